"""The ACE nodes in the real ComfyUI executor, on the tiny SD1.5 checkpoint and in-memory models."""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from comfy_harness import GraphError, in_memory_model_node, pack, run_graph

CONCEPT = "van gogh: vincent van gogh"


def ckpt(name):
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}


def erase_node(concepts=CONCEPT, steps=0, strength=1.0, anchor="a painting", preserve="monet", model=("1", 0), clip=("1", 1),
               expand=False):
    """ACE Erase Concept on the tiny checkpoint; concept expansion off unless asked (its random
    CLIP-L encodes a whole window per word it scans, minutes on a CPU: one test turns it on)."""
    return {
        "class_type": "ACEErasure_EraseConcept",
        "inputs": {"model": list(model), "clip": list(clip), "concepts": concepts, "anchor": anchor,
                   "preserve": preserve, "strength": strength, "steps": steps, "seed": 0, "expand": expand},
    }


def render(prefix: str, model, prompt: str, seed: int = 1) -> dict:
    """Nodes that render `prompt` with `model` (64 px, 3 steps): ids prefix+{p,n,l,k,d}."""
    return {
        f"{prefix}p": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        f"{prefix}n": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        f"{prefix}l": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{prefix}k": {"class_type": "KSampler", "inputs": {
            "model": list(model), "seed": seed, "steps": 3, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": [f"{prefix}p", 0], "negative": [f"{prefix}n", 0],
            "latent_image": [f"{prefix}l", 0], "denoise": 1.0}},
        f"{prefix}d": {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}k", 0], "vae": ["1", 2]}},
        f"{prefix}o": {"class_type": "PreviewImage", "inputs": {"images": [f"{prefix}d", 0]}},
    }


def image(result, prefix):
    return result.outputs[f"{prefix}d"][0]


def test_erase_concept_changes_the_concept_and_leaves_the_input_model_alone(tiny_sd15_name):
    base_only = {"1": ckpt(tiny_sd15_name), **render("a", ("1", 0), "a painting by van gogh")}
    alone = run_graph(base_only, fresh_cache=True)
    both = {
        "1": ckpt(tiny_sd15_name),
        "2": erase_node(),
        **render("a", ("1", 0), "a painting by van gogh"),
        **render("b", ("2", 0), "a painting by van gogh"),
        **render("c", ("2", 0), "a bowl of fruit on a table"),
        **render("e", ("1", 0), "a bowl of fruit on a table"),
    }
    result = run_graph(both, fresh_cache=True)
    # the branch without ACE renders exactly as in the graph without the ACE branch
    assert torch.equal(image(result, "a"), image(alone, "a"))
    erased, unrelated, unrelated_base = image(result, "b"), image(result, "c"), image(result, "e")
    concept_change = (erased - image(result, "a")).abs().mean().item()
    unrelated_change = (unrelated - unrelated_base).abs().mean().item()
    assert concept_change > 1e-3
    assert unrelated_change < 0.1 * concept_change
    erasure = result.outputs["2"][1]
    assert [c.target for c in erasure.request.concepts] == ["van gogh"]
    assert erasure.info["stage1_seconds"] > 0 and erasure.num_res_blocks == 1


def test_rerunning_unchanged_graph_reuses_the_erasure(tiny_sd15_name):
    graph = {"1": ckpt(tiny_sd15_name), "2": erase_node(concepts="snoopy"), **render("b", ("2", 0), "snoopy")}
    first = run_graph(graph, fresh_cache=True)
    second = run_graph(graph)
    assert second.outputs["2"][1] is first.outputs["2"][1]  # cached, not recomputed
    executed = [d for e, d in second.messages if e == "execution_cached"]
    assert "2" in executed[0]["nodes"]


