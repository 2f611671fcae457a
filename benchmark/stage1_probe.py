"""Stage 1 of ACE on the toy model's real (pretrained MiniLM) text encoder: how well the edit fits
at each rank, and where the gate opens.

    .venv/bin/python -m benchmark.stage1_probe [--concept "circle: disc"] [--preserve "square, triangle, ring"]

Prints, per rank, the ungated edit's relative residual (how far the concept's outputs stay from
the neutral ones; 0 is a perfect fit) and its relative change on preserve prompts, then the gate
on the concept's own tokens, on the preserve tokens, and on the words of a few other prompts.
The README's rank figures come from this command with its defaults.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

PROBES = ["a picture of a ball", "an orb", "a sketch depicting a disc", "a red square", "a ring", "a crescent"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="circle: disc")
    parser.add_argument("--preserve", default="square, triangle, ring")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    args = parser.parse_args()

    import comfy_harness  # ComfyUI in this process, with this pack loaded as ComfyUI loads it

    comfy_harness.init_comfyui(Path(tempfile.mkdtemp()))
    from benchmark import toy_comfy

    model, clip, _ = toy_comfy.load_toy_model()
    comfy_models = comfy_harness.pack_module("nodes.comfy_models")
    concepts = comfy_harness.pack_module("ace.concepts")
    tokens_mod = comfy_harness.pack_module("ace.tokens")
    closed_form = comfy_harness.pack_module("ace.closed_form")

    encoder = comfy_models.ClipTextEncoder(clip)
    tokens = tokens_mod.collect_request(encoder, concepts.parse_request(args.concept, "", args.preserve))
    projections = comfy_models.check_model(model)
    weights = comfy_models.projection_weights(model, projections)
    for rank in args.ranks:
        adapter, info = closed_form.closed_form_erasure(tokens, weights, projections, closed_form.ClosedFormConfig(rank=rank))
        stats = info["concepts"][0]
        print(f"rank {rank:3d}: relative residual {stats['relative_residual']:.3f}, "
              f"ungated preserve change {stats['ungated_preserve_change']:.3f}")
    concept = tokens.concepts[0]
    with torch.no_grad():
        own = adapter.gate(concept.C[concept.is_phrase])[:, 0]
        preserve = adapter.gate(tokens.P)[:, 0]
        print(f"gate on the concept's own tokens: min {own.min():.2f}, median {own.median():.2f}")
        print(f"gate on preserve tokens: max {preserve.max():.2f}")
        for prompt in PROBES:
            g = adapter.gate(encoder.encode([prompt]))[0, :, 0]
            n = encoder.count_tokens(prompt)
            words = " ".join(f"{x:.2f}" for x in g[1 : 1 + n].tolist())
            print(f"gate on the words of {prompt!r}: {words}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
