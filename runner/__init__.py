"""Run this pack's workflows on a real ComfyUI: start its server with the pack (`server`), turn
the shipped UI workflows into API prompts (`workflows`), and the demo on the toy model (`demo`)
with the template browser's thumbnails it renders (`thumbnails`, `pictures`).

Used by `scripts/demo.sh` and by the tests; not loaded by ComfyUI (the pack's entry point is the
repository's `__init__.py`).
"""
