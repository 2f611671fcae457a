"""The ACE benchmark in one command: erase concepts from the toy models with ACE, its ablations and
three baselines, and measure what is left, with 95% intervals.

    .venv/bin/python -m benchmark.run --quick      # a few minutes on the causal toy: does the harness work? (CI)
    .venv/bin/python -m benchmark.run --full       # both toys: the numbers (79 min on a 2-core CPU)
    .venv/bin/python -m benchmark.run --full --prompts my_prompts.json --out /tmp/mine
    .venv/bin/python -m benchmark.run --toy causal --targets circle --methods ace uce --stage1-only --scaling 10

The last form is the fast loop for method work: one toy, one target, a few methods, stage 1 only,
one scaling point; the untouched model's pictures come from a cache (.cache/benchmark/).

Writes `results.json`, `report.md` and PNGs (sample grids, H_o per method, scaling) to --out
(default benchmark/results/full or benchmark/results/quick).

What is measured (MACE's metrics; every accuracy is the toy classifier's verdict on the model's
generations, sampled with ComfyUI's sampler; chance levels are in toy.world.CHANCE):
- Acc_e: the erased concept prompted with the words the erasure request names (lower is better);
- Acc_g: the erased concept under rewordings the request never named: its learned synonyms that
  the request left out, and templates training never saw (lower is better);
- Acc_s: every other concept of the world, each from its own prompts (higher is better);
- H_o = 3 / (1/(1−Acc_e) + 1/(1−Acc_g) + 1/Acc_s), the mean over targets;
- ASR: the share of (target, attack seed) pairs a soft-prompt attacker brings back (attack.py);
- FID: Fréchet distance, in the classifier's feature space, between the untouched and the erased
  model's generations of the other concepts (same prompts, same initial noise; 0 = unchanged);
- seconds per concept of stage 1 (with stage 0) and stage 2.
Every accuracy comes with Wilson's 95% interval, H_o with a bootstrap one (benchmark/stats.py),
and the report says which differences between ACE and the baselines are within noise.
Every method gets the same request (the target's request words from the prompt file, anchor "",
and the other concepts' names as the preserve list), the same prompts, seeds and attack budget.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmark import stats
from benchmark.evaluate import measure
from benchmark.metrics import classifier_features, frechet_distance
from benchmark.prompts import HELDOUT, kept_request_words, load_prompt_file, split_prompts
from runner import host
from toy import world

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "benchmark"
TOYS = ("causal", "bidirectional")  # the causal one first: it reads prompts as SD's CLIP does
# One target of each kind for the method comparison, erased one at a time.
TARGETS = ("circle", "blue", "striped", "Quillane")
# The order concepts are added in for the scaling runs; the last one is the one kept at 18.
SCALING_ORDER = ("circle", "blue", "striped", "Quillane", "triangle", "red", "checkered", "Brontel", "square", "green",
                 "solid", "Zarnika", "ring", "yellow", "cross", "Vexmoor", "crescent", "diamond", "hourglass")
UNTOUCHED_FLOOR = 0.9  # every concept must reach this on every split, or no number means anything
SPLITS_OF_A_TARGET = ("request", "left_out", "heldout")
# The methods the bars compare under the stronger attack: ACE, its exported model, the baselines;
# and ACE trained with every gate open, which tells whether the attacker wins by closing the gate.
STRONG_ATTACKED = ("ace", "ace_baked", "ace_ungated", "uce", "rece", "esd_x")
# What the full run measures on its second toy: ACE, stage 1 alone and the baselines.
SECOND_TOY_METHODS = ("ace", "ace_stage1", "uce", "rece", "esd_x")


@dataclass(frozen=True)
class Budget:
    untouched_per_concept: int  # pictures per concept and split for the untouched model's check
    per_erased: int  # pictures of an erased concept per split (request, left-out, held-out)
    per_kept: int  # pictures per kept concept in the method comparison (Acc_s and FID)
    scaling_per_erased: int  # the same in the scaling runs
    scaling_kept_total: int  # pictures of all kept concepts together per scaling point
    attack_steps: int
    attack_batch: int
    attack_seeds: int  # attacks per (method, target), each from its own seed
    strong_attack: int  # a second, stronger attack with this many times the steps (0: none)
    first_attack_seed: int = 0  # the attacks' seeds are first_attack_seed, first_attack_seed + 1, ...


QUICK = Budget(untouched_per_concept=8, per_erased=8, per_kept=4, scaling_per_erased=4, scaling_kept_total=36,
               attack_steps=4, attack_batch=4, attack_seeds=1, strong_attack=2)
# 288 kept pictures per scaling point: a 95% interval of about ±0.025 around an Acc_s of 0.95, so a
# difference of 0.05 at 10 concepts is resolved.
FULL = Budget(untouched_per_concept=32, per_erased=24, per_kept=12, scaling_per_erased=8, scaling_kept_total=288,
              attack_steps=40, attack_batch=8, attack_seeds=2, strong_attack=4)


@dataclass(frozen=True)
class ToyPlan:
    """What one run measures on one toy model."""

    methods: tuple[str, ...]
    strong_methods: tuple[str, ...]  # the methods that also face the stronger attack
    scaling_sizes: tuple[int, ...]
    scaling_methods: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """What one run measures: per toy, and what every toy shares."""

    mode: str
    toys: dict[str, ToyPlan]
    targets: tuple[str, ...]
    stage1_only: bool
    budget: Budget
    prompt_path: Path
    out: Path
    command: str


START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.0f} s] {message}", flush=True)


def kind_of(name: str) -> str:
    return {name: kind for kind, name in world.all_concepts()}[name]


def make_request(erased: list[str], prompt_file: dict):
    """Erase each concept under its request words (the first is the target, the rest synonyms),
    anchor "", and keep every other concept of the world by its first request word."""
    concepts = host.start().ace.concepts
    keep = kept_request_words(erased, prompt_file)
    items = [concepts.Concept(prompt_file["request"][n][0], tuple(prompt_file["request"][n][1:]), "") for n in erased]
    return concepts.make_request(items, keep)


# --- the untouched model: its check and its reference pictures (cached) ---------------------------

def reference_counts(plan: Plan, toy: ToyPlan) -> dict[str, int]:
    """How many reference pictures (train split) each concept needs: as many as any comparison or
    scaling point draws of it as a kept concept."""
    names = [name for _, name in world.all_concepts()]
    counts = {n: plan.budget.untouched_per_concept for n in names}
    for n in names:
        if any(n != t for t in plan.targets):
            counts[n] = max(counts[n], plan.budget.per_kept)
    for size in toy.scaling_sizes:
        kept = [n for n in names if n not in SCALING_ORDER[:size]]
        for n in kept:
            counts[n] = max(counts[n], kept_count(plan.budget, len(kept)))
    return counts


def kept_count(budget: Budget, kept: int) -> int:
    return math.ceil(budget.scaling_kept_total / max(kept, 1))


def untouched(toy_name: str, model, clip, classifier, plan: Plan, prompt_file: dict) -> dict:
    """The untouched model's accuracy per concept and split, and its reference pictures (train
    split). Pictures are cached per toy weights, prompt file and sampler in .cache/benchmark/: the
    first n jobs of a concept are the same for every n (`evaluate.jobs`), so a cache of more
    pictures serves any run that needs fewer."""
    toy = host.start().toy.model
    key = hashlib.sha256(json.dumps({
        "weights": hashlib.sha256(toy.variant(toy_name).weights.read_bytes()).hexdigest(),
        "prompts": prompt_file, "sampler": toy.DEFAULT_SAMPLER, "version": 2}, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"untouched-{toy_name}-{key}.pt"
    cache = torch.load(path) if path.exists() else {}  # (split, concept) -> {"shown": [...], "pictures": tensor}
    counts = reference_counts(plan, plan.toys[toy_name])
    need = {("train", n): counts[n] for _, n in world.all_concepts()}
    need |= {(s, n): plan.budget.untouched_per_concept for s in SPLITS_OF_A_TARGET for _, n in world.all_concepts()}
    missing = {k: v for k, v in need.items() if len(cache.get(k, {}).get("shown", ())) < v}
    for split in ("train", *SPLITS_OF_A_TARGET):
        todo = {n: v for (s, n), v in missing.items() if s == split}
        if todo:
            measured = measure(model, clip, classifier, [(kind_of(n), n) for n in todo], split, todo, prompt_file)
            for n, m in measured.items():
                cache[(split, n)] = {"shown": m.shown, "pictures": m.pictures.half()}
    if missing:
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(cache, path)
        log(f"untouched {toy_name} toy: measured {sum(missing.values())} pictures, cached in {path.name}")
    accuracy = {s: {n: sum(cache[(s, n)]["shown"][:v]) / v for (s2, n), v in need.items() if s2 == s}
                for s in ("train", *SPLITS_OF_A_TARGET)}
    pictures = {n: cache[("train", n)]["pictures"][:counts[n]] for _, n in world.all_concepts()}
    return {"accuracy": accuracy, "chance": {n: world.CHANCE[k] for k, n in world.all_concepts()},
            "pictures": pictures}


# --- scoring one erased model ---------------------------------------------------------------------

@dataclass
class Scores:
    """What `score` measures of one erased model: the judged pictures behind H_o, each split's
    accuracy, each kept concept's, and the FID of the kept concepts' pictures with their features
    and the untouched model's, row by row (the same prompt and noise)."""

    judged: stats.Judged
    per_split: dict[str, dict[str, float]]  # split -> erased concept -> accuracy
    acc_s_per_concept: dict[str, float]
    fid: float
    kept_features: torch.Tensor
    reference_features: torch.Tensor


