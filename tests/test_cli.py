"""The command line, `python -m runner erase ...`, run as users run it: a subprocess started from
the repository root, on the tiny SD1.5 checkpoint (through ComfyUI's checkpoint loader) and on
ACE's toy model."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_harness import REPO, TINY_SD15_UNET
from safetensors import safe_open
from safetensors.torch import save_file

from ace.files import load_erasure

KOHYA_KEY = re.compile(r"lora_unet_\w+_attn2_to_[kv]\.(lora_down\.weight|lora_up\.weight|alpha)")


def ace(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "runner", *map(str, args)], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def succeeded(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    return run


def failed_with(run: subprocess.CompletedProcess, *phrases: str) -> str:
    """The one error line of a run that must fail, checked to hold every phrase."""
    assert run.returncode != 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ace erase: error: "), run.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def write_prompts(path: Path, **groups) -> Path:
    path.write_text(json.dumps(groups))
    return path


def check_eval(eval_dir: Path, stdout: str, prompts: dict) -> dict:
    report = json.loads((eval_dir / "eval.json").read_text())
    rows = [(g, p) for g in ("erase", "keep") for p in prompts[g]]
    assert [(r["group"], r["prompt"]) for r in report["prompts"]] == rows
    for r in report["prompts"]:
        assert 0.0 <= r["gate_max"] <= 1.0
        assert math.isfinite(r["latent_change"]) and math.isfinite(r["image_change"])
        assert (eval_dir / r["base_image"]).is_file() and (eval_dir / r["erased_image"]).is_file()
        assert r["prompt"] in stdout  # the printed table
    assert (eval_dir / "grid.png").stat().st_size > 0
    assert set(report["summary"]) == {"erase", "keep"}
    return report


def test_erase_a_checkpoint_writes_the_erasure_the_lora_and_an_evaluation(tiny_sd15_checkpoint, tmp_path):
    prompts = {"erase": ["a painting by Van Gogh", "water lilies by Monet"],
               "keep": ["a photo of a cat", "a red car on a street"]}
    erasure_file, lora_file, eval_dir = tmp_path / "no_painters.safetensors", tmp_path / "lora.safetensors", tmp_path / "eval"
    run = succeeded(ace(
        "erase", tiny_sd15_checkpoint,
        "--concepts", r"Van Gogh: Vincent van Gogh\nMonet",  # a typed \n separates concepts
        "--anchor", "a painting", "--preserve", "Rembrandt",
        "--steps", 1, "--rank", 4, "--resolution", 64, "--threads", 1, "--no-expand", "--precision", "bf16",
        "--checkpointing", "on", "--erasure", erasure_file, "--lora", lora_file, "--lora-rank", 3,
        "--eval", write_prompts(tmp_path / "prompts.json", **prompts), "--eval-dir", eval_dir, "--sample-steps", 2,
    ))

    erasure = load_erasure(str(erasure_file))
    assert erasure.family == "sd1"
    assert [(c.target, c.synonyms, c.anchor) for c in erasure.request.concepts] == [
        ("Van Gogh", ("Vincent van Gogh",), "a painting"), ("Monet", (), "a painting")]
    assert erasure.request.preserve == ("Rembrandt",)
    assert erasure.adapter.rank == 2 * 4  # the joint edit: the rank per concept times the concepts
    assert erasure.info["training"]["steps"] == 1 and "final_losses" in erasure.info  # stage 2 ran
    assert erasure.info["stage2_compute"] == {"precision": "bf16", "checkpointing": True}
    assert "(stage 2: bf16, gradient checkpointing on)" in run.stdout

    with safe_open(str(lora_file), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert len(keys) == 3 * len(erasure.projections)
    assert all(KOHYA_KEY.fullmatch(k) for k in keys), sorted(keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert metadata["ss_network_module"] == "networks.lora"
    # the concepts' rank-4 edits compressed together to rank 3, the error printed
    with safe_open(str(lora_file), "pt") as f:
        assert f.get_tensor(next(k for k in keys if k.endswith("lora_down.weight"))).shape[0] == 3
    assert metadata["ss_network_dim"] == "3" and metadata["ss_base_model_version"] == "sd_v1"
    assert re.search(r"rank 3, [0-9.]+% from the erasure with its gate open at most", run.stdout)

    report = check_eval(eval_dir, run.stdout, prompts)
    # The tiny checkpoint's CLIP is random, so only the gate is compared: it opens wider on the
    # prompts that name a concept.
    assert report["summary"]["erase"]["gate_max"] > report["summary"]["keep"]["gate_max"]


def test_erase_the_toy_model_from_a_concept_file(tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("# shapes to erase\ncircle: disc\n")
    prompts = {"erase": ["a picture of a circle", "a red disc", "a blue circle"],
               "keep": ["a picture of a square", "a green triangle", "a yellow ring"]}
    eval_dir = tmp_path / "eval"
    run = succeeded(ace(
        "erase", "--toy", "--concepts-file", concepts, "--preserve", "square, ring", "--steps", 2, "--threads", 1,
        "--erasure", tmp_path / "no_circle.safetensors",
        "--eval", write_prompts(tmp_path / "prompts.json", **prompts), "--eval-dir", eval_dir,
    ))
    erasure = load_erasure(str(tmp_path / "no_circle.safetensors"))
    assert erasure.family == f"ace-toy{'-causal' if erasure.family.endswith('causal') else ''}"
    (concept,) = erasure.request.concepts
    assert concept.target == "circle" and concept.synonyms[0] == "disc"
    # expansion found more of the words the toy draws circles from, and says so
    found = erasure.info["expansion"]["found"]["circle"]
    assert concept.synonyms[1:] == tuple(w for w, _ in found) and found
    assert "words the model draws each concept from" in run.stdout and found[0][0] in run.stdout

    report = check_eval(eval_dir, run.stdout, prompts)
    erase = [r for r in report["prompts"] if r["group"] == "erase"]
    keep = [r for r in report["prompts"] if r["group"] == "keep"]
    assert min(r["gate_max"] for r in erase) > max(r["gate_max"] for r in keep)
    # What the pictures show, by the toy benchmark's judge: the circles are gone, every kept shape
    # is still drawn. (Pixels alone would not say it: the kept yellow ring is redrawn a little
    # shifted, a larger mean pixel change than the erased "a blue circle".)
    from runner.demo import load_pictures
    from toy.classifier import classify, load_classifier

    judge = load_classifier()
    for group, rows in (("erase", erase), ("keep", keep)):
        for r, (base, erased) in zip(rows, [(eval_dir / f"{group}-{i:02d}-base.png", eval_dir / f"{group}-{i:02d}-erased.png")
                                            for i in range(1, len(rows) + 1)]):
            before, after = classify(judge, load_pictures([base, erased]))["object"]
            if group == "erase":
                assert before == "circle" != after, (r["prompt"], before, after)
            else:
                assert before == after == r["prompt"].split()[-1], (r["prompt"], before, after)


def test_erase_the_toy_model_from_a_preset_plus_typed_concepts(tmp_path):
    prompts = {"erase": ["a picture of Brontel", "a red disc"], "keep": ["a yellow hourglass", "a blue square"]}
    eval_dir = tmp_path / "eval"
    run = succeeded(ace(
        "erase", "--toy", "--preset", "toy-entities-demo", "--concepts", "circle: disc", "--steps", 0, "--threads", 1,
        "--erasure", tmp_path / "no_entities.safetensors",
        "--eval", write_prompts(tmp_path / "prompts.json", **prompts), "--eval-dir", eval_dir, "--sample-steps", 4,
    ))
    erasure = load_erasure(str(tmp_path / "no_entities.safetensors"))
    # the preset's concepts, then the typed one; each with the words expansion found after its own
    found = erasure.info["expansion"]["found"]
    assert [(c.target, c.synonyms) for c in erasure.request.concepts] == [
        (name, tuple(w for w, _ in found[name])) for name in ("Vexmoor", "Quillane", "Brontel", "Zarnika")
    ] + [("circle", ("disc", *(w for w, _ in found["circle"])))]
    # The preset's preserve list, less 'a red circle', which names the typed concept.
    assert erasure.request.preserve == ("a yellow hourglass", "a blue square", "a green triangle")
    report = check_eval(eval_dir, run.stdout, prompts)
    erase = [r["gate_max"] for r in report["prompts"] if r["group"] == "erase"]
    keep = [r["gate_max"] for r in report["prompts"] if r["group"] == "keep"]
    assert min(erase) > 0.9 and max(keep) < 0.1


# --- errors: one clear line, non-zero exit ---------------------------------------------------------

@pytest.fixture
def some_file(tmp_path) -> Path:
    """A file that exists (the checks below fail before anything loads it)."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 16)
    return path


