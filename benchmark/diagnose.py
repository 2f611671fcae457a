"""Where ACE's gates open: the numbers behind the erasure-quality changes, on the toy model.

    .venv/bin/python -m benchmark.diagnose                         # causal toy, the four targets, stage 1
    .venv/bin/python -m benchmark.diagnose --toy bidirectional --steps 40 --scaling 10 --out diag.json
    .venv/bin/python -m benchmark.diagnose --steps 40 --attack-steps 40 160 --attack-seeds 0 1 --scaling
    .venv/bin/python -m benchmark.diagnose --steps 40 --attack-steps 160 --attack-seeds 0 1 --kept-words --scaling
    .venv/bin/python -m benchmark.diagnose --targets square --steps 40 --attack-steps 160 --attack-seeds 0 1 \
        --scaling --outlier-quantile 0.999

For each target erased alone (ACE, stage 1 unless --steps), the target's gate on the words the
request names, on the concept's other words (left-out synonyms), on templates training never
saw, and on kept concepts' prompts, those that name the erased attribute ("a red striped
hourglass" with "red" erased) apart. Then the benchmark's soft-prompt attack, for each number of
steps and seed: how often the erased model draws the concept from the attacked prompts, how often
the untouched model does (high: the attacker found another word for the concept that the erasure
misses; low: the word works only through the erasure, undoing it), and the gate on the soft word.
With --kept-words, for each attack seed, the attack's discrete floor: the same prompts and noise
with the request word replaced by each word of a concept the request keeps (`attack.kept_words`),
drawn by the erased and the untouched model, the best three. How far from ordinary tokens the
words are: the outlier gate's score (`ace.adapter.OutlierGate`, calibrated on the erasure's preserve
and kept tokens at `--outlier-quantile`, default 0.999) of each attacked prompt's most outlying
token and the gate there, and the share of the kept prompts the gate opens on; with
--outlier-quantile the erasure has that gate, without it the gate is only measured. With
--scaling N, N concepts erased at once: how many gates open (> 0.5) on each kept prompt, and how
far the routed gate opens there. A gate is the largest value over a prompt's tokens.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmark.prompts import load_prompt_file, split_prompts
from benchmark.run import FULL, SCALING_ORDER, TARGETS, kind_of, make_request
from runner import host
from toy import world


def context_gates(erasure, context: torch.Tensor) -> torch.Tensor:
    """[prompts, gates]: each gate's largest value over each prompt's tokens, from their context."""
    with torch.no_grad():
        return erasure.adapter.gate(context).amax(dim=1)


def prompt_gates(erasure, clip, prompts: list[str]) -> torch.Tensor:
    """`context_gates` of the prompts."""
    return context_gates(erasure, host.start().toy.model.encode_prompts(clip, prompts))


def summary(values: torch.Tensor) -> dict:
    return {"mean": round(values.float().mean().item(), 3), "min": round(values.min().item(), 3),
            "max": round(values.max().item(), 3), "n": len(values)}


def outlier_of(erasure, model, clip, quantile: float):
    """The erasure's outlier gate, or one calibrated at `quantile` on its request's tokens (measured only)."""
    ace = host.start().ace
    a = erasure.adapter
    if a.has_outlier_gate:
        return ace.adapter.OutlierGate(a.outlier_center, a.outlier_whitener, a.outlier_threshold, a.outlier_quantile)
    network = host.start().nodes.comfy_models.network_of(model, clip)
    return ace.closed_form.calibrate_outlier_gate(ace.erasure.request_tokens(network, erasure.request), quantile)


def single(target: str, model, clip, classifier, prompt_file: dict, steps: int, expand: bool,
           attack_steps: list[int], attack_seeds: list[int], kept_words: bool = False,
           outlier_quantile: float | None = None) -> dict:
    from benchmark import attack

    pack = host.start()
    ace = pack.ace
    kind = kind_of(target)
    word = prompt_file["request"][target][0]
    erasure = pack.nodes.erase.erase_from_model(
        model, clip, make_request([target], prompt_file), ace.closed_form.ClosedFormConfig(outlier_quantile=outlier_quantile or 1.0),
        ace.finetune.FinetuneConfig(steps=steps), expansion=ace.expansion.ExpansionConfig(enabled=expand))
    outlier = outlier_of(erasure, model, clip, outlier_quantile or 0.999)
    toy = pack.toy.model
    gate = {}
    for split in ("request", "left_out", "heldout"):
        gate[split] = summary(prompt_gates(erasure, clip, [p.text for p in split_prompts(kind, target, split, prompt_file)])[:, 0])
    kept, composed = [], []
    for k, name in world.all_concepts():
        if name == target:
            continue
        for p in world.concept_prompts(k, name):
            (composed if target in (p.object, p.colour, p.style) else kept).append(p.text)
    gate["kept"] = summary(prompt_gates(erasure, clip, kept)[:, 0])
    with torch.no_grad():
        kept_outlier = outlier.values(toy.encode_prompts(clip, kept))  # [prompts, tokens]
    outlying = {"in_erasure": erasure.adapter.has_outlier_gate, "quantile": outlier.quantile,
                "threshold": round(outlier.threshold, 3),
                "kept_prompts_opened": round((kept_outlier.amax(1) > 0.5).float().mean().item(), 3),
                "kept_tokens_opened": round((kept_outlier > 0.5).float().mean().item(), 4)}
    if composed:
        gate["kept_naming_the_target"] = summary(prompt_gates(erasure, clip, composed)[:, 0])
    erased = pack.nodes.comfy_models.with_erasure(model, erasure, 1.0)
    attacks = []
    for n in attack_steps:
        for seed in attack_seeds:
            hit = attack.soft_prompt_attack(erased, clip, classifier, kind, target, word, prompt_file, steps=n,
                                            batch=FULL.attack_batch, seed=seed, untouched=model)
            attacks.append({"steps": n, "seed": seed, "accuracy": hit["accuracy"],
                            "untouched_accuracy": hit["untouched_accuracy"],
                            "gate": summary(context_gates(erasure, hit["contexts"])[:, 0]),
                            "outlier_score": summary(outlier.score(hit["contexts"]).amax(1)),
                            "outlier_gate": summary(outlier.values(hit["contexts"]).amax(1))})
    out = {"gate": gate, "outlier": outlying, "attacks": attacks,
           "found_words": erasure.info.get("expansion", {}).get("found", {}).get(target, [])}
    if kept_words:
        out["kept_word_routes"] = [
            {"seed": seed, "best": attack.kept_word_routes(erased, clip, classifier, kind, target, word, prompt_file,
                                                           attack.kept_words(target, prompt_file), seed=seed,
                                                           untouched=model)[:3]}
            for seed in attack_seeds]
    return out


def several(n: int, model, clip, prompt_file: dict, steps: int, expand: bool) -> dict:
    pack = host.start()
    ace = pack.ace
    erased_names = list(SCALING_ORDER[:n])
    erasure = pack.nodes.erase.erase_from_model(
        model, clip, make_request(erased_names, prompt_file), ace.closed_form.ClosedFormConfig(),
        ace.finetune.FinetuneConfig(steps=steps), expansion=ace.expansion.ExpansionConfig(enabled=expand))
    prompts = [p.text for k, name in world.all_concepts() if name not in erased_names
               for p in world.concept_prompts(k, name)
               if not {p.object, p.colour, p.style, p.entity} & set(erased_names)]
    gates = prompt_gates(erasure, clip, prompts)
    open_count = (gates > 0.5).sum(dim=1)
    return {"concepts": n, "kept_prompts": len(prompts),
            "gates_open_per_kept_prompt": {str(k): int((open_count == k).sum()) for k in range(int(open_count.max()) + 1)},
            "routed_gate_on_kept_prompts": summary(gates.max(dim=1).values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", choices=("causal", "bidirectional"), default="causal")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--steps", type=int, default=0, help="stage-2 steps per concept (default 0: stage 1 alone)")
    ap.add_argument("--no-expand", action="store_true", help="without concept expansion")
    ap.add_argument("--attack-steps", type=int, nargs="+", default=[FULL.attack_steps],
                    help="the soft-prompt attack's Adam steps, one attack per number and seed")
    ap.add_argument("--attack-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--kept-words", action="store_true",
                    help="for each attack seed, the attacked prompts with the word replaced by kept concepts' words")
    ap.add_argument("--scaling", type=int, nargs="*", default=[10], help="numbers of concepts erased at once")
    ap.add_argument("--outlier-quantile", type=float, default=None, metavar="Q",
                    help="erase the targets with an outlier gate calibrated at Q (ClosedFormConfig.outlier_quantile)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if min(args.attack_steps) < 0 or min(args.attack_seeds) < 0:
        ap.error("--attack-steps and --attack-seeds must be 0 or more")
    if args.outlier_quantile is not None and not 0 < args.outlier_quantile < 1:
        ap.error("--outlier-quantile must lie strictly between 0 and 1")
    from toy.classifier import load_classifier

    model, clip, _ = host.start().toy.model.load_toy_model(args.toy)
    prompt_file, classifier = load_prompt_file(), load_classifier()
    out = {"toy": args.toy, "steps": args.steps, "expand": not args.no_expand, "targets": {}, "scaling": []}
    for target in args.targets:
        out["targets"][target] = single(target, model, clip, classifier, prompt_file, args.steps, not args.no_expand,
                                        args.attack_steps, args.attack_seeds, args.kept_words, args.outlier_quantile)
        print(target, json.dumps(out["targets"][target]), flush=True)
    for n in args.scaling:
        out["scaling"].append(several(n, model, clip, prompt_file, args.steps, not args.no_expand))
        print(json.dumps(out["scaling"][-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
