"""Erasure files: the gated erasure (exact ACE) and the portable LoRA (gate fixed open).

Only the adapter is saved, never the model, as `.safetensors` (never pickle) with JSON metadata.
Loading checks the format, its version, every tensor's presence, shape and finiteness, and says
what is wrong in the user's terms.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapter import GatedAdapter, OutlierGate, check_strength
from .concepts import ConceptRequest
from .erasure import Erasure
from .families import GATE_SCOPES, Projection

FORMAT = "ace-erasure"
# 3: one joint edit per projection and one gate per concept (versions 1 and 2 summed one edit per
# group of concepts, a different model of the erasure that this version no longer computes).
FORMAT_VERSION = 3


class ErasureFileError(ValueError):
    """An erasure file that cannot be loaded, or a file name that cannot be used."""


def check_file_name(name: str, suffix: str = ".safetensors") -> str:
    """A bare file name for a model folder: no folders, no `..`, no odd characters."""
    if not isinstance(name, str) or not name.strip():
        raise ErasureFileError("The file name is empty: give a name such as 'no_van_gogh'.")
    name = name.strip()
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name or os.path.isabs(name):
        raise ErasureFileError(
            f"'{name}' has a folder or '..' in it; give a plain file name, the file goes into the "
            "pack's model folder."
        )
    if not re.fullmatch(r"[\w\- .()\[\]+,]+", name) or name.startswith("."):
        raise ErasureFileError(f"'{name}' has characters a file name should not have; use letters, digits, - and _.")
    if not name.endswith(suffix):
        name += suffix
    return name


def save_erasure(erasure: Erasure, path: str) -> None:
    a = erasure.adapter
    tensors = {
        "gate.directions": a.gate_basis,
        "gate.center": a.gate_center,
        "gate.threshold": a.gate_threshold,
        "gate.log_temperature": a.gate_log_temperature,
    }
    if a.has_change_gate:  # an erasure made without change gates has none to save
        tensors["gate.change_threshold"] = a.change_threshold
    if a.has_outlier_gate:
        tensors["gate.outlier_center"] = a.outlier_center
        tensors["gate.outlier_whitener"] = a.outlier_whitener
    for p, down, up in zip(a.projections, a.lora_down, a.lora_up):
        tensors[f"{p.name}.lora_down"] = down
        tensors[f"{p.name}.lora_up"] = up
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    info = {k: v for k, v in erasure.info.items() if k != "history"}
    if erasure.info.get("history"):
        info["final_losses"] = erasure.info["history"][-1]
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "family": erasure.family,
        "projections": json.dumps([[p.name, p.in_features, p.out_features] for p in a.projections]),
        "request": json.dumps(erasure.request.to_json()),
        "num_res_blocks": str(erasure.num_res_blocks),
        "num_gates": str(a.num_gates),
        "rank": str(a.rank),
        "gate_rank": str(a.gate_basis.shape[-1]),
        **({"change_quantile": str(a.change_quantile)} if a.has_change_gate else {}),
        **({"outlier_quantile": str(a.outlier_quantile), "outlier_threshold": repr(a.outlier_threshold)}
           if a.has_outlier_gate else {}),
        "info": json.dumps(info, default=str),
    }
    save_file(tensors, path, metadata=metadata)


def load_erasure(path: str) -> Erasure:
    name = os.path.basename(path)
    if not path.endswith(".safetensors"):
        raise ErasureFileError(f"'{name}' is not a .safetensors file; ACE only loads safetensors erasure files.")
    if not os.path.isfile(path):
        raise ErasureFileError(f"There is no erasure file '{name}'.")
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ErasureFileError(f"'{name}' is corrupted or not a safetensors file ({e}).") from None
    if metadata.get("format") != FORMAT:
        raise ErasureFileError(
            f"'{name}' is not an ACE erasure file (a plain LoRA or another model file?). "
            "Load LoRAs with ComfyUI's LoraLoader; load erasures saved by ACE Save Erasure."
        )
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        version = -1
    if version in (1, 2):
        raise ErasureFileError(
            f"'{name}' was made by an earlier version of this pack (erasure format {version}), whose edits this "
            "version no longer computes; erase the concepts again to make a new file."
        )
    if version != FORMAT_VERSION:
        raise ErasureFileError(
            f"'{name}' uses erasure format version {metadata.get('format_version')}; this version of "
            f"the pack reads version {FORMAT_VERSION}. Update the pack or re-create the erasure."
        )
    try:
        projections = [Projection(n, int(i), int(o)) for n, i, o in json.loads(metadata["projections"])]
        request = ConceptRequest.from_json(json.loads(metadata["request"]))
        info = json.loads(metadata.get("info", "{}"))
        family = metadata["family"]
        num_res_blocks = int(metadata["num_res_blocks"])
        change_quantile = float(metadata.get("change_quantile", "1"))
        outlier_quantile = float(metadata.get("outlier_quantile", "1"))
        outlier_threshold = float(metadata.get("outlier_threshold", "inf"))
    except (KeyError, ValueError, TypeError) as e:
        raise ErasureFileError(f"'{name}' has broken metadata ({e}); re-create the erasure.") from None

    def get(key, shape):
        if key not in tensors:
            raise ErasureFileError(f"'{name}' is incomplete: tensor '{key}' is missing.")
        t = tensors.pop(key)
        if tuple(t.shape) != tuple(shape):
            raise ErasureFileError(f"'{name}' is damaged: '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}.")
        if not torch.isfinite(t).all():
            raise ErasureFileError(f"'{name}' is damaged: '{key}' holds NaN or infinite values.")
        return t

    K, r, kg = int(metadata["num_gates"]), int(metadata["rank"]), int(metadata["gate_rank"])
    if K != len(request.concepts) or not projections:
        raise ErasureFileError(f"'{name}' has inconsistent metadata; re-create the erasure.")
    d = projections[0].in_features
    change_threshold = get("gate.change_threshold", (len(projections),)) if "gate.change_threshold" in tensors else None
    if (change_threshold is None) != (change_quantile == 1) or not 0 < change_quantile <= 1:
        raise ErasureFileError(f"'{name}' has inconsistent change gates; re-create the erasure.")
    outlier = None
    if "gate.outlier_whitener" in tensors or outlier_quantile != 1:
        if not (0 < outlier_quantile < 1 and math.isfinite(outlier_threshold)):
            raise ErasureFileError(f"'{name}' has an inconsistent outlier gate; re-create the erasure.")
        outlier = OutlierGate(get("gate.outlier_center", (d,)), get("gate.outlier_whitener", (d, d)),
                              outlier_threshold, outlier_quantile)
    adapter = GatedAdapter(
        projections,
        gate_basis=get("gate.directions", (K, d, kg)),
        gate_center=get("gate.center", (K, d)),
        gate_threshold=get("gate.threshold", (K,)),
        gate_log_temperature=get("gate.log_temperature", (K,)),
        lora_down=[get(f"{p.name}.lora_down", (r, p.in_features)) for p in projections],
        lora_up=[get(f"{p.name}.lora_up", (p.out_features, r)) for p in projections],
        gate_scope=GATE_SCOPES.get(family, "token"),
        change_threshold=change_threshold,
        change_quantile=change_quantile,
        outlier=outlier,
    )
    if tensors:
        raise ErasureFileError(f"'{name}' has unexpected tensors ({sorted(tensors)[0]}, ...); it is not an erasure this pack wrote.")
    return Erasure(family, request, adapter, num_res_blocks, info)


def diffusers_name(ldm_name: str, num_res_blocks: int) -> str:
    """The diffusers module path of an LDM/ComfyUI UNet attention projection."""
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.1\.(.+)", ldm_name)
    if m:
        kind, n, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "input_blocks":
            return f"down_blocks.{(n - 1) // (num_res_blocks + 1)}.attentions.{(n - 1) % (num_res_blocks + 1)}.{rest}"
        return f"up_blocks.{n // (num_res_blocks + 1)}.attentions.{n % (num_res_blocks + 1)}.{rest}"
    m = re.fullmatch(r"middle_block\.1\.(.+)", ldm_name)
    if m:
        return f"mid_block.attentions.0.{m.group(1)}"
    raise ValueError(f"no diffusers name for UNet layer '{ldm_name}'")


@dataclass
class PortableLora:
    """The portable LoRA of an erasure: its tensors (kohya keys), its rank, and how far it is from
    the erasure with every gate open, per projection: ‖ΔW − up·down‖_F / ‖ΔW‖_F with
    ΔW = strength · B A (0 where the LoRA is exact)."""

    tensors: dict[str, torch.Tensor]
    rank: int
    errors: dict[str, float]

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / max(len(self.errors), 1)


def lora_key(erasure: Erasure, name: str) -> str:
    """The kohya key of a projection in the portable LoRA (`lora_unet_` + its module path with `_`)."""
    # diffusers module names for SD1.x/SD2.x, the original LDM names for SDXL and the toy model,
    # as their trainers write them (and as ComfyUI, A1111 and diffusers read them back)
    module = diffusers_name(name, erasure.num_res_blocks) if erasure.family in ("sd1", "sd2") else name
    return "lora_unet_" + module.replace(".", "_")


def _compressed(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors of ΔW = up · down (Eckart–Young), and their relative error.

    ΔW is never formed: with up = Q_u R_u and downᵀ = Q_d R_d (QR), ΔW = Q_u (R_u R_dᵀ) Q_dᵀ, so
    the SVD of the small core R_u R_dᵀ (r square) is the SVD of ΔW. The singular values split
    evenly between the two factors, as in stage 1. Zero-padded when ΔW has fewer directions."""
    Q_u, R_u = torch.linalg.qr(up.double())
    Q_d, R_d = torch.linalg.qr(down.double().T)
    U, S, Vh = torch.linalg.svd(R_u @ R_d.T)
    k = min(rank, len(S))
    root = S[:k].sqrt()
    new_up = torch.zeros(up.shape[0], rank, dtype=torch.float64)
    new_down = torch.zeros(rank, down.shape[1], dtype=torch.float64)
    new_up[:, :k] = (Q_u @ U[:, :k]) * root
    new_down[:k] = root[:, None] * (Vh[:k] @ Q_d.T)
    total = S.square().sum()
    error = (S[k:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return new_up.float(), new_down.float(), error


def portable_lora(erasure: Erasure, strength: float = 1.0, rank: int | None = None) -> PortableLora:
    """The erasure with every gate open as a standard LoRA.

    Without `rank`, each projection's LoRA is the joint edit's pair (down = A, up = strength · B):
    exact, of the edit's rank (the rank per concept times the concepts, at most the stage-1
    cap). With `rank` R, it is compressed to rank R (the best rank-R approximation of B A per
    projection, by SVD); `errors` says what that cost. A rank at or above the edit's is exact."""
    strength = check_strength(strength)
    a = erasure.adapter
    full = a.rank
    if rank is not None and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"The LoRA rank must be a whole number of at least 1, got {rank!r}.")
    rank = full if rank is None else min(rank, full)
    tensors, errors = {}, {}
    for p, down, up in zip(a.projections, a.lora_down, a.lora_up):
        key = lora_key(erasure, p.name)
        down = down.detach().float().cpu()  # [r, d]
        up = up.detach().float().cpu() * strength  # [o, r]
        errors[p.name] = 0.0
        if rank < full:
            up, down, errors[p.name] = _compressed(up, down, rank)
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))  # alpha = rank: scale 1
    return PortableLora(tensors, rank, errors)


