"""Stage 2: adversarially augmented fine-tuning of the gated adapter.

The network stays frozen; the adapter trains: every layer's A and B and every gate (directions,
threshold, temperature). The original network's predictions come from the same network with the
adapter switched off. Per step, for one concept (in turn), on noisy examples x_t = x_0 + σ ε of
it, σ drawn as the model was trained (`Network.train_sigmas`):

    target  = D_orig(x_t, σ, neutral) − η (D_orig(x_t, σ, concept) − D_orig(x_t, σ, neutral))
    L_erase = ‖D_edit(x_t, σ, concept) − target‖² / σ²
    L_adv   = ‖D_edit(x_t, σ, soft) − target‖² / σ²
    L_pres  = ‖D_edit(x_t, σ, p) − D_orig(x_t, σ, p)‖² / σ²  +  Σ_l ‖(B_l A_l − B⁰_l A⁰_l) p‖² / ‖W_l p‖²
              (B⁰ A⁰: 0, or the edit stage 2 starts from: `preserve_anchor`)
    L_gate  = BCE(g_c(concept tokens and soft tokens), 1) + BCE(g(preserve tokens), 0)
    L       = L_erase + α L_adv + β L_pres + γ L_gate

- The target is negative guidance (as ESD's): the neutral prediction pushed away from the
  concept's by η. Matching the neutral prediction alone gives almost no signal: at low noise the
  original model's neutral prediction of a noisy concept picture still contains the concept, and
  stage 1 already matches it. Dividing by σ² weighs every noise level as a noise-prediction loss
  does (D = x_t − σ ε); `loss_weighting="model"` weighs it as the model was trained instead
  (`Network.train_weights`: the same for an ε model, an added x_0 term for v-prediction and EDM).
- x_0: pictures the original model draws of the concept, and, every `on_policy_every` steps of
  that concept, one the edited model draws (on-policy: where the erased model actually goes).
- The soft word (the adversarial input): the concept's word replaced by free input token
  embeddings of the text encoder, which an inner attacker optimises with Adam for
  `attack_steps` steps per outer step, warm-started from the previous step (AdvUnlearn's and
  Receler's scheme), to make the edited model predict the concept again: the attack a
  textual-inversion attacker makes. The gate learns to open on it. With `restart_every`, the word
  starts afresh from the phrase every so many steps of its concept and is first attacked for
  `restart_attack_steps` steps on fresh examples (off by default: docs/method.md, 5.4).
- The preserve term binds where the gate is closed too: the second part is how far the open-gate
  edit moves preserve tokens' keys and values, relative to them, so the baked model and the
  exported LoRA stay specific. By default it is measured from no edit, which pulls the whole edit
  down as long as training runs (its norm fell by a seventh in 40 steps, and with some seeds the
  erased concept came back); `preserve_anchor="start"` measures it from the edit stage 2 starts
  from (B⁰ A⁰), which holds the erasure, but at 10 concepts at once the kept ones fared worse;
  `"start_on_everyday"` measures it from the start on everyday tokens and from no edit on the kept
  concepts' (neither became the default: docs/method.md, section 8). Half of its prompts and
  tokens come from the concepts the request keeps: drawn uniformly they are a few among the
  everyday prompts, and they are where an erasure of many concepts does its harm (causal toy, 10
  concepts: Acc_s 0.934 -> 0.965).
- The budget grows with the request: `steps` per concept, and a learning rate that warms up and
  decays along a cosine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .adapter import GatedAdapter, open_edit_change
from .network import Denoiser, Network, noise_prediction_weights
from .tokens import RequestTokens, prompts_to


PRESERVE_ANCHORS = ("zero", "start", "start_on_everyday")
LOSS_WEIGHTINGS = ("noise", "model")


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 40  # per concept of the request
    max_steps: int = 400  # of the whole run, whatever the number of concepts
    learning_rate: float = 5e-3
    guidance: float = 1.0  # η of the negative-guidance target
    adversarial_weight: float = 1.0  # α
    preserve_weight: float = 1.0  # β
    gate_weight: float = 0.1  # γ
    attack_steps: int = 2  # inner Adam steps on the soft word per outer step (0: no adversarial term)
    attack_rate: float = 0.1  # the inner Adam's step, relative to the soft word's typical coordinate
    batch_size: int = 2
    images_per_concept: int = 2  # examples of each concept the original model draws to train on
    on_policy_every: int = 10  # a concept's steps between its pictures drawn by the edited model (0: never)
    # Where the open-gate preservation term measures the edit's change of preserve tokens from:
    # "zero" (no edit), "start" (the edit stage 2 starts from) or "start_on_everyday" (from the
    # start on the everyday pool, from no edit on the kept concepts' tokens); docs/method.md, 5.3
    preserve_anchor: str = "zero"
    # Every `restart_every` steps of a concept (0: never) its soft word starts afresh from the
    # phrase and is attacked for `restart_attack_steps` steps, each on fresh examples, before
    # training goes on: the threat starts from the word and runs long, which a warm-started word
    # the edit has already beaten is not (docs/method.md, 5.4)
    restart_every: int = 0
    restart_attack_steps: int = 40
    # How the noise levels weigh in every loss: "noise" (1/σ², a noise-prediction loss) or "model"
    # (the weights the model was trained with, `Network.train_weights`; docs/method.md, 5.3)
    loss_weighting: str = "noise"
    seed: int = 0

    def __post_init__(self):
        for name, low, high in (("steps", 0, 100_000), ("max_steps", 1, 1_000_000), ("attack_steps", 0, 100),
                                ("batch_size", 1, 64), ("images_per_concept", 1, 64), ("on_policy_every", 0, 100_000),
                                ("restart_every", 0, 100_000), ("restart_attack_steps", 0, 10_000)):
            v = getattr(self, name)
            if not (isinstance(v, int) and low <= v <= high):
                raise ValueError(f"{name.replace('_', ' ')} must be an integer from {low} to {high}, got {v!r}")
        for name in ("learning_rate", "guidance", "adversarial_weight", "preserve_weight", "gate_weight", "attack_rate"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {v!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {self.loss_weighting!r}")
        if self.preserve_anchor not in PRESERVE_ANCHORS:
            raise ValueError(f"preserve anchor must be one of {', '.join(PRESERVE_ANCHORS)}, got {self.preserve_anchor!r}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning rate must be in (0, 1], got {self.learning_rate!r}")

    def total_steps(self, concepts: int) -> int:
        return min(self.steps * max(concepts, 1), self.max_steps) if self.steps else 0


@dataclass
class StepReport:
    step: int
    total: int
    losses: dict[str, float]
    adapter: GatedAdapter  # as trained so far, live: copy it to keep it


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


def _kept_share(n: int) -> int:
    """How many of n preserve prompts or anchor tokens come from the kept concepts: half, at least one."""
    return n // 2 or 1


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().flatten(1).mean(1)


def _bce(g: torch.Tensor, target: float) -> torch.Tensor:
    g = g.clamp(1e-6, 1 - 1e-6)
    return -(torch.log(g) if target == 1 else torch.log(1 - g)).mean()


def guided_target(neutral: torch.Tensor, concept: torch.Tensor, guidance: float) -> torch.Tensor:
    """Negative guidance (ESD's): the neutral prediction pushed away from the concept's by η."""
    return neutral - guidance * (concept - neutral)


def learning_rate(cfg: FinetuneConfig, step: int, total: int) -> float:
    """Linear warm-up over the first tenth, then a cosine down to a tenth of the rate."""
    warm = max(1, total // 10)
    if step < warm:
        return cfg.learning_rate * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class SoftWord:
    """The adversarial input of one concept: its target phrase's input embeddings, free to move,
    and an Adam that moves them; kept across steps (warm start)."""

    def __init__(self, network: Network, phrase: str, cfg: FinetuneConfig):
        self.phrase = phrase
        self.vectors = {k: v.detach().clone().requires_grad_(True) for k, v in network.encoder.soft_word(phrase).items()}
        scale = torch.cat([v.flatten() for v in self.vectors.values()]).square().mean().sqrt().item()
        self.optimizer = torch.optim.Adam(list(self.vectors.values()), lr=cfg.attack_rate * scale)


@dataclass
class SoftBatch:
    """What one attack step on a soft word, and the adversarial term, run on."""

    chosen: torch.Tensor  # which of the concept's prompts (each names its target)
    texts: list[str]
    pooled: torch.Tensor | None  # those prompts' pooled text, which the soft word keeps
    x_t: torch.Tensor
    sigma: torch.Tensor
    weight: torch.Tensor  # each example's loss weight (1/σ², or the model's)
    original: torch.Tensor  # the original model's prediction for the prompts


def finetune(
    adapter: GatedAdapter,
    denoise: Denoiser,
    network: Network,
    tokens: RequestTokens,
    latents: list[torch.Tensor],
    cfg: FinetuneConfig = FinetuneConfig(),
    callback: Callable[[StepReport], bool | None] | None = None,
) -> FinetuneResult:
    """Train `adapter` in place. `latents[c]` are clean latents `[n, ...]` of concept `c` drawn by
    the original model. `callback` is called after every step; returning True stops the run (an
    exception it raises propagates, leaving the adapter mid-training: callers that cancel should
    discard it)."""
    if cfg.loss_weighting == "model" and network.train_weights is None:
        # Falling back to 1/σ² would run another weighting than the one asked for, unreported.
        raise ValueError('loss_weighting="model" needs the model\'s training weights (Network.train_weights), '
                         "and this network does not give them; use the default weighting instead")
    result = FinetuneResult()
    total = cfg.total_steps(len(tokens.concepts))
    if total == 0:
        return result
    start = time.perf_counter()
    device = latents[0].device
    generator = torch.Generator().manual_seed(cfg.seed)
    train_sigmas = network.train_sigmas.float()
    train_weights = network.train_weights.float() if cfg.loss_weighting == "model" \
        else noise_prediction_weights(train_sigmas)
    weights = [network.weights[p.name].detach().to(device, torch.float32) for p in adapter.projections]
    pool = [list(x) for x in latents]  # each concept's examples; on-policy ones join them

    def pick(n: int, k: int) -> torch.Tensor:
        return torch.randint(0, n, (k,), generator=generator)

    def usable(t: torch.Tensor) -> torch.Tensor:  # a normal tensor autograd may save, on device
        return (t.clone() if t.is_inference() else t).to(device)

    def on_device(prompts: tuple[torch.Tensor, torch.Tensor | None]):  # (context, pooled or None), usable
        context, pooled = prompts
        return usable(context), None if pooled is None else usable(pooled)

    def draw(n: int, kept: torch.Tensor, size: int) -> torch.Tensor:
        """n indices in range(size), the kept share of them from `kept` when it has any."""
        index = pick(size, n)
        if len(kept):
            index[:_kept_share(n)] = kept[pick(len(kept), _kept_share(n))]
        return index

    def noisy(c: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """b noisy examples x_t of concept c, their σ and their loss weight."""
        x0 = torch.stack([pool[c][i] for i in pick(len(pool[c]), b).tolist()]).to(device)
        level = pick(len(train_sigmas), b)
        sigma = train_sigmas[level].to(device, x0.dtype)
        x_t = (x0 + torch.randn(x0.shape, generator=generator).to(device, x0.dtype) * sigma.view(-1, *[1] * (x0.dim() - 1))).detach()
        return x_t, sigma, train_weights[level].to(device)

    def soft_batch(c: int, b: int, examples: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> SoftBatch:
        """b of concept c's prompts that name its target, on `examples` (x_t, σ, weight; fresh
        ones if None), with the original model's prediction for them."""
        concept = tokens.concepts[c]
        chosen = target_prompts[c][pick(len(target_prompts[c]), b)]
        x_t, sigma, weight = noisy(c, b) if examples is None else examples
        # The soft word keeps the concept prompt's pooled text: the attack moves the tokens
        # the cross-attention reads, which is what the edit acts on.
        chosen_ctx, chosen_pooled = on_device(concept.concept_at(chosen))
        with torch.no_grad(), adapter.disabled():
            original = denoise(x_t, sigma, chosen_ctx, chosen_pooled)
        return SoftBatch(chosen, [concept.prompts[i] for i in chosen.tolist()], chosen_pooled, x_t, sigma, weight, original)

    with torch.inference_mode(False), torch.enable_grad():
        autograd_safe(adapter)
        adapter.requires_grad_(True)
        params = list(adapter.parameters())
        start_edit = [(A.detach().clone(), B.detach().clone()) for A, B in zip(adapter.lora_down, adapter.lora_up)] \
            if cfg.preserve_anchor != "zero" else None
        optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
        P = usable(tokens.P.float())
        K = usable(tokens.K.float())
        # The concepts the request keeps make half of every preserve batch and of the anchor's
        # tokens: a few among the everyday prompts, they are where the erasure does its harm.
        kept_prompts = tokens.kept_mask.any(1).nonzero().flatten()

        def anchor_tokens(n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            """n preserve embeddings, the kept share of them kept ones, and which rows the term
            measures from the start (None: all of them; the rest from no edit)."""
            if not len(K):  # a request that keeps no concept: all everyday
                return P[pick(len(P), n).to(device)], None
            k = _kept_share(n)
            from_start = None
            if cfg.preserve_anchor == "start_on_everyday":
                from_start = torch.arange(n, device=device) >= k
            return torch.cat([K[pick(len(K), k).to(device)], P[pick(len(P), n - k).to(device)]]), from_start
        soft = [SoftWord(network, c.concept.target, cfg) if cfg.attack_steps and cfg.adversarial_weight else None
                for c in tokens.concepts]
        target_prompts = [torch.tensor(c.target_prompts()) for c in tokens.concepts]
        phrase_masks = [c.phrase_mask for c in tokens.concepts]
        for step in range(total):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, total)
            turn, c = divmod(step, len(tokens.concepts))  # concepts take turns; `turn` counts each one's steps
            concept = tokens.concepts[c]
            if cfg.on_policy_every and turn % cfg.on_policy_every == cfg.on_policy_every - 1:
                pool[c].append(_on_policy(denoise, network, concept, generator, device))
            b = cfg.batch_size
            if soft[c] is not None and cfg.restart_every and turn and turn % cfg.restart_every == 0:
                soft[c] = SoftWord(network, concept.concept.target, cfg)
                _attack(adapter, denoise, network, soft[c], (soft_batch(c, b) for _ in range(cfg.restart_attack_steps)))
            prompt = pick(len(concept.prompts), b)
            x_t, sigma, weight = noisy(c, b)
            ctx, pooled = on_device(concept.concept_at(prompt))
            p_ctx, p_pooled = on_device(tokens.preserve_at(draw(b, kept_prompts, len(tokens.preserve_context))))

            with torch.no_grad(), adapter.disabled():
                original_concept = denoise(x_t, sigma, ctx, pooled)
                original_neutral = denoise(x_t, sigma, *on_device(concept.neutral_at(prompt)))
                original_preserve = denoise(x_t, sigma, p_ctx, p_pooled)
                target = guided_target(original_neutral, original_concept, cfg.guidance)

            losses = {"erase": (weight * _per_sample_mse(denoise(x_t, sigma, ctx, pooled), target)).mean()}
            gate_terms = [_bce(adapter.gate(usable(concept.C[concept.is_phrase]))[:, c], 1.0),
                          _bce(adapter.gate(P[pick(len(P), 256).to(device)]), 0.0)]
            if soft[c] is not None:
                attacked = soft_batch(c, b, (x_t, sigma, weight))
                with torch.no_grad(), adapter.disabled():
                    neutral = denoise(x_t, sigma, *on_device(concept.neutral_at(attacked.chosen)))
                adversarial_target = guided_target(neutral, attacked.original, cfg.guidance)
                _attack(adapter, denoise, network, soft[c], [attacked] * cfg.attack_steps)
                with torch.no_grad():
                    adv = network.encoder.encode_soft(attacked.texts, soft[c].phrase, soft[c].vectors)
                losses["adversarial"] = (weight * _per_sample_mse(denoise(x_t, sigma, adv, attacked.pooled),
                                                                  adversarial_target)).mean()
                gate_terms.append(_bce(adapter.gate(adv[usable(phrase_masks[c][attacked.chosen])])[:, c], 1.0))
            losses["preserve"] = (weight * _per_sample_mse(denoise(x_t, sigma, p_ctx, p_pooled), original_preserve)).mean() \
                + open_edit_change(adapter, weights, start_edit, *anchor_tokens(256))
            losses["gate"] = sum(gate_terms) / len(gate_terms)
            total_loss = (losses["erase"] + cfg.adversarial_weight * losses.get("adversarial", 0.0)
                          + cfg.preserve_weight * losses["preserve"] + cfg.gate_weight * losses["gate"])
            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            optimizer.step()

            record = {k: v.item() for k, v in losses.items()} | {"total": total_loss.item()}
            result.history.append(record)
            if callback is not None and callback(StepReport(step + 1, total, record, adapter)):
                result.stopped_early = True
                break
    for p in params:
        p.grad = None
    adapter.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    return result


