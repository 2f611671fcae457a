"""The Markdown report of a benchmark run (`report.md`), from its `results.json`."""
from __future__ import annotations

from benchmark.metrics import harmonic_overall

HEADLINE = "causal"


def _ci(x: dict | None) -> str:
    return f"{x['value']:.3f} [{x['low']:.2f}, {x['high']:.2f}]" if x else "—"


def best_h_o(chance: dict[str, float], targets) -> float:
    """The best H_o possible: an erased concept is redrawn at random, so Acc_e and Acc_g cannot go
    below its chance level; everything else perfect."""
    targets = list(targets)
    return sum(harmonic_overall(chance[t], chance[t], 1.0) for t in targets) / max(len(targets), 1)


def untouched_table(toy: dict, targets) -> list[str]:
    acc = toy["untouched"]["accuracy"]
    lowest = min((a, n, s) for s, per in acc.items() for n, a in per.items())
    lines = [f"Untouched model, every concept on every split ({toy['untouched']['per_concept']} pictures each): lowest "
             f"{lowest[0]:.3f} ({lowest[1]}, {lowest[2]}): {'passes' if toy['untouched']['passes'] else 'FAILS'} the "
             f"{toy['untouched']['floor']:.0%} floor.", "",
             "| target | chance | request words | left-out synonyms | held-out templates |", "|---|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t} | {toy['untouched']['chance'][t]:.3f} | {acc['request'][t]:.2f} | {acc['left_out'][t]:.2f} | "
                     f"{acc['heldout'][t]:.2f} |")
    return lines


