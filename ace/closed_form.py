"""Stage 1: the closed-form gated low-rank edit.

For every key/value projection `W` (`d_out × d`), with the rows of `C`, `N`, `P` the concept,
neutral and preserve embeddings of stage 0 (counts `n`, `n`, `m`) of *every* concept of the
request stacked, solve

    min_ΔW  1/n Σ_i ‖(W + ΔW) c_i − W n_i‖²  +  λ_p/m Σ_j ‖ΔW p_j‖²  +  λ_k/k Σ_j ‖ΔW k_j‖²  +  λ ‖ΔW‖²

whose solution is ΔW = W M with M = (N − C)ᵀC/n · G⁻¹ and G = CᵀC/n + λ_p PᵀP/m + λ_k KᵀK/k + λ I.
`K` (count `k`) are the tokens of the concepts the request keeps, which are also rows of `P`
but a few among thousands (every position of every everyday prompt): weighed on their own, with
λ_k growing with the number of erased concepts, the near concepts a user names to keep hold even
when dozens of expanded words are erased around them.
`M` does not depend on `W`, so it is solved once for the request (a linear solve, never an
inverse) and every layer only truncates `W M` to rank `r × concepts` (`docs/method.md`, section
3). One joint edit, as UCE solves it: each concept's pairs are fitted knowing the others'
and the preserve set, instead of one edit per concept summed where their gates overlap.

Then, for `adversarial_rounds` rounds, the closed-form adversarial embeddings of the concept's
own tokens against the current edit (`adversarial_embeddings`, as RECE derives them: where an
attacker would move the concept so that the edited keys and values still reproduce it) join `C`,
paired with the same neutral embeddings, and the edit is solved again.

Each concept's gate looks at the directions where its own tokens differ from their neutral
counterparts far more than preserve embeddings vary: the top generalized eigenvectors of
Σ_D u = μ (Σ_P + εI) u. Its threshold and temperature are set in closed form from the scores of
the two sets: 0.95 at the 10th percentile of the concept's own tokens and 0.05 at the 99.9th
percentile of the preserve tokens. The adapter routes the gates:
the largest one decides how much of the joint edit a token gets (`adapter.GatedAdapter`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .adapter import OUTLIER_TEMPERATURE, GatedAdapter, OutlierGate, gate_score, log_relative_change, open_edit_change
from .families import Projection
from .tokens import RequestTokens

GATE_HIGH = 0.95  # gate value at the `on_quantile` of concept tokens
LOGIT_HIGH = math.log(GATE_HIGH / (1 - GATE_HIGH))


@dataclass(frozen=True)
class ClosedFormConfig:
    rank: int = 64  # per concept and projection: the joint edit's rank is rank × concepts, up to max_rank
    max_rank: int = 256  # of the joint edit, whatever the number of concepts
    gate_rank: int = 8  # dimensions of each concept's gate subspace
    adversarial_rounds: int = 2  # rounds of closed-form adversarial embeddings (0: none)
    # λ_p: the gates do not shut on near concepts, so the edit itself must spare them (docs/method.md, 7)
    preserve_weight: float = 1.0
    # λ_k per erased concept: the concepts the request keeps, weighed on their own (docs/method.md, 3)
    kept_weight: float = 0.4
    ridge: float = 1e-3  # λ, relative to the mean energy of the concept embeddings
    on_quantile: float = 0.1  # of the concept's own tokens' scores, where the gate reaches 0.95
    off_quantile: float = 0.999  # of preserve-token scores, where the gate falls to 0.05
    # of preserve tokens' relative change under the open edit, where the change gate opens; 1: no
    # change gate (the default until a full benchmark run decides; 0.9 measured in docs/method.md, 3.4)
    change_quantile: float = 1.0
    # of the kept tokens' outlier scores, where the outlier gate is 0.05; 1: no outlier gate
    # (docs/method.md, 3.4)
    outlier_quantile: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.rank, int) and 1 <= self.rank <= 256):
            raise ValueError(f"rank must be an integer from 1 to 256, got {self.rank!r}")
        if not (isinstance(self.max_rank, int) and self.rank <= self.max_rank <= 4096):
            raise ValueError(f"max rank must be an integer from the rank to 4096, got {self.max_rank!r}")
        if not (isinstance(self.gate_rank, int) and 1 <= self.gate_rank <= 256):
            raise ValueError(f"gate rank must be an integer from 1 to 256, got {self.gate_rank!r}")
        if not (isinstance(self.adversarial_rounds, int) and 0 <= self.adversarial_rounds <= 10):
            raise ValueError(f"adversarial rounds must be an integer from 0 to 10, got {self.adversarial_rounds!r}")
        for name in ("preserve_weight", "kept_weight", "ridge"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (0 < self.on_quantile < 1 and 0 < self.off_quantile < 1):
            raise ValueError("gate quantiles must lie strictly between 0 and 1")
        if not 0 < self.change_quantile <= 1:
            raise ValueError(f"change quantile must be in (0, 1], got {self.change_quantile!r}")
        if not 0 < self.outlier_quantile <= 1:
            raise ValueError(f"outlier quantile must be in (0, 1], got {self.outlier_quantile!r}")


def solve_edit(C: torch.Tensor, N: torch.Tensor, preserve_gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """M (d × d) with ΔW = W M, solved in float64. `preserve_gram` is the weighted preserve term
    (λ_p PᵀP/m + λ_k KᵀK/k for ACE, PᵀP/m for UCE); `ridge` is λ relative to the concept
    embeddings' energy."""
    C, N = C.double(), N.double()
    n, d = C.shape
    CtC_n = C.T @ C / n
    G = CtC_n + preserve_gram.double() + ridge * CtC_n.diagonal().sum() / d * torch.eye(d, dtype=C.dtype)
    Mt = torch.linalg.solve(G, C.T @ (N - C) / n)  # G symmetric: G Mᵀ = Cᵀ(N − C)/n
    return Mt.T