def test_a_missing_checkpoint_fails(tmp_path):
    failed_with(ace("erase", tmp_path / "nope.safetensors", "--concepts", "Monet", "--erasure", tmp_path / "o.safetensors"),
                "checkpoint not found", "nope.safetensors")


@pytest.mark.parametrize("concepts, preserve, phrases", [
    ("Monet", "monet", ["concept list:", "'monet' is both erased and preserved"]),
    ("# only a comment", "", ["concept list:", "No concept to erase"]),
    (r"Monet\nmonet", "", ["concept list:", "requested twice"]),
])
def test_a_bad_concept_list_fails(some_file, tmp_path, concepts, preserve, phrases):
    failed_with(ace("erase", some_file, "--concepts", concepts, "--preserve", preserve, "--lora", tmp_path / "o.safetensors"),
                *phrases)


def test_an_output_in_a_missing_folder_fails(some_file, tmp_path):
    failed_with(ace("erase", some_file, "--concepts", "Monet", "--erasure", tmp_path / "no" / "o.safetensors"),
                "--erasure", f"the folder '{tmp_path / 'no'}' does not exist")


def test_an_existing_output_is_not_overwritten_without_overwrite(some_file, tmp_path):
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"keep me")
    failed_with(ace("erase", some_file, "--concepts", "Monet", "--lora", existing),
                "--lora", "already exists; pass --overwrite")
    assert existing.read_bytes() == b"keep me"


