"""Packaging and set-up: registry metadata, requirements, the set-up script's errors."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from comfy_harness import REPO, copy_tracked_tree

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMFY_CLI = Path(sys.executable).with_name("comfy")
NEVER_LISTED = {"torch", "torchvision", "torchaudio"}  # they come with the user's ComfyUI


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


def run_comfy_cli(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    # Offline and non-interactive: no telemetry prompt, no update check, no stdin, own HOME.
    env = {**os.environ, "HOME": str(home), "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1",
           "COMFY_NO_UPDATE_CHECK": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([str(COMFY_CLI), "--skip-prompt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=180)


def test_comfy_cli_validates_and_packs_the_node(tmp_path):
    copy = copy_tracked_tree(tmp_path / "comfyui-ace")
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    home = tmp_path / "home"
    home.mkdir()

    validate = run_comfy_cli(["node", "validate"], copy, home)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "All validation checks passed" in validate.stdout + validate.stderr, validate.stdout + validate.stderr
    assert "Security warnings" not in validate.stdout + validate.stderr

    pack = run_comfy_cli(["node", "pack"], copy, home)
    assert pack.returncode == 0, pack.stdout + pack.stderr
    with zipfile.ZipFile(copy / "node.zip") as z:
        names = set(z.namelist())
    assert {"__init__.py", "pyproject.toml", "LICENSE", "requirements.txt", "README.md",
            "nodes/__init__.py", "nodes/model_info.py"} <= names
    assert not any(n.startswith((".venv/", ".cache/", ".git/")) or "__pycache__" in n for n in names)


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
