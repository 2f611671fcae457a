"""Stage 2 step by step, on the toy model: how the erasure of one target moves while it trains.

    .venv/bin/python -m benchmark.stage2_trace --target square --seed 1
    .venv/bin/python -m benchmark.stage2_trace --target ring --seed 0 --every 10 --set finetune.guidance=2

Erases the target alone as the benchmark does (stage 1, then stage 2 from `--seed`) and, at the
start and every `--every` steps of stage 2, draws the target's request-split pictures (the
benchmark's Acc_e) through the erasure as trained so far, and reports the open edit's size: the sum
over projections of ||B A||, and its relative change of the preserve pool's keys and values.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from benchmark.evaluate import measure
from benchmark.prompts import load_prompt_file
from benchmark.run import kind_of, make_request
from runner import host


def open_edit_size(adapter, weights: list[torch.Tensor], P: torch.Tensor) -> dict:
    """||B A|| summed over projections, and the open edit's change of P's keys and values relative to them."""
    with torch.no_grad():
        norm = sum((B @ A).norm().item() for A, B in zip(adapter.lora_down, adapter.lora_up))
        change = host.start().ace.adapter.open_edit_change(adapter, weights, None, P).item() ** 0.5
    return {"edit_norm": round(norm, 2), "preserve_change": round(change, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", choices=("causal", "bidirectional"), default="causal")
    ap.add_argument("--target", default="square")
    ap.add_argument("--seed", type=int, default=0, help="stage 2's seed")
    ap.add_argument("--every", type=int, default=5, help="stage-2 steps between measurements")
    ap.add_argument("--pictures", type=int, default=24, help="request-split pictures per measurement")
    ap.add_argument("--set", nargs="+", default=[], metavar="CONFIG.FIELD=VALUE",
                    help="change a setting of ACE's configs, as benchmark.run's --set does")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.every < 1 or args.pictures < 1 or args.seed < 0:
        ap.error("--every and --pictures must be 1 or more, --seed 0 or more")
    from benchmark import methods
    from toy.classifier import load_classifier

    try:
        methods.apply_settings(args.set)
    except ValueError as e:
        ap.error(str(e))
    settings = methods.ACE_OVERRIDES

    pack = host.start()
    ace, comfy_models = pack.ace, pack.nodes.comfy_models
    model, clip, _ = pack.toy.model.load_toy_model(args.toy)
    prompt_file, classifier = load_prompt_file(), load_classifier()
    network = comfy_models.network_of(model, clip)
    closed_form = ace.closed_form.ClosedFormConfig(**settings["closed_form"])
    training = methods.finetune_config(seed=args.seed)
    expansion = ace.expansion.ExpansionConfig(**settings["expansion"])
    stage1 = ace.erasure.erase(network, make_request([args.target], prompt_file), closed_form,
                               ace.finetune.FinetuneConfig(steps=0), expansion)
    P = ace.erasure.request_tokens(network, stage1.request).P.float()
    weights = [network.weights[p.name].float() for p in stage1.adapter.projections]
    snapshots = {0: copy.deepcopy(stage1.adapter)}

    def keep(report) -> None:
        if report.step % args.every == 0 or report.step == report.total:
            snapshots[report.step] = copy.deepcopy(report.adapter).requires_grad_(False)

    trained = ace.erasure.fine_tune(stage1, network, training, keep)
    kind = kind_of(args.target)
    trace = []
    for step, adapter in sorted(snapshots.items()):
        erasure = ace.erasure.Erasure(trained.family, trained.request, adapter.to("cpu"), trained.num_res_blocks,
                                      trained.info)
        shown = measure(comfy_models.with_erasure(model, erasure, 1.0), clip, classifier, [(kind, args.target)],
                        "request", args.pictures, prompt_file)[args.target]
        trace.append({"step": step, "acc_e": round(shown.accuracy, 3), **open_edit_size(adapter, weights, P)})
        print(json.dumps(trace[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"toy": args.toy, "target": args.target, "seed": args.seed, "settings": args.set,
                                        "trace": trace}, indent=2) + "\n")


if __name__ == "__main__":
    main()
