"""The foundation: the pack loads into a real ComfyUI, reads model families, and reports them."""
from __future__ import annotations

import pytest

from comfy_harness import PACK_NAME, GraphError, in_memory_model_node, pack, run_graph

SUPPORTED_NAMES = ("Stable Diffusion 1.x", "Stable Diffusion 2.x", "Stable Diffusion XL")
# The node menu's groups (Add Node > ACE > ...): the everyday nodes apart from the stages, the
# files, the inspectors and the demo.
CATEGORIES = {
    "ACEErasure_EraseConcept": "ACE/erase", "ACEErasure_Apply": "ACE/erase",
    "ACEErasure_ConceptList": "ACE/stages", "ACEErasure_ClosedForm": "ACE/stages", "ACEErasure_FineTune": "ACE/stages",
    "ACEErasure_Save": "ACE/files", "ACEErasure_Load": "ACE/files", "ACEErasure_ExportLoRA": "ACE/files",
    "ACEErasure_Bake": "ACE/files",
    "ACEErasure_ModelInfo": "ACE/inspect", "ACEErasure_InspectPrompt": "ACE/inspect",
    "ACEErasure_LoadToyModel": "ACE/demo",
}
TINY_SD15_REPORT = "sd1: 4 cross-attention layers (8 key/value projections), context 768, inner widths 320"


def model_info_graph(model_node: dict, clip_from_checkpoint: bool = False) -> dict:
    inputs = {"model": ["1", 0]}
    if clip_from_checkpoint:
        inputs["clip"] = ["1", 1]
    return {"1": model_node, "2": {"class_type": "ACEErasure_ModelInfo", "inputs": inputs}}


def checkpoint_node(name: str) -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}


