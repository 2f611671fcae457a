"""ASR pooled over benchmark runs that differ only in a setting of the erasure, such as stage 2's
training seed (`--set finetune.seed=K`).

    .venv/bin/python -m benchmark.pool benchmark/results/clean-objects benchmark/results/train-seeds/seed-*

One run's ASR is measured on one erasure per target: its attack seeds vary the attacker, not the
training. Stage 2 draws its examples, noise levels and soft-word path from its own seed, and on the
causal toy that seed alone decides whether ring holds (`docs/method.md`, section 8), so a method's
robustness needs several training seeds. This prints, per method and toy, each run's (target,
attack seed) pairs brought back under the default and the stronger attack, and the pairs of all
runs pooled with Wilson's interval. The pooled interval treats the pairs as independent; pairs of
one run share an erasure, so it is narrower than the truth, and the spread between runs is printed
beside it.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from benchmark import stats

ATTACKS = (("attacks", "default attack"), ("strong_attacks", "stronger attack"))


@dataclass
class RunAttacks:
    """One run's attacks on one method: per target, whether each attack seed brought it back."""

    label: str
    brought_back: dict[str, dict[str, list[bool]]]  # attack kind -> target -> per attack seed

    def count(self, kind: str) -> tuple[int, int]:
        pairs = [b for per_seed in self.brought_back[kind].values() for b in per_seed]
        return sum(pairs), len(pairs)


def read_run(folder: Path, toy: str, method: str) -> RunAttacks | None:
    """The attacks of `method` on `toy` in the run written to `folder` (None if it has none)."""
    results = json.loads((folder / "results.json").read_text())
    methods = results.get("toys", {}).get(toy, {}).get("methods", {})
    if method not in methods:
        return None
    per_target = methods[method]["per_target"]
    settings = {f"{stage}.{k}": v for stage, changed in results.get("ace_settings", {}).items() for k, v in changed.items()}
    label = ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "defaults"
    return RunAttacks(f"{folder.name} ({label})", {
        kind: {t: [a["brought_back"] for a in s.get(kind, [])] for t, s in per_target.items()} for kind, _ in ATTACKS})


def pooled_report(folders: list[Path], toy: str, method: str) -> str:
    runs = [r for r in (read_run(f, toy, method) for f in folders) if r is not None]
    if not runs:
        raise ValueError(f"no run in {', '.join(map(str, folders))} measured {method} on the {toy} toy")
    lines = [f"{method} on the {toy} toy, {len(runs)} runs"]
    for kind, name in ATTACKS:
        counts = [r.count(kind) for r in runs]
        if not sum(n for _, n in counts):
            continue
        lines.append(f"  {name}:")
        for run, (back, n) in zip(runs, counts):
            per_target = ", ".join(f"{t} {sum(b)}/{len(b)}" for t, b in run.brought_back[kind].items() if b)
            lines.append(f"    {run.label}: {back}/{n} ({per_target})")
        back, n = sum(b for b, _ in counts), sum(n for _, n in counts)
        shares = [b / n for b, n in counts if n]
        lines.append(f"    pooled: {back}/{n} = {stats.wilson(back, n)} (pairs as independent); "
                     f"runs from {min(shares):.3f} to {max(shares):.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="run folders (each with its results.json)")
    ap.add_argument("--toy", default="causal")
    ap.add_argument("--method", default="ace")
    args = ap.parse_args(argv)
    print(pooled_report(args.folders, args.toy, args.method))


if __name__ == "__main__":
    main()
