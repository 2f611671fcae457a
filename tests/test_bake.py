"""An erased model saved as a checkpoint stays erased: ACE Bake Erasure writes the erasure into
the weights (gate open), ComfyUI's own Save Checkpoint writes them, and a MODEL that still carries
the gated erasure in its forward pass is refused by every saver instead of being saved un-erased."""
from __future__ import annotations

import copy
import dataclasses
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_harness import REPO, pack

PROMPT = "a painting by van gogh"


def erase_node(model=("1", 0), clip=("1", 1)) -> dict:
    return {"class_type": "ACEErasure_EraseConcept", "inputs": {
        "model": list(model), "clip": list(clip), "concepts": "van gogh: vincent van gogh", "anchor": "a painting",
        "preserve": "monet", "strength": 1.0, "steps": 0, "seed": 0, "expand": False}}


def render(prefix: str, model, text: str = PROMPT) -> dict:
    """Nodes that render `text` with `model` at 64 px and save it: ids prefix+{p,n,l,k,d,s}."""
    return {
        f"{prefix}p": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        f"{prefix}n": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        f"{prefix}l": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{prefix}k": {"class_type": "KSampler", "inputs": {
            "model": list(model), "seed": 3, "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": [f"{prefix}p", 0], "negative": [f"{prefix}n", 0], "latent_image": [f"{prefix}l", 0],
            "denoise": 1.0}},
        f"{prefix}d": {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}k", 0], "vae": ["1", 2]}},
        f"{prefix}s": {"class_type": "SaveImage", "inputs": {"images": [f"{prefix}d", 0], "filename_prefix": f"bake/{prefix}"}},
    }


def saved_picture(server, entry: dict, prefix: str) -> np.ndarray:
    (image,) = entry["outputs"][f"{prefix}s"]["images"]
    with Image.open(server.image_path(image)) as png:
        return np.asarray(png.convert("RGB"), dtype=np.float32) / 255


def checkpoint_node(name: str) -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}