def lora_state_dict(erasure: Erasure, strength: float = 1.0, rank: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `portable_lora`: what ComfyUI's LoraLoader and diffusers load."""
    return portable_lora(erasure, strength, rank).tensors


# What LoRA tools read to tell which base model a LoRA is for, as trainers write it: kohya's
# sd-scripts keys (`ss_*`, read by A1111/Forge and model sites) and Stability's model spec
# (`modelspec.*`). SD2's architecture name also says its prediction type (512 = epsilon, 768-v).
_SD_SCRIPTS_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base",
                 ("sd2", "epsilon"): "stable-diffusion-v2-512", ("sd2", "v"): "stable-diffusion-v2-768-v",
                 ("sd2", None): "stable-diffusion-v2"}
_IMPLEMENTATION = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}


def lora_metadata(erasure: Erasure, lora: PortableLora) -> dict[str, str]:
    """The LoRA file's metadata: the base model family (and, where the erasure recorded it, the
    prediction type: `info["prediction"]`, "epsilon" or "v"), its rank, and what it erases."""
    concepts = ", ".join(c.target for c in erasure.request.concepts)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(lora.rank),
        "ace_family": erasure.family,
        "ace_concepts": concepts,
        "ace_lora_max_error": f"{lora.max_error:.6g}",
    }
    family, prediction = erasure.family, erasure.info.get("prediction")
    if family in _SD_SCRIPTS_VERSION:
        architecture = _ARCHITECTURE[(family, prediction if prediction in ("epsilon", "v") else None)
                                     if family == "sd2" else family]
        metadata |= {
            "ss_base_model_version": _SD_SCRIPTS_VERSION[family],
            "ss_v2": str(family == "sd2"),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": _IMPLEMENTATION[family],
            "modelspec.title": f"ACE erasure: {concepts}",
            "modelspec.description": "Concepts erased with ACE (Attentional Concept Erasure), gate fixed open.",
        }
        if prediction in ("epsilon", "v"):
            metadata["modelspec.prediction_type"] = prediction
    return metadata


def export_lora(erasure: Erasure, path: str, strength: float = 1.0, rank: int | None = None) -> PortableLora:
    """Write `portable_lora(erasure, strength, rank)` with `lora_metadata` to `path`; return it."""
    lora = portable_lora(erasure, strength, rank)
    save_file(lora.tensors, path, metadata=lora_metadata(erasure, lora))
    return lora
