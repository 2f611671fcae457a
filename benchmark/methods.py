"""The erasure methods the benchmark compares, each run on a ComfyUI MODEL + CLIP.

Every method takes the same inputs, a `ConceptRequest` (what to erase, its anchor, what to keep)
and the toy model, and returns an `Erased`: a ComfyUI MODEL clone that renders with the concepts
erased, plus its timings. The input MODEL is never changed.

    ace              stages 0-2, as the "ACE Erase Concept" node runs them
    ace_stage1       the closed-form gated edit alone (no fine-tuning)
    ace_stage1_no_expand
                     the same without concept expansion (only the request's words)
    ace_ungated      stages 1-2 with every gate fixed open: the low-rank edit fires on every token
    ace_no_adv       stages 1-2 without the adversarial term (α = 0)
    ace_token_gate   stages 0-2 with the gate decided token by token (as for SD's causal CLIP) instead
                     of per prompt (the toy's MiniLM reads in both directions)
    ace_baked        `ace`'s erasure baked into the weights (ACE Bake Erasure: every gate open), what a
                     saved erased checkpoint holds; the same model as the exported LoRA loaded by
                     ComfyUI's LoraLoader (tests/test_bake.py checks the two agree)
    uce              Unified Concept Editing: the same token sets and closed-form objective as
                     stage 1, solved at full rank with no gate, written into the weights
    rece             RECE: UCE, then rounds of closed-form adversarial embeddings (the embedding
                     whose edited keys/values reproduce the concept's original ones), each erased
                     in turn by re-solving UCE with them added to the concept's tokens
    esd_x            Erased Stable Diffusion, cross-attention variant: the key/value weights
                     fine-tuned with negative guidance, ε(x, c) → ε(x) − η(ε(x, c) − ε(x))

The ACE variants go through the pack's own code paths (`nodes/erase.py`, `nodes/comfy_models.py`);
the two baselines are written here, on the same stage-0 tokens and noise levels, so that the
comparison differs only in the method.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace

import torch

from runner import host

ACE_TRAINING = {"steps": 40}  # FinetuneConfig fields the benchmark sets (the node's defaults otherwise)
ESD_STEPS = 100  # about ACE's stage-2 time: an ESD step is one backward pass, an ACE step four
ESD_LEARNING_RATE = 1e-3
ESD_GUIDANCE = 1.0  # η of ESD's negative guidance

RECE_ROUNDS = 3

METHODS = ("ace", "ace_stage1", "ace_stage1_no_expand", "ace_ungated", "ace_no_adv", "ace_token_gate", "ace_baked",
           "uce", "rece", "esd_x")
# Settings of ACE's own configs for a run (`python -m benchmark.run --set closed_form.rank=64`), the
# fast loop for method work; the run records them.
ACE_OVERRIDES: dict[str, dict] = {"closed_form": {}, "finetune": {}, "expansion": {}}
BASELINES = ("uce", "rece", "esd_x")


def apply_settings(settings: list[str]) -> None:
    """Record `CONFIG.FIELD=VALUE` settings (JSON values; true/false in any case) in ACE_OVERRIDES."""
    for setting in settings:
        part, _, value = setting.partition("=")
        config, _, field_name = part.partition(".")
        if config not in ACE_OVERRIDES or not field_name or not value:
            raise ValueError(f"--set {setting}: write CONFIG.FIELD=VALUE with CONFIG one of {', '.join(ACE_OVERRIDES)}")
        ACE_OVERRIDES[config][field_name] = json.loads(value.lower() if value.lower() in ("true", "false") else value)


@dataclass
class Erased:
    model: object  # the erased ComfyUI MODEL (a clone of the input)
    stage1_seconds: float  # stage 0 + closed form (or the method's own set-up)
    stage2_seconds: float  # fine-tuning
    erasure: object | None = None  # ace.erasure.Erasure, for the ACE variants
    info: dict = field(default_factory=dict)


# --- ACE and its ablations -----------------------------------------------------------------------

def finetune_config(**overrides):
    return host.start().ace.finetune.FinetuneConfig(**{**ACE_TRAINING, **ACE_OVERRIDES["finetune"], **overrides})


def open_gates(erasure) -> None:
    """Fix every gate of the erasure open (threshold far below any score; its gradient vanishes)."""
    with torch.no_grad():
        erasure.adapter.gate_threshold.fill_(-1e4)


def ace(model, clip, request, steps: int | None = None, adversarial: bool = True, gated: bool = True,
        gate_scope: str | None = None, expand: bool = True) -> Erased:
    pack = host.start()
    erase, comfy_models = pack.nodes.erase, pack.nodes.comfy_models
    training = finetune_config(**({} if steps is None else {"steps": steps}))
    if not adversarial:
        training = replace(training, adversarial_weight=0.0)
    closed_form = pack.ace.closed_form.ClosedFormConfig(**ACE_OVERRIDES["closed_form"])
    expansion = pack.ace.expansion.ExpansionConfig(**{**ACE_OVERRIDES["expansion"], **({} if expand else {"enabled": False})})

    start = time.perf_counter()
    erasure = erase.erase_from_model(model, clip, request, closed_form, replace(training, steps=0), expansion=expansion)
    stage1 = time.perf_counter() - start
    if not gated:
        open_gates(erasure)
    if gate_scope:
        erasure.adapter.gate_scope = gate_scope
    stage2 = 0.0
    if training.steps:
        start = time.perf_counter()
        erasure = erase.fine_tune_on_model(model, clip, erasure, training)
        stage2 = time.perf_counter() - start
    return Erased(comfy_models.with_erasure(model, erasure, 1.0), stage1, stage2, erasure)


def baked(erased: Erased) -> Erased:
    """An ACE erasure written into the weights, gate open, as ACE Bake Erasure does before saving."""
    return Erased(host.start().nodes.comfy_models.baked(erased.model), erased.stage1_seconds, erased.stage2_seconds,
                  erased.erasure)


# --- UCE -----------------------------------------------------------------------------------------

def _tokens(model, clip, request):
    """Stage 0's tokens, as ACE collects them before its own expansion: the baselines differ from
    ACE in the edit, not in the prompts."""
    pack = host.start()
    return pack.ace.erasure.request_tokens(pack.nodes.comfy_models.network_of(model, clip), request)


def uce(model, clip, request, rounds: int = 0) -> Erased:
    """Closed form, full rank, ungated: W' = W (I + M) for every key/value projection, with M
    solved once from all concepts' stacked tokens (UCE's sum over concepts) and the preserve set.
    With `rounds` > 0 this is RECE: each round finds the closed-form adversarial embeddings of the
    concept tokens against the current edit and re-solves with them added (mapped, like the tokens
    they come from, onto the neutral ones)."""
    pack = host.start()
    closed_form, comfy_models = pack.ace.closed_form, pack.nodes.comfy_models
    start = time.perf_counter()
    projections = comfy_models.check_model(model)
    weights = comfy_models.projection_weights(model, projections)
    tokens = _tokens(model, clip, request)
    C = torch.cat([c.C for c in tokens.concepts]).double()
    N = torch.cat([c.N for c in tokens.concepts]).double()
    P = tokens.P.double()
    PtP_m, ridge = P.T @ P / len(P), closed_form.ClosedFormConfig().ridge  # UCE's own balance: λ_p = 1
    M = closed_form.solve_edit(C, N, PtP_m, ridge)
    gram = closed_form.projection_gram([weights[p.name].detach().cpu() for p in projections])
    C_all, N_all, found = C, N, []
    for _ in range(rounds):
        adversarial = closed_form.adversarial_embeddings(C, gram, M)
        found.append(adversarial.norm(dim=1).mean().item() / C.norm(dim=1).mean().item())
        C_all, N_all = torch.cat([C_all, adversarial]), torch.cat([N_all, N])
        M = closed_form.solve_edit(C_all, N_all, PtP_m, ridge)
    clone = model.clone()
    for p in projections:
        W = weights[p.name].detach().double().cpu()
        clone.add_patches({f"diffusion_model.{p.name}.weight": ((W @ M).float(),)}, 1.0)
    return Erased(clone, time.perf_counter() - start, 0.0, info={"adversarial_norm_ratio": found} if rounds else {})


# --- ESD-x ---------------------------------------------------------------------------------------

def weight_deltas(projections):
    """Trainable additive deltas of the key/value weights, attached as the gated adapter is (a
    `ProjectionEdit`: object patches on a clone, with an off switch), so stage 2's machinery trains them."""

    class WeightDeltas(host.start().ace.adapter.ProjectionEdit):
        def __init__(self):
            super().__init__(projections)
            self.deltas = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.zeros(p.out_features, p.in_features)) for p in projections])

        def delta(self, index, x, base=None):
            return torch.nn.functional.linear(x, self.deltas[index].to(x))

        def weight_delta(self, index):
            return self.deltas[index].detach().float()

    return WeightDeltas()


