"""ACE Inspect Prompt: how strongly each erased concept's gate fires on every token of a prompt,
so a user sees before rendering whether a wording slips past the erasure, or whether it hits a
prompt it should spare.

The gates are computed on exactly what the MODEL's cross-attention receives: the CLIP's token
embeddings of the prompt (weights such as `(word:1.2)` included), start, end and padding tokens
too, since the edit acts on every position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.v0_0_2 import io, ui

from .comfy_models import AppliedErasure, ClipTextEncoder, erasures_on
from .erase import Erasure_
from .gate_map import gate_map_image

FIRES = 0.5  # a gate at or above this counts as the edit acting on the token
MAX_PROMPTS = 16


@dataclass(frozen=True)
class Token:
    label: str  # the token as the tokenizer spells it ("gogh", "##mor"), or <start>, <end>, <pad>
    kind: str  # "word", "start", "end" or "pad"


@dataclass(frozen=True)
class PromptGates:
    """One prompt's gates: `gates[i, k]` is concept k's gate on token i; `applied[i, k]` the gate the
    edit uses there, as the family's gate scope spreads it (`GatedAdapter.spread`: per token, the
    largest at or before the token for a causal encoder, the prompt's largest for one that reads
    both ways); the edit adds `strengths[k] · applied[i, k]` of the change."""

    prompt: str
    tokens: list[Token]
    gates: torch.Tensor  # [L, K]
    applied: torch.Tensor  # [L, K]
    strengths: list[float]  # [K]


def prompt_tokens(clip, prompt: str) -> list[Token]:
    """The tokens of `prompt`, one per position of the CLIP's encoding, in windows of the
    tokenizer's length (a long prompt has several)."""
    tokenizer = ClipTextEncoder(clip).tokenizer
    vocab = getattr(tokenizer, "inv_vocab", {})
    tokens = []
    for window in tokenizer.tokenize_with_weights(prompt):
        ended = False
        for i, (token_id, *_rest) in enumerate(window):
            if not isinstance(token_id, int):  # a textual-inversion embedding
                tokens.append(Token("<embedding>", "word"))
            elif i == 0 and token_id == tokenizer.start_token:
                tokens.append(Token("<start>", "start"))
            elif ended:
                tokens.append(Token("<pad>", "pad"))
            elif token_id == tokenizer.end_token:
                tokens.append(Token("<end>", "end"))
                ended = True
            else:
                tokens.append(Token(vocab.get(token_id, str(token_id)).removesuffix("</w>"), "word"))
    return tokens


def inspect_prompt(clip, erasures: list[AppliedErasure], prompt: str) -> PromptGates:
    """Every gate on every token of `prompt`, the gates of `erasures` side by side."""
    cond = clip.encode_from_tokens(clip.tokenize(prompt)).float().cpu()[0]  # [L, d]
    tokens = prompt_tokens(clip, prompt)
    if len(tokens) != cond.shape[0]:
        raise ValueError(f"This CLIP gives {cond.shape[0]} embeddings for {len(tokens)} tokens of the prompt; "
                         "ACE Inspect Prompt cannot tell which token is which for this text encoder.")
    gates, applied, strengths = [], [], []
    with torch.no_grad():
        for e in erasures:
            g = e.adapter.gate(cond)  # [L, K]
            gates.append(g)
            applied.append(e.adapter.spread(g))  # as the edit spreads it (gate scope)
            strengths += [float(e.adapter.strength)] * g.shape[1]
    return PromptGates(prompt, tokens, torch.cat(gates, dim=1), torch.cat(applied, dim=1), strengths)


def check_width(clip, erasures: list[AppliedErasure]) -> None:
    width = clip.encode_from_tokens(clip.tokenize("")).shape[-1]
    for e in erasures:
        needed = e.adapter.projections[0].in_features
        if width != needed:
            raise ValueError(f"This CLIP gives {width}-wide text embeddings but the erasure was made for a model "
                             f"that takes {needed}: connect the CLIP loaded with that model.")


def gate_sources(erasure, model) -> list[AppliedErasure]:
    """What to inspect: an ERASURE, or the erasures on an erased MODEL (one of the two)."""
    if (erasure is None) == (model is None):
        raise ValueError("Connect an ERASURE (from ACE Erase Concept, ACE Load Erasure, ...) or an erased MODEL "
                         "(the MODEL output of ACE Erase Concept or ACE Apply Erasure), not both and not neither.")
    if erasure is not None:
        return [AppliedErasure(erasure.adapter, tuple(erasure.gate_names()))]
    found = erasures_on(model)
    if not found:
        raise ValueError("This MODEL carries no ACE erasure: connect the MODEL output of ACE Erase Concept or "
                         "ACE Apply Erasure (a baked MODEL has no gate left to inspect), or the ERASURE itself.")
    return found