def adversarial_embeddings(C: torch.Tensor, gram: torch.Tensor, M: torch.Tensor, ridge: float = 0.1) -> torch.Tensor:
    """Closed-form adversarial embeddings against an edit ΔW = W M (as RECE derives them).

    For each concept embedding c (a row of `C`), the embedding c' whose *edited* keys and values
    come closest to the *original* ones of c over every projection:
    argmin_c' Σ_l ‖W_l (I + M) c' − W_l c‖² + λ ‖c'‖², i.e.
    c' = ((I + M)ᵀ G (I + M) + λ I)⁻¹ (I + M)ᵀ G c with G = Σ_l W_lᵀ W_l (`gram`, d × d). These are
    the points an attacker would move the concept to; erasing them too closes that door. λ is
    `ridge` times the mean eigenvalue of (I + M)ᵀ G (I + M), which keeps c' near the embeddings a
    text encoder produces instead of an exact, huge preimage.
    """
    d = C.shape[1]
    A = torch.eye(d, dtype=torch.float64) + M.double()
    AtG = A.T @ gram.double()
    H = AtG @ A
    H = H + ridge * H.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(H, AtG @ C.double().T).T


def projection_gram(Ws: list[torch.Tensor]) -> torch.Tensor:
    """G = Σ_l W_lᵀ W_l over projections whose input is the text context (d × d, float64)."""
    return sum(W.double().T @ W.double() for W in Ws)


def truncate(W: torch.Tensor, U_S: torch.Tensor, Vt: torch.Tensor, rank: int):
    """Rank-`rank` factors (B, A) of W M, given M ≈ U_S Vt (Vt with orthonormal rows).

    W M ≈ (W U_S) Vt; with W U_S = Q R and R = U_R S_R V_Rᵀ the product's SVD is
    (Q U_R) S_R (V_Rᵀ Vt), so only a k × k SVD is needed per layer. The singular values are split
    evenly between B and A, which keeps both factors on one scale for fine-tuning.
    """
    Q, R = torch.linalg.qr(W.double() @ U_S)
    U_R, S_R, Vt_R = torch.linalg.svd(R, full_matrices=False)
    q = min(rank, len(S_R))
    root = S_R[:q].sqrt()
    B = (Q @ U_R[:, :q]) * root
    A = root[:, None] * (Vt_R[:q] @ Vt)
    if q < rank:  # fewer directions than the rank: pad with zeros
        B = torch.nn.functional.pad(B, (0, rank - B.shape[1]))
        A = torch.nn.functional.pad(A, (0, 0, 0, rank - A.shape[0]))
    return B.float(), A.float()


