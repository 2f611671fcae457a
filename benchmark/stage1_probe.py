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

import torch

from runner import host

PROBES = ["a picture of a ball", "an orb", "a sketch depicting a disc", "a red square", "a ring", "a crescent"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="circle: disc")
    parser.add_argument("--preserve", default="square, triangle, ring")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--toy", choices=("causal", "bidirectional"), default="bidirectional")
    args = parser.parse_args()

    pack = host.start()
    comfy_models, closed_form = pack.nodes.comfy_models, pack.ace.closed_form
    model, clip, _ = pack.toy.model.load_toy_model(args.toy)
    network = comfy_models.network_of(model, clip)
    encoder = network.encoder
    tokens = pack.ace.tokens.collect_request(encoder, pack.ace.concepts.parse_request(args.concept, "", args.preserve))
    for rank in args.ranks:
        stage1 = closed_form.closed_form_erasure(tokens, network.weights, network.projections,
                                                 closed_form.ClosedFormConfig(rank=rank))
        adapter, stats = stage1.adapter, stage1.stats[0]
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
