"""Measure how well a (possibly edited) toy MODEL renders each concept of the world.

For every concept, the model draws one picture per prompt of that concept (ComfyUI's sampler),
and the toy world's classifier judges it: an object, colour or style concept counts when the
classifier sees that attribute; an entity counts when it sees all three of its attributes.

    python -m benchmark.evaluate --threads 1                       # the untouched causal toy model
    python -m benchmark.evaluate --toy bidirectional --split heldout --out results.json

Splits (`benchmark/prompts.py`): 'train' (learned synonyms, training templates), 'request' (only
the words an erasure request names), 'left_out' (the learned synonyms a request leaves out) and
'heldout' (templates training never saw).

Every picture is a `Job`: a prompt of one concept and the seed of its initial noise, both fixed by
(concept, split, index) alone. So the first n jobs of a concept are the same whatever else is
measured with them, two models evaluated alike differ only by what the models do, and the
untouched model's pictures can be cached and compared with any edited model's (the benchmark's FID).
"""
from __future__ import annotations

import argparse
import json
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmark.prompts import SPLITS, load_prompt_file, split_prompts
from runner import host
from toy import world
from toy.classifier import classify, load_classifier, shows


@dataclass(frozen=True)
class Job:
    """One picture to draw and judge: a prompt asking for `concept` and its noise seed."""

    concept: str
    kind: str
    prompt: world.Prompt
    seed: int


def ordered(prompts: list, n: int, key: str) -> list:
    """n prompts in a fixed order shuffled by `key`, cycling when there are fewer: the first k of
    `ordered(p, n, key)` are the same for every n >= k."""
    order = list(prompts)
    random.Random(zlib.crc32(key.encode())).shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def jobs(kind: str, name: str, split: str, n: int, prompt_file: dict, seed: int = 0) -> list[Job]:
    """The first n pictures of a concept in a split."""
    key = f"{name}|{split}"
    return [Job(name, kind, p, seed + zlib.crc32(f"{key}|{i}".encode()))
            for i, p in enumerate(ordered(split_prompts(kind, name, split, prompt_file), n, key))]


def render(model_patcher, clip, todo: list[Job], batch: int = 256, **sampler) -> torch.Tensor:
    """(len(todo), 3, 16, 16) pictures in [0, 1], each from its job's prompt and noise."""
    toy = host.start().toy.model
    uncond = toy.encode_prompts(clip, [""])
    pictures = []
    with torch.no_grad():
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            context = toy.encode_prompts(clip, [j.prompt.text for j in chunk])
            noise = torch.stack([torch.randn(3, toy.RESOLUTION, toy.RESOLUTION,
                                             generator=torch.Generator().manual_seed(j.seed)) for j in chunk])
            pictures.append(toy.sample_contexts(model_patcher, context, uncond, noise=noise, **sampler))
    return torch.cat(pictures) if pictures else torch.zeros(0, 3, 16, 16)


def judge(classifier, pictures: torch.Tensor, todo: list[Job]) -> list[bool]:
    """Per picture: does it show the concept its prompt asks for?"""
    pred = classify(classifier, pictures)
    return [shows(pred, i, j.prompt, j.kind) for i, j in enumerate(todo)]


@dataclass
class Measured:
    """The judged pictures of one concept: `shown[i]` for `jobs[i]`, and the pictures themselves."""

    kind: str
    jobs: list[Job]
    shown: list[bool]
    pictures: torch.Tensor

    @property
    def accuracy(self) -> float:
        return sum(self.shown) / len(self.shown)


def measure(model_patcher, clip, classifier, concepts: list[tuple[str, str]], split: str, per_concept: int | dict,
            prompt_file: dict, seed: int = 0, **sampler) -> dict[str, Measured]:
    """{concept: Measured} for the first `per_concept` jobs of each (kind, name) in `concepts`
    (`per_concept` may map names to counts)."""
    todo = []
    for kind, name in concepts:
        n = per_concept[name] if isinstance(per_concept, dict) else per_concept
        todo += jobs(kind, name, split, n, prompt_file, seed)
    pictures = render(model_patcher, clip, todo, **sampler)
    shown = judge(classifier, pictures, todo)
    out = {}
    for kind, name in concepts:
        mine = [i for i, j in enumerate(todo) if j.concept == name]
        out[name] = Measured(kind, [todo[i] for i in mine], [shown[i] for i in mine], pictures[mine])
    return out


def format_table(results: dict[str, Measured]) -> str:
    lines = [f"{'concept':<12} {'kind':<7} {'accuracy':>8} {'chance':>7} {'n':>5}"]
    for name, r in results.items():
        lines.append(f"{name:<12} {r.kind:<7} {r.accuracy:>8.3f} {world.CHANCE[r.kind]:>7.3f} {len(r.shown):>5}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", choices=("causal", "bidirectional"), default="causal", help="which toy model")
    ap.add_argument("--split", choices=list(SPLITS), default="train")
    ap.add_argument("--per-concept", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, clip, _ = host.start().toy.model.load_toy_model(args.toy)
    results = measure(model, clip, load_classifier(), world.all_concepts(), args.split, args.per_concept,
                      load_prompt_file(), args.seed)
    print(format_table(results))
    print(f"({time.time() - t0:.0f} s, {args.toy} toy, split {args.split})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "toy": args.toy, "sampler": host.start().toy.model.DEFAULT_SAMPLER, "split": args.split, "seed": args.seed,
            "per_concept": args.per_concept,
            "results": {n: {"kind": r.kind, "accuracy": r.accuracy, "chance": world.CHANCE[r.kind], "n": len(r.shown)}
                        for n, r in results.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
