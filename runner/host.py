"""The one way into ComfyUI for everything that runs this pack outside ComfyUI's own start-up:
the tests, the benchmark, the command line, the demo's server and the toy model's training.

    from runner import host
    pack = host.start()                      # ComfyUI in this process, this pack loaded by its loader
    pack.nodes.comfy_models.with_erasure(model, erasure, 1.0)

`comfyui_path()` finds ComfyUI (one rule: $COMFYUI_PATH, else the folder `scripts/setup.sh`
recorded in .cache/comfyui-path; anything else is an error that says what to do). `start()` brings
it up once per process and loads this checkout as a custom node pack, exactly as ComfyUI's
`main.py` does, and returns the pack's package: its `ace`, `nodes` and `toy.model` modules are the
ones the registered nodes use, so classes and exceptions are the same objects everywhere. In a
process where ComfyUI runs, reach those modules through the returned package, never by importing
`ace` or `nodes` from the repository root (which would make second copies). The pure modules
`toy.world` and `toy.classifier` do not need ComfyUI and are imported directly.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pkgutil
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
# The pack's folder in custom_nodes/: its registry name (pyproject.toml), which is the folder ComfyUI
# Manager and comfy-cli install it into, and which names its group in the template browser.
PACK_NAME = "ace-concept-erasure"
RECORDED_PATH = REPO / ".cache" / "comfyui-path"


class ComfyUINotFound(RuntimeError):
    """No usable ComfyUI: COMFYUI_PATH is wrong, or set-up has not run."""


class HostError(RuntimeError):
    """ComfyUI started, but the pack could not be loaded into it (or was started differently)."""


def comfyui_path() -> Path:
    """ComfyUI's folder: $COMFYUI_PATH, else the one recorded by scripts/setup.sh."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path, source = Path(env), "COMFYUI_PATH"
    elif RECORDED_PATH.is_file():
        path, source = Path(RECORDED_PATH.read_text().strip()), str(RECORDED_PATH)
    else:
        raise ComfyUINotFound(
            "No ComfyUI found: set COMFYUI_PATH to a ComfyUI folder (the one holding main.py), "
            "or run `bash scripts/setup.sh` to unpack the pinned ComfyUI 0.3.75."
        )
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise ComfyUINotFound(
            f"{path} (from {source}) is not a ComfyUI folder: no main.py and comfy/. "
            "Fix COMFYUI_PATH or run `bash scripts/setup.sh`."
        )
    return path.resolve()


def link_pack(custom_nodes: Path) -> Path:
    """Put this checkout into a custom_nodes folder as PACK_NAME, where a registry install puts it."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return link


@dataclass
class Host:
    """ComfyUI running in this process: where it lives, its base folder, and this pack in it."""

    comfy_path: Path
    base_dir: Path
    device: str  # "cpu" or "cuda"
    pack: ModuleType  # this checkout's package, as ComfyUI's loader imported it
    node_ids: list[str] = field(default_factory=list)  # the node ids the pack registered
    extra_nodes: bool = False  # ComfyUI's comfy_extras nodes are loaded


_HOST: Host | None = None


def start(base_dir: Path | str | None = None, device: str = "auto", quiet: bool = True,
          extra_nodes: bool = False) -> ModuleType:
    """Start ComfyUI in this process (once; later calls return the same pack) and load this pack.

    base_dir: ComfyUI's base folder (models, input, output, temp, user, custom_nodes); every model
    folder points inside it, so a user's own models never leak in. Default: a new temp folder.
    device: "cpu", "cuda" or "auto" (CUDA when torch sees a GPU). quiet: only errors from
    ComfyUI's logging (it warns about optional packages it misses, such as torchaudio). extra_nodes: also load ComfyUI's built-in extra nodes (comfy_extras), as
    the server does; graphs that use them (the tests' executor) need it.
    Returns the pack's package module.
    """
    global _HOST
    if _HOST is not None:
        if extra_nodes and not _HOST.extra_nodes:
            asyncio.run(_load_extra_nodes())
            _HOST.extra_nodes = True
        return _HOST.pack
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise HostError("device 'cuda' was asked for, but torch sees no CUDA GPU on this machine")
    comfy_path = comfyui_path()
    # ComfyUI first: its `nodes` module must win over this repository's `nodes/` package.
    sys.path[:] = [str(comfy_path)] + [p for p in sys.path if p != str(comfy_path)]
    if quiet:
        logging.getLogger().setLevel(logging.ERROR)

    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    args = comfy.cli_args.args
    args.cpu = device == "cpu"
    args.use_pytorch_cross_attention = True
    args.disable_api_nodes = True
    # As main.py does, before anything imports ComfyUI's `nodes`: that module puts ComfyUI/comfy
    # first on sys.path, after which `import utils` would find comfy/utils.py instead of the
    # `utils` package that server.py needs.
    import utils.extra_config  # noqa: F401
    import folder_paths

    base = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="ace-comfyui-"))
    _use_base_folder(folder_paths, base)
    import comfy.model_management  # noqa: F401  (after args: picks the device)
    import nodes

    if Path(nodes.__file__).resolve() != comfy_path / "nodes.py":
        raise HostError(f"`nodes` was imported from {nodes.__file__}, not from ComfyUI; never `import nodes` "
                        "from this repository")
    before = set(nodes.NODE_CLASS_MAPPINGS)
    pack_path = link_pack(base / "custom_nodes")

    async def load() -> bool:
        if extra_nodes:
            await _load_extra_nodes()
        return await nodes.load_custom_node(str(pack_path))

    if not asyncio.run(load()):
        raise HostError(f"ComfyUI could not load the pack from {pack_path}; see the log above.")
    node_ids = sorted(k for k, cls in nodes.NODE_CLASS_MAPPINGS.items()
                      if k not in before and getattr(cls, "RELATIVE_PYTHON_MODULE", "") == f"custom_nodes.{PACK_NAME}")
    if not node_ids:
        raise HostError("the pack loaded but registered no nodes")
    pack = sys.modules[str(pack_path).replace(".", "_x_")]  # the name ComfyUI's loader gives it
    _import_submodules(pack)
    _HOST = Host(comfy_path, base, device, pack, node_ids, extra_nodes)
    return pack


def host() -> Host:
    """The running host (after `start`)."""
    if _HOST is None:
        raise HostError("ComfyUI has not been started in this process; call runner.host.start() first")
    return _HOST


def _use_base_folder(folder_paths, base: Path) -> None:
    for kind in ("output", "input", "temp", "user"):
        (base / kind).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_user_directory(str(base / "user"))
    for name, (_paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
        if name == "custom_nodes":
            continue
        folder = base / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[name] = ([str(folder)], extensions)
    folder_paths.models_dir = str(base / "models")


async def _load_extra_nodes() -> None:
    import nodes

    await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)


def _import_submodules(pack: ModuleType) -> None:
    """Import every module of the pack's `ace` and `nodes` packages (and `toy.model`), so that
    `pack.ace.tokens`, `pack.nodes.erase`, `pack.toy.model`, ... are attributes."""
    for package in ("ace", "nodes"):
        parent = importlib.import_module(f"{pack.__name__}.{package}")
        for info in pkgutil.iter_modules(parent.__path__):
            importlib.import_module(f"{parent.__name__}.{info.name}")
    importlib.import_module(f"{pack.__name__}.toy.model")


def machine() -> str:
    """The machine a figure was measured on, in one line: CPU, cores, torch and its threads, GPU."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the model here
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"{gpu}, {platform.system()} {platform.release()}")
