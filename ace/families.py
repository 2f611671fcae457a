"""Model families ACE supports and the cross-attention projections it edits.

ACE edits the text keys and values of every cross-attention layer. In the UNet of SD1.x, SD2.x
and SDXL (as ComfyUI and the original LDM code name its modules) those are the linear layers
`...attn2.to_k` and `...attn2.to_v`, fed by the text encoder's token embeddings (the context).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Context width of each supported family: what its text encoder feeds the UNet.
SUPPORTED_FAMILIES: dict[str, str] = {
    "sd1": "Stable Diffusion 1.x (CLIP-L, 768-wide context)",
    "sd2": "Stable Diffusion 2.x (OpenCLIP-H, 1024-wide context)",
    "sdxl": "Stable Diffusion XL (CLIP-L + CLIP-G, 2048-wide context)",
    "ace-toy-causal": "ACE's toy model (MiniLM read left to right, 384-wide context)",
    "ace-toy": "ACE's bidirectional toy model (MiniLM, 384-wide context)",
}
CONTEXT_WIDTHS: dict[str, int] = {"sd1": 768, "sd2": 1024, "sdxl": 2048, "ace-toy-causal": 384, "ace-toy": 384}

# Where a concept lives in the context, which sets how far its gate reaches (adapter.GATE_SCOPE_NAMES).
# CLIP's text encoders (SD1.x, SD2.x, SDXL) are causal: a token carries the words up to it, so the
# concept is in its own tokens and in every one after it (end-of-text and padding included), and
# a token keeps the largest gate opened before it; so does the causal toy. Gating each token on
# its own left the concept in the later tokens, whose gates open only partly (the benchmark's
# `ace_token_gate` ablation measures it against `ace`). The bidirectional
# toy's MiniLM reads both ways: every token of a prompt carries the concept, so a gate that opens
# on any token opens for the whole prompt.
GATE_SCOPES: dict[str, str] = {"sd1": "causal", "sd2": "causal", "sdxl": "causal", "ace-toy-causal": "causal",
                               "ace-toy": "prompt"}

PROJECTION_SUFFIXES = ("attn2.to_k", "attn2.to_v")


class UnsupportedModelError(ValueError):
    """The model is not one whose cross-attention ACE knows how to edit."""


def supported_list() -> str:
    return ", ".join(SUPPORTED_FAMILIES[f] for f in SUPPORTED_FAMILIES)


@dataclass(frozen=True)
class Projection:
    """One cross-attention key or value projection: `name` is its module path in the UNet."""

    name: str
    in_features: int
    out_features: int


def cross_attention_projections(unet: torch.nn.Module) -> list[Projection]:
    """Every `attn2.to_k` / `attn2.to_v` linear layer of a UNet, in module order."""
    found = []
    for name, module in unet.named_modules():
        if name.endswith(PROJECTION_SUFFIXES) and isinstance(module, torch.nn.Linear):
            found.append(Projection(name, module.in_features, module.out_features))
    return found


def check_family(family: str, projections: list[Projection], model_name: str = "this model") -> None:
    """Refuse a model ACE cannot edit, with a message naming its family and the supported ones."""
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"{model_name} is a {family} model; ACE supports {supported_list()}. "
            "Models whose text keys and values sit inside fused joint-attention projections "
            "(SD3, Flux and similar) are not supported yet."
        )
    if not projections:
        raise UnsupportedModelError(
            f"{model_name} ({family}) has no cross-attention (attn2.to_k / attn2.to_v) layers, so "
            f"there is nothing for ACE to edit; ACE supports {supported_list()}."
        )
    width = CONTEXT_WIDTHS[family]
    wrong = sorted({p.in_features for p in projections} - {width})
    if wrong:
        raise UnsupportedModelError(
            f"{model_name} looks like {family}, whose text context is {width} wide, but its "
            f"cross-attention takes {wrong}; it is not a model ACE supports ({supported_list()})."
        )