def _attack(adapter, denoise, network, soft: SoftWord, batches: Iterable[SoftBatch]) -> None:
    """One Adam step on the soft word per batch, towards the original model's prediction of the
    concept through the edited model (whose parameters stay out of the graph meanwhile)."""
    for p in adapter.parameters():
        p.requires_grad_(False)
    try:
        for batch in batches:
            context = network.encoder.encode_soft(batch.texts, soft.phrase, soft.vectors)
            prediction = denoise(batch.x_t, batch.sigma, context, batch.pooled)
            loss = (batch.weight * _per_sample_mse(prediction, batch.original)).mean()
            soft.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            soft.optimizer.step()
    finally:
        for p in adapter.parameters():
            p.requires_grad_(True)


def _on_policy(denoise, network: Network, concept, generator, device) -> torch.Tensor:
    """One picture of the concept drawn by the edited model, as a clean latent."""
    prompt = int(torch.randint(0, len(concept.prompts), (1,), generator=generator))
    context, pooled = prompts_to(concept.concept_at(slice(prompt, prompt + 1)), device)
    return sample_latents(denoise, context, network.latent_shape,
                          network.sample_sigmas, seed=int(torch.randint(0, 2**31, (1,), generator=generator)),
                          pooled=pooled)[0]


@torch.no_grad()
def sample_latents(
    denoise: Denoiser,
    context: torch.Tensor,
    shape: tuple[int, ...],
    sigmas: torch.Tensor,
    seed: int = 0,
    pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents `[len(context), *shape]` generated by Euler steps along `sigmas` (descending,
    ending at 0): the "few generated examples" of the concept that stage 2 trains on. `pooled`:
    the prompts' pooled text, for models that take it."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((len(context), *shape), generator=generator).to(context.device) * sigmas[0]
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        s = sigma.expand(len(x)).to(x)
        denoised = denoise(x, s, context, pooled)
        x = x + (x - denoised) / sigma * (next_sigma - sigma)
    return x