def methods_table(toy: dict) -> list[str]:
    lines = ["| method | Acc_e ↓ | Acc_g ↓ | Acc_s ↑ | H_o ↑ | ASR ↓ | ASR, stronger attack ↓ | attack acc. ↓ | FID ↓ | "
             "stage 1 s | stage 2 s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, s in toy["methods"].items():
        strong = _ci(s["asr_strong"]) if s.get("asr_strong") else "—"
        lines.append(f"| {method} | {_ci(s['acc_e'])} | {_ci(s['acc_g'])} | {_ci(s['acc_s'])} | {_ci(s['h_o'])} | "
                     f"{_ci(s['asr'])} | {strong} | {_ci(s['attack_accuracy'])} | {s['fid_preserve']:.1f} | "
                     f"{s['stage1_s_per_concept']:.2f} | {s['stage2_s_per_concept']:.1f} |")
    return lines


def differences(toy: dict) -> list[str]:
    ace = toy["methods"].get("ace", {})
    if "difference_to" not in ace:
        return []
    lines = ["| ACE minus | H_o difference [95% interval] | |", "|---|---|---|"]
    for other, d in ace["difference_to"].items():
        verdict = "within noise" if d["within_noise"] else ("ACE better" if d["h_o"]["value"] > 0 else "ACE worse")
        lines.append(f"| {other} | {_ci(d['h_o'])} | {verdict} |")
    return lines


def per_target(toy: dict) -> list[str]:
    lines = ["| method | target | Acc_e | left-out | held-out | Acc_s | H_o | attack acc. (per seed) |",
             "|---|---|---|---|---|---|---|---|"]
    for method, s in toy["methods"].items():
        for target, r in s["per_target"].items():
            split = r["per_split"]
            attacks = ", ".join(f"{a['accuracy']:.2f}" for a in r["attacks"])
            lines.append(f"| {method} | {target} | {split['request'][target]:.2f} | {split['left_out'][target]:.2f} | "
                         f"{split['heldout'][target]:.2f} | {r['acc_s']['value']:.3f} | {r['h_o']:.3f} | {attacks} |")
    return lines


def scaling_table(toy: dict) -> list[str]:
    if not toy["scaling"]:
        return []
    lines = ["| method | concepts erased | Acc_e | Acc_g | Acc_s | H_o | FID | FID: ACE minus this [95%] | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in toy["scaling"]:
        d = r.get("fid_ace_minus_this")
        versus = f"{d['value']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" if d else "—"
        lines.append(f"| {r['method']} | {r['n_concepts']} | {_ci(r['acc_e'])} | {_ci(r['acc_g'])} | {_ci(r['acc_s'])} | "
                     f"{r['h_o']:.3f} | {r['fid_preserve']:.1f} | {versus} | {r['seconds']:.1f} |")
    return lines


def _seeds(attack: dict) -> str:
    """The attack seeds, when they are not the default ones (0, 1, ...)."""
    first = attack.get("first_seed", 0)
    if not first:
        return ""
    return f" Attack seeds {first} to {first + attack['seeds'] - 1} (the default run uses 0 to {attack['seeds'] - 1})."


def report(results: dict) -> str:
    toys = results["toys"]
    order = sorted(toys, key=lambda t: t != HEADLINE)
    targets = results["plan"]["targets"]
    per_toy = ", ".join(f"{t} toy {toys[t].get('seconds', 0) / 60:.1f} min" for t in order)
    lines = [
        f"# ACE benchmark on the toy world ({results['mode']} run)", "",
        f"Command: `{results['command']}`. Machine: {results['machine']}. Total {results.get('seconds', 0) / 60:.1f} min "
        f"({per_toy}). "
        "Numbers come from the toy world of `toy/` (16x16 pictures, a 4.6 M-parameter UNet on MiniLM), not from "
        "Stable Diffusion. Intervals are 95%: Wilson's for accuracies and ASR, a bootstrap over the judged pictures "
        "for H_o.", "",
        f"The causal toy reads prompts left to right as Stable Diffusion's CLIP does, so it is the headline; the "
        f"bidirectional toy is the same recipe with MiniLM reading both ways. Targets: {', '.join(targets)}, erased one "
        f"at a time with their request words, anchor \"\", the other concepts as the preserve list. ASR: share of "
        f"(target, attack seed) pairs where a soft-prompt attacker ({results['attack']['steps']} Adam steps of "
        f"{results['attack']['batch']} pictures) brings the concept back in at least "
        f"{results['attack']['success_accuracy']:.0%} of 16 pictures; the stronger attack takes "
        f"{results['attack']['strong_factor']} times the steps.{_seeds(results['attack'])}", "",
    ]
    if len(order) > 1:
        lines += ["## Side by side", "", "| method | " + " | ".join(f"{t} H_o | {t} ASR" for t in order) + " |",
                  "|---|" + "---|---|" * len(order)]
        for method in toys[order[0]]["methods"]:
            cells = []
            for t in order:
                s = toys[t]["methods"].get(method)
                cells += [_ci(s["h_o"]), _ci(s["asr"])] if s else ["", ""]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    for t in order:
        toy = toys[t]
        chance = toy["untouched"]["chance"]
        lines += [f"## {t.capitalize()} toy{' (headline)' if t == HEADLINE else ''}", ""]
        if "training" in toy:
            lines += [f"Trained for {toy['training']['minutes']:.1f} minutes ({toy['training']['steps']} steps; "
                      f"{toy['training']['machine']}).", ""]
        plan = results["plan"]["toys"].get(t)
        if plan:
            scaling = (f"scaling {', '.join(map(str, plan['scaling_sizes']))} concepts with "
                       f"{', '.join(plan['scaling_methods'])}" if plan["scaling_sizes"] else "no scaling runs")
            lines += [f"Measured here: {', '.join(plan['methods'])}; the stronger attack on "
                      f"{', '.join(plan['strong_methods']) or 'none'}; {scaling}.", ""]
        lines += untouched_table(toy, targets) + [""]
        lines += ["### Methods (pooled over targets)", "", *methods_table(toy), "",
                  f"Best possible H_o here (erased concept at chance, everything else perfect): "
                  f"{best_h_o(chance, targets):.3f}.", ""]
        diff = differences(toy)
        if diff:
            lines += ["### ACE against each method (H_o)", "", *diff, ""]
        lines += ["### Per target", "", *per_target(toy), ""]
        scale = scaling_table(toy)
        if scale:
            lines += ["### Scaling", "", *scale, "", f"![scaling]({t}/scaling.png)", ""]
        lines += ["### Samples", "", "Same prompts and seed in every column; columns are the untouched model and each method.",
                  ""]
        lines += [f"![{target}]({path})" for target, path in toy["grids"].items()]
        lines += ["", f"![H_o per method]({t}/h_o.png)", ""]
    return "\n".join(lines)
