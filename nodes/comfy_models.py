"""Plain helpers that read ComfyUI's model objects: which family a MODEL is and where its UNet is.

Every node that takes a MODEL goes through these, so the mapping from ComfyUI's model classes to
ACE's families lives in one place.
"""
from __future__ import annotations

import torch

from ..ace.families import Projection, check_family, cross_attention_projections

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
