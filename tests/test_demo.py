"""The demo (`bash scripts/demo.sh`): ACE on the toy model in a real ComfyUI server, judged by the
toy benchmark's classifier; and the toy stand-ins the thumbnails run the other workflows with."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from PIL import Image

from comfy_harness import REPO
from runner import demo
from runner.workflows import DEMO, for_toy_model, load, shipped, to_api


# --- reading prompts in the toy world's words -----------------------------------------------------

def test_named_concepts_take_the_longest_name():
    assert demo.named_concepts("a portrait of Captain Brontel") == [("entity", "Brontel", "Captain Brontel")]
    assert demo.named_concepts("a solid yellow hourglass") == [
        ("style", "solid", "solid"), ("colour", "yellow", "yellow"), ("object", "hourglass", "hourglass")]
    assert demo.named_concepts("a crescent moon") == [("object", "crescent", "crescent moon")]
    assert demo.named_concepts("a painting of sunflowers") == []


def test_prompts_get_their_role_from_the_erasure_request():
    request = {"phrases": ["Brontel"], "erased_kinds": [("entity", "Brontel")], "preserve": "Vexmoor, Quillane"}
    assert demo.role("a picture of Brontel", request) == "erased"
    assert demo.role("a portrait of Captain Brontel", request) == "synonym"
    assert demo.role("a picture of Quillane", request) == "preserved"
    assert demo.role("a solid yellow hourglass", request) == "unrelated"
    assert demo.asks_for("old Brontel") == {"object": "hourglass", "colour": "yellow", "style": "solid"}


# --- the other workflows on the toy model (what --thumbnails runs) -------------------------------

@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get("/object_info", timeout=30)


@pytest.mark.slow
def test_for_toy_model_swaps_the_checkpoint_and_painters_for_the_toy(object_info):
    prompt = for_toy_model(to_api(load(REPO / "example_workflows" / "ACE 2 - Erase several concepts.json"), object_info))
    kinds = {node["class_type"] for node in prompt.values()}
    assert "CheckpointLoaderSimple" not in kinds and "ACEErasure_LoadToyModel" in kinds
    erase = next(n["inputs"] for n in prompt.values() if n["class_type"] == "ACEErasure_EraseConcept")
    assert (erase["concepts"], erase["anchor"], erase["preserve"]) == ("Brontel\nVexmoor\nZarnika", "", "Quillane")
    assert erase["steps"] == 40  # ACE's own settings stay as shipped
    texts = sorted(n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "CLIPTextEncode")
    assert texts == ["", "a picture of Brontel", "a picture of Quillane", "a picture of Vexmoor"]
    sampler = next(n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler")
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (20, 3.0, "euler", "karras")
    assert all(n["inputs"]["width"] == 128 for n in prompt.values() if n["class_type"] == "EmptyLatentImage")
    # The demo is on the toy model already and runs as shipped.
    shipped_demo = to_api(load(DEMO), object_info)
    assert for_toy_model(shipped_demo) == shipped_demo
    assert DEMO in shipped()


# --- the demo end to end ----------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_script_runs_the_workflow_and_writes_pictures_grid_and_numbers(tmp_path):
    out = tmp_path / "demo-output"
    run = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--out", str(out), "--threads", "1"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert f"[demo] output: {out}" in run.stdout

    result = json.loads((out / "results.json").read_text())
    assert result["workflow"] == DEMO.stem and result["request"]["erased"] == ["Brontel"]
    rows = {r["prompt"]: r for r in result["prompts"]}
    assert [r["role"] for r in result["prompts"]] == ["erased", "synonym", "unrelated", "preserved"]
    for r in rows.values():
        # The untouched toy model draws every prompt; four pictures each, before and after.
        assert r["before"]["of"] == r["after"]["of"] == 4
        assert r["before"]["shows"] >= 3, r
        for picture in r["before"]["pictures"] + r["after"]["pictures"]:
            with Image.open(out / picture["file"]) as png:
                assert png.size == (16, 16)
        # ...and the erasure takes the concept away from prompts naming it, not from the others.
        if r["role"] in ("erased", "synonym"):
            assert r["after"]["shows"] <= 1, r
        else:
            assert r["after"]["shows"] >= 3, r
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 8 * 128 and grid.height > 4 * 128  # 16 px pictures enlarged 8 times
    assert len(list((out / "images").glob("*.png"))) == 32
    # The table names each prompt with its counts; the times are measured.
    for r in rows.values():
        assert r["prompt"] in run.stdout
    seconds = result["seconds"]
    assert 0 < seconds["workflow"] < seconds["total"] < 180
    assert "cores" in result["machine"] and "torch" in result["machine"]
