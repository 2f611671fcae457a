"""Stage 1: the closed-form gated low-rank edit.

For every key/value projection `W` (`d_out × d`), with the rows of `C`, `N`, `P` the concept,
neutral and preserve embeddings of stage 0 (counts `n`, `n`, `m`), solve

    min_ΔW  1/n Σ_i ‖(W + ΔW) c_i − W n_i‖²  +  λ_p/m Σ_j ‖ΔW p_j‖²  +  λ ‖ΔW‖²

whose solution is ΔW = W M with M = (N − C)ᵀC/n · G⁻¹ and G = CᵀC/n + λ_p PᵀP/m + λ I.
`M` does not depend on `W`, so it is solved once per concept (a linear solve, never an
inverse) and every layer only truncates `W M` to rank `r` (eq. in `ace-method.md`, stage 1).

The gate of a concept looks at the directions where the concept's embeddings have far more
energy than the preserve embeddings: the top generalized eigenvectors of
Σ_C u = μ (Σ_P + εI) u. Its threshold and temperature are set in closed form from the energy
scores of the two sets: 0.95 at the 10th percentile of the concept's own tokens and 0.05 at the
99.9th percentile of the preserve tokens. Tokens after the concept (which carry it more weakly)
get a gate between the two, in proportion to how much of the concept they carry.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .adapter import GatedAdapter, gate_score
from .families import Projection
from .tokens import ConceptTokens, RequestTokens

GATE_HIGH = 0.95  # gate value at the `on_quantile` of concept tokens
LOGIT_HIGH = math.log(GATE_HIGH / (1 - GATE_HIGH))


@dataclass(frozen=True)
class ClosedFormConfig:
    rank: int = 32  # per concept and projection (see the README: 8 fitted MiniLM's concept badly)
    gate_rank: int = 8  # dimensions of each concept's gate subspace
    preserve_weight: float = 1.0  # λ_p
    ridge: float = 1e-3  # λ, relative to the mean energy of the concept embeddings
    on_quantile: float = 0.1  # of the concept's own tokens' scores, where the gate reaches 0.95
    off_quantile: float = 0.999  # of preserve-token scores, where the gate falls to 0.05

    def __post_init__(self):
        if not (isinstance(self.rank, int) and 1 <= self.rank <= 256):
            raise ValueError(f"rank must be an integer from 1 to 256, got {self.rank!r}")
        if not (isinstance(self.gate_rank, int) and 1 <= self.gate_rank <= 256):
            raise ValueError(f"gate rank must be an integer from 1 to 256, got {self.gate_rank!r}")
        for name in ("preserve_weight", "ridge"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (0 < self.on_quantile < 1 and 0 < self.off_quantile < 1):
            raise ValueError("gate quantiles must lie strictly between 0 and 1")


def solve_edit(C: torch.Tensor, N: torch.Tensor, PtP_m: torch.Tensor, cfg: ClosedFormConfig) -> torch.Tensor:
    """M (d × d) with ΔW = W M, solved in float64."""
    C, N = C.double(), N.double()
    n, d = C.shape
    CtC_n = C.T @ C / n
    ridge = cfg.ridge * CtC_n.diagonal().sum() / d
    G = CtC_n + cfg.preserve_weight * PtP_m + ridge * torch.eye(d, dtype=C.dtype)
    Mt = torch.linalg.solve(G, C.T @ (N - C) / n)  # G symmetric: G Mᵀ = Cᵀ(N − C)/n
    return Mt.T


def truncate(W: torch.Tensor, U_S: torch.Tensor, Vt: torch.Tensor, rank: int):
    """Rank-`rank` factors (B, A) of W M, given M ≈ U_S Vt (Vt with orthonormal rows).

    W M ≈ (W U_S) Vt; with W U_S = Q R and R = U_R S_R V_Rᵀ the product's SVD is
    (Q U_R) S_R (V_Rᵀ Vt), so only a k × k SVD is needed per layer. The singular values are split
    evenly between B and A, which keeps both factors on one scale for fine-tuning.
    """
    Q, R = torch.linalg.qr(W.double() @ U_S)
    U_R, S_R, Vt_R = torch.linalg.svd(R)
    root = S_R[:rank].sqrt()
    B = (Q @ U_R[:, :rank]) * root
    A = root[:, None] * (Vt_R[:rank] @ Vt)
    if B.shape[1] < rank:  # fewer directions than the rank: pad with zeros
        B = torch.nn.functional.pad(B, (0, rank - B.shape[1]))
        A = torch.nn.functional.pad(A, (0, 0, 0, rank - A.shape[0]))
    return B.float(), A.float()


@dataclass
class Gate:
    """One slot's gate: g(e) = sigmoid((s(e) − threshold) / exp(log_temperature)), with s(e) the
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
    d = C.shape[1]
    center = P.mean(0)
    Cc, Pc, D = C - center, P - center, C - N
    Sigma_D = D.T @ D / len(D)
    Sigma_P = Pc.T @ Pc / len(Pc)
    Sigma_P = Sigma_P + 1e-3 * Sigma_P.diagonal().mean() * torch.eye(d, dtype=C.dtype)
    L = torch.linalg.cholesky(Sigma_P)
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
    """Stage 1's result: the adapter, the concepts of each of its slots, and fit statistics."""

    adapter: GatedAdapter
    slots: list[list[int]]
    stats: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def closed_form_erasure(
    tokens: RequestTokens,
    weights: dict[str, torch.Tensor],
    projections: list[Projection],
    cfg: ClosedFormConfig = ClosedFormConfig(),
) -> ClosedForm:
    """Stage 1 for every concept of a request.

    Concepts whose gates fire on each other's tokens ("Van Gogh" and "Vincent van Gogh" on two
    lines) share one slot of the adapter, solved jointly on their stacked C and N: separate slots
    would both fire on the shared tokens and apply the edit twice. `slots` lists the concept
    indices of each slot. `weights` maps each projection's name to its weight `W` (any
    dtype and device; the maths runs in float64 on the CPU, the factors are stored in float32).
    """
    start = time.perf_counter()
    P = tokens.P.double()
    PtP_m = P.T @ P / len(P)
    k = min(P.shape[1], max(4 * cfg.rank, 32))
    Ws = [weights[p.name].detach().to("cpu", torch.float64) for p in projections]

    gates = [calibrate_gate(c.C, c.N, c.is_phrase, P, cfg) for c in tokens.concepts]
    slots = overlapping_groups(tokens.concepts, gates)
    downs = [[] for _ in projections]
    ups = [[] for _ in projections]
    gate_parts, stats = [], []
    for slot in slots:
        C = torch.cat([tokens.concepts[i].C for i in slot])
        N = torch.cat([tokens.concepts[i].N for i in slot])
        is_phrase = torch.cat([tokens.concepts[i].is_phrase for i in slot])
        M = solve_edit(C, N, PtP_m, cfg)
        U, S, Vt = torch.linalg.svd(M)
        U_S, Vt = U[:, :k] * S[:k], Vt[:k]
        for i, W in enumerate(Ws):
            B, A = truncate(W, U_S, Vt, cfg.rank)
            ups[i].append(B)
            downs[i].append(A)
        gate = gates[slot[0]] if len(slot) == 1 else calibrate_gate(C, N, is_phrase, P, cfg)
        gate_parts.append(gate)
        stats.append(_fit_stats(C, N, Ws, [u[-1] for u in ups], [a[-1] for a in downs], P))
        stats[-1].update(concepts=[tokens.concepts[i].concept.target for i in slot], gate_margin=gate.margin)

    adapter = GatedAdapter(
        projections,
        gate_basis=torch.stack([g.directions for g in gate_parts]),
        gate_center=torch.stack([g.center for g in gate_parts]),
        gate_threshold=torch.tensor([g.threshold for g in gate_parts]),
        gate_log_temperature=torch.tensor([g.log_temperature for g in gate_parts]),
        lora_down=[torch.stack(a) for a in downs],
        lora_up=[torch.stack(b) for b in ups],
    )
    return ClosedForm(adapter, slots, stats, time.perf_counter() - start)


