"""Intervals for the benchmark's numbers, so that the report can say which differences are noise.

Every accuracy is a share of pictures the classifier judges, so its 95% interval is Wilson's score
interval for a binomial proportion. H_o combines three accuracies non-linearly, so its interval
comes from a bootstrap: the judged pictures of each group are resampled with replacement, H_o is
recomputed, and the 2.5th and 97.5th percentiles are taken. A difference between two methods is
"within noise" when the 95% bootstrap interval of the difference contains 0. Two methods' FIDs
are compared the same way, pairing pictures: both drew the same prompts from the same noise as
the reference pictures, so the same resampled pictures enter all three sets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from benchmark.metrics import frechet_distance, harmonic_overall

Z95 = 1.959964


@dataclass(frozen=True)
class Interval:
    """A measured share and its 95% interval."""

    value: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.2f}, {self.high:.2f}]"


def wilson(successes: int, n: int) -> Interval:
    """Wilson's 95% score interval of a proportion (well-behaved at 0 and 1, unlike the normal one)."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    p = successes / n
    denominator = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denominator
    # at 0 or n successes one end is exactly p; rounding must not leave p outside its interval
    return Interval(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)), n)


def share(outcomes: list[bool]) -> Interval:
    return wilson(sum(outcomes), len(outcomes))


@dataclass
class Judged:
    """The judged pictures behind one H_o: did each picture show its concept? `erased` (request
    words), `general` (left-out words and unseen templates), `kept` (the other concepts)."""

    erased: list[bool]
    general: list[bool]
    kept: list[bool]

    def h_o(self) -> float:
        return harmonic_overall(_mean(self.erased), _mean(self.general), _mean(self.kept))


def _mean(xs) -> float:
    return sum(xs) / len(xs) if len(xs) else math.nan


def _resampled_h_o(groups: list[Judged], generator: torch.Generator, draws: int) -> torch.Tensor:
    """`draws` bootstrap values of the mean H_o over `groups` (each group resampled on its own)."""
    totals = torch.zeros(draws, dtype=torch.float64)
    for judged in groups:
        shares = []
        for outcomes in (judged.erased, judged.general, judged.kept):
            x = torch.tensor(outcomes, dtype=torch.float64)
            picks = torch.randint(0, len(x), (draws, len(x)), generator=generator)
            shares.append(x[picks].mean(1))
        terms = torch.stack([1 - shares[0], 1 - shares[1], shares[2]])
        h = 3 / (1 / terms.clamp_min(1e-12)).sum(0)
        totals += torch.where((terms > 0).all(0), h, torch.zeros_like(h))
    return totals / len(groups)


def h_o_interval(groups: list[Judged], draws: int = 2000, seed: int = 0) -> Interval:
    """Mean H_o over targets with its 95% bootstrap interval."""
    values = _resampled_h_o(groups, torch.Generator().manual_seed(seed), draws)
    point = sum(g.h_o() for g in groups) / len(groups)
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Interval(point, low, high, sum(len(g.erased) + len(g.general) + len(g.kept) for g in groups))


def h_o_difference(a: list[Judged], b: list[Judged], draws: int = 2000, seed: int = 0) -> Interval:
    """Mean H_o of `a` minus that of `b` (the same targets), with its 95% bootstrap interval."""
    generator = torch.Generator().manual_seed(seed)
    diff = _resampled_h_o(a, generator, draws) - _resampled_h_o(b, generator, draws)
    point = sum(g.h_o() for g in a) / len(a) - sum(g.h_o() for g in b) / len(b)
    low, high = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Interval(point, low, high, 0)


def fid_difference(a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor, draws: int = 500,
                   seed: int = 0) -> Interval:
    """FID of features `a` minus FID of `b` (both against `reference`; row i of each is the same
    prompt and noise), with a 95% bootstrap interval over the pictures, resampled in pairs."""
    if not len(a) == len(b) == len(reference):
        raise ValueError(f"paired features need the same number of pictures, got {len(a)}, {len(b)}, {len(reference)}")
    generator = torch.Generator().manual_seed(seed)
    diff = []
    for _ in range(draws):
        i = torch.randint(0, len(a), (len(a),), generator=generator)
        diff.append(frechet_distance(a[i], reference[i]) - frechet_distance(b[i], reference[i]))
    low, high = torch.quantile(torch.tensor(diff, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Interval(frechet_distance(a, reference) - frechet_distance(b, reference), low, high, len(a))


def within_noise(difference: Interval) -> bool:
    return difference.low <= 0 <= difference.high