@dataclass
class Scored:
    """One erased model measured: its scores, the attacks, the time it took."""

    scores: Scores
    attacks: list[dict]
    strong_attacks: list[dict]
    stage1_seconds: float
    stage2_seconds: float
    info: dict

    def summary(self) -> dict:
        j = self.scores.judged
        return {"acc_e": stats.share(j.erased).to_json(), "acc_g": stats.share(j.general).to_json(),
                "acc_s": stats.share(j.kept).to_json(), "h_o": j.h_o(), "fid_preserve": self.scores.fid,
                "per_split": self.scores.per_split, "acc_s_per_concept": self.scores.acc_s_per_concept,
                "attacks": [_light(a) for a in self.attacks], "strong_attacks": [_light(a) for a in self.strong_attacks],
                "stage1_seconds": self.stage1_seconds, "stage2_seconds": self.stage2_seconds, "info": self.info}


def score(erased, clip, classifier, names: list[str], per_erased: int, kept: dict[str, int], reference: dict,
          prompt_file: dict) -> Scores:
    """Judge the erased concepts on their three splits and the kept ones on their own prompts."""
    model = erased.model
    targets = [(kind_of(n), n) for n in names]
    by_split = {s: measure(model, clip, classifier, targets, s, per_erased, prompt_file) for s in SPLITS_OF_A_TARGET}
    others = measure(model, clip, classifier, [(kind_of(n), n) for n in kept], "train", kept, prompt_file)
    judged = stats.Judged(
        erased=[ok for n in names for ok in by_split["request"][n].shown],
        general=[ok for s in ("left_out", "heldout") for n in names for ok in by_split[s][n].shown],
        kept=[ok for m in others.values() for ok in m.shown])
    mine = torch.cat([m.pictures for m in others.values()])
    theirs = torch.cat([reference["pictures"][n][:kept[n]].float() for n in others])
    mine, theirs = classifier_features(classifier, mine), classifier_features(classifier, theirs)
    return Scores(judged, {s: {n: by_split[s][n].accuracy for n in names} for s in SPLITS_OF_A_TARGET},
                  {n: m.accuracy for n, m in others.items()}, frechet_distance(mine, theirs), mine, theirs)


