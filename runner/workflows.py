"""The shipped workflows (`example_workflows/*.json`, the UI format ComfyUI's frontend saves), for the
demo, the thumbnails and the tests.

The UI files are the only source: `to_api` turns one into the API format that `POST /prompt`
takes, the way the frontend's `graphToPrompt` does for these graphs (the browser test checks the
two agree). `for_tiny_model` swaps the real-use settings (an SD1.5 checkpoint, 512 px, 25 steps,
40 fine-tuning steps) for ones the tiny random test checkpoint runs in seconds on a CPU;
`for_toy_model` runs the same graph on ACE's toy model instead, whose pictures mean something.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import toy
from runner.host import REPO

WORKFLOWS_DIR = REPO / "example_workflows"

# Nodes that live only in the frontend: never sent to the server, absent from /object_info.
FRONTEND_ONLY = {"Note", "MarkdownNote"}

# Input types the frontend shows as widgets (a COMBO also comes as a list of options).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# The SD1.5 checkpoint the workflows name (ComfyUI's own default workflow downloads it).
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
TOY_LOADER = "ACEErasure_LoadToyModel"
# The demo: ACE on the toy model, which needs no checkpoint.
DEMO = WORKFLOWS_DIR / "ACE 0 - Demo on the toy model.json"


def shipped() -> list[Path]:
    """The workflows ComfyUI's template browser lists: the .json files directly in example_workflows/ (the folder name ComfyUI looks for first)."""
    return sorted(WORKFLOWS_DIR.glob("*.json"))


def uses_toy_model(workflow: dict) -> bool:
    return any(n["type"] == TOY_LOADER for n in workflow["nodes"])


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def executed_nodes(workflow: dict) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY]


def widget_inputs(node_info: dict) -> list[tuple[str, bool]]:
    """(name, has a 'control after generate' value) for each widget of a node, in the order of
    its `widgets_values`: inputs in `input_order`, required then optional, that are widgets."""
    widgets = []
    for section in ("required", "optional"):
        for name in node_info["input_order"].get(section, []):
            kind, options = _spec(node_info["input"][section][name])
            if options.get("forceInput") or not (isinstance(kind, list) or kind in WIDGET_TYPES):
                continue
            # The frontend adds the control widget when the input asks for one, and for INT
            # inputs named seed/noise_seed that do not say (useIntWidget, useComboWidget).
            control = options.get("control_after_generate")
            if control is None:
                control = kind == "INT" and name in ("seed", "noise_seed")
            widgets.append((name, bool(control)))
    return widgets


def _spec(spec) -> tuple[object, dict]:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return kind, options


def widget_count(node_info: dict) -> int:
    """How many `widgets_values` the frontend saves for a node (control values included)."""
    return sum(2 if control else 1 for _, control in widget_inputs(node_info))


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI workflow: `{id: {class_type, inputs, _meta}}`.

    Widget values are matched to their inputs by `widget_inputs`; linked inputs become
    `[source id, output slot]`. Muted or bypassed nodes are refused: the shipped workflows have
    none, and the frontend rewires around bypassed nodes in ways this does not copy.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in executed_nodes(workflow):
        where = f"node {node['id']} ({node['type']})"
        if node.get("mode", 0) != 0:
            raise ValueError(f"{where} is muted or bypassed; to_api only converts active nodes")
        if node["type"] not in object_info:
            raise ValueError(f"{where}: the server has no such node type")
        info = object_info[node["type"]]
        values = list(node.get("widgets_values", []))
        widgets = widget_inputs(info)
        if len(values) != widget_count(info):
            raise ValueError(f"{where} has {len(values)} widget values; its widgets {widgets} need {widget_count(info)}")
        inputs = {}
        for name, control in widgets:
            inputs[name] = values.pop(0)
            if control:
                values.pop(0)  # "fixed" / "randomize": a frontend setting, never sent
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": inputs,
            "_meta": {"title": node.get("title") or info["display_name"]},
        }
    return prompt


def for_tiny_model(prompt: dict, ckpt_name: str, lora_name: str | None = None) -> dict:
    """The same graph with settings for the tiny test checkpoint on a CPU: its checkpoint, 64 px
    images, 2 sampling steps, no fine-tuning and no concept expansion in ACE Erase Concept (its
    random CLIP-L encodes a whole 77-token window per word it scans: minutes on a CPU), one step at
    64 px in ACE Adversarial Fine-Tune, and `lora_name` in every Load LoRA. Everything else stays
    as shipped.
    A graph on the toy model keeps its 128 px (the toy's 16x16 grid) and takes the rest."""
    on_toy = any(node["class_type"] == TOY_LOADER for node in prompt.values())
    overrides = {
        "CheckpointLoaderSimple": {"ckpt_name": ckpt_name},
        "EmptyLatentImage": {} if on_toy else {"width": 64, "height": 64},
        "KSampler": {"steps": 2},
        "ACEErasure_EraseConcept": {"steps": 0, "expand": False},
        "ACEErasure_ClosedForm": {"expand": False},
        "ACEErasure_FineTune": {"steps": 1, "resolution": 64},
        "LoraLoader": {"lora_name": lora_name} if lora_name else {},
    }
    tiny = json.loads(json.dumps(prompt))
    for node in tiny.values():
        node["inputs"].update(overrides.get(node["class_type"], {}))
    return tiny


# The painters the shipped workflows name, as the toy world's made-up named entities (the toy's
# analogue of a famous name; toy/world.py). A name the toy does not know is dropped.
TOY_ENTITIES = {"van gogh": "Brontel", "picasso": "Vexmoor", "dali": "Zarnika", "monet": "Quillane"}
# The toy's pictures are 16x16, so the 16 px white gap ImageStitch puts between 512 px pictures
# would be as wide as a picture: 2 px instead.
TOY_STITCH_SPACING = 2
# Its stand-in for "512 px" in ACE Adversarial Fine-Tune: the toy's 16x16 grid.
TOY_RESOLUTION = toy.IMAGE_SIZE


def toy_entity(text: str) -> str | None:
    """The toy entity standing in for the first painter `text` names, if any."""
    found = [(m.start(), entity) for name, entity in TOY_ENTITIES.items()
             for m in [re.search(rf"\b{name}\b", text, re.IGNORECASE)] if m]
    return min(found)[1] if found else None


def toy_prompt(text: str) -> str:
    """A prompt for the toy: 'a picture of <entity>' for a prompt naming a painter, else ''
    (the toy's empty prompt, which is also what its negative prompt should be)."""
    entity = toy_entity(text)
    return f"a picture of {entity}" if entity else ""


def toy_concepts(text: str) -> str:
    """An ACE concept list (one concept per line) with each painter as its toy entity."""
    lines = (toy_entity(line.partition(":")[0]) for line in text.splitlines())
    return "\n".join(dict.fromkeys(e for e in lines if e))


def toy_names(text: str) -> str:
    """A comma- or line-separated list of names (ACE's preserve list) as toy entities."""
    names = (toy_entity(n) for n in re.split(r"[,\n]", text))
    return ", ".join(dict.fromkeys(e for e in names if e))


def for_toy_model(prompt: dict, lora_name: str | None = None) -> dict:
    """The same graph on ACE's toy model (`ACEErasure_LoadToyModel`): the toy loader for the
    checkpoint loader (the same MODEL, CLIP, VAE outputs), its 128 px grid, sampler settings and
    stitching gap, the painters the prompts and concepts name as toy entities, and `lora_name` in
    every Load LoRA. ACE's own settings (fine-tuning steps, rank, strength) stay as shipped. A
    graph already on the toy model runs as shipped."""
    if any(node["class_type"] == TOY_LOADER for node in prompt.values()):
        return json.loads(json.dumps(prompt))
    graph = json.loads(json.dumps(prompt))
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = TOY_LOADER, {"text_encoder": toy.DEFAULT_MODEL}
        elif kind == "EmptyLatentImage":
            inputs.update(width=TOY_RESOLUTION, height=TOY_RESOLUTION)
        elif kind == "KSampler":
            inputs.update(toy.SAMPLER)
        elif kind == "CLIPTextEncode":
            inputs["text"] = toy_prompt(inputs["text"])
        elif kind in ("ACEErasure_EraseConcept", "ACEErasure_ConceptList"):
            inputs.update(concepts=toy_concepts(inputs["concepts"]), anchor="", preserve=toy_names(inputs["preserve"]))
        elif kind == "ACEErasure_FineTune":
            inputs["resolution"] = TOY_RESOLUTION
        elif kind == "ImageStitch":
            inputs["spacing_width"] = TOY_STITCH_SPACING
        elif kind == "LoraLoader" and lora_name:
            inputs["lora_name"] = lora_name
    return graph