def esd_x(model, clip, request, steps: int = ESD_STEPS, learning_rate: float = ESD_LEARNING_RATE,
          guidance: float = ESD_GUIDANCE, batch_size: int = 2, seed: int = 0) -> Erased:
    """ESD-x: train the key/value weights so that the concept prompt predicts the negatively
    guided noise of the frozen model; x_t from the frozen model's own samples of the concept."""
    pack = host.start()
    comfy_models, finetune = pack.nodes.comfy_models, pack.ace.finetune
    start = time.perf_counter()
    network = comfy_models.network_of(model, clip)
    tokens = _tokens(model, clip, request)
    uncond = network.encoder.encode([""])
    deltas = weight_deltas(network.projections)
    generator = torch.Generator().manual_seed(seed)
    setup = time.perf_counter() - start

    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad(), network.attach(deltas) as denoise:
        with deltas.disabled():
            latents = [finetune.sample_latents(denoise, c.concept_context[:2], network.latent_shape,
                                               network.sample_sigmas, seed=seed + i)
                       for i, c in enumerate(tokens.concepts)]
        optimizer = torch.optim.Adam(deltas.parameters(), lr=learning_rate)
        for step in range(steps):
            concept = tokens.concepts[step % len(tokens.concepts)]
            x0 = latents[step % len(tokens.concepts)]
            pick = torch.randint(0, len(x0), (batch_size,), generator=generator)
            prompt = torch.randint(0, len(concept.prompts), (batch_size,), generator=generator)
            sigma = network.train_sigmas[torch.randint(0, len(network.train_sigmas), (batch_size,), generator=generator)]
            x_t = x0[pick] + torch.randn(x0[pick].shape, generator=generator) * sigma.view(-1, 1, 1, 1)
            context = concept.concept_context[prompt]
            with torch.no_grad(), deltas.disabled():
                cond = denoise(x_t, sigma, context)
                free = denoise(x_t, sigma, uncond.expand(batch_size, -1, -1))
                # Negative guidance, written on the denoised estimate (affine in ε at fixed x_t, σ).
                target = finetune.guided_target(free, cond, guidance)
            loss = (denoise(x_t, sigma, context) - target).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    stage2 = time.perf_counter() - start

    clone = model.clone()
    for p, delta in zip(network.projections, deltas.deltas):
        clone.add_patches({f"diffusion_model.{p.name}.weight": (delta.detach().clone(),)}, 1.0)
    return Erased(clone, setup, stage2, info={"final_loss": loss.item()})