def _light(attack: dict) -> dict:
    return {k: v for k, v in attack.items() if k not in ("images", "contexts")}


def attack_all(erased, clip, classifier, target: str, plan: Plan, prompt_file: dict, factor: int = 1) -> list[dict]:
    """The soft-prompt attack from every seed of the budget, with `factor` times its steps."""
    from benchmark import attack

    word = prompt_file["request"][target][0]
    return [attack.soft_prompt_attack(erased.model, clip, classifier, kind_of(target), target, word, prompt_file,
                                      steps=plan.budget.attack_steps * factor, batch=plan.budget.attack_batch, seed=seed)
            for seed in range(plan.budget.first_attack_seed, plan.budget.first_attack_seed + plan.budget.attack_seeds)]


# --- the three parts of a toy's run ---------------------------------------------------------------

def compare_methods(toy_name: str, model, clip, classifier, plan: Plan, prompt_file: dict, reference: dict):
    """Every method on every target, one target at a time: {method: {target: Scored}}, and the
    pictures of the sample grids."""
    from benchmark import methods as erasers

    results: dict[str, dict[str, Scored]] = {m: {} for m in plan.toys[toy_name].methods}
    grids = {}
    names = [n for _, n in world.all_concepts()]
    for target in plan.targets:
        request = make_request([target], prompt_file)
        kept = {n: plan.budget.per_kept for n in names if n != target}
        rows = sample_rows(target, prompt_file)
        columns = {"untouched": sample(model, clip, rows)}
        ace_result = None
        for method in results:
            erased = erasers.run_method(method, model, clip, request, ace_erased=ace_result, quick=plan.mode == "quick",
                                        stage1_only=plan.stage1_only)
            if method == "ace":
                ace_result = erased
            scores = score(erased, clip, classifier, [target], plan.budget.per_erased, kept, reference, prompt_file)
            judged, fid = scores.judged, scores.fid
            attacks = attack_all(erased, clip, classifier, target, plan, prompt_file)
            strong = attack_all(erased, clip, classifier, target, plan, prompt_file, plan.budget.strong_attack) \
                if plan.budget.strong_attack and method in plan.toys[toy_name].strong_methods else []
            results[method][target] = Scored(scores, attacks, strong, erased.stage1_seconds, erased.stage2_seconds,
                                             erased.info)
            columns[method] = sample(erased.model, clip, rows)
            log(f"{toy_name:<13} {target:<9} {method:<15} Acc_e {stats.share(judged.erased)}  "
                f"Acc_g {stats.share(judged.general)}  Acc_s {stats.share(judged.kept)}  H_o {judged.h_o():.3f}  "
                f"attack {sum(a['accuracy'] for a in attacks) / max(len(attacks), 1):.2f}"
                f"{f' (x{plan.budget.strong_attack}: ' + format(sum(a['accuracy'] for a in strong) / len(strong), '.2f') + ')' if strong else ''}"
                f"  FID {fid:.1f}  "
                f"stage 1 {erased.stage1_seconds:.1f} s  stage 2 {erased.stage2_seconds:.1f} s")
        grids[target] = (rows, columns)
    return results, grids