def test_pack_registers_its_nodes_with_comfyui(comfy):
    import nodes

    assert sorted(comfy.node_ids) == sorted(CATEGORIES)
    for node_id in comfy.node_ids:  # every node: its ACE/... group, a description, tooltips everywhere
        schema = nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert schema.category == CATEGORIES[node_id] and schema.description, node_id
        assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs), node_id
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["ACEErasure_EraseConcept"] == "ACE Erase Concept"
    node = nodes.NODE_CLASS_MAPPINGS["ACEErasure_ModelInfo"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["ACEErasure_ModelInfo"] == "ACE Model Info"
    schema = node.GET_SCHEMA()
    assert schema.description
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    # What the frontend receives from /object_info.
    info = node.GET_NODE_INFO_V1()
    assert info["output_node"] is True
    assert set(info["input"]["required"]) == {"model"} and set(info["input"]["optional"]) == {"clip"}
    assert info["output"] == ["STRING"]


def test_tiny_checkpoint_loads_as_sd15_through_checkpoint_loader(tiny_sd15):
    model, clip, vae = tiny_sd15
    comfy_models = pack().nodes.comfy_models
    assert type(model.model.model_config).__name__ == "SD15"
    assert comfy_models.family_of(model) == "sd1"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert clip.tokenize("a photo")["l"]  # ComfyUI's CLIP-L tokenizer is wired up


@pytest.mark.slow
def test_tiny_checkpoint_samples_and_decodes_with_comfyui_nodes(tiny_sd15_name):
    graph = {
        "1": checkpoint_node(tiny_sd15_name),
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    result = run_graph(graph)
    latent, image = result.outputs["5"][0]["samples"], result.outputs["6"][0]
    assert latent.shape == (1, 4, 8, 8) and image.shape == (1, 64, 64, 3)
    assert latent.isfinite().all() and latent.std() > 0 and image.std() > 0
    assert result.ui["7"]["images"][0]["type"] == "temp"


def test_model_info_reports_tiny_sd15_through_executor(tiny_sd15_name):
    result = run_graph(model_info_graph(checkpoint_node(tiny_sd15_name), clip_from_checkpoint=True))
    report = result.outputs["2"][0]
    assert report.splitlines() == [TINY_SD15_REPORT, "text encoder: SD1ClipModel, context 768 (matches the model)"]
    assert result.ui["2"] == {"text": [report]}


@pytest.mark.parametrize("fixture, expected", [
    ("sd2_model", "sd2: 7 cross-attention layers (14 key/value projections), context 1024, inner widths 64/128"),
    ("sdxl_model", "sdxl: 8 cross-attention layers (16 key/value projections), context 2048, inner widths 128"),
])
def test_model_info_reports_in_memory_families_through_executor(request, fixture, expected):
    model = request.getfixturevalue(fixture)
    result = run_graph(model_info_graph(in_memory_model_node(fixture, model)))
    assert result.outputs["2"] == (expected,)
    assert result.ui["2"] == {"text": [expected]}


def test_model_info_flags_a_clip_that_does_not_fit_the_model(sd2_model, tiny_sd15_name):
    graph = model_info_graph(in_memory_model_node("sd2-with-sd1-clip", sd2_model))
    graph["3"] = checkpoint_node(tiny_sd15_name)
    graph["2"]["inputs"]["clip"] = ["3", 1]
    report = run_graph(graph).outputs["2"][0]
    assert report.splitlines()[1] == (
        "text encoder: SD1ClipModel, context 768, but the model takes 1024: "
        "connect the CLIP that belongs to this model"
    )


def test_model_info_execute_can_be_called_directly(sdxl_model):
    import nodes

    output = nodes.NODE_CLASS_MAPPINGS["ACEErasure_ModelInfo"].execute(model=sdxl_model)
    assert output.result[0].startswith("sdxl: 8 cross-attention layers")


def test_family_of_maps_comfyui_model_configs(sd2_model, sdxl_model, flux_model):
    comfy_models = pack().nodes.comfy_models
    assert [comfy_models.family_of(m) for m in (sd2_model, sdxl_model, flux_model)] == ["sd2", "sdxl", "Flux"]
    assert comfy_models.unet_of(sd2_model) is sd2_model.model.diffusion_model


def test_unsupported_family_is_refused_naming_it_and_the_supported_ones(flux_model):
    families = pack().ace.families
    comfy_models = pack().nodes.comfy_models
    with pytest.raises(families.UnsupportedModelError) as err:
        comfy_models.check_model(flux_model)
    assert "Flux model" in str(err.value)
    assert all(name in str(err.value) for name in SUPPORTED_NAMES)


def test_model_without_cross_attention_fails_in_the_executor_with_a_clear_error(sd1_without_cross_attention):
    with pytest.raises(GraphError) as err:
        run_graph(model_info_graph(in_memory_model_node("no-attn", sd1_without_cross_attention)))
    assert err.value.node_id == "2"
    assert err.value.exception_type.endswith("ace.families.UnsupportedModelError")
    message = str(err.value)
    assert "(sd1) has no cross-attention" in message
    assert all(name in message for name in SUPPORTED_NAMES)


@pytest.mark.slow
def test_model_info_over_http_on_the_real_server(comfy_server, tiny_sd15_checkpoint):
    object_info = comfy_server.get("/object_info/ACEErasure_ModelInfo")["ACEErasure_ModelInfo"]
    assert object_info["display_name"] == "ACE Model Info" and object_info["category"] == "ACE/inspect"
    assert object_info["python_module"] == f"custom_nodes.{PACK_NAME}"

    entry = comfy_server.run(model_info_graph(checkpoint_node(tiny_sd15_checkpoint.name)))
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    assert entry["outputs"]["2"] == {"text": [TINY_SD15_REPORT]}


@pytest.mark.slow
def test_server_refuses_an_invalid_graph_with_its_validation_error(comfy_server):
    with pytest.raises(GraphError, match="ckpt_name"):
        comfy_server.submit(model_info_graph(checkpoint_node("no-such-model.safetensors")))