def test_fine_tuning_node_trains_with_progress_and_a_loss_curve(tiny_sd15_name):
    graph = {
        "1": ckpt(tiny_sd15_name),
        "c": {"class_type": "ACEErasure_ConceptList", "inputs": {"concepts": CONCEPT, "anchor": "a painting", "preserve": ""}},
        "s1": {"class_type": "ACEErasure_ClosedForm", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["c", 0], "rank": 4, "preserve_weight": 1.0, "expand": False}},
        "s2": {"class_type": "ACEErasure_FineTune", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "erasure": ["s1", 0], "steps": 3, "learning_rate": 5e-3,
            "adversarial_weight": 1.0, "preserve_weight": 1.0, "guidance": 1.0, "resolution": 64, "seed": 0}},
        "apply": {"class_type": "ACEErasure_Apply", "inputs": {"model": ["1", 0], "erasure": ["s2", 0], "strength": 1.0}},
        **render("b", ("apply", 0), "a painting by van gogh"),
    }
    result = run_graph(graph, fresh_cache=True)
    tuned, curve = result.outputs["s2"]
    assert len(tuned.info["history"]) == 3 and tuned.info["stage2_seconds"] > 0
    assert curve.shape == (1, 256, 512, 3)
    assert result.ui["s2"]["images"]
    closed = result.outputs["s1"][0]
    assert closed.adapter.rank == 4
    # the input erasure is not changed by fine-tuning it
    assert not torch.equal(closed.adapter.lora_down[0], tuned.adapter.lora_down[0])
    assert torch.isfinite(image(result, "b")).all()


def test_save_load_apply_and_lora_export(tiny_sd15_name, tiny_sd15, comfy):
    graph = {
        "1": ckpt(tiny_sd15_name),
        "2": erase_node(),
        "sv": {"class_type": "ACEErasure_Save", "inputs": {"erasure": ["2", 1], "file_name": "test_vg", "overwrite": True}},
        "ex": {"class_type": "ACEErasure_ExportLoRA", "inputs": {"erasure": ["2", 1], "file_name": "test_vg_lora", "strength": 1.0, "overwrite": True}},
    }
    result = run_graph(graph, fresh_cache=True)
    assert result.outputs["sv"][0] == "test_vg.safetensors"
    load = {
        "1": ckpt(tiny_sd15_name),
        "2": erase_node(),
        "ld": {"class_type": "ACEErasure_Load", "inputs": {"file_name": "test_vg.safetensors"}},
        "apply": {"class_type": "ACEErasure_Apply", "inputs": {"model": ["1", 0], "erasure": ["ld", 0], "strength": 1.0}},
        **render("a", ("2", 0), "van gogh"),
        **render("b", ("apply", 0), "van gogh"),
    }
    loaded = run_graph(load)
    assert torch.equal(image(loaded, "a"), image(loaded, "b"))  # loaded erasure == computed one

    # the portable LoRA through ComfyUI's own LoraLoader == the erasure with every gate open
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import folder_paths

    model, clip, _ = tiny_sd15
    erasure = result.outputs["2"][1]
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", "test_vg_lora.safetensors"), safe_load=True)
    lora_model, _ = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 0.0)
    assert len(lora_model.patches) == 2 * 4  # every to_k / to_v of the tiny UNet
    open_gate = dataclasses.replace(erasure, adapter=_open(erasure.adapter))
    gated_model = pack().nodes.comfy_models.with_erasure(model, open_gate, 1.0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([2.0])
    context = clip.encode_from_tokens(clip.tokenize("a painting by van gogh"))
    outs = []
    for m in (lora_model, gated_model, model):
        comfy.model_management.load_models_gpu([m])
        outs.append(m.model.apply_model(x.to(m.load_device), sigma.to(m.load_device),
                                        c_crossattn=context.to(m.load_device)).cpu())
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(outs[0], outs[2], atol=1e-4)


def _open(adapter):
    import copy

    opened = copy.deepcopy(adapter)
    with torch.no_grad():
        opened.gate_threshold.fill_(-1e9)
        opened.gate_log_temperature.fill_(0.0)
    return opened


def test_other_families_erase_and_apply_in_memory(sd2_model, sdxl_model, sd2_clip, sdxl_clip, comfy):
    """SD2.x and SDXL with ComfyUI's own text encoders of each (OpenCLIP-H; CLIP-L + CLIP-G, small
    and random): stages 1 and 2 on their cross-attention layers, then the erased clone samples."""
    ace_erasure = pack().ace.erasure
    comfy_models = pack().nodes.comfy_models
    import comfy.model_management
    import comfy.sd

    for model, clip, family, width in ((sd2_model, sd2_clip, "sd2", 1024), (sdxl_model, sdxl_clip, "sdxl", 2048)):
        projections = comfy_models.check_model(model)
        assert comfy_models.family_of(model) == family and projections[0].in_features == width
        request = pack().ace.concepts.parse_request("snoopy", "a dog", "")
        network = comfy_models.network_of(model, clip, resolution=64)
        erasure = ace_erasure.erase(network, request, training=pack().ace.finetune.FinetuneConfig(steps=2))
        assert len(erasure.info["history"]) == 2
        assert all(math.isfinite(v) for h in erasure.info["history"] for v in h.values())
        erased = comfy_models.with_erasure(model, erasure, 1.0)
        # one ACE forward per projection, and the guard that makes savers refuse the unbaked MODEL
        assert sorted(erased.object_patches) == sorted([f"diffusion_model.{p.name}.forward" for p in projections] + [comfy_models.SAVE_GUARD])
        assert not model.object_patches  # the input MODEL is not changed
        comfy.model_management.load_models_gpu([erased])
        device = model.load_device
        x, sigma = torch.randn(1, 4, 8, 8).to(device), torch.tensor([1.0], device=device)
        context, pooled = network.encoder.encode_pooled(["a photo of snoopy"])
        y = comfy_models.adm_conditioning(erased.model, x, None if pooled is None else pooled.to(device))
        out = erased.model.apply_model(x, sigma, c_crossattn=context.to(device), **({} if y is None else {"y": y}))
        assert out.shape == x.shape and torch.isfinite(out).all()
        # the portable LoRA's keys (diffusers names for SD2, LDM names for SDXL) all map in ComfyUI
        lora = pack().ace.files.lora_state_dict(erasure)
        lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        assert len(lora_model.patches) == len(projections)


def test_erasure_for_another_family_is_refused(tiny_sd15_name, sdxl_model):
    graph = {
        "1": ckpt(tiny_sd15_name),
        "2": erase_node(concepts="snoopy"),
        "x": in_memory_model_node("sdxl", sdxl_model),
        "apply": {"class_type": "ACEErasure_Apply", "inputs": {"model": ["x", 0], "erasure": ["2", 1], "strength": 1.0}},
        "info": {"class_type": "ACEErasure_ModelInfo", "inputs": {"model": ["apply", 0]}},
    }
    with pytest.raises(GraphError, match="made for a sd1 model and cannot be applied to a sdxl model"):
        run_graph(graph)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"concepts": "  "}, "No concept to erase"),
        ({"concepts": "a painting"}, "is its own anchor"),
        ({"strength": math.nan}, "Strength must be a number"),
        ({"steps": -1}, "steps"),
    ],
)
def test_erase_concept_bad_input(tiny_sd15_name, change, message):
    node = erase_node()
    node["inputs"].update(change)
    with pytest.raises(GraphError, match=message):
        run_graph({"1": ckpt(tiny_sd15_name), "2": node, **render("b", ("2", 0), "x")})


def test_rank_zero_is_refused_before_running(tiny_sd15_name):
    graph = {
        "1": ckpt(tiny_sd15_name),
        "c": {"class_type": "ACEErasure_ConceptList", "inputs": {"concepts": "snoopy", "anchor": "", "preserve": ""}},
        "s1": {"class_type": "ACEErasure_ClosedForm", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["c", 0], "rank": 0, "preserve_weight": 1.0, "expand": False}},
        "sv": {"class_type": "ACEErasure_Save", "inputs": {"erasure": ["s1", 0], "file_name": "never", "overwrite": True}},
    }
    with pytest.raises(GraphError, match="rank"):
        run_graph(graph)


@pytest.mark.parametrize("name", ["../evil", "sub/dir", "..", "/tmp/x"])
def test_save_refuses_paths_and_writes_nothing(tiny_sd15_name, comfy, name):
    import folder_paths

    folder = folder_paths.get_folder_paths("ace_erasures")[0]
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    graph = {"1": ckpt(tiny_sd15_name), "2": erase_node(concepts="snoopy"),
             "sv": {"class_type": "ACEErasure_Save", "inputs": {"erasure": ["2", 1], "file_name": name, "overwrite": True}}}
    with pytest.raises(GraphError, match="folder or '..'|characters"):
        run_graph(graph)
    after = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    assert after == before


