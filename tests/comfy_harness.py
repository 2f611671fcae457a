"""Run this pack inside a real ComfyUI, in-process or as a server, with tiny random models.

Nothing here mocks ComfyUI: ComfyUI starts in this process through `runner.host` (the one way
in), which loads the pack with ComfyUI's own loader; graphs run through its
`execution.PromptExecutor`, checkpoints load through its `CheckpointLoaderSimple`, and
`ComfyServer` (from `runner/server.py`, which the demo shares) starts its `main.py` and talks to
it over HTTP. ComfyUI is found through COMFYUI_PATH, else the path `scripts/setup.sh` recorded.

Tests reach the pack's modules as ComfyUI loaded them, `pack().nodes.comfy_models`, never by
importing `nodes` from this repository (ComfyUI's own `nodes` module owns that name).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import host
from runner.server import (  # noqa: F401  (the server side, shared with the demo; re-exported for tests)
    PACK_NAME,
    REPO,
    ComfyServer,
    GraphError,
    HarnessError,
    free_port,
    install_checkpoint,
)

MODEL_CACHE = REPO / ".cache" / "test-models"

# Bump when the tiny checkpoint's recipe changes; the cached file is keyed by it.
TINY_SD15_VERSION = 1
TINY_SD15_NAME = f"ace-tiny-sd15-v{TINY_SD15_VERSION}.safetensors"
TINY_SD15_SEED = 1234

# The tiny SD1.5 UNet: ComfyUI detects SD15 from model_channels=320 and 768-wide context, the rest
# is cut to one level. This is the config ComfyUI's detector reports for the saved file.
TINY_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
    "transformer_depth_output": [1, 1], "transformer_depth_middle": 1, "context_dim": 768,
    "use_linear_in_transformer": False, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


# --- ComfyUI in this process ---------------------------------------------------------------------

# Where the in-process tests run ComfyUI: the CPU, unless ACE_TEST_DEVICE says "cuda" (as
# scripts/gpu_check.sh does). The server tests always start ComfyUI's main.py with --cpu.
TEST_DEVICE = os.environ.get("ACE_TEST_DEVICE", "cpu")


def init_comfyui(base_dir: Path) -> host.Host:
    """ComfyUI in this process (on TEST_DEVICE, its extra nodes, folders under base_dir) with this
    pack, and the tests' in-memory model node."""
    host.start(base_dir, device=TEST_DEVICE, extra_nodes=True)
    import nodes

    nodes.NODE_CLASS_MAPPINGS[InMemoryModel.NODE_ID] = InMemoryModel
    return host.host()


def pack():
    """This pack's package as ComfyUI loaded it: `pack().nodes.comfy_models`, `pack().ace.families`."""
    return host.host().pack


# --- tiny random models --------------------------------------------------------------------------

def _randomize_(module, seed: int) -> None:
    """Seeded random weights for a module built with ComfyUI's ops (which skip initialisation).

    Matrices and kernels ~ N(0, 1/fan_in), biases and shifts 0, norm scales 1 (a random norm
    scale makes the UNet's output nearly constant).
    """
    import torch

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if t.ndim >= 2:
                t.normal_(0.0, t[0].numel() ** -0.5)
            elif leaf in ("bias", "vae_shift") or t.ndim == 0 and leaf != "vae_scale":
                t.zero_()
            else:  # norm scales, vae_scale
                t.fill_(1.0)


def build_tiny_sd15_checkpoint(path: Path, seed: int = TINY_SD15_SEED) -> Path:
    """Write a tiny random SD1.5-format checkpoint that ComfyUI's loader detects as SD15.

    UNet: TINY_SD15_UNET (25.8 M parameters); CLIP-L: ComfyUI's own, random (123.6 M); VAE: a
    random TAESD (2.4 M), which ComfyUI recognises by its key names. Stored as fp16.
    """
    import torch

    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    import comfy.utils

    config = comfy.supported_models.SD15(TINY_SD15_UNET)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device="cpu")
    _randomize_(model.diffusion_model, seed)
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    _randomize_(clip, seed + 1)
    taesd = comfy.taesd.taesd.TAESD()
    _randomize_(taesd, seed + 2)

    sd = model.state_dict_for_saving(clip.state_dict(), taesd.state_dict())
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    comfy.utils.save_torch_file(sd, str(partial), metadata={"ace_test_model": f"tiny-sd15-v{TINY_SD15_VERSION}"})
    partial.replace(path)
    return path