def scaling(toy_name: str, model, clip, classifier, plan: Plan, prompt_file: dict, reference: dict) -> list[dict]:
    """Several concepts erased at once (the first n of SCALING_ORDER)."""
    from benchmark import methods as erasers

    out = []
    names = [n for _, n in world.all_concepts()]
    toy = plan.toys[toy_name]
    for size in toy.scaling_sizes:
        erased_names = list(SCALING_ORDER[:size])
        kept_names = [n for n in names if n not in erased_names]
        kept = {n: kept_count(plan.budget, len(kept_names)) for n in kept_names}
        request = make_request(erased_names, prompt_file)
        ace_features = None
        for method in toy.scaling_methods:
            erased = erasers.run_method(method, model, clip, request, quick=plan.mode == "quick",
                                        stage1_only=plan.stage1_only)
            scores = score(erased, clip, classifier, erased_names, plan.budget.scaling_per_erased, kept, reference,
                           prompt_file)
            judged, fid = scores.judged, scores.fid
            row = {"method": method, "n_concepts": size, "acc_e": stats.share(judged.erased).to_json(),
                   "acc_g": stats.share(judged.general).to_json(), "acc_s": stats.share(judged.kept).to_json(),
                   "h_o": judged.h_o(), "fid_preserve": fid, "acc_s_per_concept": scores.acc_s_per_concept,
                   "seconds": erased.stage1_seconds + erased.stage2_seconds}
            if method == "ace":
                ace_features = scores.kept_features
            elif ace_features is not None:  # is ACE's FID lower than this method's beyond noise?
                row["fid_ace_minus_this"] = stats.fid_difference(ace_features, scores.kept_features,
                                                                 scores.reference_features).to_json()
            out.append(row)
            log(f"{toy_name:<13} scaling {method:<7} {size:>2} concepts  Acc_e {stats.share(judged.erased)}  "
                f"Acc_g {stats.share(judged.general)}  Acc_s {stats.share(judged.kept)}  H_o {judged.h_o():.3f}  "
                f"FID {fid:.1f}  ({row['seconds']:.1f} s)")
    return out