def test_other_wrong_arguments_fail_before_loading_anything(some_file, tmp_path):
    out = tmp_path / "o.safetensors"
    failed_with(ace("erase", some_file, "--concepts", "Monet"), "nothing to write")
    failed_with(ace("erase", some_file, "--erasure", out), "nothing to erase: give --preset, --concepts or --concepts-file")
    failed_with(ace("erase", some_file, "--concepts", "Monet", "--erasure", out, "--lora-rank", 4),
                "--lora-rank sets the rank of the LoRA: give --lora")
    failed_with(ace("erase", some_file, "--concepts", "Monet", "--lora", out, "--lora-rank", 0),
                "--lora-rank must be from 1 to 1024")
    failed_with(ace("erase", some_file, "--concepts", "Monet", "--erasure", some_file, "--overwrite"),
                "same file as the checkpoint")
    failed_with(ace("erase", some_file, "--concepts", "Monet", "--erasure", tmp_path / "o.pt"), "must end in .safetensors")
    failed_with(ace("erase", some_file, "--toy", "--concepts", "Monet", "--erasure", out), "either a checkpoint file or --toy")
    failed_with(ace("erase", some_file, "--concepts", "Monet", "--erasure", out, "--eval", some_file), "go together")
    bad = write_prompts(tmp_path / "bad.json", erased=["a cat"])
    failed_with(ace("erase", some_file, "--concepts", "Monet", "--erasure", out, "--eval", bad, "--eval-dir", tmp_path / "e"),
                "unknown key 'erased'")
    assert not out.exists()


@pytest.fixture(scope="module")
def unusable_models(comfy, tmp_path_factory) -> dict[str, Path]:
    """Files ComfyUI's loader refuses or loads as a model ACE cannot edit."""
    import comfy.supported_models
    import torch

    folder = tmp_path_factory.mktemp("unusable")
    files = {}
    save_file({"weight": torch.zeros(64)}, str(folder / "full.safetensors"))
    files["corrupted"] = folder / "corrupted.safetensors"  # a download cut short
    files["corrupted"].write_bytes((folder / "full.safetensors").read_bytes()[:-100])
    files["not a checkpoint"] = folder / "not_a_checkpoint.safetensors"
    save_file({"lora_unet_x.alpha": torch.ones(())}, str(files["not a checkpoint"]))
    # InstructPix2Pix (8 input channels): ComfyUI loads it, ACE does not support it. Only the
    # shapes matter to ComfyUI's detector, so the weights are zeros.
    config = comfy.supported_models.SD15_instructpix2pix({**TINY_SD15_UNET, "in_channels": 8})
    config.set_inference_dtype(torch.float16, None)
    unet = config.get_model({}, device="cpu").diffusion_model
    files["unsupported"] = folder / "pix2pix.safetensors"
    save_file({f"model.diffusion_model.{k}": torch.zeros(v.shape, dtype=torch.float16) for k, v in unet.state_dict().items()},
              str(files["unsupported"]))
    return files


@pytest.mark.parametrize("kind, phrases", [
    ("corrupted", ["'corrupted.safetensors' cannot be loaded", "corrupted or not a model file"]),
    ("not a checkpoint", ["'not_a_checkpoint.safetensors' is not a checkpoint ComfyUI recognises"]),
    ("unsupported", ["'pix2pix.safetensors' is a SD15_instructpix2pix model; ACE supports Stable Diffusion 1.x"]),
])
def test_a_file_ace_cannot_use_fails(unusable_models, tmp_path, kind, phrases):
    out = tmp_path / "o.safetensors"
    failed_with(ace("erase", unusable_models[kind], "--concepts", "Monet", "--erasure", out, "--threads", 1), *phrases)
    assert not out.exists()


def test_the_command_imports_neither_torch_nor_comfyui_until_it_runs():
    code = "import sys, runner.cli; print(sorted({'torch', 'comfy', 'nodes'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr
