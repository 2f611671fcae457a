"""The portable LoRA: exact or compressed to a total rank (SVD, error reported), with metadata
naming the base model family; loaded by ComfyUI's LoraLoader and by diffusers (with peft)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from comfy_harness import pack, run_graph, tiny_sd2_model

CONCEPTS, RANK = 3, 12  # three concepts, one joint edit of rank 12: an exact LoRA of rank 12


def random_erasure(model, seed: int = 0):
    """An erasure of three concepts whose adapter holds a random joint edit for every
    cross-attention projection of `model` (what the export does depends on the adapter, not on how
    it was fitted)."""
    ace, comfy_models = pack().ace, pack().nodes.comfy_models
    projections = comfy_models.check_model(model)
    g = torch.Generator().manual_seed(seed)
    d, K, kg = projections[0].in_features, CONCEPTS, 2
    adapter = ace.adapter.GatedAdapter(
        projections, gate_basis=torch.randn(K, d, kg, generator=g), gate_center=torch.zeros(K, d),
        gate_threshold=torch.zeros(K), gate_log_temperature=torch.zeros(K),
        lora_down=[torch.randn(RANK, p.in_features, generator=g) / p.in_features ** 0.5 for p in projections],
        lora_up=[torch.randn(p.out_features, RANK, generator=g) / RANK ** 0.5 for p in projections])
    request = ace.concepts.parse_request("snoopy\nvan gogh\nmonet", "a picture")
    return ace.erasure.Erasure(comfy_models.family_of(model), request, adapter, comfy_models.num_res_blocks(model),
                               {"prediction": comfy_models.prediction_type(model)})


def open_gate_delta(erasure, index: int, strength: float = 1.0) -> torch.Tensor:
    a = erasure.adapter
    return strength * a.lora_up[index].detach() @ a.lora_down[index].detach()


def lora_pair(lora, key_prefix: str):
    return lora.tensors[f"{key_prefix}.lora_up.weight"], lora.tensors[f"{key_prefix}.lora_down.weight"]


def test_exact_and_compressed_lora_with_their_error(sdxl_model):
    files = pack().ace.files
    erasure = random_erasure(sdxl_model)
    exact = files.portable_lora(erasure, strength=0.5)
    assert exact.rank == RANK and exact.max_error == 0.0
    compressed = files.portable_lora(erasure, strength=0.5, rank=5)
    assert compressed.rank == 5 and 0 < compressed.mean_error <= compressed.max_error < 1
    for i, p in enumerate(erasure.projections):
        key = files.lora_key(erasure, p.name)
        assert key == "lora_unet_" + p.name.replace(".", "_")  # SDXL: LDM names, as kohya's SDXL LoRAs
        delta = open_gate_delta(erasure, i, 0.5)
        up, down = lora_pair(exact, key)
        assert up.shape == (p.out_features, 12) and down.shape == (12, p.in_features)
        assert torch.allclose(up @ down, delta, atol=1e-5)
        up, down = lora_pair(compressed, key)
        assert up.shape == (p.out_features, 5) and down.shape == (5, p.in_features)
        assert compressed.tensors[f"{key}.alpha"].item() == 5.0
        # the reported error is the real one, and the best any rank-5 LoRA can do (Eckart-Young)
        real = ((delta - up @ down).norm() / delta.norm()).item()
        s = torch.linalg.svdvals(delta.double())
        best = (s[5:].square().sum() / s.square().sum()).sqrt().item()
        assert compressed.errors[p.name] == pytest.approx(real, rel=1e-3, abs=1e-6)
        assert real == pytest.approx(best, rel=1e-3, abs=1e-6)
    # a total rank at or above the exact one is the exact LoRA
    assert files.portable_lora(erasure, rank=50).rank == 12 and files.portable_lora(erasure, rank=50).max_error == 0
    with pytest.raises(ValueError, match="LoRA rank must be a whole number of at least 1"):
        files.portable_lora(erasure, rank=0)


@pytest.mark.parametrize("family, version, architecture, prediction", [
    ("sd1", "sd_v1", "stable-diffusion-v1/lora", "epsilon"),
    ("sd2", "sd_v2", "stable-diffusion-v2-512/lora", "epsilon"),
    ("sd2-v", "sd_v2", "stable-diffusion-v2-768-v/lora", "v"),
    ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "epsilon"),
])
def test_metadata_names_the_base_model_and_comfyui_loads_every_key(request, tmp_path, family, version, architecture,
                                                                    prediction):
    import comfy.sd

    model = {"sd1": lambda: request.getfixturevalue("tiny_sd15")[0], "sd2": lambda: request.getfixturevalue("sd2_model"),
             "sd2-v": lambda: tiny_sd2_model(v_prediction=True),
             "sdxl": lambda: request.getfixturevalue("sdxl_model")}[family]()
    files, comfy_models = pack().ace.files, pack().nodes.comfy_models
    erasure = random_erasure(model)
    path = tmp_path / "lora.safetensors"
    lora = files.export_lora(erasure, str(path), rank=6)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == version
    assert metadata["ss_v2"] == str(family.startswith("sd2"))
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.prediction_type"] == prediction
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "6"
    assert metadata["ace_concepts"] == "snoopy, van gogh, monet"
    assert float(metadata["ace_lora_max_error"]) == pytest.approx(lora.max_error, rel=1e-4)
    # ComfyUI's LoraLoader maps every key onto its projection: W + up · down, nothing else
    projections = comfy_models.check_model(model)
    lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora.tensors, 1.0, 0.0)
    assert len(lora_model.patches) == len(projections)
    before = comfy_models.projection_weights(model, projections)
    after = comfy_models.projection_weights(lora_model, projections)
    for p in projections:
        up, down = lora_pair(lora, files.lora_key(erasure, p.name))
        assert torch.allclose((after[p.name].float() - before[p.name].float()).cpu(), up @ down, atol=1e-5)


def test_export_node_compresses_to_the_asked_rank_and_reports_the_error(tiny_sd15_name, comfy):
    import folder_paths

    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15_name}},
        "2": {"class_type": "ACEErasure_EraseConcept", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concepts": "snoopy\nvan gogh", "anchor": "a picture",
            "preserve": "", "strength": 1.0, "steps": 0, "seed": 0, "expand": False}},
        "ex": {"class_type": "ACEErasure_ExportLoRA", "inputs": {
            "erasure": ["2", 1], "file_name": "two_concepts_rank8", "strength": 1.0, "overwrite": True, "rank": 8}},
    }
    result = run_graph(graph, fresh_cache=True)
    [text] = result.ui["ex"]["text"]
    assert "rank 8, error" in text and "%" in text
    path = folder_paths.get_full_path("loras", "two_concepts_rank8.safetensors")
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        down = f.get_tensor(next(k for k in f.keys() if k.endswith("lora_down.weight")))
    assert down.shape[0] == 8 and metadata["ss_network_dim"] == "8" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.prediction_type"] == "epsilon"  # recorded from the MODEL by ACE Erase Concept


def diffusers_unet_of(model):
    """A diffusers UNet2DConditionModel with the weights of ComfyUI's tiny SD1.5 UNet (one level of
    320 channels, one residual block, one transformer), mapped by ComfyUI's own key table."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    import comfy.model_management

    config = model.model.model_config.unet_config
    assert config["channel_mult"] == [1] and config["context_dim"] == 768
    # ComfyUI patches the weights its clones share in place for the clone it loaded last (a LoRA
    # of another test): load this MODEL so that they are its own
    comfy.model_management.load_models_gpu([model])
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(320,), layers_per_block=1,
        cross_attention_dim=768, attention_head_dim=8)
    ldm = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(config)
    # (the table lists every key such a UNet may have; strict loading checks none is missing)
    unet.load_state_dict({k: ldm[v].float() for k, v in mapping.items() if v in ldm}, strict=True)
    return unet.eval()


def test_diffusers_loads_the_lora_and_reproduces_the_open_gate_output(tiny_sd15, tmp_path):
    """The exported LoRA, read by diffusers' own loader (kohya keys converted, through peft) into a
    diffusers UNet2DConditionModel holding the tiny checkpoint's weights, gives the output of
    ComfyUI's model with the erasure applied and every gate open."""
    import comfy.model_management
    from diffusers import StableDiffusionPipeline

    comfy_models, ace = pack().nodes.comfy_models, pack().ace
    model, clip, _ = tiny_sd15
    request = ace.concepts.parse_request("snoopy\nvan gogh", "a picture")
    erasure = pack().nodes.erase.erase_from_model(model, clip, request, ace.closed_form.ClosedFormConfig(rank=4),
                                                  ace.finetune.FinetuneConfig(steps=0),
                                                  expansion=ace.expansion.ExpansionConfig(enabled=False))
    opened = ace.erasure.Erasure(erasure.family, erasure.request, _open(erasure.adapter), erasure.num_res_blocks,
                                 erasure.info)
    context = clip.encode_from_tokens(clip.tokenize("a painting by van gogh")).float().cpu()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])

    def comfy_output(m):
        comfy.model_management.load_models_gpu([m])
        device = m.load_device
        with torch.no_grad():
            return m.model.diffusion_model(x.to(device), t.to(device), context=context.to(device)).float().cpu()

    unet = diffusers_unet_of(model)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=context).sample
    # the same network in both: they agree to `noise` (1e-6 on the CPU; more where ComfyUI runs on
    # a GPU, whose convolutions use TF32), which is what "reproduces" allows below
    noise = (base - comfy_output(model)).abs().max().item()
    assert noise < 1e-4 if model.load_device.type == "cpu" else noise < 1e-2

    target = comfy_output(comfy_models.with_erasure(model, opened, 1.0))
    assert (target - base).abs().max() > 100 * noise  # the erasure changes this prompt's prediction
    for rank, name in ((None, "exact"), (6, "compressed")):
        path = tmp_path / f"{name}.safetensors"
        lora = ace.files.export_lora(erasure, str(path), rank=rank)
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        unet = diffusers_unet_of(model)
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name="ace")
        with torch.no_grad():
            edited = unet(x, t, encoder_hidden_states=context).sample
        if rank is None:
            assert (edited - target).abs().max() <= 2 * noise + 1e-5
        else:  # as far from the open gate as the reported error allows, and as ComfyUI loads it
            import comfy.sd

            lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora.tensors, 1.0, 0.0)
            assert (edited - comfy_output(lora_model)).abs().max() <= 2 * noise + 1e-5
            assert (edited - target).norm() <= 2 * lora.max_error * (target - base).norm() + 1e-4


def _open(adapter):
    import copy

    opened = copy.deepcopy(adapter)
    with torch.no_grad():
        opened.gate_threshold.fill_(-1e9)
        opened.gate_log_temperature.fill_(0.0)
    return opened