def summarize(results: dict[str, dict[str, Scored]], plan: Plan) -> dict:
    """Per method: pooled accuracies with intervals, mean H_o with its bootstrap interval, ASR
    over (target, seed) pairs, and the differences of ACE to each baseline."""
    summary = {}
    for method, by_target in results.items():
        scored = list(by_target.values())
        attacks = [a for s in scored for a in s.attacks]
        strong = [a for s in scored for a in s.strong_attacks]
        summary[method] = {
            "acc_e": stats.share([x for s in scored for x in s.scores.judged.erased]).to_json(),
            "acc_g": stats.share([x for s in scored for x in s.scores.judged.general]).to_json(),
            "acc_s": stats.share([x for s in scored for x in s.scores.judged.kept]).to_json(),
            "h_o": stats.h_o_interval([s.scores.judged for s in scored]).to_json(),
            "asr": stats.share([a["brought_back"] for a in attacks]).to_json() if attacks else None,
            "attack_accuracy": stats.share([ok for a in attacks for ok in a["shown"]]).to_json() if attacks else None,
            "asr_strong": stats.share([a["brought_back"] for a in strong]).to_json() if strong else None,
            "fid_preserve": sum(s.scores.fid for s in scored) / len(scored),
            "stage1_s_per_concept": sum(s.stage1_seconds for s in scored) / len(scored),
            "stage2_s_per_concept": sum(s.stage2_seconds for s in scored) / len(scored),
            "per_target": {t: s.summary() for t, s in by_target.items()},
        }
    if "ace" in results:
        summary["ace"]["difference_to"] = {}
        for other in results:
            if other != "ace":
                d = stats.h_o_difference([s.scores.judged for s in results["ace"].values()],
                                         [s.scores.judged for s in results[other].values()])
                summary["ace"]["difference_to"][other] = {"h_o": d.to_json(), "within_noise": stats.within_noise(d)}
    return summary