def tiny_sd15_checkpoint() -> Path:
    """The cached tiny SD1.5 checkpoint (.cache/test-models/), built on first use."""
    path = MODEL_CACHE / TINY_SD15_NAME
    if not path.is_file():
        build_tiny_sd15_checkpoint(path)
    return path


def load_checkpoint(ckpt_name: str):
    """(MODEL, CLIP, VAE) through ComfyUI's own CheckpointLoaderSimple node."""
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)


def _in_memory(config_class_name: str, unet_config: dict, seed: int, dtype=None, model_type=None):
    import torch

    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_class_name)(unet_config)
    config.set_inference_dtype(dtype or torch.float32, None)
    if model_type is None:  # what ComfyUI's loader decides from the (here empty) state dict
        model = config.get_model({}, device="cpu")
    else:  # as the loader builds it when the checkpoint says e.g. v-prediction (SD2.x 768-v)
        model = comfy.model_base.BaseModel(config, model_type=getattr(comfy.model_base.ModelType, model_type), device="cpu")
    _randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=torch.device("cpu")
    )


_SMALL_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 64, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "use_temporal_resblock": False, "use_temporal_attention": False,
}


def tiny_sd2_model(seed: int = 2, dtype=None, v_prediction: bool = False):
    """An SD2.x-family MODEL (ComfyUI's SD20 config) built in memory: 2 levels, widths 64/128,
    1024-wide context, linear projections in the transformers; 7 cross-attention layers.
    `v_prediction`: a v-prediction model (as SD 2.x 768-v), else epsilon (as SD 2.x base)."""
    return _in_memory("SD20", {
        **_SMALL_UNET, "adm_in_channels": None, "context_dim": 1024, "use_linear_in_transformer": True,
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    }, seed, dtype, "V_PREDICTION" if v_prediction else None)


def tiny_sdxl_model(seed: int = 3):
    """An SDXL-family MODEL (ComfyUI's SDXL config) built in memory: widths 64/128, 2048-wide
    context, no attention at the first level and depth 2 below it (as in SDXL), ADM input 2816;
    8 cross-attention layers."""
    return _in_memory("SDXL", {
        **_SMALL_UNET, "adm_in_channels": 2816, "num_classes": "sequential", "context_dim": 2048,
        "use_linear_in_transformer": True, "transformer_depth": [0, 2],
        "transformer_depth_output": [0, 0, 2, 2], "transformer_depth_middle": 2,
    }, seed)


# Text encoder layers of the small real CLIPs: ComfyUI takes the penultimate layer of SD2's and
# SDXL's towers, so 3 is the fewest that keeps that choice meaningful; full depth (24 for
# OpenCLIP-H, 12 + 32 for SDXL's CLIP-L + CLIP-G) only makes stage 0 slower on a CPU.
SMALL_CLIP_LAYERS = 3


def _random_clip(config_class_name: str, model_options: dict, seed: int):
    """ComfyUI's own CLIP (tokenizer and text model classes of the family, as its checkpoint
    loader builds them) with random weights and `model_options` changing the towers' depth."""
    import torch

    import comfy.sd
    import comfy.supported_models

    target = getattr(comfy.supported_models, config_class_name)({}).clip_target()
    clip = comfy.sd.CLIP(target=target, model_options={**model_options, "dtype": torch.float32})
    _randomize_(clip.cond_stage_model, seed)
    return clip


def tiny_sd2_clip(seed: int = 12, layers: int = SMALL_CLIP_LAYERS):
    """SD2.x's text encoder as ComfyUI builds it (`SD2Tokenizer` + `SD2ClipModel`: OpenCLIP-H,
    1024 wide, pads with token 0), random, `layers` deep."""
    # SD2ClipHModel gives its tower no model name; naming it lets its config be changed.
    return _random_clip("SD20", {"model_name": "clip_h", "clip_h_model_config": {"num_hidden_layers": layers}}, seed)


def tiny_sdxl_clip(seed: int = 13, layers: int = SMALL_CLIP_LAYERS):
    """SDXL's text encoders as ComfyUI builds them (`SDXLTokenizer` + `SDXLClipModel`: CLIP-L
    768 wide padding with its end token, CLIP-G 1280 wide padding with 0, joined to 2048; the
    pooled output from CLIP-G's projection), random, each tower `layers` deep."""
    return _random_clip("SDXL", {"clip_l_model_config": {"num_hidden_layers": layers},
                                 "clip_g_model_config": {"num_hidden_layers": layers}}, seed)