def test_load_refuses_corrupted_and_foreign_files(comfy):
    import folder_paths

    folder = folder_paths.get_folder_paths("ace_erasures")[0]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "broken.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, os.path.join(folder, "a_lora.safetensors"))
    for name, message in (("broken.safetensors", "corrupted"), ("a_lora.safetensors", "not an ACE erasure file")):
        with pytest.raises(GraphError, match=message):
            run_graph({
                "ld": {"class_type": "ACEErasure_Load", "inputs": {"file_name": name}},
                "sv": {"class_type": "ACEErasure_Save", "inputs": {"erasure": ["ld", 0], "file_name": "never", "overwrite": True}},
            })


def test_cancel_stops_fine_tuning_within_a_step_and_leaves_the_model_clean(tiny_sd15_name, tiny_sd15):
    import comfy.model_management
    import comfy.utils

    graph = {
        "1": ckpt(tiny_sd15_name),
        "c": {"class_type": "ACEErasure_ConceptList", "inputs": {"concepts": "snoopy", "anchor": "a dog", "preserve": ""}},
        "s1": {"class_type": "ACEErasure_ClosedForm", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["c", 0], "rank": 4, "preserve_weight": 1.0, "expand": False}},
        "s2": {"class_type": "ACEErasure_FineTune", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "erasure": ["s1", 0], "steps": 50, "learning_rate": 5e-3,
            "adversarial_weight": 1.0, "preserve_weight": 1.0, "guidance": 1.0, "resolution": 64, "seed": 0}},
        "sv": {"class_type": "ACEErasure_Save", "inputs": {"erasure": ["s2", 0], "file_name": "cancelled", "overwrite": True}},
        **render("a", ("1", 0), "snoopy"),
    }
    before = image(run_graph({"1": ckpt(tiny_sd15_name), **render("a", ("1", 0), "snoopy")}), "a")
    steps_seen = []

    def hook(value, total, preview, node_id=None):
        if total == 50:  # the fine-tuning's bar: press Cancel at step 2
            steps_seen.append(value)
            if value == 2:
                comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(GraphError) as failure:
            run_graph(graph)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert "interrupted" in str(failure.value)
    assert max(steps_seen) == 2  # stopped right after the step Cancel came in
    # nothing half-patched: no projection still runs the half-trained adapter (an erasure applied
    # by an earlier graph may legitimately stay loaded), and the base renders as before
    model = tiny_sd15[0]

    def runs_a_trainable_adapter(forward) -> bool:
        while hasattr(forward, "edit"):  # an ACE forward (others: ComfyUI's restored originals)
            if any(p.requires_grad for p in forward.edit.parameters()):
                return True
            forward = forward.inner
        return False

    assert not any(runs_a_trainable_adapter(vars(m).get("forward")) for m in model.model.diffusion_model.modules())
    import folder_paths

    assert folder_paths.get_full_path("ace_erasures", "cancelled.safetensors") is None
    after = image(run_graph({"1": ckpt(tiny_sd15_name), **render("a", ("1", 0), "snoopy")}), "a")
    assert torch.equal(before, after)


def test_chained_erasures_add_up(tiny_sd15_name):
    """Two ACE nodes in a row keep both edits: half + half renders as the full erasure."""
    graph = {
        "1": ckpt(tiny_sd15_name),
        "2": erase_node(concepts="snoopy", strength=1.0),
        "h1": {"class_type": "ACEErasure_Apply", "inputs": {"model": ["1", 0], "erasure": ["2", 1], "strength": 0.5}},
        "h2": {"class_type": "ACEErasure_Apply", "inputs": {"model": ["h1", 0], "erasure": ["2", 1], "strength": 0.5}},
        **render("f", ("2", 0), "snoopy"),
        **render("h", ("h2", 0), "snoopy"),
        **render("q", ("h1", 0), "snoopy"),
    }
    result = run_graph(graph)
    full, halves, half = image(result, "f"), image(result, "h"), image(result, "q")
    assert torch.allclose(full, halves, atol=2e-3)
    assert (full - half).abs().max() > 10 * (full - halves).abs().max()


