"""The layout's rules, checked on the source: what may import what, and one way into ComfyUI.

- `ace/` is the algorithm in plain torch: it imports neither ComfyUI nor any other folder of the
  repository, and every module of it imports in a process that has no ComfyUI.
- `nodes/` is glue from ComfyUI to `ace/` (and the toy model's node to `toy/`): never the benchmark
  or the runner, which are not part of what ComfyUI loads.
- Nothing outside `tests/` imports from `tests/`.
- One function (`runner.host.start`) brings ComfyUI up in-process.
"""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from runner.host import REPO

FOLDERS = ("ace", "nodes", "toy", "runner", "benchmark")
TEST_MODULES = {p.stem for p in (REPO / "tests").glob("*.py")}


def imported_names(path) -> set[str]:
    """Top-level names a module imports: `comfy` for `import comfy.sd`, `nodes` for `from ..nodes
    import x` inside the pack (relative imports resolved against the repository root)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(REPO).parent.parts
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
                names.add(target[0] if target else "")
            else:
                names.add(node.module.split(".")[0])
    return names


def sources(folder: str):
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("folder, forbidden", [
    ("ace", {"comfy", "comfy_api", "folder_paths", "nodes", "benchmark", "runner", "toy", "tests"}),
    ("nodes", {"benchmark", "runner", "tests"}),
    ("toy", {"benchmark", "tests"}),
    ("runner", {"benchmark", "tests"}),
    ("benchmark", {"tests"}),
])
def test_each_folder_imports_only_what_it_may(folder, forbidden):
    for path in sources(folder):
        bad = imported_names(path) & (forbidden | (TEST_MODULES if "tests" in forbidden else set()))
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_every_module_of_ace_imports_without_comfyui():
    modules = [f"ace.{p.stem}" for p in sources("ace") if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'comfy', 'comfy_api', 'nodes', 'folder_paths', 'runner', 'benchmark', 'toy'}))")
    # Only the repository root on the path: no ComfyUI folder to find.
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n{code}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    assert len(modules) >= 9


def test_one_function_starts_comfyui_in_process():
    # ComfyUI's in-process start-up begins by switching off its own argument parsing.
    starters = [path.relative_to(REPO) for folder in (*FOLDERS, "tests") for path in sources(folder)
                if path.name != "test_structure.py" and "enable_args_parsing" in path.read_text(encoding="utf-8")]
    assert [str(p) for p in starters] == ["runner/host.py"]