def tiny_sd1_without_cross_attention(seed: int = 4):
    """An SD15-config MODEL whose UNet has no transformers, so no cross-attention at all."""
    return _in_memory("SD15", {
        **_SMALL_UNET, "adm_in_channels": None, "context_dim": 768, "use_linear_in_transformer": False,
        "transformer_depth": [0, 0], "transformer_depth_output": [0, 0, 0, 0], "transformer_depth_middle": 0,
    }, seed)


def tiny_flux_model(seed: int = 5):
    """A Flux-family MODEL (joint attention, no attn2 cross-attention) built in memory."""
    import dataclasses

    import comfy.ldm.flux.model

    config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
        "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [4, 14, 14], "theta": 10000, "patch_size": 2,
        "qkv_bias": True, "guidance_embed": True,
    }
    # Newer ComfyUI asks which text-id axes a Flux model uses; Flux.1's detected config has none.
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        config["txt_ids_dims"] = []
    return _in_memory("Flux", config, seed)


# --- running graphs in-process -------------------------------------------------------------------

_IN_MEMORY: dict[str, Any] = {}


class InMemoryModel:
    """Test-only node: hands the executor a MODEL built in memory (see `in_memory_model_node`)."""

    NODE_ID = "ACETest_InMemoryModel"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "provide"
    CATEGORY = "ACE tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": ""})}}

    @classmethod
    def IS_CHANGED(cls, name):
        return id(_IN_MEMORY.get(name))

    def provide(self, name):
        return (_IN_MEMORY[name],)


def in_memory_model_node(name: str, model) -> dict:
    """Register a MODEL object under `name`; return the API-format node that outputs it."""
    _IN_MEMORY[name] = model
    return {"class_type": InMemoryModel.NODE_ID, "inputs": {"name": name}}


class _HeadlessServer:
    """What PromptExecutor needs of the server: client_id (None: nobody listens), last_node_id,
    and send_sync. Messages are kept for inspection."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


@dataclass
class GraphResult:
    """`outputs[node_id]` is the node's output tuple (each slot unwrapped when it holds one
    value); `ui[node_id]` its UI output (what the frontend shows); `messages` the executor's."""

    outputs: dict[str, tuple]
    ui: dict[str, dict]
    messages: list


_EXECUTOR = None


def run_graph(prompt: dict, fresh_cache: bool = False) -> GraphResult:
    """Validate and run an API-format graph with ComfyUI's PromptExecutor, as the server would.

    The executor lives for the whole session, so like ComfyUI it reuses cached node outputs
    (a checkpoint loads once); pass fresh_cache=True to start from an empty cache.
    Raises GraphError with ComfyUI's message when validation or a node fails.
    """
    global _EXECUTOR
    import execution

    host.host()  # ComfyUI must be running: use the `comfy` fixture
    if _EXECUTOR is None or fresh_cache:
        # Every cache setting main.py passes; newer ComfyUI reads "ram_inactive" too.
        _EXECUTOR = execution.PromptExecutor(
            _HeadlessServer(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0}
        )
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise GraphError(
            f"graph failed validation: {error['message']}: {error['details']} {json.dumps(node_errors)}",
            details=node_errors,
        )
    _EXECUTOR.execute(prompt, prompt_id, {}, outputs)
    if not _EXECUTOR.success:
        for event, data in _EXECUTOR.status_messages:
            if event == "execution_error":
                raise GraphError(
                    f"node {data['node_id']} ({data['node_type']}) failed: "
                    f"{data['exception_type']}: {data['exception_message'].strip()}",
                    node_id=data["node_id"], exception_type=data["exception_type"], details=data,
                )
        raise GraphError(f"execution failed: {_EXECUTOR.status_messages}")
    results = {}
    for node_id in prompt:
        entry = _EXECUTOR.caches.outputs.get(node_id)
        if inspect.isawaitable(entry):  # newer ComfyUI's caches are async
            entry = asyncio.run(entry)
        if entry is not None:
            results[node_id] = tuple(v[0] if isinstance(v, list) and len(v) == 1 else v for v in entry.outputs)
    return GraphResult(results, dict(_EXECUTOR.history_result["outputs"]), list(_EXECUTOR.status_messages))


# --- the checkout --------------------------------------------------------------------------------

def copy_tracked_tree(dest: Path) -> Path:
    """Copy this checkout's tracked and not-ignored files (the working copy) to dest."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest
