"""`python -m ace ...` from the repository root: the command line in `ace/cli.py`.

The command reuses the ComfyUI node code in `nodes/`, whose modules import `..ace` relatively,
so `ace/cli.py` must run as a module of this checkout taken as one package (as ComfyUI loads
it). That package is set up here without running the checkout's `__init__.py` (ComfyUI's entry,
which needs ComfyUI): `ace.cli` then starts with no ComfyUI and no torch, and imports them only
once its checks have passed.
"""
import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE = "comfyui_ace"  # the name this checkout gets as a package in this process

if PACKAGE not in sys.modules:
    spec = importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True)
    spec.submodule_search_locations = [str(Path(__file__).resolve().parent.parent)]
    sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
sys.exit(importlib.import_module(f"{PACKAGE}.ace.cli").main())