def test_fine_tuning_on_a_model_that_already_carries_an_erasure(tiny_sd15_name):
    """ACE Erase Concept with stage 2 on an erased MODEL: it trains through the upstream adapter
    (whose tensors ComfyUI made in inference mode) and leaves that erasure unchanged (that chained
    edits add up is `test_chained_erasures_add_up`)."""
    graph = {
        "1": ckpt(tiny_sd15_name),
        "2": erase_node(concepts="snoopy", anchor="a dog", preserve=""),
        "3": erase_node(steps=2, model=("2", 0)),
        **render("a", ("2", 0), "a painting by van gogh"),
        **render("b", ("3", 0), "a painting by van gogh"),
        **render("s", ("2", 0), "snoopy"),
    }
    result = run_graph(graph, fresh_cache=True)
    first, second = result.outputs["2"][1], result.outputs["3"][1]
    history = second.info["history"]
    assert len(history) == 2 and all(math.isfinite(v) for h in history for v in h.values())
    assert all(p.grad is None for p in first.adapter.parameters())  # nothing flowed into the upstream erasure
    assert (image(result, "a") - image(result, "b")).abs().max() > 1e-3  # the second erasure acts
    alone = run_graph({"1": ckpt(tiny_sd15_name), "2": erase_node(concepts="snoopy", anchor="a dog", preserve=""),
                       **render("s", ("2", 0), "snoopy")})
    assert torch.equal(image(result, "s"), image(alone, "s"))  # the upstream erasure is as it was


def test_weights_come_from_the_model_not_from_another_clone_loaded_in_memory(tiny_sd15):
    """ComfyUI patches shared weights in place for the clone it loaded last (a LoRA branch); the
    erasure must still be solved against this MODEL's own weights."""
    import comfy.model_management

    comfy_models = pack().nodes.comfy_models
    model = tiny_sd15[0]
    projections = comfy_models.check_model(model)
    name = projections[0].name
    key = f"diffusion_model.{name}.weight"
    original = {k: v.detach().clone() for k, v in comfy_models.projection_weights(model, projections).items()}
    other = model.clone()
    other.add_patches({key: (torch.ones_like(original[name]),)}, 1.0)
    mine = model.clone()
    mine.add_patches({key: (torch.full_like(original[name], 2.0),)}, 1.0)
    try:
        for loaded in (other, mine):  # another clone patched in memory, then this MODEL's own clone
            comfy.model_management.load_models_gpu([loaded], force_full_load=True)
            in_memory = dict(comfy_models.unet_of(model).named_modules())[name].weight
            assert not torch.equal(in_memory, original[name])
            assert all(torch.equal(w, original[k]) for k, w in comfy_models.projection_weights(model, projections).items())
            assert torch.allclose(comfy_models.projection_weights(mine, projections)[name], original[name] + 2.0)
    finally:
        comfy.model_management.unload_all_models()
    assert torch.equal(dict(comfy_models.unet_of(model).named_modules())[name].weight, original[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_comfy_model_trains_and_samples(comfy, sd2_clip, dtype):
    """A MODEL whose UNet runs in fp16/bf16: stage 2 trains the float32 adapter through it inside
    ComfyUI's model management, and the erased clone's output is finite and differs from the base."""
    import comfy.model_management

    from comfy_harness import tiny_sd2_model

    model = tiny_sd2_model(dtype=dtype)
    assert model.model.get_dtype() == dtype
    comfy_models = pack().nodes.comfy_models
    network = comfy_models.network_of(model, sd2_clip, resolution=64)
    erasure = pack().ace.erasure.erase(network, pack().ace.concepts.parse_request("snoopy", "a dog"),
                                       training=pack().ace.finetune.FinetuneConfig(steps=2))
    assert all(math.isfinite(v) for h in erasure.info["history"] for v in h.values())
    assert erasure.adapter.lora_down[0].dtype == torch.float32
    device = model.load_device
    x, sigma = torch.randn(1, 4, 8, 8).to(device), torch.tensor([1.0], device=device)
    context = network.encoder.encode(["snoopy"]).to(device)
    outs = []
    for m in (model, comfy_models.with_erasure(model, erasure, 1.0)):
        comfy.model_management.load_models_gpu([m])
        outs.append(m.model.apply_model(x, sigma, c_crossattn=context).float())
    assert torch.isfinite(outs[1]).all() and not torch.equal(outs[0], outs[1])