def overlapping_groups(concepts: list[ConceptTokens], gates: list[Gate]) -> list[list[int]]:
    """Concepts linked when each one's gate is open (mean > 0.6) on the other's own tokens.

    Measured on the toy encoder (384 wide): "van gogh" / "vincent van gogh" score 0.95 and 0.74;
    unrelated concepts at most 0.56 one way and 0.45 the other, so a one-way test merged unrelated
    concepts and the mutual one does not."""
    parent = list(range(len(concepts)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    opens = [[gate.values(c.C[c.is_phrase]).mean().item() for c in concepts] for gate in gates]
    for i in range(len(concepts)):
        for j in range(i + 1, len(concepts)):
            if min(opens[i][j], opens[j][i]) > 0.6:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(concepts)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def _fit_stats(C, N, Ws, Bs, As, P, rows: int = 512) -> dict:
    """How far the ungated edit moves concept outputs to neutral ones, and preserve outputs.

    A diagnostic, so it looks at `rows` evenly spaced embeddings of each set: on all of them it
    took longer than the edit itself (19 s per concept for SD1.5's 32 projections on the CPU)."""

    def spread(X):
        return X[torch.linspace(0, len(X) - 1, min(len(X), rows)).long()].float()

    pick = torch.linspace(0, len(C) - 1, min(len(C), rows)).long()
    C, N, P = C[pick].float(), N[pick].float(), spread(P)
    residual = before = moved = kept = 0.0
    for W, B, A in zip(Ws, Bs, As):
        W = W.float()
        CW, NW = C @ W.T, N @ W.T
        residual += (CW + (C @ A.T) @ B.T - NW).square().sum().item()
        before += (CW - NW).square().sum().item()
        moved += ((P @ A.T) @ B.T).square().sum().item()
        kept += (P @ W.T).square().sum().item()
    return {
        "relative_residual": math.sqrt(residual / max(before, 1e-30)),
        "ungated_preserve_change": math.sqrt(moved / max(kept, 1e-30)),
    }