def split_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("No prompt to inspect: write one prompt per line.")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"{len(prompts)} prompts; inspect at most {MAX_PROMPTS} at once.")
    return prompts


def verdict(result: PromptGates, names: list[str]) -> str:
    """One line: which concepts the edit acts on in this prompt, strongest first, and on which token.
    Gates of several erased concepts can fire on one word; the edit is one, applied once at the
    largest gate, so the first concept named is the one that decides."""
    best = result.applied.amax(dim=0)  # per gate: what the edit uses at most
    where = result.gates.argmax(dim=0)  # the token that looks most like the concept
    acting = sorted((k for k in range(len(names)) if best[k] >= FIRES), key=lambda k: -float(best[k]))
    if not acting:
        k = int(best.argmax())
        return f"untouched: no concept's gate reaches {FIRES} (largest {float(best[k]):.2f}, {names[k]})"
    parts = [f"{names[k]} ({float(best[k]):.2f} at {result.tokens[int(where[k])].label}"
             + (f", strength {result.strengths[k]:g})" if result.strengths[k] != 1 else ")") for k in acting]
    return "the edit acts: " + ", ".join(parts)


def report_text(results: list[PromptGates], names: list[str], scopes: set[str]) -> str:
    lines = [f"ACE Inspect Prompt: {len(names)} concept gate(s); gate 0: the prompt goes through the original "
             f"model, 1: the edit acts (it maps the concept onto its anchor)."]
    lines += [f"  [{k + 1}] {name}" for k, name in enumerate(names)]
    if "prompt" in scopes:
        lines.append("  This model's text encoder reads both ways: the prompt's largest gate applies at every token.")
    if "causal" in scopes:
        lines.append("  This model's text encoder reads left to right: a token gets the largest gate at or before it.")
    for n, r in enumerate(results, 1):
        lines += ["", f"prompt {n}: {r.prompt}", f"  {verdict(r, names)}",
                  "  " + f"{'token':<16}" + "".join(f"{f'[{k + 1}]':>7}" for k in range(len(names)))]
        for label, row in table_rows(r):
            lines.append("  " + f"{label[:16]:<16}" + "".join(f"{float(v):>7.2f}" for v in row))
    return "\n".join(lines)


def table_rows(result: PromptGates) -> list[tuple[str, torch.Tensor]]:
    """(label, each gate) per row: the start token, each word token, then the end and
    padding tokens as one row (their largest gate)."""
    rows = [(t.label, result.gates[i]) for i, t in enumerate(result.tokens) if t.kind in ("start", "word")]
    tail = [i for i, t in enumerate(result.tokens) if t.kind in ("end", "pad")]
    if tail:
        rows.append(("<end>+<pad>", result.gates[tail].amax(dim=0)))
    return rows


class InspectPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ACEErasure_InspectPrompt",
            display_name="ACE Inspect Prompt",
            category="ACE/inspect",
            description=(
                "Shows, per token of each prompt, how strongly each erased concept's gate fires (0: the prompt "
                "goes through the original model, 1: the edit acts), as text and as a picture, before any "
                "rendering: see whether a wording slips past the erasure or hits a prompt it should spare."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the model the erasure was made for: it encodes the prompts as the model receives them."),
                io.String.Input("prompts", multiline=True, default="a painting by Vincent van Gogh\nsunflowers, post-impressionism\na landscape painting by Claude Monet",
                                tooltip="One prompt per line (up to 16), written as you would prompt the model."),
                Erasure_.Input("erasure", optional=True, tooltip="The erasure to inspect (or connect an erased MODEL instead)."),
                io.Model.Input("model", optional=True, tooltip="An erased MODEL (from ACE Erase Concept or ACE Apply Erasure): every erasure on it, at the strength it was applied with."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="Per prompt: which concepts the edit acts on, and each token's gate per concept."),
                io.Image.Output(display_name="GATES", tooltip="The same as a picture: one row per token, one column per concept, brighter = the gate fires."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, clip, prompts, erasure=None, model=None) -> io.NodeOutput:
        sources = gate_sources(erasure, model)
        check_width(clip, sources)
        names = [name for s in sources for name in s.gate_names]
        results = [inspect_prompt(clip, sources, p) for p in split_prompts(prompts)]
        report = report_text(results, names, {s.adapter.gate_scope for s in sources})
        picture = gate_map_image([(r.prompt, table_rows(r)) for r in results], names)
        return io.NodeOutput(report, picture, ui={"text": (report,), **ui.PreviewImage(picture, cls=cls).as_dict()})


INSPECT_NODES = [InspectPrompt]
