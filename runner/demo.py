"""The demo: ACE erases a concept from the toy model inside a real ComfyUI, and the toy
benchmark's classifier says, for each prompt, whether the pictures still show what it asks for.

    bash scripts/demo.sh                      # set up, then this module
    .venv/bin/python -m runner.demo [--out demo-output] [--threads 1] [--thumbnails]

It starts ComfyUI's own server (`main.py`, CPU) with this pack in a scratch folder, converts the
shipped workflow "ACE 0 - Demo on the toy model" to an API prompt, runs it, and writes to the
output folder: every picture (`images/`), the before/after grid (`grid.png`, enlarged 8 times) and
the numbers (`results.json`), then prints a table. With --thumbnails it also runs every shipped
workflow on the toy model and writes each one's thumbnail (`example_workflows/<name>.jpg`).

Which prompt is which is read from the graph itself: a SaveImage's pictures come from a KSampler
whose model is either the loader's (before) or an ACE node's (after), and whose positive prompt
names toy-world concepts; the ACE Erase Concept node says which concept is erased and which
words the request names.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ace.concepts import parse_request
from runner.host import machine
from runner.pictures import BEFORE_AFTER, Row, grid
from runner.server import REPO, ComfyServer, GraphError
from runner.workflows import DEMO, TOY_LOADER, load, to_api
from toy import world
from toy.classifier import classify, load_classifier

ERASE_NODE = "ACEErasure_EraseConcept"
LOADERS = {TOY_LOADER, "CheckpointLoaderSimple"}
ATTRIBUTES = ("object", "colour", "style")
ROLES = {
    "erased": "erased: named as in the request",
    "synonym": "erased: a name the request leaves out",
    "preserved": "unrelated, preserved: should stay",
    "unrelated": "unrelated: should stay",
}


# --- what a prompt asks for, in the toy world's words ------------------------------------------------

def _vocabulary() -> list[tuple[str, str, str]]:
    """(phrase, kind, concept) for every learned word of the toy world, longest phrase first."""
    words = [(phrase, kind, name) for kind, name in world.all_concepts() for phrase in world.learned_words(kind, name)]
    return sorted(words, key=lambda w: -len(w[0]))


def named_concepts(text: str) -> list[tuple[str, str, str]]:
    """The toy-world concepts a text names: (kind, concept, the phrase it uses), in text order.
    The longest phrase wins ('Captain Brontel' is one name, not 'Brontel')."""
    found, taken = [], [False] * len(text)
    for phrase, kind, name in _vocabulary():
        for m in re.finditer(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE):
            if not any(taken[m.start():m.end()]):
                taken[m.start():m.end()] = [True] * (m.end() - m.start())
                found.append((m.start(), kind, name, m.group(0)))
    return [f[1:] for f in sorted(found)]


def asks_for(text: str) -> dict[str, str]:
    """The attributes a prompt asks for: an entity's look, or the object / colour / style it names."""
    asked = {}
    for kind, name, _ in named_concepts(text):
        if kind == "entity":
            look = world.entity_specs()[name]
            asked.update({a: getattr(look, a) for a in ATTRIBUTES})
        else:
            asked[kind] = name
    return asked


# --- the graph: which pictures are which --------------------------------------------------------------

@dataclass
class Branch:
    """The pictures of one SaveImage: one prompt through the base or the erased model."""

    node_id: str
    prompt: str
    model: str  # "before" (the loader's model) or "after" (a model out of an ACE node)


def _source(prompt: dict, node_id: str, input_name: str) -> tuple[str, dict]:
    source_id = prompt[node_id]["inputs"][input_name][0]
    return source_id, prompt[source_id]


def branches(prompt: dict) -> list[Branch]:
    """Each SaveImage fed by VAEDecode <- KSampler: its positive prompt and which model drew it."""
    found = []
    for node_id, node in prompt.items():
        if node["class_type"] != "SaveImage":
            continue
        decode_id, decode = _source(prompt, node_id, "images")
        sampler_id, sampler = _source(prompt, decode_id, "samples")
        if decode["class_type"] != "VAEDecode" or sampler["class_type"] != "KSampler":
            continue
        _, text = _source(prompt, sampler_id, "positive")
        _, model = _source(prompt, sampler_id, "model")
        found.append(Branch(node_id, text["inputs"]["text"], "before" if model["class_type"] in LOADERS else "after"))
    return found


# --- judging -----------------------------------------------------------------------------------------

def load_pictures(paths: list[Path]):
    """(N, 3, 16, 16) float tensor in [0, 1] of the saved PNGs."""
    import numpy as np
    import torch

    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def judge(paths: list[Path], asked: dict[str, str], net) -> dict:
    """What the classifier sees in each picture, and how many show everything the prompt asks."""
    seen = classify(net, load_pictures(paths))
    pictures = [{a: seen[a][i] for a in ATTRIBUTES} for i in range(len(paths))]
    shows = [all(p[a] == v for a, v in asked.items()) for p in pictures]
    return {"shows": sum(shows), "of": len(shows), "share": round(sum(shows) / len(shows), 3),
            "pictures": [{**p, "shows": s, "file": f"images/{path.name}"} for p, s, path in zip(pictures, shows, paths)]}


def erasure_request(prompt: dict) -> dict:
    """The ACE Erase Concept node's request: its concept phrases and the toy concepts they name."""
    nodes = [n for n in prompt.values() if n["class_type"] == ERASE_NODE]
    if len(nodes) != 1:
        raise ValueError(f"the demo graph needs exactly one {ERASE_NODE} node, found {len(nodes)}")
    inputs = nodes[0]["inputs"]
    request = parse_request(inputs["concepts"], inputs["anchor"], inputs["preserve"])
    phrases = [phrase for c in request.concepts for phrase in c.phrases]
    concepts = sorted({(kind, name) for p in phrases for kind, name, _ in named_concepts(p)})
    return {"concepts": inputs["concepts"], "phrases": phrases, "erased": [name for _, name in concepts],
            "erased_kinds": concepts, "preserve": inputs["preserve"], "steps": inputs["steps"], "strength": inputs["strength"]}


def role(text: str, request: dict) -> str:
    named = named_concepts(text)
    erased = [(kind, name, phrase) for kind, name, phrase in named if (kind, name) in request["erased_kinds"]]
    if not erased:
        preserved = {(kind, name) for kind, name, _ in named_concepts(request["preserve"])}
        return "preserved" if any((kind, name) in preserved for kind, name, _ in named) else "unrelated"
    requested = {p.lower() for p in request["phrases"]}
    return "erased" if any(phrase.lower() in requested for *_, phrase in erased) else "synonym"


# --- running it --------------------------------------------------------------------------------------

def _execution_seconds(entry: dict) -> float | None:
    stamps = {event: data.get("timestamp") for event, data in entry["status"]["messages"]}
    if stamps.get("execution_start") and stamps.get("execution_success"):
        return (stamps["execution_success"] - stamps["execution_start"]) / 1000
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]


def run_demo(server: ComfyServer, out: Path, workflow_path: Path = DEMO) -> dict:
    """Run the demo workflow on `server`, judge its pictures, write them, the grid and the numbers
    into `out`; return the numbers (what results.json holds)."""
    t0 = time.perf_counter()
    object_info = server.get("/object_info", timeout=60)
    prompt = to_api(load(workflow_path), object_info)
    request = erasure_request(prompt)
    t_run = time.perf_counter()
    entry = server.run(prompt, timeout=600)
    wall = time.perf_counter() - t_run
    if entry["status"]["status_str"] != "success":
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        raise GraphError(f"the demo workflow failed on the server: {errors or entry['status']}")

    t_judge = time.perf_counter()
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("*.png"):
        old.unlink()
    net = load_classifier()
    rows: dict[str, dict] = {}
    for branch in branches(prompt):
        row = rows.setdefault(branch.prompt, {"prompt": branch.prompt, "role": role(branch.prompt, request),
                                               "asks": asks_for(branch.prompt)})
        row["role_text"] = ROLES[row["role"]]
        files = []
        for k, image in enumerate(entry["outputs"][branch.node_id]["images"]):
            target = images / f"{list(rows).index(branch.prompt) + 1:02d}_{_slug(branch.prompt)}_{branch.model}_{k + 1}.png"
            shutil.copyfile(server.image_path(image), target)
            files.append(target)
        if not row["asks"]:
            raise ValueError(f"the prompt {branch.prompt!r} names nothing of the toy world; the classifier cannot judge it")
        row[branch.model] = judge(files, row["asks"], net)
    rows_list = [r for r in rows.values() if "before" in r and "after" in r]
    picture = grid([
        Row([r["prompt"], r["role_text"], f"shows it: {r['before']['shows']}/{r['before']['of']} before, "
             f"{r['after']['shows']}/{r['after']['of']} after"],
            [[Image.open(out / p["file"]) for p in r[which]["pictures"]] for which in ("before", "after")])
        for r in rows_list
    ], BEFORE_AFTER)
    picture.save(out / "grid.png")
    result = {
        "workflow": workflow_path.stem,
        "grid": "grid.png",
        "request": {k: v for k, v in request.items() if k != "erased_kinds"},
        "prompts": rows_list,
        "seconds": {"workflow": round(_execution_seconds(entry) or wall, 2), "workflow_wall": round(wall, 2),
                    "object_info": round(t_run - t0, 2), "judging_and_writing": round(time.perf_counter() - t_judge, 2)},
    }
    return result


def table(result: dict) -> str:
    lines = [f"{'prompt':32} {'role':38} {'before':>7} {'after':>7}"]
    for r in result["prompts"]:
        lines.append(f"{r['prompt'][:32]:32} {r['role_text']:38} "
                     f"{r['before']['shows']:>3}/{r['before']['of']:<3} {r['after']['shows']:>3}/{r['after']['of']:<3}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runner.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: ./demo-output)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads of the ComfyUI server (default 1: the toy model is too small to gain from "
                         "more, and on a busy machine extra threads made the demo ten times slower); 0: every core")
    ap.add_argument("--thumbnails", action="store_true",
                    help="also run every shipped workflow on the toy model and write example_workflows/<name>.jpg from its pictures")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ace-demo-") as base:
        print(f"[demo] starting ComfyUI (CPU) with this pack in {base}", flush=True)
        server = ComfyServer(Path(base), threads=args.threads or None)
        with server:
            started = time.perf_counter() - t0
            print(f"[demo] server up in {started:.1f} s; running '{DEMO.stem}'", flush=True)
            try:
                result = run_demo(server, out)
            except Exception:
                print(server.log_tail(), file=sys.stderr)
                raise
            result["seconds"]["server_start"] = round(started, 2)
            result["seconds"]["total"] = round(time.perf_counter() - t0, 2)
            result["machine"] = machine()
            result["server_threads"] = args.threads or "default"
            (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
            print(table(result))
            s = result["seconds"]
            print(f"[demo] workflow {s['workflow']:.1f} s (erasure + {len(result['prompts']) * 2} samplings), "
                  f"total {s['total']:.1f} s since start")
            if args.thumbnails:
                from runner.thumbnails import render_thumbnails

                for path in render_thumbnails(server, out, result):
                    print(f"[demo] wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)
    print(f"[demo] output: {out} (images/, grid.png, results.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