# --- one entry point ------------------------------------------------------------------------------

def run_method(name: str, model, clip, request, ace_erased: Erased | None = None, quick: bool = False,
               stage1_only: bool = False) -> Erased:
    """Erase `request` from the toy MODEL with method `name` (see METHODS).

    `ace_baked` bakes `ace_erased` (the `ace` result for the same request) when given, so
    the two share one training run; `quick` shortens every training run (for testing the harness);
    `stage1_only` runs every ACE variant without stage 2 (the fast loop for stage-1 work)."""
    steps = 0 if stage1_only else 8 if quick else None
    if name == "ace":
        return ace(model, clip, request, steps)
    if name == "ace_stage1":
        return ace(model, clip, request, steps=0)
    if name == "ace_stage1_no_expand":
        return ace(model, clip, request, steps=0, expand=False)
    if name == "ace_ungated":
        return ace(model, clip, request, steps, gated=False)
    if name == "ace_no_adv":
        return ace(model, clip, request, steps, adversarial=False)
    if name == "ace_token_gate":
        return ace(model, clip, request, steps, gate_scope="token")
    if name == "ace_baked":
        return baked(ace_erased or ace(model, clip, request, steps))
    if name == "uce":
        return uce(model, clip, request)
    if name == "rece":
        return uce(model, clip, request, rounds=RECE_ROUNDS)
    if name == "esd_x":
        return esd_x(model, clip, request, steps=20 if quick else ESD_STEPS)
    raise ValueError(f"unknown method {name!r}; the benchmark has {METHODS}")
