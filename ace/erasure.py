"""An erasure: the trained gated adapter with what it erases and which model it fits, and the
whole method from a concept request to that erasure (stages 0, 1 and 2 in order)."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

from .adapter import GatedAdapter
from .closed_form import ClosedFormConfig, calibrate_change_gate, closed_form_erasure, preserve_tokens
from .concepts import ConceptRequest
from .expansion import ExpansionConfig, expand
from .families import GATE_SCOPES, Projection, check_family
from .finetune import FinetuneConfig, StepReport, finetune, sample_latents
from .network import Network
from .tokens import RequestTokens, collect_request, prompts_to


@dataclass
class Erasure:
    """What an erasure is: the adapter, the request it erases, and the model it fits.

    The adapter has one gate per concept of the request, in the request's order. `num_res_blocks`
    is the UNet layout of the model it was made from (residual blocks per level), which names its
    layers in an exported LoRA. `info` holds what happened when it was made (timings, fit
    statistics, the words expansion found, the training history): a record, never read back to
    compute."""

    family: str
    request: ConceptRequest
    adapter: GatedAdapter
    num_res_blocks: int
    info: dict = field(default_factory=dict)

    @property
    def projections(self) -> list[Projection]:
        return self.adapter.projections

    def gate_names(self) -> list[str]:
        """The concept each gate of the adapter belongs to."""
        return [c.target for c in self.request.concepts]

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
    network: Network,
    request: ConceptRequest,
    closed_form: ClosedFormConfig = ClosedFormConfig(),
    training: FinetuneConfig = FinetuneConfig(),
    expansion: ExpansionConfig = ExpansionConfig(),
    callback: Callable[[StepReport], bool | None] | None = None,
) -> Erasure:
    """Stage 0 (the concept's words, expanded with those the model draws it from, and their
    tokens), stage 1 (closed form) and, when `training.steps > 0`, stage 2 (fine-tuning) of
    `request` on `network`. The erasure's request holds the words expansion found as synonyms."""
    check_family(network.family, network.projections)
    started = time.perf_counter()
    info = {}
    if expansion.enabled:
        found = expand(network, request, expansion)
        request = found.expanded(request)
        info["expansion"] = found.to_json()
    stage1 = closed_form_erasure(request_tokens(network, request), network.weights, network.projections, closed_form)
    stage1.adapter.gate_scope = GATE_SCOPES[network.family]
    info |= {"stage1_seconds": time.perf_counter() - started, "closed_form_seconds": stage1.seconds,
             "stage2_seconds": 0.0, "concepts": stage1.stats, "closed_form": closed_form.__dict__}
    erasure = Erasure(network.family, request, stage1.adapter, network.num_res_blocks, info)
    if training.steps > 0:
        erasure = fine_tune(erasure, network, training, callback)
    return erasure


def request_tokens(network: Network, request: ConceptRequest) -> RequestTokens:
    """Stage 0's tokens of a request on this network: for an encoder that reads both ways, the
    positions before each concept too."""
    return collect_request(network.encoder, request, all_positions=GATE_SCOPES[network.family] == "prompt")


def fine_tune(
    erasure: Erasure,
    network: Network,
    training: FinetuneConfig = FinetuneConfig(),
    callback: Callable[[StepReport], bool | None] | None = None,
) -> Erasure:
    """Stage 2 on a copy of the erasure's adapter (the given erasure is not changed): sample a few
    examples of each concept with the edit off, then `finetune` on them."""
    erasure.check_fits(network.family, network.projections)
    tokens = request_tokens(network, erasure.request)
    adapter = copy.deepcopy(erasure.adapter)
    # The change gates' thresholds follow A and B, which training moves: stage 2 trains without
    # them and calibrates them on the trained edit, shut on the same share of preserve tokens.
    change_quantile, adapter.change_quantile = adapter.change_quantile, 1.0
    adapter.to(network.device)
    with network.attach(adapter) as denoise:
        with adapter.disabled():
            latents = []
            for i, c in enumerate(tokens.concepts):
                context, pooled = prompts_to(c.concept_at(slice(training.images_per_concept)), network.device)
                latents.append(sample_latents(denoise, context, network.latent_shape, network.sample_sigmas,
                                              seed=training.seed + i, pooled=pooled))
        result = finetune(adapter, denoise, network, tokens, latents, training, callback)
    adapter.to("cpu")
    if change_quantile < 1:
        calibrate_change_gate(adapter, network.weights, preserve_tokens(tokens), change_quantile)
    info = dict(erasure.info, stage2_seconds=result.seconds, history=result.history,
                stopped_early=result.stopped_early, training=training.__dict__)
    return Erasure(erasure.family, erasure.request, adapter, erasure.num_res_blocks, info)
