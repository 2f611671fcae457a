"""Stage 2: adversarially augmented fine-tuning of the gated adapter.

Only the adapter trains (every layer's A and B, and each gate's threshold and temperature); the
network stays frozen, and the original network's predictions come from the same network with
the adapter switched off. Per step, for a concept drawn in turn:

    L_erase = ‖D_edit(x_t, σ, concept) − sg[D_orig(x_t, σ, neutral)]‖²
    L_adv   = the same loss at concept + δ, δ found by projected gradient ascent on the concept
              tokens' embeddings within a ball of radius ρ·‖token‖ (the attack an adversarial
              prompt makes, in embedding space)
    L_pres  = ‖D_edit(x_t, σ, p) − sg[D_orig(x_t, σ, p)]‖²  on preserve prompts
    L       = L_erase + α L_adv + β L_pres

`D(x_t, σ, context)` is the network's denoised estimate of x_0; `x_t = x_0 + σ ε` with `x_0`
latents the original model generated for the concept.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter import GatedAdapter
from .network import Denoiser
from .tokens import RequestTokens


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 40
    learning_rate: float = 5e-3
    adversarial_weight: float = 1.0  # α
    preserve_weight: float = 1.0  # β
    attack_radius: float = 0.1  # ρ, relative to each token embedding's norm
    attack_steps: int = 2
    batch_size: int = 2
    images_per_concept: int = 2  # examples of each concept the original model draws to train on
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.steps, int) and 0 <= self.steps <= 100_000):
            raise ValueError(f"steps must be an integer from 0 to 100000, got {self.steps!r}")
        if not (isinstance(self.attack_steps, int) and 0 <= self.attack_steps <= 100):
            raise ValueError(f"attack steps must be an integer from 0 to 100, got {self.attack_steps!r}")
        if not (isinstance(self.batch_size, int) and 1 <= self.batch_size <= 64):
            raise ValueError(f"batch size must be an integer from 1 to 64, got {self.batch_size!r}")
        if not (isinstance(self.images_per_concept, int) and 1 <= self.images_per_concept <= 64):
            raise ValueError(f"images per concept must be an integer from 1 to 64, got {self.images_per_concept!r}")
        for name in ("learning_rate", "adversarial_weight", "preserve_weight", "attack_radius"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {v!r}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning rate must be in (0, 1], got {self.learning_rate!r}")


@dataclass
class StepReport:
    step: int
    total: int
    losses: dict[str, float]


@dataclass
class FinetuneResult:
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def autograd_safe(module: torch.nn.Module) -> None:
    """Make tensors created under `torch.inference_mode` usable by autograd.

    ComfyUI loads models inside inference mode; backpropagating through such weights fails
    ("Inference tensors cannot be saved for backward"). Each such parameter or buffer is replaced
    by a normal copy with the same values, one at a time, so no second copy of the model exists.
    """
    with torch.inference_mode(False):
        for owner in module.modules():
            for name, p in list(owner.named_parameters(recurse=False)):
                if p.is_inference():
                    setattr(owner, name, torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad))
            for name, b in list(owner.named_buffers(recurse=False)):
                if b.is_inference():
                    setattr(owner, name, b.clone())


def _mse(a, b):
    return (a.float() - b.float()).square().mean()


def finetune(
    adapter: GatedAdapter,
    denoise: Denoiser,
    tokens: RequestTokens,
    latents: list[torch.Tensor],
    sigmas: torch.Tensor,
    cfg: FinetuneConfig = FinetuneConfig(),
    callback: Callable[[StepReport], bool | None] | None = None,
) -> FinetuneResult:
    """Train `adapter` in place. `latents[c]` are clean latents `[n, ...]` of concept `c`;
    `sigmas` the noise levels to draw from. `callback` is called after every step; returning
    True stops the run (an exception it raises propagates, leaving the adapter mid-training:
    callers that cancel should discard it)."""
    result = FinetuneResult()
    if cfg.steps == 0:
        return result
    start = time.perf_counter()
    device = latents[0].device
    generator = torch.Generator().manual_seed(cfg.seed)

    def pick(n: int, k: int) -> torch.Tensor:
        return torch.randint(0, n, (k,), generator=generator)

    def usable(t: torch.Tensor) -> torch.Tensor:  # a normal tensor autograd may save, on device
        return (t.clone() if t.is_inference() else t).to(device)

    with torch.inference_mode(False), torch.enable_grad():
        autograd_safe(adapter)
        params = list(adapter.parameters())
        optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
        preserve = usable(tokens.preserve_context)
        for step in range(cfg.steps):
            c = step % len(tokens.concepts)
            concept = tokens.concepts[c]
            b = cfg.batch_size
            prompt = pick(len(concept.prompts), b)
            x0 = usable(latents[c][pick(len(latents[c]), b)])
            sigma = usable(sigmas[pick(len(sigmas), b)]).to(x0.dtype)
            noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
            x_t = (x0 + noise * sigma.view(-1, *[1] * (x0.dim() - 1))).detach()
            ctx = usable(concept.concept_context[prompt])
            mask = usable(concept.concept_mask[prompt]).unsqueeze(-1)
            p_ctx = preserve[pick(len(preserve), b).to(device)]

            with torch.no_grad(), adapter.disabled():
                target_erase = denoise(x_t, sigma, usable(concept.neutral_context[prompt]))
                target_preserve = denoise(x_t, sigma, p_ctx)

            losses = {"erase": _mse(denoise(x_t, sigma, ctx), target_erase)}
            if cfg.adversarial_weight > 0 and cfg.attack_radius > 0 and cfg.attack_steps > 0:
                delta = attack(adapter, denoise, x_t, sigma, ctx, mask, target_erase, cfg, generator)
                losses["adversarial"] = _mse(denoise(x_t, sigma, ctx + delta), target_erase)
            if cfg.preserve_weight > 0:
                losses["preserve"] = _mse(denoise(x_t, sigma, p_ctx), target_preserve)
            total = (
                losses["erase"]
                + cfg.adversarial_weight * losses.get("adversarial", 0.0)
                + cfg.preserve_weight * losses.get("preserve", 0.0)
            )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()

            record = {k: v.item() for k, v in losses.items()} | {"total": total.item()}
            result.history.append(record)
            if callback is not None and callback(StepReport(step + 1, cfg.steps, record)):
                result.stopped_early = True
                break
    for p in params:
        p.grad = None
    result.seconds = time.perf_counter() - start
    return result


def attack(
    adapter: GatedAdapter,
    denoise: Denoiser,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    context: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    cfg: FinetuneConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Projected gradient ascent on the concept tokens' embeddings: the perturbation δ within
    ‖δ_token‖ ≤ ρ·‖e_token‖ that most raises the erase loss (brings the concept back)."""
    radius = cfg.attack_radius * context.norm(dim=-1, keepdim=True).detach()
    delta = torch.randn(context.shape, generator=generator).to(context) * mask
    delta = _project(delta, radius) * 0.5
    step_size = 2.5 / max(cfg.attack_steps, 1)
    for p in adapter.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(cfg.attack_steps):
            delta.requires_grad_(True)
            loss = _mse(denoise(x_t, sigma, context + delta), target)
            (grad,) = torch.autograd.grad(loss, delta)
            step = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12) * radius * step_size
            delta = _project((delta + step) * mask, radius).detach()
    finally:
        for p in adapter.parameters():
            p.requires_grad_(True)
    return delta


def _project(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return delta * torch.clamp(radius / norm, max=1.0)


@torch.no_grad()
def sample_latents(
    denoise: Denoiser,
    context: torch.Tensor,
    shape: tuple[int, ...],
    sigmas: torch.Tensor,
    seed: int = 0,
) -> torch.Tensor:
    """Latents `[len(context), *shape]` generated by Euler steps along `sigmas` (descending,
    ending at 0): the "few generated examples" of the concept that stage 2 trains on."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((len(context), *shape), generator=generator).to(context.device) * sigmas[0]
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        s = sigma.expand(len(x)).to(x)
        denoised = denoise(x, s, context)
        x = x + (x - denoised) / sigma * (next_sigma - sigma)
    return x
