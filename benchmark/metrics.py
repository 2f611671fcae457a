"""The benchmark's summary numbers: MACE's harmonic mean H_o, and a Fréchet distance between two
sets of generations in the classifier's feature space (the benchmark's FID)."""
from __future__ import annotations

import torch


def harmonic_overall(acc_e: float, acc_g: float, acc_s: float) -> float:
    """H_o = 3 / (1/(1 − Acc_e) + 1/(1 − Acc_g) + 1/Acc_s): high only when the erased concept is gone
    (directly and under rewordings) and every other concept stays. 0 when any term is at its worst."""
    terms = (1 - acc_e, 1 - acc_g, acc_s)
    if min(terms) <= 0:
        return 0.0
    return 3 / sum(1 / t for t in terms)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [n, d] and b [m, d]:
    ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(value.item(), 0.0)


def classifier_features(classifier, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """The classifier's penultimate features (128 per image) of images (B, 3, 16, 16) in [0, 1]."""
    with torch.no_grad():
        classifier.eval()
        return torch.cat([classifier.embed(images[i:i + batch]) for i in range(0, len(images), batch)])
