"""Measure how well a (possibly edited) toy MODEL renders each concept of the world.

For every concept, the model draws one picture per prompt of that concept (ComfyUI's sampler),
and the benchmark classifier judges it: an object, colour or style concept counts when the
classifier sees that attribute; an entity counts when it sees all three of its attributes.

    python -m benchmark.evaluate --threads 1                       # the untouched toy model
    python -m benchmark.evaluate --split heldout --out results.json

Splits (see `world.concept_prompts`): 'train' (learned synonyms, training templates), 'request'
(only the words an erasure request names), 'left_out' (the learned synonyms a request leaves out)
and 'heldout' (templates training never saw).

An erasure method is doing its job when the erased concept's accuracy falls towards its chance
level and the other concepts' accuracies stay where they were.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmark import world

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def correct(pred: dict[str, list[str]], prompts: list[world.Prompt], kind: str) -> list[bool]:
    """Per image: did the classifier see the concept the prompt asked for?"""
    if kind == "entity":
        keys = ("object", "colour", "style")
    else:
        keys = (kind,)
    return [all(pred[k][i] == getattr(p, k) for k in keys) for i, p in enumerate(prompts)]


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
                      heldout: dict | None = None, keep_images: bool = False, **sampler) -> dict[str, dict]:
    """{concept: {kind, accuracy, chance, n}} for the model's generations from each concept's prompts
    (and, with keep_images, the generations themselves under "images").

    The same concepts, split, per_concept and seed always give the same prompts and initial noise,
    so two models evaluated alike differ only by what the models do. `heldout` replaces
    prompts/heldout.json (the request words, left-out synonyms and held-out templates)."""
    from benchmark.classifier import classify
    from benchmark.toy_comfy import encode_prompts, sample_contexts

    concepts = concepts or world.all_concepts()
    jobs = []  # (concept, kind, prompt)
    for kind, name in concepts:
        for p in pick(world.concept_prompts(kind, name, split, heldout=heldout), per_concept):
            jobs.append((name, kind, p))
    uncond = encode_prompts(clip, [""])
    oks, kept = [], []
    with torch.no_grad():
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            context = encode_prompts(clip, [p.text for _, _, p in chunk])
            images = sample_contexts(model_patcher, context, uncond, seed=seed + start, **sampler)
            pred = classify(classifier, images)
            for i, (name, kind, p) in enumerate(chunk):
                one = {k: [v[i]] for k, v in pred.items()}
                oks.append(correct(one, [p], kind)[0])
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


def concept_grid(model_patcher, clip, path: Path, per_concept: int = 8, split: str = "train", seed: int = 0,
                 **sampler) -> None:
    """Save a PNG: one row per concept, `per_concept` generations from its prompts, 4x enlarged."""
    import torchvision

    from benchmark.toy_comfy import generate

    prompts = [p.text for kind, name in world.all_concepts()
               for p in pick(world.concept_prompts(kind, name, split), per_concept)]
    with torch.no_grad():
        images = generate(model_patcher, clip, prompts, seed=seed, **sampler)
    grid = torchvision.utils.make_grid(images, nrow=per_concept, padding=1, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, str(path))


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'concept':<12} {'kind':<7} {'accuracy':>8} {'chance':>7} {'n':>5}"]
    for name, r in results.items():
        lines.append(f"{name:<12} {r['kind']:<7} {r['accuracy']:>8.3f} {r['chance']:>7.3f} {r['n']:>5}")
    return "\n".join(lines)


def main() -> None:
    from benchmark.toy_comfy import DEFAULT_SAMPLER, UNET_WEIGHTS, load_toy_clip, load_toy_model_patcher
    from benchmark.classifier import load_classifier

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, default=UNET_WEIGHTS)
    ap.add_argument("--split", choices=list(world.SPLITS), default="train")
    ap.add_argument("--per-concept", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=DEFAULT_SAMPLER["steps"])
    ap.add_argument("--cfg", type=float, default=DEFAULT_SAMPLER["cfg"])
    ap.add_argument("--sampler", default=DEFAULT_SAMPLER["sampler_name"])
    ap.add_argument("--scheduler", default=DEFAULT_SAMPLER["scheduler"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--grid", type=Path, default=None, help="also save a PNG of samples, one row per concept")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, clip = load_toy_model_patcher(args.weights), load_toy_clip()
    sampler = {"steps": args.steps, "cfg": args.cfg, "sampler_name": args.sampler, "scheduler": args.scheduler}
    results = evaluate_concepts(model, clip, load_classifier(), split=args.split, per_concept=args.per_concept,
                                seed=args.seed, **sampler)
    print(format_table(results))
    print(f"({time.time() - t0:.0f} s, sampler {sampler}, split {args.split})")
    if args.grid:
        concept_grid(model, clip, args.grid, split=args.split, seed=args.seed, **sampler)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"sampler": sampler, "split": args.split, "seed": args.seed,
                                        "per_concept": args.per_concept, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
