"""An erasure: the trained gated adapter with what it erases and which model it fits, and the
whole method from a concept request to that erasure (stages 0, 1 and 2 in order)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from .adapter import GatedAdapter
from .closed_form import ClosedFormConfig, closed_form_erasure
from .concepts import ConceptRequest
from .families import GATE_SCOPES, Projection, check_family
from .finetune import Denoiser, FinetuneConfig, StepReport, finetune, sample_latents
from .tokens import RequestTokens, TextEncoder, collect_request


@dataclass
class Erasure:
    family: str
    request: ConceptRequest
    adapter: GatedAdapter
    info: dict = field(default_factory=dict)

    @property
    def projections(self) -> list[Projection]:
        return self.adapter.projections

    def check_fits(self, family: str, projections: list[Projection]) -> None:
        """Raise ValueError unless this erasure was made for a model of this family and shape."""
        if family != self.family:
            raise ValueError(
                f"This erasure was made for a {self.family} model and cannot be applied to a "
                f"{family} model; erase the concepts again from this model."
            )
        mine = {(p.name, p.in_features, p.out_features) for p in self.projections}
        theirs = {(p.name, p.in_features, p.out_features) for p in projections}
        if mine != theirs:
            missing = sorted(mine - theirs)
            raise ValueError(
                f"This erasure does not fit this {family} model: its cross-attention layers differ "
                f"(e.g. {missing[0][0] if missing else sorted(theirs - mine)[0][0]}). It was made for "
                "another architecture of the same family; erase the concepts again from this model."
            )


def erase(
    encoder: TextEncoder,
    family: str,
    projections: list[Projection],
    weights: dict[str, torch.Tensor],
    request: ConceptRequest,
    closed_form: ClosedFormConfig = ClosedFormConfig(),
    training: FinetuneConfig = FinetuneConfig(),
    attach: Callable[[GatedAdapter], ContextManager[Denoiser]] | None = None,
    latent_shape: tuple[int, ...] | None = None,
    sample_sigmas: torch.Tensor | None = None,
    train_sigmas: torch.Tensor | None = None,
    images_per_concept: int = 2,
    device: torch.device | str = "cpu",
    callback: Callable[[StepReport], bool | None] | None = None,
) -> Erasure:
    """Stage 0 (token collection), stage 1 (closed form) and, when `training.steps > 0`,
    stage 2 (fine-tuning). Stage 2 needs `attach(adapter)`, a context manager yielding the
    denoiser `D(x_t, σ, context)` with the adapter attached (for a plain network,
    `adapter.attached(unet)`; in ComfyUI, a patched clone of the model), the latent shape and
    the noise levels to sample the concept's examples with (descending, ending at 0) and to
    train at."""
    check_family(family, projections)
    tokens = collect_request(encoder, request)
    adapter, info = closed_form_erasure(tokens, weights, projections, closed_form)
    adapter.gate_scope = GATE_SCOPES[family]
    info["stage2_seconds"] = 0.0
    info["closed_form"] = closed_form.__dict__
    erasure = Erasure(family, request, adapter, info)
    if training.steps > 0:
        if attach is None or latent_shape is None or sample_sigmas is None or train_sigmas is None:
            raise ValueError("fine-tuning needs the network (attach), the latent shape and the noise levels")
        erasure = fine_tune(erasure, tokens, attach, latent_shape, sample_sigmas, train_sigmas, training,
                            images_per_concept, device, callback)
    return erasure


def fine_tune(
    erasure: Erasure,
    tokens: RequestTokens,
    attach: Callable[[GatedAdapter], ContextManager[Denoiser]],
    latent_shape: tuple[int, ...],
    sample_sigmas: torch.Tensor,
    train_sigmas: torch.Tensor,
    training: FinetuneConfig = FinetuneConfig(),
    images_per_concept: int = 2,
    device: torch.device | str = "cpu",
    callback: Callable[[StepReport], bool | None] | None = None,
) -> Erasure:
    """Stage 2 on a copy of the erasure's adapter (the given erasure is not changed): sample a few
    examples of each concept with the edit off, then `finetune` on them."""
    adapter = copy.deepcopy(erasure.adapter)
    adapter.to(device)
    with attach(adapter) as denoise:
        with adapter.disabled():
            latents = [
                sample_latents(
                    denoise,
                    c.concept_context[:images_per_concept].to(device),
                    latent_shape,
                    sample_sigmas,
                    seed=training.seed + i,
                )
                for i, c in enumerate(tokens.concepts)
            ]
        result = finetune(adapter, denoise, tokens, latents, train_sigmas, training, callback)
    adapter.to("cpu")
    info = dict(erasure.info, stage2_seconds=result.seconds, history=result.history,
                stopped_early=result.stopped_early, training=training.__dict__)
    return Erasure(erasure.family, erasure.request, adapter, info)
