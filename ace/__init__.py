"""ACE (Attentional Concept Erasure) in plain torch, importable without ComfyUI.

The data path, one module a stage:
concepts (request) -> tokens (stage 0: C, N, P) -> closed_form (stage 1) -> adapter (the gated
edit) -> finetune (stage 2) -> erasure (the result, and `erase`, all stages in order on a
`network.Network`) -> files. The host (ComfyUI, through `nodes/comfy_models.py`) builds the
`Network`; nothing here imports it.
"""