@pytest.mark.slow
def test_baked_checkpoint_saved_by_comfyui_reloads_and_renders_erased(comfy_server, tiny_sd15_checkpoint):
    graph = {
        "1": checkpoint_node(tiny_sd15_checkpoint.name),
        "2": erase_node(),
        "3": {"class_type": "ACEErasure_Bake", "inputs": {"model": ["2", 0]}},
        "4": {"class_type": "CheckpointSave", "inputs": {"model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                          "filename_prefix": "checkpoints/no_van_gogh_test"}},
        **render("base", ("1", 0)),
        **render("baked", ("3", 0)),
    }
    entry = comfy_server.run(graph, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    (saved,) = (comfy_server.base_dir / "output" / "checkpoints").glob("no_van_gogh_test_*.safetensors")
    shutil.copy(saved, comfy_server.base_dir / "models" / "checkpoints" / "reloaded_no_van_gogh.safetensors")

    reload = {"1": checkpoint_node("reloaded_no_van_gogh.safetensors"), **render("reloaded", ("1", 0))}
    again = comfy_server.run(reload, timeout=300)
    assert again["status"]["status_str"] == "success", again["status"]["messages"]
    base, baked = saved_picture(comfy_server, entry, "base"), saved_picture(comfy_server, entry, "baked")
    reloaded = saved_picture(comfy_server, again, "reloaded")
    # The file renders as the baked MODEL did (8-bit pictures: within 2/255), and not as the base.
    assert np.abs(reloaded - baked).max() <= 2 / 255
    assert np.abs(reloaded - base).mean() > 0.02


@pytest.mark.slow
def test_save_checkpoint_refuses_an_erased_model_that_is_not_baked(comfy_server, tiny_sd15_checkpoint):
    graph = {
        "1": checkpoint_node(tiny_sd15_checkpoint.name),
        "2": erase_node(),
        "4": {"class_type": "CheckpointSave", "inputs": {"model": ["2", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                          "filename_prefix": "checkpoints/not_baked"}},
    }
    entry = comfy_server.run(graph, timeout=300)
    assert entry["status"]["status_str"] == "error"
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "CheckpointSave" and error["exception_type"].endswith("UnbakedErasureError")
    assert "ACE Bake Erasure" in error["exception_message"] and "original model" in error["exception_message"]
    assert not list((comfy_server.base_dir / "output").rglob("not_baked*"))


def test_baked_model_is_the_open_gate_erasure_and_the_exported_lora(tiny_sd15):
    """Baking = every gate open = the portable LoRA, as weights; other clones are untouched."""
    import comfy.model_management
    import comfy.sd

    model, clip, _ = tiny_sd15
    ace, comfy_models = pack().ace, pack().nodes.comfy_models
    request = ace.concepts.parse_request("van gogh", "a painting", "monet")
    erasure = pack().nodes.erase.erase_from_model(model, clip, request, ace.closed_form.ClosedFormConfig(),
                                                  ace.finetune.FinetuneConfig(steps=0),
                                                  expansion=ace.expansion.ExpansionConfig(enabled=False))
    erased = comfy_models.with_erasure(model, erasure, 0.8)
    baked = comfy_models.baked(erased)
    assert not [k for k in baked.object_patches if k.endswith(".forward")] and len(baked.patches) == 8
    assert comfy_models.SAVE_GUARD in erased.object_patches and comfy_models.SAVE_GUARD not in baked.object_patches

    opened = copy.deepcopy(erasure.adapter)
    with torch.no_grad():
        opened.gate_threshold.fill_(-1e9)
    open_gate = comfy_models.with_erasure(model, dataclasses.replace(erasure, adapter=opened), 0.8)
    lora, _ = comfy.sd.load_lora_for_models(model, None, ace.files.lora_state_dict(erasure, 0.8), 1.0, 0.0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, context = torch.tensor([2.0]), clip.encode_from_tokens(clip.tokenize(PROMPT))
    outs = {}
    for name, m in (("base", model), ("open", open_gate), ("baked", baked), ("lora", lora)):
        comfy.model_management.load_models_gpu([m])
        outs[name] = m.model.apply_model(x, sigma, c_crossattn=context).float()
    assert torch.allclose(outs["baked"], outs["open"], atol=1e-4)
    assert torch.allclose(outs["baked"], outs["lora"], atol=1e-4)
    assert (outs["baked"] - outs["base"]).abs().max() > 100 * (outs["baked"] - outs["open"]).abs().max()
    with pytest.raises(ValueError, match="carries no ACE erasure to bake"):
        comfy_models.baked(model)


def test_command_line_bakes_a_checkpoint_comfyui_loads(tiny_sd15_checkpoint, tmp_path):
    import comfy.sd

    out, erasure_file = tmp_path / "no_van_gogh.safetensors", tmp_path / "erasure.safetensors"
    run = subprocess.run([sys.executable, "-m", "runner", "erase", str(tiny_sd15_checkpoint), "--concepts", "van gogh",
                          "--anchor", "a painting", "--steps", "0", "--no-expand", "--threads", "1", "--bake", str(out),
                          "--erasure", str(erasure_file)],
                         cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wrote the erased checkpoint" in run.stdout
    base, *_ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_checkpoint))
    reloaded, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(out), output_vae=True, output_clip=True)
    assert clip is not None and vae is not None
    erasure = pack().ace.files.load_erasure(str(erasure_file))
    # Each to_k / to_v weight of the file is the base weight plus the open-gate edit.
    modules = dict(reloaded.model.diffusion_model.named_modules())
    original = dict(base.model.diffusion_model.named_modules())
    for i, projection in enumerate(erasure.projections):
        expected = original[projection.name].weight.float() + erasure.adapter.weight_delta(i)
        assert torch.allclose(modules[projection.name].weight.float(), expected, atol=2e-3), projection.name


def test_command_line_bake_needs_a_checkpoint(tmp_path):
    run = subprocess.run([sys.executable, "-m", "runner", "erase", "--toy", "--concepts", "circle",
                          "--bake", str(tmp_path / "x.safetensors")],
                         cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode != 0 and "--bake writes a checkpoint" in run.stderr
