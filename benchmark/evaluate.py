"""Measure how well a (possibly edited) toy MODEL renders each concept of the world.

For every concept, the model draws one picture per prompt of that concept (ComfyUI's sampler),
and the toy world's classifier judges it: an object, colour or style concept counts when the
classifier sees that attribute; an entity counts when it sees all three of its attributes.

    python -m benchmark.evaluate --threads 1                       # the untouched toy model
    python -m benchmark.evaluate --toy bidirectional --split heldout --out results.json

Splits (`benchmark/prompts.py`): 'train' (learned synonyms, training templates), 'request' (only
the words an erasure request names), 'left_out' (the learned synonyms a request leaves out) and
'heldout' (templates training never saw).

An erasure method is doing its job when the erased concept's accuracy falls towards its chance
level and the other concepts' accuracies stay where they were.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmark.prompts import SPLITS, load_prompt_file, split_prompts
from runner import host
from toy import world
from toy.classifier import classify, load_classifier, shows


def pick(prompts: list, n: int) -> list:
    """n prompts spread evenly over the list (cycling when it is shorter than n)."""
    if n <= 0:
        return []
    if len(prompts) >= n:
        step = len(prompts) / n
        return [prompts[int(i * step)] for i in range(n)]
    return [prompts[i % len(prompts)] for i in range(n)]


def evaluate_concepts(model_patcher, clip, classifier, concepts: list[tuple[str, str]] | None = None,
                      split: str = "train", per_concept: int = 32, seed: int = 0, batch: int = 256,
                      prompt_file: dict | None = None, keep_images: bool = False, **sampler) -> dict[str, dict]:
    """{concept: {kind, accuracy, chance, n}} for the model's generations from each concept's prompts
    (and, with keep_images, the generations themselves under "images").

    The same concepts, split, per_concept and seed always give the same prompts and initial noise,
    so two models evaluated alike differ only by what the models do. `prompt_file` replaces
    prompts/heldout.json (the request words, left-out synonyms and held-out templates)."""
    toy = host.start().toy.model
    prompt_file = prompt_file or load_prompt_file()
    concepts = concepts or world.all_concepts()
    jobs = []  # (concept, kind, prompt)
    for kind, name in concepts:
        for p in pick(split_prompts(kind, name, split, prompt_file), per_concept):
            jobs.append((name, kind, p))
    uncond = toy.encode_prompts(clip, [""])
    oks, kept = [], []
    with torch.no_grad():
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            context = toy.encode_prompts(clip, [p.text for _, _, p in chunk])
            images = toy.sample_contexts(model_patcher, context, uncond, seed=seed + start, **sampler)
            pred = classify(classifier, images)
            oks += [shows(pred, i, p, kind) for i, (_, kind, p) in enumerate(chunk)]
            kept.append(images)
    out: dict[str, dict] = {}
    for (name, kind, _), ok in zip(jobs, oks):
        r = out.setdefault(name, {"kind": kind, "correct": 0, "n": 0, "chance": world.CHANCE[kind]})
        r["correct"] += int(ok)
        r["n"] += 1
    for r in out.values():
        r["accuracy"] = r["correct"] / r["n"]
    if keep_images:
        images = torch.cat(kept)
        for name, r in out.items():
            r["images"] = images[[i for i, job in enumerate(jobs) if job[0] == name]]
    return out


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'concept':<12} {'kind':<7} {'accuracy':>8} {'chance':>7} {'n':>5}"]
    for name, r in results.items():
        lines.append(f"{name:<12} {r['kind']:<7} {r['accuracy']:>8.3f} {r['chance']:>7.3f} {r['n']:>5}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", choices=("causal", "bidirectional"), default="causal", help="which toy model")
    ap.add_argument("--split", choices=list(SPLITS), default="train")
    ap.add_argument("--per-concept", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="karras")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, clip, _ = host.start().toy.model.load_toy_model(args.toy)
    sampler = {"steps": args.steps, "cfg": args.cfg, "sampler_name": args.sampler, "scheduler": args.scheduler}
    results = evaluate_concepts(model, clip, load_classifier(), split=args.split, per_concept=args.per_concept,
                                seed=args.seed, **sampler)
    print(format_table(results))
    print(f"({time.time() - t0:.0f} s, {args.toy} toy, sampler {sampler}, split {args.split})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"toy": args.toy, "sampler": sampler, "split": args.split, "seed": args.seed,
                                        "per_concept": args.per_concept, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
