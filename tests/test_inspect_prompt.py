"""ACE Inspect Prompt: per token, how strongly each erased concept's gate fires, on the toy model
(whose text encoder is a real pretrained one) and on the tiny SD1.5 checkpoint's CLIP tokenizer;
from an ERASURE and from an erased MODEL; its picture and its errors."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from comfy_harness import GraphError, pack, run_graph

TOY = {"class_type": "ACEErasure_LoadToyModel", "inputs": {"text_encoder": "bidirectional"}}
PROMPTS = ["a picture of Brontel", "a portrait of Captain Brontel", "a red disc", "a yellow hourglass", "a blue square"]


def erase_node(concepts: str = "circle: disc", preset: str = "toy-entities-demo", strength: float = 1.0) -> dict:
    return {"class_type": "ACEErasure_EraseConcept", "inputs": {
        "model": ["toy", 0], "clip": ["toy", 1], "concepts": concepts, "anchor": "", "preserve": "",
        "strength": strength, "steps": 0, "seed": 0, "preset": preset}}


def inspect_node(source: str, output: int, prompts: list[str]) -> dict:
    return {"class_type": "ACEErasure_InspectPrompt", "inputs": {
        "clip": ["toy", 1], "prompts": "\n".join(prompts), source: ["erase", output]}}


@pytest.fixture(scope="module")
def toy_erased(comfy):
    """The toy model erased with the demo preset plus 'circle: disc', through the executor, and
    ACE Inspect Prompt on its ERASURE."""
    return run_graph({"toy": TOY, "erase": erase_node(), "inspect": inspect_node("erasure", 1, PROMPTS)})


def gate_of(names: list[str], concept: str) -> int:
    """The gate of a concept."""
    return names.index(concept)


def verdicts(report: str) -> list[str]:
    lines = report.splitlines()
    return [lines[i + 1].strip() for i, line in enumerate(lines) if line.startswith("prompt ")]


def test_the_report_says_which_prompts_the_erasure_acts_on_and_where(toy_erased):
    report, picture = toy_erased.outputs["inspect"]
    assert toy_erased.ui["inspect"]["text"] == [report]
    names = toy_erased.outputs["erase"][1].gate_names()
    lines = report.splitlines()
    assert lines[1:1 + len(names)] == [f"  [{k + 1}] {name}" for k, name in enumerate(names)]
    assert "reads both ways: the prompt's largest gate applies at every token" in lines[1 + len(names)]
    brontel, circle = names[gate_of(names, "Brontel")], names[gate_of(names, "circle")]
    said = verdicts(report)
    # strongest first: other erased names' gates may fire too (the edit is one, applied once)
    assert re.match(rf"the edit acts: {brontel} \(\d\.\d\d at bro\)", said[0]), said[0]
    # A wording the preset does not list is caught too: the inspector shows it before rendering.
    assert said[1].startswith(f"the edit acts: {brontel} (")
    assert f"{circle} (" in said[2] and said[2].startswith("the edit acts: ")
    assert said[3].startswith("untouched: no concept's gate reaches 0.5") and said[4].startswith("untouched")


def test_gates_per_token_are_the_adapters_on_what_the_model_receives(toy_erased, comfy):
    inspect = pack().nodes.inspect_prompt
    erasure = toy_erased.outputs["erase"][1]
    clip = toy_erased.outputs["toy"][1]
    source = pack().nodes.comfy_models.AppliedErasure(erasure.adapter, tuple(erasure.gate_names()))
    result = inspect.inspect_prompt(clip, [source], "a picture of Brontel")
    assert [t.label for t in result.tokens[:8]] == ["<start>", "a", "picture", "of", "bro", "##nte", "##l", "<end>"]
    assert {t.kind for t in result.tokens[8:]} == {"pad"} and len(result.tokens) == 24
    cond = clip.encode_from_tokens(clip.tokenize("a picture of Brontel"))[0].float()
    assert torch.allclose(result.gates, erasure.adapter.gate(cond), atol=1e-6)
    # This toy's encoder reads both ways: every position gets the prompt's largest gate.
    assert torch.allclose(result.applied, result.gates.amax(dim=0).expand_as(result.gates))
    assert result.gates[4, gate_of(erasure.gate_names(), "Brontel")] >= inspect.FIRES
    spared = inspect.inspect_prompt(clip, [source], "a yellow hourglass")
    assert spared.applied.max() < inspect.FIRES


def test_the_picture_shows_firing_gates_in_red(toy_erased):
    picture = toy_erased.outputs["inspect"][1]
    assert picture.ndim == 4 and picture.shape[0] == 1 and picture.shape[-1] == 3
    gate_map = pack().nodes.gate_map
    red = np.all(np.abs(picture[0].numpy() * 255 - gate_map.OPEN) < 40, axis=-1).sum()
    assert red > 0
    spared = run_graph({"toy": TOY, "erase": erase_node(),
                        "inspect": inspect_node("erasure", 1, ["a yellow hourglass", "a blue square"])}).outputs["inspect"][1]
    assert np.all(np.abs(spared[0].numpy() * 255 - gate_map.OPEN) < 40, axis=-1).sum() == 0


def test_an_erased_model_is_inspected_at_the_strength_it_was_applied_with(comfy):
    graph = {"toy": TOY, "erase": erase_node(strength=0.5), "inspect": inspect_node("model", 0, ["a red disc"])}
    chained = {"class_type": "ACEErasure_EraseConcept", "inputs": {
        "model": ["erase", 0], "clip": ["toy", 1], "concepts": "striped", "anchor": "", "preserve": "",
        "strength": 1.0, "steps": 0, "seed": 0, "preset": "none"}}
    graph.update(second=chained, inspect_both={"class_type": "ACEErasure_InspectPrompt", "inputs": {
        "clip": ["toy", 1], "prompts": "a red disc\na striped square", "model": ["second", 0]}})
    result = run_graph(graph)
    first = tuple(result.outputs["erase"][1].gate_names())
    circle = first[gate_of(list(first), "circle")]
    said = verdicts(result.outputs["inspect"][0])
    assert said[0].startswith(f"the edit acts: {circle} (") and said[0].endswith(" at disc, strength 0.5)")
    applied = pack().nodes.comfy_models.erasures_on(result.outputs["second"][0])
    assert [a.gate_names for a in applied] == [first, ("striped",)]  # in the order they were applied
    assert [a.adapter.strength for a in applied] == [0.5, 1.0]
    both = result.outputs["inspect_both"][0].splitlines()
    assert both[1:2 + len(first)] == [f"  [{k + 1}] {name}" for k, name in enumerate([*first, "striped"])]
    said = verdicts(result.outputs["inspect_both"][0])
    assert f"{circle} (" in said[0] and said[1].startswith("the edit acts: ") and "striped (" in said[1]


def test_clip_tokens_line_up_with_the_embeddings_on_sd15(tiny_sd15):
    _, clip, _ = tiny_sd15
    tokens = pack().nodes.inspect_prompt.prompt_tokens(clip, "a painting by Van Gogh")
    assert len(tokens) == 77 == clip.encode_from_tokens(clip.tokenize("a painting by Van Gogh")).shape[1]
    assert [t.label for t in tokens[:7]] == ["<start>", "a", "painting", "by", "van", "gogh", "<end>"]
    assert {t.kind for t in tokens[7:]} == {"pad"}
    long = " ".join(["a red circle"] * 40)  # 120 words: two windows of 77
    tokens = pack().nodes.inspect_prompt.prompt_tokens(clip, long)
    assert len(tokens) == 154 == clip.encode_from_tokens(clip.tokenize(long)).shape[1]
    assert [t.label for t in tokens if t.kind == "start"] == ["<start>", "<start>"]


@pytest.mark.parametrize("inputs, message", [
    ({}, "Connect an ERASURE"),
    ({"erasure": ["erase", 1], "model": ["erase", 0]}, "not both and not neither"),
    ({"model": ["toy", 0]}, "This MODEL carries no ACE erasure"),
    ({"model": ["bake", 0]}, "a baked MODEL has no gate left"),
    ({"erasure": ["erase", 1], "prompts": "\n \n"}, "No prompt to inspect"),
    ({"erasure": ["erase", 1], "prompts": "\n".join(["a red circle"] * 17)}, "17 prompts; inspect at most 16"),
    ({"erasure": ["erase", 1], "clip": ["sd15", 1]}, "This CLIP gives 768-wide text embeddings but the erasure was made "
                                                     "for a model that takes 384"),
])
def test_wrong_inputs_fail_with_a_message_that_says_what_to_connect(tiny_sd15_name, inputs, message):
    node = {"class_type": "ACEErasure_InspectPrompt", "inputs": {"clip": ["toy", 1], "prompts": "a red circle", **inputs}}
    graph = {"toy": TOY, "erase": erase_node(), "inspect": node,
             "bake": {"class_type": "ACEErasure_Bake", "inputs": {"model": ["erase", 0]}},
             "sd15": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15_name}}}
    with pytest.raises(GraphError) as error:
        run_graph(graph)
    assert error.value.node_id == "inspect" and error.value.exception_type == "ValueError"
    assert message in str(error.value)
