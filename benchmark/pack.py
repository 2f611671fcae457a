"""This pack's modules as ComfyUI loads them, for the benchmark's scripts.

The benchmark runs the pack's real nodes' code on the toy model, so ComfyUI is initialised in
this process once (CPU, scratch folders) and the pack loaded by ComfyUI's own loader, exactly as
the tests do (`tests/comfy_harness.py`).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def pack_module(name: str):
    """e.g. pack_module("nodes.erase"): the module of this pack inside the running ComfyUI."""
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))
    import comfy_harness

    comfy_harness.init_comfyui(Path(tempfile.mkdtemp(prefix="ace-benchmark-")))  # once per process
    return comfy_harness.pack_module(name)
