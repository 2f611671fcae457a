"""Stage 2's memory options: gradient checkpointing and autocast precision, on the clone only,
with safe defaults per device; on the fine-tune node and the command line. (What they save is
measured by `benchmark/memory.py`, not here.)"""
from __future__ import annotations

import math

import pytest
import torch

from comfy_harness import GraphError, pack, run_graph


def closed_form(model, clip, concepts="vincent van gogh"):
    comfy_models, ace = pack().nodes.comfy_models, pack().ace
    network = comfy_models.network_of(model, clip, resolution=64)
    request = ace.concepts.parse_request(concepts, "a painting")
    return ace.erasure.erase(network, request, training=ace.finetune.FinetuneConfig(steps=0))


def compute(precision="fp32", checkpointing=False):
    return pack().ace.network.TrainingCompute(precision, checkpointing)


def saved_bytes(denoise, x, sigma, context) -> int:
    """Bytes autograd keeps for the backward pass of one prediction (outside checkpointed blocks)."""
    total = 0

    def pack_hook(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        denoise(x, sigma, context).square().mean().backward()
    return total


def test_checkpointing_trains_the_same_adapter_keeping_far_fewer_activations(sdxl_model, sdxl_clip):
    comfy_models, ace = pack().nodes.comfy_models, pack().ace
    closed = closed_form(sdxl_model, sdxl_clip)
    training = ace.finetune.FinetuneConfig(steps=2, seed=3)
    runs, kept = {}, {}
    for checkpointing in (False, True):
        network = comfy_models.network_of(sdxl_model, sdxl_clip, resolution=64, compute=compute("fp32", checkpointing))
        runs[checkpointing] = ace.erasure.fine_tune(closed, network, training)
        adapter = closed.adapter
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(network.device)
        context = network.encoder.encode(["a photo of vincent van gogh", "a dog"]).to(network.device)
        with network.attach(adapter) as denoise:
            kept[checkpointing] = saved_bytes(denoise, x, torch.tensor([2.0, 2.0], device=x.device), context)
    plain, checkpointed = runs[False], runs[True]
    for a, b in zip(plain.info["history"], checkpointed.info["history"]):
        assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-7) for k in a)
    for a, b in zip(plain.adapter.parameters(), checkpointed.adapter.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert checkpointed.info["history"] != [] and kept[True] < 0.5 * kept[False]
    # on a clone only: the input MODEL has no patches, and no UNet block still runs a checkpoint
    assert not sdxl_model.object_patches
    CheckpointedForward = comfy_models.CheckpointedForward
    assert not any(isinstance(vars(m).get("forward"), CheckpointedForward)
                   for m in sdxl_model.model.diffusion_model.modules())


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_autocast_predicts_close_to_fp32_and_trains(sd2_model, sd2_clip, precision, dtype):
    comfy_models, ace = pack().nodes.comfy_models, pack().ace
    closed = closed_form(sd2_model, sd2_clip)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0, 4.0])
    outputs, inner_dtypes = {}, []
    hook = sd2_model.model.diffusion_model.out.register_forward_hook(lambda m, i, o: inner_dtypes.append(o.dtype))
    try:
        for name in ("fp32", precision):
            network = comfy_models.network_of(sd2_model, sd2_clip, resolution=64, compute=compute(name))
            context = network.encoder.encode(["a photo of vincent van gogh", "a dog"]).to(network.device)
            with network.attach(closed.adapter) as denoise, torch.no_grad():
                outputs[name] = denoise(x.to(network.device), sigma.to(network.device), context).cpu()
    finally:
        hook.remove()
    assert inner_dtypes == [torch.float32, dtype]  # the UNet really computed in half precision
    relative = ((outputs[precision] - outputs["fp32"]).norm() / outputs["fp32"].norm()).item()
    assert 0 < relative < 0.05
    network = comfy_models.network_of(sd2_model, sd2_clip, resolution=64, compute=compute(precision, True))
    tuned = ace.erasure.fine_tune(closed, network, ace.finetune.FinetuneConfig(steps=2))
    assert all(math.isfinite(v) for h in tuned.info["history"] for v in h.values())
    assert tuned.adapter.lora_down[0].dtype == torch.float32  # the adapter itself stays float32
    assert not torch.equal(tuned.adapter.lora_down[0], closed.adapter.lora_down[0])


def test_defaults_per_device_and_the_choices(sdxl_model, sd2_model, monkeypatch):
    import comfy.model_patcher

    comfy_models = pack().nodes.comfy_models
    if sd2_model.load_device.type == "cpu":
        assert comfy_models.default_compute(sd2_model) == compute("fp32", False)
        assert comfy_models.default_compute(sdxl_model) == compute("fp32", False)
    # on a CUDA device (the patcher only names it: nothing is loaded): bf16 where the GPU has it,
    # else fp16, and checkpointing for SDXL only
    on_gpu = {name: comfy.model_patcher.ModelPatcher(m.model, load_device=torch.device("cuda"),
                                                     offload_device=torch.device("cpu"))
              for name, m in (("sd2", sd2_model), ("sdxl", sdxl_model))}
    for bf16, precision in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        assert comfy_models.default_compute(on_gpu["sd2"]) == compute(precision, False)
        assert comfy_models.default_compute(on_gpu["sdxl"]) == compute(precision, True)
    with pytest.raises(ValueError, match="This GPU cannot compute in bf16: choose fp16 or fp32"):
        comfy_models.training_compute(on_gpu["sd2"], "bf16", "auto")
    # what a user picks wins over the default; "auto" is the default
    assert comfy_models.training_compute(sd2_model, "bf16", "on") == compute("bf16", True)
    assert comfy_models.training_compute(sd2_model) == comfy_models.default_compute(sd2_model)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        comfy_models.training_compute(sd2_model, "fp8")
    with pytest.raises(ValueError, match="gradient checkpointing must be one of auto, on, off"):
        comfy_models.training_compute(sd2_model, "auto", "yes")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        compute("half")


def fine_tune_graph(tiny_sd15_name, **options):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15_name}},
        "c": {"class_type": "ACEErasure_ConceptList", "inputs": {"concepts": "snoopy", "anchor": "a dog", "preserve": ""}},
        "s1": {"class_type": "ACEErasure_ClosedForm", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["c", 0], "rank": 4, "preserve_weight": 1.0, "expand": False}},
        "s2": {"class_type": "ACEErasure_FineTune", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "erasure": ["s1", 0], "steps": 2, "learning_rate": 5e-3,
            "adversarial_weight": 1.0, "preserve_weight": 1.0, "guidance": 1.0, "resolution": 64, "seed": 0,
            **options}},
        "curve": {"class_type": "PreviewImage", "inputs": {"images": ["s2", 1]}},
    }


def test_fine_tune_node_takes_precision_and_checkpointing(tiny_sd15_name):
    result = run_graph(fine_tune_graph(tiny_sd15_name, precision="bf16", gradient_checkpointing="on"), fresh_cache=True)
    tuned = result.outputs["s2"][0]
    assert tuned.info["stage2_compute"] == {"precision": "bf16", "checkpointing": True}
    assert all(math.isfinite(v) for h in tuned.info["history"] for v in h.values())
    # left out (as in workflows saved before these inputs existed): the device's defaults
    result = run_graph(fine_tune_graph(tiny_sd15_name), fresh_cache=True)
    default = pack().nodes.comfy_models.default_compute(result.outputs["1"][0])
    assert result.outputs["s2"][0].info["stage2_compute"] == {"precision": default.precision,
                                                              "checkpointing": default.checkpointing}
    with pytest.raises(GraphError, match="precision"):
        run_graph(fine_tune_graph(tiny_sd15_name, precision="fp8"))
