"""Plain helpers that read ComfyUI's model objects: which family a MODEL is and where its UNet is.

Every node that takes a MODEL goes through these, so the mapping from ComfyUI's model classes to
ACE's families lives in one place.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import comfy.lora
import comfy.model_management
import comfy.samplers
import torch

from ..ace.adapter import GatedAdapter
from ..ace.erasure import Erasure
from ..ace.families import Projection, check_family, cross_attention_projections
from ..ace.finetune import autograd_safe

# ComfyUI's model config class (comfy/supported_models.py) -> ACE family. Matched by exact class
# name: variants such as SD15_instructpix2pix take other inputs and are not assumed to work.
_FAMILY_OF_CONFIG: dict[str, str] = {
    "SD15": "sd1",
    "SD20": "sd2",
    "SD21UnclipL": "sd2",
    "SD21UnclipH": "sd2",
    "SDXL": "sdxl",
    "SSD1B": "sdxl",
    "Segmind_Vega": "sdxl",
    "AceToy": "ace-toy",  # the benchmark's toy model (benchmark/toy_comfy.py)
}


def family_of(model_patcher) -> str:
    """ACE's family name for a ComfyUI MODEL ("sd1", "sd2", "sdxl"), else its config class name."""
    config_name = type(model_patcher.model.model_config).__name__
    if config_name.startswith("KOALA_"):
        return "sdxl"
    return _FAMILY_OF_CONFIG.get(config_name, config_name)


def unet_of(model_patcher) -> torch.nn.Module:
    """The denoising network (`diffusion_model`) inside a ComfyUI MODEL."""
    return model_patcher.model.diffusion_model


def check_model(model_patcher, model_name: str = "this model") -> list[Projection]:
    """Refuse a MODEL that ACE cannot edit; return its cross-attention key/value projections."""
    projections = cross_attention_projections(unet_of(model_patcher))
    check_family(family_of(model_patcher), projections, model_name)
    return projections


class ClipTextEncoder:
    """ACE's `TextEncoder` over a ComfyUI CLIP: the token embeddings its model's UNet receives."""

    def __init__(self, clip):
        self.clip = clip
        # The first word-level tokenizer inside ComfyUI's wrapper (clip_l for SD1/SDXL, clip_h for
        # SD2): its start/end tokens tell where a prompt's words are.
        self.tokenizer = next(
            t for t in vars(clip.tokenizer).values() if hasattr(t, "tokenize_with_weights") and hasattr(t, "end_token")
        )
        self.start_tokens = 1 if self.tokenizer.start_token is not None else 0

    def count_tokens(self, text: str) -> int:
        chunk = self.tokenizer.tokenize_with_weights(text)[0]
        ids = [t[0] for t in chunk][self.start_tokens :]
        return ids.index(self.tokenizer.end_token) if self.tokenizer.end_token in ids else len(ids)

    def encode(self, prompts) -> torch.Tensor:
        # One prompt = one window of tokens. ComfyUI encodes the windows of a long prompt as one
        # batch and joins them along the sequence, so N prompts go in as N windows and come back
        # as N rows: one call instead of N.
        windows: dict[str, list] = {}
        for prompt in prompts:
            for key, chunks in self.clip.tokenize(prompt).items():
                windows.setdefault(key, []).append(chunks[0])
        cond = self.clip.encode_from_tokens(windows)
        return cond.reshape(len(prompts), -1, cond.shape[-1])


def projection_weights(model_patcher, projections: list[Projection]) -> dict[str, torch.Tensor]:
    """The weights of the projections ACE edits, with the MODEL's weight patches (LoRAs) applied.

    Clones of a MODEL share its weights, and ComfyUI patches them in place for whichever clone it
    loaded last (a LoRA in another branch of the graph, this MODEL itself): the original weight
    then sits in the clones' shared `backup`, and that is the one to start from."""
    modules = dict(unet_of(model_patcher).named_modules())
    weights = {}
    for p in projections:
        key = f"diffusion_model.{p.name}.weight"
        backup = model_patcher.backup.get(key)
        weight = backup.weight if backup is not None else modules[p.name].weight
        if key in model_patcher.patches:
            weight = comfy.lora.calculate_weight(model_patcher.patches[key], weight.float().clone(), key)
        weights[p.name] = weight
    return weights


def num_res_blocks(model_patcher) -> int:
    """Residual blocks per UNet level, which fixes the diffusers names of its layers."""
    n = model_patcher.model.model_config.unet_config.get("num_res_blocks", 2)
    return n[0] if isinstance(n, (list, tuple)) else int(n)


def with_erasure(model_patcher, erasure: Erasure, strength: float):
    """A clone of the MODEL whose cross-attention projections run the gated edit.

    The edit is a set of object patches (each projection's `forward`), which ComfyUI applies when
    it loads this clone and removes when it unloads it: the input MODEL, and every other branch of
    the graph, stay as they were. Weight patches such as LoRAs keep working underneath.
    """
    erasure.check_fits(family_of(model_patcher), check_model(model_patcher))
    adapter = copy.deepcopy(erasure.adapter)
    adapter.strength = strength
    adapter.requires_grad_(False)
    return _patched_clone(model_patcher, adapter)


def _patched_clone(model_patcher, adapter: GatedAdapter):
    """A clone whose projections run `adapter` on top of whatever forwards they already had."""
    clone = model_patcher.clone()
    modules = dict(unet_of(model_patcher).named_modules())
    patches = adapter.patched_forwards(modules, "diffusion_model.", existing=clone.object_patches)
    for name, forward in patches.items():
        clone.add_object_patch(name, forward)
    return clone


@contextlib.contextmanager
def attached_for_training(model_patcher, adapter: GatedAdapter) -> Iterator:
    """Stage 2's network: a patched clone, loaded once by ComfyUI's model management, as a
    denoiser D(x_t, σ, context). The "original" predictions come from the same network with the
    adapter switched off, so no second copy of the UNet is ever made."""
    clone = _patched_clone(model_patcher, adapter)
    comfy.model_management.load_models_gpu([clone], force_full_load=True)
    base = clone.model
    autograd_safe(base.diffusion_model)
    base.diffusion_model.requires_grad_(False)  # only the adapter trains
    dtype = base.get_dtype()
    adm = getattr(base, "adm_channels", 0)

    def denoise(x_t, sigma, context):
        extra = {"y": torch.zeros(len(x_t), adm, device=x_t.device, dtype=x_t.dtype)} if adm else {}
        return base.apply_model(x_t, sigma, c_crossattn=context.to(dtype), **extra).float()

    try:
        yield denoise
    finally:
        # Unload this clone the way ComfyUI does when another clone loads, so that its patches come
        # off now, also when training was cancelled, and nothing half-patched stays behind.
        loaded = comfy.model_management.current_loaded_models
        for i in reversed(range(len(loaded))):
            if loaded[i].model is clone:
                entry = loaded.pop(i)
                entry.model.detach(unpatch_all=True)
                entry.model_finalizer.detach()


def training_sigmas(model_patcher, sample_steps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels from the model's own schedule: a short schedule to sample the concept's
    examples with (descending, ending at 0) and the levels to train at."""
    sampling = model_patcher.get_model_object("model_sampling")
    sample = comfy.samplers.calculate_sigmas(sampling, "karras", sample_steps).float().cpu()
    return sample, sample[:-1]