def sample_rows(target: str, prompt_file: dict) -> list[tuple[str, str]]:
    """(label, prompt) rows of a before/after grid for one erased target."""
    kind = kind_of(target)
    direct = split_prompts(kind, target, "request", prompt_file)
    left_out = split_prompts(kind, target, "left_out", prompt_file)
    unseen = split_prompts(kind, target, "heldout", prompt_file)
    rows = [("erased", direct[0].text), ("erased", direct[len(direct) // 2].text),
            ("left-out synonym", left_out[0].text), ("held-out template", unseen[-1].text)]
    for name in SCALING_ORDER:  # four other concepts, each from a prompt that does not ask for the target
        prompts = world.concept_prompts(kind_of(name), name)
        clean = [p for p in prompts if target not in (p.object, p.colour, p.style, p.entity)]
        if name != target and clean and len(rows) < 8:
            rows.append((f"other ({name})", clean[len(clean) // 3].text))
    return rows


def sample(model, clip, rows: list[tuple[str, str]]) -> torch.Tensor:
    """One picture per grid row, from a fixed seed per row, so every column is comparable."""
    toy = host.start().toy.model
    context = toy.encode_prompts(clip, [p for _, p in rows])
    noise = torch.randn(len(rows), 3, toy.RESOLUTION, toy.RESOLUTION, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return toy.sample_contexts(model, context, toy.encode_prompts(clip, [""]), noise=noise)


# --- the run --------------------------------------------------------------------------------------

def run_toy(toy_name: str, plan: Plan, prompt_file: dict) -> dict:
    from benchmark import plots
    from runner.pictures import Row, grid
    from toy.classifier import load_classifier

    toy = host.start().toy.model
    model, clip, _ = toy.load_toy_model(toy_name)
    classifier = load_classifier()
    log(f"{toy_name} toy model loaded; machine: {host.machine()}")
    reference = untouched(toy_name, model, clip, classifier, plan, prompt_file)
    accuracy = reference["accuracy"]
    lowest = min((a, n, s) for s, per in accuracy.items() for n, a in per.items())
    log(f"untouched {toy_name} toy: lowest accuracy {lowest[0]:.3f} ({lowest[1]}, {lowest[2]})")
    results, grids = compare_methods(toy_name, model, clip, classifier, plan, prompt_file, reference)
    scaled = scaling(toy_name, model, clip, classifier, plan, prompt_file, reference)
    out = plan.out / toy_name
    out.mkdir(parents=True, exist_ok=True)
    for target, (rows, columns) in grids.items():
        grid([Row([label, prompt], [[columns[c][i]] for c in columns]) for i, (label, prompt) in enumerate(rows)],
             list(columns), scale=4, label_width=300).save(out / f"samples_{target}.png")
    summary = summarize(results, plan)
    plots.bar_chart({m: s["h_o"]["value"] for m, s in summary.items()}, out / "h_o.png",
                    f"H_o per method, {toy_name} toy (mean over targets)")
    if scaled:
        series: dict[str, list] = {}
        for row in scaled:
            series.setdefault(f"{row['method']} Acc_s", []).append((row["n_concepts"], row["acc_s"]["value"]))
        plots.line_chart(series, out / "scaling.png", f"Erasing several concepts at once, {toy_name} toy",
                         "concepts erased")
    card = json.loads(toy.variant(toy_name).weights.with_suffix(".json").read_text())
    return {
        "untouched": {"accuracy": accuracy, "chance": reference["chance"], "floor": UNTOUCHED_FLOOR,
                      "passes": lowest[0] >= UNTOUCHED_FLOOR, "per_concept": plan.budget.untouched_per_concept},
        "training": {"minutes": float(card["train_minutes"]), "steps": int(card["steps"]), "machine": card["machine"]},
        "methods": summary,
        "scaling": scaled,
        "grids": {t: f"{toy_name}/samples_{t}.png" for t in grids},
    }


def run(plan: Plan) -> dict:
    from benchmark import attack, methods as erasers
    from benchmark.report import report

    prompt_file = load_prompt_file(plan.prompt_path)
    plan.out.mkdir(parents=True, exist_ok=True)
    results = {
        "mode": plan.mode,
        "command": plan.command,
        "machine": host.machine(),
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},  # ToyPlans as dicts
        "sampler": host.start().toy.model.DEFAULT_SAMPLER,
        "attack": {"success_accuracy": attack.SUCCESS_ACCURACY, "steps": plan.budget.attack_steps,
                   "batch": plan.budget.attack_batch, "seeds": plan.budget.attack_seeds,
                   "first_seed": plan.budget.first_attack_seed,
                   "strong_factor": plan.budget.strong_attack},
        "ace_settings": erasers.ACE_OVERRIDES,
        "training": {"ace": erasers.ACE_TRAINING, "esd_x": {"steps": erasers.ESD_STEPS,
                                                           "learning_rate": erasers.ESD_LEARNING_RATE},
                     "rece": {"rounds": erasers.RECE_ROUNDS}},
        "toys": {},
    }
    for toy_name in plan.toys:
        started = time.perf_counter()
        results["toys"][toy_name] = run_toy(toy_name, plan, prompt_file)
        results["toys"][toy_name]["seconds"] = time.perf_counter() - started
        (plan.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    results["seconds"] = time.perf_counter() - START
    (plan.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (plan.out / "report.md").write_text(report(results))
    log(f"wrote {plan.out / 'results.json'}, {plan.out / 'report.md'} and the PNGs")
    return results


def parse_plan(argv=None) -> Plan:
    from benchmark import methods as erasers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few minutes on the causal toy: checks the harness")
    ap.add_argument("--full", action="store_true", help="the benchmark's numbers, both toys (79 min on 2 CPU cores)")
    ap.add_argument("--toy", choices=(*TOYS, "both"), default=None,
                    help="which toy model (default: both with --full, causal otherwise)")
    ap.add_argument("--targets", nargs="+", default=None, metavar="CONCEPT",
                    help=f"concepts to erase one at a time (default {' '.join(TARGETS)}; quick: circle)")
    ap.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help=f"a subset of {', '.join(erasers.METHODS)}")
    ap.add_argument("--scaling", nargs="*", type=int, default=None, metavar="N",
                    help="numbers of concepts erased at once (default 10 18; quick: 3; none: skip)")
    ap.add_argument("--scaling-methods", nargs="+", default=None, metavar="METHOD",
                    help="methods of the scaling runs (default ace uce rece esd_x; quick: ace)")
    ap.add_argument("--stage1-only", action="store_true", help="ACE and its variants without stage 2 (fast loop)")
    ap.add_argument("--attack-seeds", type=int, default=None, metavar="N",
                    help="soft-prompt attacks per method and target (default 2, quick 1; 0: no attack, fast loop)")
    ap.add_argument("--first-attack-seed", type=int, default=0, metavar="K",
                    help="the attacks' first seed (default 0): other seeds check a choice made on the default ones")
    ap.add_argument("--set", nargs="+", default=[], metavar="CONFIG.FIELD=VALUE",
                    help="change a setting of ACE's configs for this run, e.g. closed_form.rank=64 finetune.guidance=2 "
                         "expansion.enabled=false (fast loop for method work; recorded in results.json)")
    ap.add_argument("--prompts", type=Path, default=None, help="a prompt file in the schema of benchmark/prompts/heldout.json")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmark/results/<mode>)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick and args.full:
        ap.error("--quick and --full exclude each other")
    mode = "quick" if args.quick else "full" if args.full else "custom"
    budget = QUICK if args.quick else FULL
    toy_names = TOYS if (args.toy == "both" or (args.toy is None and args.full)) else (args.toy or "causal",)
    names = [n for _, n in world.all_concepts()]
    targets = tuple(args.targets or (("circle",) if args.quick else TARGETS))
    methods = tuple(args.methods or erasers.METHODS)
    scaling_sizes = tuple(args.scaling if args.scaling is not None else ((3,) if args.quick else (10, 18)))
    scaling_methods = tuple(args.scaling_methods or (("ace",) if args.quick else ("ace", *erasers.BASELINES)))
    strong_methods = tuple(m for m in methods if m in STRONG_ATTACKED)
    headline = ToyPlan(methods, strong_methods, scaling_sizes, scaling_methods)
    toys = {name: headline for name in toy_names}
    if len(toy_names) > 1 and args.methods is None and args.scaling is None and args.scaling_methods is None:
        # The second toy checks that the comparison carries over to another encoder; the ablations
        # and the stronger attack on the baselines are measured on the headline toy (an hour in all).
        toys[toy_names[1]] = ToyPlan(tuple(m for m in methods if m in SECOND_TOY_METHODS), ("ace",),
                                     scaling_sizes[:1], ("ace", "uce"))
    try:
        erasers.apply_settings(args.set)
        if args.first_attack_seed < 0:
            raise ValueError(f"--first-attack-seed must be 0 or more, got {args.first_attack_seed}")
        load_prompt_file(args.prompts)  # fail now, not after the first erasure
        for name in targets:
            if name not in names:
                raise ValueError(f"unknown target {name!r}; the toy world has {', '.join(names)}")
        for m in (*methods, *scaling_methods):
            if m not in erasers.METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(erasers.METHODS)}")
        for n in scaling_sizes:
            if not 1 <= n <= len(SCALING_ORDER) - 1:
                raise ValueError(f"--scaling takes numbers of concepts from 1 to {len(SCALING_ORDER) - 1}, got {n}")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.attack_seeds is not None:
        budget = replace(budget, attack_seeds=args.attack_seeds, strong_attack=budget.strong_attack if args.attack_seeds else 0)
    budget = replace(budget, first_attack_seed=args.first_attack_seed)
    command = "python -m benchmark.run " + " ".join(sys.argv[1:] if argv is None else argv)
    return Plan(mode, toys, targets, args.stage1_only, budget,
                args.prompts or HELDOUT, args.out or RESULTS / mode, command)


def main() -> None:
    plan = parse_plan()
    results = run(plan)
    failing = [t for t, r in results["toys"].items() if not r["untouched"]["passes"]]
    if failing:
        raise SystemExit(f"error: the untouched {', '.join(failing)} toy misses the accuracy floor; its numbers mean nothing")


if __name__ == "__main__":
    main()
