"""The template browser's thumbnails, `example_workflows/<name>.jpg`, from what each workflow really makes.

ComfyUI's template browser shows example_workflows/<name>.jpg on the card of example_workflows/<name>.json. Each
shipped workflow runs on the toy model (`runner.workflows.for_toy_model`: the toy loader for the
checkpoint, the painters as the toy's named entities, toy sizes), and its thumbnail shows the
pictures it saved, enlarged; a workflow that saves no picture shows what its nodes reported.
The demo's own thumbnail is its before/after grid. Run through the demo:

    bash scripts/demo.sh --thumbnails
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from runner.pictures import BEFORE_AFTER, Row, grid, thumbnail
from runner.server import ComfyServer, GraphError
from runner.workflows import DEMO, for_toy_model, load, shipped, to_api

CAPTION = "rendered on ACE's toy model (16x16 pictures)"


def _exported_loras(paths: list[Path]) -> list[str]:
    """The LoRA files the shipped workflows export (a later workflow's Load LoRA takes one)."""
    return [f"{n['widgets_values'][0]}.safetensors" for p in paths for n in load(p)["nodes"]
            if n["type"] == "ACEErasure_ExportLoRA"]


def demo_thumbnail(demo_out: Path, result: dict) -> Image.Image:
    """The demo's before/after pictures, one row per prompt, without labels."""
    rows = [Row([], [[Image.open(demo_out / p["file"]) for p in r[which]["pictures"]] for which in ("before", "after")])
            for r in result["prompts"]]
    return thumbnail([grid(rows, BEFORE_AFTER, scale=1, labels=False, gap=4)], [], CAPTION)


def workflow_thumbnail(server: ComfyServer, path: Path, object_info: dict, lora_name: str | None) -> Image.Image:
    prompt = for_toy_model(to_api(load(path), object_info), lora_name)
    entry = server.run(prompt, timeout=600)
    if entry["status"]["status_str"] != "success":
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        raise GraphError(f"{path.stem} failed on the toy model: {errors or entry['status']}")
    pictures, texts = [], []
    for node_id in sorted(prompt, key=int):
        outputs = entry["outputs"].get(node_id, {})
        if prompt[node_id]["class_type"] == "SaveImage":
            pictures += [Image.open(server.image_path(image)).convert("RGB") for image in outputs.get("images", [])]
        texts += outputs.get("text", [])
    return thumbnail(pictures, texts, CAPTION)


def render_thumbnails(server: ComfyServer, demo_out: Path, demo_result: dict | None = None) -> list[Path]:
    """Write example_workflows/<name>.jpg for every shipped workflow; return the paths written. The
    workflows run in name order, so one that saves an erasure or a LoRA runs before those that
    load it."""
    paths = shipped()
    object_info = server.get("/object_info", timeout=60)
    loras = _exported_loras(paths)
    written = []
    for path in paths:
        if path == DEMO:
            result = demo_result or json.loads((demo_out / "results.json").read_text())
            card = demo_thumbnail(demo_out, result)
        else:
            card = workflow_thumbnail(server, path, object_info, loras[0] if loras else None)
        target = path.with_suffix(".jpg")
        card.save(target, quality=90)
        written.append(target)
    return written
