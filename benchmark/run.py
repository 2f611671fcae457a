"""The ACE benchmark in one command: erase concepts from the toy model with ACE, its ablations and
two baselines, and measure what is left.

    .venv/bin/python -m benchmark.run --quick      # ~3 min: does the harness work? (CI runs it)
    .venv/bin/python -m benchmark.run --full       # ~27 min on a 2-core CPU: the numbers
    .venv/bin/python -m benchmark.run --full --prompts my_prompts.json --out /tmp/mine

Writes `results.json`, `report.md` and PNGs (sample grids, H_o per method, scaling) to --out
(default benchmark/results/full or benchmark/results/quick).

What is measured (MACE's metrics; every accuracy is the benchmark classifier's verdict on the
model's generations, sampled with ComfyUI's sampler; chance levels are in world.CHANCE):
- Acc_e: the erased concept prompted with the words the erasure request names (lower is better);
- Acc_g: the erased concept under rewordings the request never named: its learned synonyms that
  the request left out, and templates training never saw (lower is better);
- Acc_s: every other concept of the world, each from its own prompts (higher is better);
- H_o = 3 / (1/(1−Acc_e) + 1/(1−Acc_g) + 1/Acc_s);
- ASR: the share of erased concepts a soft-prompt attacker brings back (benchmark/attack.py);
- fid_preserve: Fréchet distance, in the classifier's feature space, between the untouched and
  the erased model's generations of the other concepts (same prompts, same initial noise);
- seconds per concept of stage 1 (with stage 0) and stage 2.
Every method gets the same request (the target's request words, anchor "", and the other
concepts' names as the preserve list), the same prompts, seeds and attack budget.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmark.prompts import load_prompt_file, split_prompts
from runner import host
from toy import world

RESULTS = Path(__file__).resolve().parent / "results"

# One target of each kind for the method comparison, erased one at a time.
TARGETS = [("object", "circle"), ("colour", "blue"), ("style", "striped"), ("entity", "Quillane")]
# The order concepts are added in for the scaling runs; the last one is the one kept.
SCALING_ORDER = ["circle", "blue", "striped", "Quillane", "triangle", "red", "checkered", "Brontel", "square", "green",
                 "solid", "Zarnika", "ring", "yellow", "cross", "Vexmoor", "crescent", "diamond", "hourglass"]
UNTOUCHED_FLOOR = 0.9  # every concept must reach this on its own prompts, or no number means anything


@dataclass(frozen=True)
class Budget:
    targets: tuple
    untouched_per_concept: int  # generations per concept for the untouched check
    per_erased: int  # generations of the erased concept for Acc_e, and per generality split for Acc_g
    per_other: int  # generations per other concept for Acc_s (and the FID)
    attack_steps: int
    attack_batch: int
    scaling_sizes: tuple
    scaling_methods: tuple
    quick: bool


QUICK = Budget(targets=(("object", "circle"),), untouched_per_concept=16, per_erased=8, per_other=4, attack_steps=4,
               attack_batch=4, scaling_sizes=(3,), scaling_methods=("ace",), quick=True)
FULL = Budget(targets=tuple(TARGETS), untouched_per_concept=32, per_erased=24, per_other=12, attack_steps=40,
              attack_batch=8, scaling_sizes=(1, 3, 10, 18), scaling_methods=("ace", "uce", "esd_x"), quick=False)


STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", flush=True)


def concept_kinds() -> dict[str, str]:
    return {name: kind for kind, name in world.all_concepts()}


def make_request(erased: list[str], heldout: dict):
    """Erase each concept under its request words (the first is the target, the rest synonyms),
    anchor "", and keep every other concept of the world by name."""
    concepts = host.start().ace.concepts
    keep = [heldout["request"][name][0] for name in concept_kinds() if name not in erased]
    items = [concepts.Concept(heldout["request"][n][0], tuple(heldout["request"][n][1:]), "") for n in erased]
    return concepts.make_request(items, keep)


def measure(model, clip, classifier, erased: list[str], budget: Budget, heldout: dict, reference: dict) -> dict:
    """Acc_e, Acc_g, Acc_s, H_o and fid_preserve of a MODEL with the concepts `erased` taken out."""
    from benchmark.evaluate import evaluate_concepts
    from benchmark.metrics import classifier_features, frechet_distance, harmonic_overall

    kinds = concept_kinds()
    targets = [(kinds[n], n) for n in erased]
    direct = evaluate_concepts(model, clip, classifier, targets, split="request", per_concept=budget.per_erased,
                               prompt_file=heldout)
    general = [evaluate_concepts(model, clip, classifier, targets, split=s, per_concept=budget.per_erased,
                                 prompt_file=heldout) for s in ("left_out", "heldout")]
    others = evaluate_concepts(model, clip, classifier, split="train", per_concept=budget.per_other,
                               prompt_file=heldout, keep_images=True)
    kept = [n for n in others if n not in erased]
    acc_e = sum(direct[n]["accuracy"] for n in erased) / len(erased)
    acc_g = sum(g[n]["accuracy"] for g in general for n in erased) / (2 * len(erased))
    acc_s = sum(others[n]["accuracy"] for n in kept) / len(kept)
    mine = classifier_features(classifier, torch.cat([others[n]["images"] for n in kept]))
    theirs = classifier_features(classifier, torch.cat([reference[n]["images"] for n in kept]))
    return {
        "acc_e": acc_e, "acc_g": acc_g, "acc_s": acc_s, "h_o": harmonic_overall(acc_e, acc_g, acc_s),
        "fid_preserve": frechet_distance(mine, theirs),
        "per_concept": {n: {"acc_e": direct[n]["accuracy"], "acc_left_out": general[0][n]["accuracy"],
                            "acc_heldout": general[1][n]["accuracy"], "chance": direct[n]["chance"]} for n in erased},
        "acc_s_per_concept": {n: others[n]["accuracy"] for n in kept},
    }


def sample_rows(target: str, heldout: dict) -> list[tuple[str, str]]:
    """(label, prompt) rows of a before/after grid for one erased target."""
    kinds = concept_kinds()
    kind = kinds[target]
    direct = split_prompts(kind, target, "request", heldout)
    left_out = split_prompts(kind, target, "left_out", heldout)
    unseen = split_prompts(kind, target, "heldout", heldout)
    rows = [("erased", direct[0].text), ("erased", direct[len(direct) // 2].text),
            ("left-out synonym", left_out[0].text), ("held-out template", unseen[-1].text)]
    for name in SCALING_ORDER:  # four other concepts, each from a prompt that does not ask for the target
        prompts = world.concept_prompts(kinds[name], name)
        clean = [p for p in prompts if target not in (p.object, p.colour, p.style, p.entity)]
        if name != target and clean and len(rows) < 8:
            rows.append((f"other ({name})", clean[len(clean) // 3].text))
    return rows


def run(budget: Budget, out: Path, heldout_path: Path | None = None, methods: tuple | None = None,
        toy_name: str = "bidirectional") -> dict:
    from benchmark import attack, methods as erasers, plots
    from benchmark.evaluate import evaluate_concepts
    from runner.pictures import Row, grid
    from toy.classifier import load_classifier

    toy = host.start().toy.model
    heldout = load_prompt_file(heldout_path)
    methods = methods or erasers.METHODS
    out.mkdir(parents=True, exist_ok=True)
    model, clip, _ = toy.load_toy_model(toy_name)
    generate = toy.generate
    classifier = load_classifier()
    log(f"{toy_name} toy model loaded; machine: {host.machine()}")

    # 1. The untouched model must render every concept, or no erasure number means anything.
    untouched = evaluate_concepts(model, clip, classifier, split="train", per_concept=budget.untouched_per_concept,
                                  prompt_file=heldout)
    untouched_acc = {n: r["accuracy"] for n, r in untouched.items()}
    failing = {n: a for n, a in untouched_acc.items() if a < UNTOUCHED_FLOOR}
    log(f"untouched model: lowest accuracy {min(untouched_acc.values()):.3f} ({min(untouched_acc, key=untouched_acc.get)})")
    reference = evaluate_concepts(model, clip, classifier, split="train", per_concept=budget.per_other,
                                  prompt_file=heldout, keep_images=True)
    untouched_generality = {}
    for kind, name in budget.targets:
        untouched_generality[name] = {s: evaluate_concepts(model, clip, classifier, [(kind, name)], split=s,
                                                           per_concept=budget.per_erased, prompt_file=heldout)[name]["accuracy"]
                                      for s in ("request", "left_out", "heldout")}

    # 2. Every method on every target, one target at a time.
    per_target: dict[str, dict[str, dict]] = {m: {} for m in methods}
    grids: dict[str, list] = {}
    for kind, name in budget.targets:
        request = make_request([name], heldout)
        rows = sample_rows(name, heldout)
        with torch.no_grad():
            grid_columns = {"untouched": generate(model, clip, [p for _, p in rows], seed=7)}
        ace_result = None
        for method in methods:
            erased = erasers.run_method(method, model, clip, request, ace_erased=ace_result, quick=budget.quick)
            if method == "ace":
                ace_result = erased
            scores = measure(erased.model, clip, classifier, [name], budget, heldout, reference)
            word = heldout["request"][name][0]
            hit = attack.soft_prompt_attack(erased.model, clip, classifier, kind, name, word, heldout,
                                            steps=budget.attack_steps, batch=budget.attack_batch)
            scores.update(attack_accuracy=hit["accuracy"], brought_back=hit["brought_back"],
                          stage1_seconds=erased.stage1_seconds, stage2_seconds=erased.stage2_seconds)
            per_target[method][name] = scores
            with torch.no_grad():
                grid_columns[method] = generate(erased.model, clip, [p for _, p in rows], seed=7)
            log(f"{name:<9} {method:<16} Acc_e {scores['acc_e']:.2f}  Acc_g {scores['acc_g']:.2f}  "
                f"Acc_s {scores['acc_s']:.2f}  H_o {scores['h_o']:.2f}  attack {hit['accuracy']:.2f}  "
                f"FID {scores['fid_preserve']:.2f}  stage 1 {erased.stage1_seconds:.1f} s  stage 2 {erased.stage2_seconds:.1f} s")
        columns = list(grid_columns)
        grid([Row([label, prompt], [[grid_columns[c][i]] for c in columns]) for i, (label, prompt) in enumerate(rows)],
             columns, scale=4, label_width=300).save(out / f"samples_{name}.png")
        grids[name] = f"samples_{name}.png"

    summary = {}
    for method, by_target in per_target.items():
        n = len(by_target)
        mean = {k: sum(r[k] for r in by_target.values()) / n
                for k in ("acc_e", "acc_g", "acc_s", "fid_preserve", "stage1_seconds", "stage2_seconds")}
        summary[method] = {
            "acc_e": mean["acc_e"], "acc_g": mean["acc_g"], "acc_s": mean["acc_s"],
            "h_o": sum(r["h_o"] for r in by_target.values()) / n,
            "asr": sum(r["brought_back"] for r in by_target.values()) / n,
            "attack_accuracy": sum(r["attack_accuracy"] for r in by_target.values()) / n,
            "fid_preserve": mean["fid_preserve"],
            "stage1_s_per_concept": mean["stage1_seconds"],
            "stage2_s_per_concept": mean["stage2_seconds"],
            "per_target": by_target,
        }

    # 3. Scaling: several concepts erased at once.
    scaling = []
    for n_concepts in budget.scaling_sizes:
        erased_names = SCALING_ORDER[:n_concepts]
        request = make_request(erased_names, heldout)
        for method in budget.scaling_methods:
            if n_concepts == 1 and budget.targets and erased_names[0] == budget.targets[0][1] and method in per_target:
                r = per_target[method][erased_names[0]]  # the same run as the comparison's first target
                seconds = r["stage1_seconds"] + r["stage2_seconds"]
            else:
                erased = erasers.run_method(method, model, clip, request, quick=budget.quick)
                r = measure(erased.model, clip, classifier, erased_names, budget, heldout, reference)
                seconds = erased.stage1_seconds + erased.stage2_seconds
            scaling.append({"method": method, "n_concepts": n_concepts, "acc_e": r["acc_e"], "acc_g": r["acc_g"],
                            "acc_s": r["acc_s"], "h_o": r["h_o"], "fid_preserve": r["fid_preserve"],
                            "seconds": seconds})
            log(f"scaling {method:<6} {n_concepts:>2} concepts  Acc_e {r['acc_e']:.2f}  Acc_g {r['acc_g']:.2f}  "
                f"Acc_s {r['acc_s']:.2f}  H_o {r['h_o']:.2f}  ({seconds:.1f} s)")

    results = {
        "untouched": {"per_concept_acc": untouched_acc, "chance": {n: r["chance"] for n, r in untouched.items()},
                      "floor": UNTOUCHED_FLOOR, "passes": not failing, "targets": untouched_generality},
        "methods": summary,
        "scaling": scaling,
        "machine": host.machine(),
        "toy": toy_name,
        "mode": "quick" if budget.quick else "full",
        "budget": asdict(budget),
        "sampler": toy.DEFAULT_SAMPLER,
        "prompts": str(heldout_path or "benchmark/prompts/heldout.json"),
        "attack": {"success_accuracy": attack.SUCCESS_ACCURACY, "steps": budget.attack_steps, "batch": budget.attack_batch},
        "training": {"ace": erasers.ACE_TRAINING, "esd_x": {"steps": erasers.ESD_STEPS, "learning_rate": erasers.ESD_LEARNING_RATE}},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots.bar_chart({m: s["h_o"] for m, s in summary.items()}, out / "h_o.png", "H_o per method (mean over targets)")
    if scaling:
        series: dict[str, list] = {}
        for row in scaling:
            series.setdefault(f"{row['method']} Acc_s", []).append((row["n_concepts"], row["acc_s"]))
            series.setdefault(f"{row['method']} H_o", []).append((row["n_concepts"], row["h_o"]))
        plots.line_chart(series, out / "scaling.png", "Erasing several concepts at once", "concepts erased")
    (out / "report.md").write_text(report(results, grids))
    log(f"wrote {out / 'results.json'}, {out / 'report.md'} and the PNGs")
    return results


def report(results: dict, grids: dict[str, str]) -> str:
    """The Markdown report of a run."""
    from benchmark.metrics import harmonic_overall

    untouched = results["untouched"]
    lines = [
        f"# ACE benchmark on the toy world ({results['mode']} run)",
        "",
        f"Machine: {results['machine']}. Command: `python -m benchmark.run --{results['mode']}`. "
        "Numbers come from the toy world of `benchmark/` (16x16 pictures, a 4.6 M-parameter UNet on MiniLM), "
        "not from Stable Diffusion.",
        "",
        "## Untouched model",
        "",
        f"Every concept on its own prompts: lowest {min(untouched['per_concept_acc'].values()):.3f} "
        f"({'passes' if untouched['passes'] else 'FAILS'} the {untouched['floor']:.0%} floor).",
        "",
        "| target | chance | request words | left-out synonyms | held-out templates |",
        "|---|---|---|---|---|",
    ]
    for name, accs in untouched["targets"].items():
        lines.append(f"| {name} | {untouched['chance'][name]:.3f} | {accs['request']:.2f} | {accs['left_out']:.2f} | {accs['heldout']:.2f} |")
    lines += [
        "",
        "## Methods (mean over targets: " + ", ".join(untouched["targets"]) + ")",
        "",
        "Acc_e and Acc_g: lower is better (floor: the chance level); Acc_s and H_o: higher is better; "
        "ASR: share of erased concepts a soft-prompt attacker brings back; attack acc.: the attacker's mean accuracy; "
        "FID: Fréchet distance of the other concepts' generations to the untouched model's (classifier features, 0 = unchanged).",
        "",
        "| method | Acc_e | Acc_g | Acc_s | H_o | ASR | attack acc. | FID | stage 1 s/concept | stage 2 s/concept |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s in results["methods"].items():
        lines.append(f"| {method} | {s['acc_e']:.3f} | {s['acc_g']:.3f} | {s['acc_s']:.3f} | {s['h_o']:.3f} | {s['asr']:.2f} | "
                     f"{s['attack_accuracy']:.2f} | {s['fid_preserve']:.2f} | {s['stage1_s_per_concept']:.2f} | {s['stage2_s_per_concept']:.2f} |")
    chance = [untouched["chance"][n] for n in untouched["targets"]]
    best = sum(harmonic_overall(c, c, 1.0) for c in chance) / max(len(chance), 1)
    lines += ["", f"Best possible H_o here (erased concept at chance, everything else perfect): {best:.3f}.", ""]
    lines += ["### Per target", "", "| method | target | Acc_e | left-out | held-out | Acc_s | H_o | attack acc. |", "|---|---|---|---|---|---|---|---|"]
    for method, s in results["methods"].items():
        for name, r in s["per_target"].items():
            pc = r["per_concept"][name]
            lines.append(f"| {method} | {name} | {pc['acc_e']:.2f} | {pc['acc_left_out']:.2f} | {pc['acc_heldout']:.2f} | "
                         f"{r['acc_s']:.2f} | {r['h_o']:.2f} | {r['attack_accuracy']:.2f} |")
    if results["scaling"]:
        lines += ["", "## Scaling", "", "| method | concepts erased | Acc_e | Acc_g | Acc_s | H_o | FID | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["scaling"]:
            lines.append(f"| {r['method']} | {r['n_concepts']} | {r['acc_e']:.3f} | {r['acc_g']:.3f} | {r['acc_s']:.3f} | "
                         f"{r['h_o']:.3f} | {r['fid_preserve']:.2f} | {r['seconds']:.1f} |")
        lines += ["", "![scaling](scaling.png)"]
    lines += ["", "## Samples", "", "Same prompts and seed in every column; columns are the untouched model and each method.", ""]
    lines += [f"![{name}]({path})" for name, path in grids.items()]
    lines += ["", "![H_o per method](h_o.png)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="a few minutes: checks the harness and the untouched model")
    mode.add_argument("--full", action="store_true", help="the benchmark's numbers (about 27 minutes on 2 CPU cores)")
    ap.add_argument("--prompts", type=Path, default=None, help="a prompt file in the schema of benchmark/prompts/heldout.json")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmark/results/<mode>)")
    ap.add_argument("--methods", nargs="+", default=None, help="a subset of the methods")
    ap.add_argument("--toy", choices=("causal", "bidirectional"), default="bidirectional", help="which toy model")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    out = args.out or RESULTS / ("quick" if args.quick else "full")
    try:
        if args.prompts:
            load_prompt_file(args.prompts)  # fail now, not after the first erasure
        from benchmark.methods import METHODS

        unknown = [m for m in args.methods or () if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    results = run(budget, out, args.prompts, tuple(args.methods) if args.methods else None, args.toy)
    if not results["untouched"]["passes"]:
        raise SystemExit("error: the untouched model misses the accuracy floor; its numbers mean nothing")


if __name__ == "__main__":
    main()