@dataclass
class Gate:
    """One concept's gate: g(e) = sigmoid((s(e) − threshold) / exp(log_temperature)), with s(e) the
    log mean squared coordinate of e − center along `directions` (`adapter.gate_score`).
    `margin` is the concept's on-quantile score minus the preserve off-quantile score: > 0 when
    the two sets are separable at those quantiles."""

    directions: torch.Tensor  # [d, k]
    center: torch.Tensor  # [d]
    threshold: float
    log_temperature: float
    margin: float

    def values(self, E: torch.Tensor) -> torch.Tensor:
        """The gate on embeddings `[n, d]`."""
        score = gate_score(E.double() - self.center.double(), self.directions.double())
        return torch.sigmoid((score - self.threshold) / math.exp(self.log_temperature))


def pool_whitening(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The preserve pool's centre and the Cholesky factor L of its covariance plus εI (L Lᵀ), with
    ε = 10⁻³ of the covariance's mean diagonal: what the gates measure tokens against."""
    center = P.mean(0)
    Pc = P - center
    Sigma_P = Pc.T @ Pc / len(Pc)
    Sigma_P = Sigma_P + 1e-3 * Sigma_P.diagonal().mean() * torch.eye(len(Sigma_P), dtype=P.dtype)
    return center, torch.linalg.cholesky(Sigma_P)


def calibrate_gate(C: torch.Tensor, N: torch.Tensor, is_phrase: torch.Tensor, P: torch.Tensor, cfg: ClosedFormConfig) -> Gate:
    """A concept's gate from its aligned concept/neutral embeddings (`is_phrase` marks the
    concept's own tokens) and the preserve embeddings.

    The directions `u` solve Σ_D u = μ (Σ_P + εI) u, with D = C − N the aligned concept-minus-neutral
    differences, and are scaled so that uᵀ Σ_P u = 1: the score
    of a token, the mean of (uᵀ(e − centre))², is about 1 for preserve tokens and counts how many
    preserve standard deviations a token sits along the concept's own directions. Measured on the
    toy encoder in `tests/toys.py`, this score separates concept from preserve tokens where the
    plain energy share inside an orthonormal basis did not (its median concept token scored below
    the 99th-percentile preserve token), because it is not diluted by the large components that
    every token shares. Using D rather than C matters as much: with C, the template words (which
    occur in every concept prompt but rarely in the preserve set) captured the gate.
    """
    C, N, P = C.double(), N.double(), P.double()
    center, L = pool_whitening(P)
    Cc, Pc, D = C - center, P - center, C - N
    Sigma_D = D.T @ D / len(D)
    # whitened problem: L⁻¹ Σ_D L⁻ᵀ w = μ w, then u = L⁻ᵀ w (so that uᵀ Σ_P u = wᵀw = 1)
    Linv_Sigma_D = torch.linalg.solve_triangular(L, Sigma_D, upper=False)
    whitened = torch.linalg.solve_triangular(L, Linv_Sigma_D.T, upper=False)
    _, w = torch.linalg.eigh((whitened + whitened.T) / 2)
    directions = torch.linalg.solve_triangular(L.T, w[:, -cfg.gate_rank :], upper=True)

    s_C, s_P = gate_score(Cc, directions), gate_score(Pc, directions)
    high = torch.quantile(s_C[is_phrase], cfg.on_quantile).item()
    low = torch.quantile(s_P, cfg.off_quantile).item()
    threshold = (high + low) / 2
    if high > low:
        temperature = (high - low) / (2 * LOGIT_HIGH)
    else:  # not separable at these quantiles: a sharp gate at the midpoint, and say so in the margin
        temperature = 0.05
    return Gate(directions.float(), center.float(), threshold, math.log(temperature), high - low)


@dataclass
class ClosedForm:
    """Stage 1's result: the adapter, and fit statistics per concept."""

    adapter: GatedAdapter
    stats: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def closed_form_erasure(
    tokens: RequestTokens,
    weights: dict[str, torch.Tensor],
    projections: list[Projection],
    cfg: ClosedFormConfig = ClosedFormConfig(),
) -> ClosedForm:
    """Stage 1 for every concept of a request: one joint edit, one gate per concept.

    `weights` maps each projection's name to its weight `W` (any dtype and device; the maths runs
    in float64 on the CPU, the factors are stored in float32)."""
    start = time.perf_counter()
    P = tokens.P.double()
    preserve = cfg.preserve_weight * P.T @ P / len(P)
    if cfg.kept_weight and tokens.kept_mask.any():
        K = tokens.K.double()
        # The erase term is a mean, but every erased concept adds directions the edit moves, so
        # the kept concepts' weight grows with the erased ones: λ_k = kept_weight × concepts.
        preserve = preserve + cfg.kept_weight * len(tokens.concepts) * K.T @ K / len(K)
    Ws = [weights[p.name].detach().to("cpu", torch.float64) for p in projections]
    concepts = tokens.concepts
    C = [c.C.double() for c in concepts]
    N = [c.N.double() for c in concepts]
    M = solve_edit(torch.cat(C), torch.cat(N), preserve, cfg.ridge)
    if cfg.adversarial_rounds:
        # The edit learns to map the adversarial embeddings too; the gates stay calibrated on the
        # concepts' real tokens (stage 2 teaches them to open on attacks).
        gram = projection_gram(Ws)
        phrase = [(c.C[c.is_phrase].double(), c.N[c.is_phrase].double()) for c in concepts]
        found_C, found_N = [], []
        for _ in range(cfg.adversarial_rounds):
            for Ck, Nk in phrase:
                found_C.append(adversarial_embeddings(Ck, gram, M))
                found_N.append(Nk)
            M = solve_edit(torch.cat([*C, *found_C]), torch.cat([*N, *found_N]), preserve, cfg.ridge)

    rank = min(cfg.rank * len(concepts), cfg.max_rank, M.shape[0])
    k = min(M.shape[0], max(4 * rank, 32))
    U, S, Vt = torch.linalg.svd(M)
    U_S, Vt = U[:, :k] * S[:k], Vt[:k]
    factors = [truncate(W, U_S, Vt, rank) for W in Ws]
    gates = [calibrate_gate(Ck, Nk, c.is_phrase, P, cfg) for Ck, Nk, c in zip(C, N, concepts)]
    adapter = GatedAdapter(
        projections,
        gate_basis=torch.stack([g.directions for g in gates]),
        gate_center=torch.stack([g.center for g in gates]),
        gate_threshold=torch.tensor([g.threshold for g in gates]),
        gate_log_temperature=torch.tensor([g.log_temperature for g in gates]),
        lora_down=[a for _, a in factors],
        lora_up=[b for b, _ in factors],
        outlier=calibrate_outlier_gate(tokens, cfg.outlier_quantile) if cfg.outlier_quantile < 1 else None,
    )
    if cfg.change_quantile < 1:
        calibrate_change_gate(adapter, weights, preserve_tokens(tokens), cfg.change_quantile)
    # How far the ungated edit moves preserve outputs, on 512 evenly spaced preserve tokens (a diagnostic)
    spread = P[torch.linspace(0, len(P) - 1, min(len(P), 512)).long()].float()
    with torch.no_grad():
        preserve_change = math.sqrt(open_edit_change(adapter, [W.float() for W in Ws], None, spread).item())
    stats = [_fit_stats(Ck, Nk, Ws, [b for b, _ in factors], [a for _, a in factors])
             | {"concept": concept.concept.target, "gate_margin": gate.margin, "ungated_preserve_change": preserve_change}
             for concept, Ck, Nk, gate in zip(concepts, C, N, gates)]
    return ClosedForm(adapter, stats, time.perf_counter() - start)


def preserve_tokens(tokens: RequestTokens) -> torch.Tensor:
    """The tokens the change and outlier gates are calibrated to stay shut on: the preserve pool and
    the kept concepts'."""
    return torch.cat([tokens.P, tokens.K]).float()


def calibrate_outlier_gate(tokens: RequestTokens, quantile: float) -> OutlierGate:
    """The outlier gate: the pool's centre and whitener (Σ_P + εI = L Lᵀ, whitener L⁻ᵀ, ε as the
    concept gates'), and a threshold at which the `quantile` of the preserve and kept tokens'
    scores gets 0.05.

    Why: the 4x soft-prompt attack's words lie far from the tokens the erasure was fitted on (on
    the causal toy their score is above the 0.999 quantile of the kept tokens'), so a gate that
    opens on such tokens gives them the edit even when they shut the concept gates, and an
    attacker must find the concept among ordinary tokens. What it gains and costs (it also opens
    on prompts unlike the pool's): docs/method.md, 3.4."""
    center, L = pool_whitening(tokens.P.double())
    whitener = torch.linalg.solve_triangular(L.T, torch.eye(len(L), dtype=L.dtype), upper=True)
    low = torch.quantile(gate_score(preserve_tokens(tokens).double() - center, whitener), quantile).item()
    return OutlierGate(center.float(), whitener.float(), low + OUTLIER_TEMPERATURE * LOGIT_HIGH, quantile)


def _log_changes(adapter: GatedAdapter, weights: dict[str, torch.Tensor], E: torch.Tensor) -> list[torch.Tensor]:
    """Per projection, log(|B A e|² / |W e|²) of every token e of `E` `[n, d]`: how far the open edit
    moves its key or value, relative to it."""
    out = []
    with torch.no_grad():
        for i, p in enumerate(adapter.projections):
            W = weights[p.name].detach().to("cpu", torch.float32)
            A, B = adapter.lora_down[i].detach().cpu().float(), adapter.lora_up[i].detach().cpu().float()
            out.append(log_relative_change((E @ A.T) @ B.T, E @ W.T))
    return out


def calibrate_change_gate(adapter: GatedAdapter, weights: dict[str, torch.Tensor], E: torch.Tensor,
                          quantile: float) -> None:
    """Set each projection's change threshold to the `quantile` of the open edit's log relative change
    on the tokens `E`: the change gate stays shut on that share of them.

    Why a second gate: the concept gates look at a few directions of the embedding, and the 4x
    soft-prompt attack finds words for the concept that half-shut them while the open edit would
    still erase them (causal toy, square: 3 of 4 attack seeds bring it back through the gates, none
    through the baked edit). The change gate opens wherever the edit would matter, so shutting it
    means making the edit itself small on the word; what it gains and costs is in docs/method.md, 3.4."""
    thresholds = [torch.quantile(c, quantile) for c in _log_changes(adapter, weights, E.cpu().float())]
    with torch.no_grad():
        adapter.change_threshold.copy_(torch.stack(thresholds))
    adapter.change_quantile = quantile


def _fit_stats(C, N, Ws, Bs, As, rows: int = 512) -> dict:
    """How far the ungated edit moves concept outputs to neutral ones.

    A diagnostic, so it looks at `rows` evenly spaced embeddings: on all of them it took longer
    than the edit itself (19 s per concept for SD1.5's 32 projections on the CPU)."""
    pick = torch.linspace(0, len(C) - 1, min(len(C), rows)).long()
    C, N = C[pick].float(), N[pick].float()
    residual = before = 0.0
    for W, B, A in zip(Ws, Bs, As):
        W = W.float()
        CW, NW = C @ W.T, N @ W.T
        residual += (CW + (C @ A.T) @ B.T - NW).square().sum().item()
        before += (CW - NW).square().sum().item()
    return {"relative_residual": math.sqrt(residual / max(before, 1e-30))}
