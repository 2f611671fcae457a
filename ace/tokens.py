"""Stage 0: which token embeddings carry a concept.

Each phrase of a concept (its target and synonyms) is written into a handful of prompt templates
and encoded; the same templates are encoded with the neutral anchor. With a causal text encoder
such as CLIP, the concept lives in its own tokens *and in every token after it* (end-of-text and
padding included), so all those positions are collected. They are paired with the neutral prompt
by aligning the two prompts *after* the concept word, since the concept and the anchor may
tokenize to different lengths. An encoder that reads both ways spreads the concept over the
positions *before* it too; for it (`all_positions`) those are collected as well, paired with the
same positions of the neutral prompt (the prefix is the same text).

Compositions: the target next to each concept to preserve ("red hourglass" while erasing "red"
and keeping "hourglass") maps onto the preserved one alone ("hourglass"), so that the edit takes
the concept out of a prompt without taking the kept concept with it.

The result is the matrices of the method note: `C` (concept embeddings), `N` (their neutral
counterparts) and `P` (embeddings to preserve: the preserve concepts, the neutral prompts and a
pool of everyday prompts).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .concepts import Concept, ConceptRequest

# "{}" marks where the concept goes. Varied positions and contexts make the edit hold when the
# concept is prompted in words the templates never used.
CONCEPT_TEMPLATES = (
    "{}",
    "a photo of {}",
    "a painting of {}",
    "an image of {}",
    "{} in the style of art",
    "a detailed picture of {}, high quality",
    "a close-up of {}",
    "a drawing showing {} in a room",
)

# The target written next to a concept to preserve ("{}" the target, then the kept concept).
COMPOSITION_TEMPLATES = ("{} {kept}", "a {} {kept}")
MAX_COMPOSED = 32  # preserve concepts composed with each target (the first ones of the list)

# Everyday prompts whose renders must not change (the generic part of `P`).
EVERYDAY_PROMPTS = (
    "a dog running on the beach",
    "a portrait of a woman smiling",
    "a city street at night with lights",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "an old man reading a newspaper",
    "a red car parked by the road",
    "a cat sleeping on a sofa",
    "a forest path in autumn",
    "a cup of coffee on a desk",
    "a child playing with a ball",
    "a landscape painting of hills",
    "a house with a garden",
    "a plate of pasta",
    "a sailing boat on the sea",
    "a bird sitting on a branch",
    "a watercolor of flowers",
    "a group of people at a concert",
    "a bridge over a river",
    "a snowy village in winter",
    "a bicycle leaning on a wall",
    "a pencil sketch of a horse",
    "an astronaut in space",
    "a kitchen with white cabinets",
    "a train crossing the countryside",
    "a man in a suit",
    "a photo of a building",
    "a simple shape on a plain background",
    "a colorful abstract pattern",
    "a book on a shelf",
    "",
    "a picture",
)


class TextEncoder(Protocol):
    """What stage 0 needs from a model's text encoder.

    `encode` returns the token embeddings the UNet's cross-attention receives, `[n, L, d]`, with
    every prompt padded to the same length `L`; `encode_pooled` returns them with the pooled text
    embedding `[n, p]` that models such as SDXL also receive (None for a model that takes none).
    `count_tokens` counts a text's tokens without the start/end markers; `start_tokens` is the
    number of tokens before a prompt's first word (1 for CLIP's start-of-text token). For concept
    expansion (`expansion.py`): `vocabulary` lists the encoder's whole words, `static_embeddings`
    their input token embeddings (no forward pass), and `encode_words` each word's embedding where
    it stands as a prompt's only word (at its last token), `[n, d]`. For stage 2's adversarial
    input (`finetune.py`): `soft_word` gives a phrase's input token embeddings (per tower of the
    encoder, as tensors to optimise) and `encode_soft` encodes prompts with that phrase replaced by
    them, differentiably.
    """

    start_tokens: int

    def encode(self, prompts: Sequence[str]) -> torch.Tensor: ...

    def encode_pooled(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def count_tokens(self, text: str) -> int: ...

    def vocabulary(self) -> list[str]: ...

    def static_embeddings(self, words: Sequence[str]) -> torch.Tensor: ...

    def encode_words(self, words: Sequence[str]) -> torch.Tensor: ...

    def soft_word(self, phrase: str) -> dict[str, torch.Tensor]: ...

    def encode_soft(self, prompts: Sequence[str], phrase: str, vectors: dict[str, torch.Tensor]) -> torch.Tensor: ...


@dataclass
class ConceptTokens:
    """Everything stage 1 and stage 2 need about one concept.

    `concept_context`/`neutral_context` are whole prompts `[T, L, d]` (template t with the
    concept, and with the anchor); `concept_mask` `[T, L]` marks the positions that carry the
    concept; `concept_index`/`neutral_index` `[n, 2]` hold the aligned (prompt, position) pairs
    whose embeddings are the columns of `C` and `N`. `concept_pooled`/`neutral_pooled` `[T, p]`
    are the prompts' pooled text for models that take it (SDXL), else None.
    """

    concept: Concept
    prompts: list[str]
    neutral_prompts: list[str]
    concept_context: torch.Tensor
    neutral_context: torch.Tensor
    concept_mask: torch.Tensor
    concept_index: torch.Tensor
    neutral_index: torch.Tensor
    is_phrase: torch.Tensor
    concept_pooled: torch.Tensor | None = None
    neutral_pooled: torch.Tensor | None = None

    @property
    def C(self) -> torch.Tensor:
        t, p = self.concept_index.unbind(1)
        return self.concept_context[t, p]

    @property
    def N(self) -> torch.Tensor:
        t, p = self.neutral_index.unbind(1)
        return self.neutral_context[t, p]

    @property
    def phrase_mask(self) -> torch.Tensor:
        """`[T, L]`: the positions of the concept's own words in each prompt."""
        mask = torch.zeros_like(self.concept_mask)
        t, p = self.concept_index[self.is_phrase].unbind(1)
        mask[t, p] = True
        return mask

    def concept_at(self, index) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The context and pooled text (None for models without) of the concept prompts at `index`."""
        return self.concept_context[index], _pooled_at(self.concept_pooled, index)

    def neutral_at(self, index) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same for their neutral prompts."""
        return self.neutral_context[index], _pooled_at(self.neutral_pooled, index)

    def target_prompts(self) -> list[int]:
        """The prompts that name the concept's target phrase (not a synonym)."""
        target = f" {' '.join(self.concept.target.lower().split())} "
        return [i for i, p in enumerate(self.prompts) if target in f" {' '.join(p.lower().split())} "]


@dataclass
class RequestTokens:
    concepts: list[ConceptTokens]
    preserve_prompts: list[str]
    preserve_context: torch.Tensor  # [Tp, L, d]: preserve concepts in templates, and everyday prompts
    # [Tp, L]: the positions that carry a concept the request keeps (its words and, as for an erased
    # concept, what the encoder reads after them); none in everyday prompts
    kept_mask: torch.Tensor
    preserve_pooled: torch.Tensor | None = None  # [Tp, p]: their pooled text (SDXL), else None

    def preserve_at(self, index) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The context and pooled text (None for models without) of the preserve prompts at `index`."""
        return self.preserve_context[index], _pooled_at(self.preserve_pooled, index)

    @property
    def K(self) -> torch.Tensor:
        """The kept concepts' embeddings: the near misses the edit must spare, a few rows among the
        thousands of P, so the closed form weighs them on their own."""
        return self.preserve_context[self.kept_mask]

    @property
    def P(self) -> torch.Tensor:
        """Preserve embeddings: every position of every preserve prompt and of every neutral prompt."""
        neutral = [c.neutral_context.flatten(0, 1) for c in self.concepts]
        return torch.cat([self.preserve_context.flatten(0, 1), *neutral])


def _pooled_at(pooled: torch.Tensor | None, index) -> torch.Tensor | None:
    return None if pooled is None else pooled[index]


def prompts_to(prompts: tuple[torch.Tensor, torch.Tensor | None], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A (context, pooled or None) pair, as `concept_at` and the like return it, on `device`."""
    context, pooled = prompts
    return context.to(device), None if pooled is None else pooled.to(device)


def fill(template: str, phrase: str) -> str:
    return " ".join(template.format(phrase).split()).strip(" ,")


def _prefix_tokens(encoder: TextEncoder, template: str) -> int:
    prefix = template.split("{}")[0].strip()
    return encoder.start_tokens + (encoder.count_tokens(prefix) if prefix else 0)


def _encode(encoder: TextEncoder, prompts: list[str], batch: int = 32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context `[n, L, d]`, pooled `[n, p]` or None), float32."""
    with torch.no_grad():
        parts = [encoder.encode_pooled(prompts[i : i + batch]) for i in range(0, len(prompts), batch)]
    pooled = None if parts[0][1] is None else torch.cat([p for _, p in parts]).float()
    return torch.cat([c for c, _ in parts]).float(), pooled


def collect_concept(
    encoder: TextEncoder, concept: Concept, templates: Sequence[str] = CONCEPT_TEMPLATES,
    kept: Sequence[str] = (), all_positions: bool = False,
) -> ConceptTokens:
    """Encode one concept's phrases in every template (and its target composed with each `kept`
    concept), and pair concept and neutral positions; `all_positions` also pairs the positions
    before the concept (encoders that read both ways)."""
    prompts, neutral_prompts, starts, lengths = [], [], [], []
    n_anchor = encoder.count_tokens(concept.anchor) if concept.anchor else 0
    composed = [t.replace("{kept}", k) for k in kept[:MAX_COMPOSED] for t in COMPOSITION_TEMPLATES]
    for phrase in concept.phrases:
        n_phrase = encoder.count_tokens(phrase)
        for template in (*templates, *(composed if phrase == concept.target else ())):
            prompts.append(fill(template, phrase))
            neutral_prompts.append(fill(template, concept.anchor))
            starts.append(_prefix_tokens(encoder, template))
            lengths.append(n_phrase)
    concept_context, concept_pooled = _encode(encoder, prompts)
    neutral_context, neutral_pooled = _encode(encoder, neutral_prompts)
    T, L, _ = concept_context.shape

    concept_mask = torch.zeros(T, L, dtype=torch.bool)
    concept_index, neutral_index, is_phrase = [], [], []
    for t, (s, n_c) in enumerate(zip(starts, lengths)):
        if s + n_c > L:
            raise ValueError(
                f"'{prompts[t]}' does not fit the text encoder's {L} tokens; shorten the concept."
            )
        for pos in range(0 if all_positions else s, L):
            i = pos - s
            if i < 0:  # before the concept: the same text in both prompts
                neutral_pos = pos
            elif i < n_c:  # a token of the concept itself: spread it over the anchor's tokens
                neutral_pos = s + (i * n_anchor) // n_c if n_anchor else s
            else:  # after the concept: the same offset after the anchor
                neutral_pos = s + n_anchor + (i - n_c)
            concept_mask[t, pos] = True
            is_phrase.append(0 <= i < n_c)
            concept_index.append((t, pos))
            neutral_index.append((t, min(neutral_pos, L - 1)))
    return ConceptTokens(
        concept,
        prompts,
        neutral_prompts,
        concept_context,
        neutral_context,
        concept_mask,
        torch.tensor(concept_index),
        torch.tensor(neutral_index),
        torch.tensor(is_phrase),
        concept_pooled,
        neutral_pooled,
    )


def _mentions(prompt: str, request: ConceptRequest) -> bool:
    """Whether a prompt names a phrase the request erases: such a prompt must not be preserved
    (erasing "cat" while keeping "a cat sleeping on a sofa" fights the edit and its gate)."""
    words = f" {' '.join(re.findall(r'[a-z0-9]+', prompt.lower()))} "
    return any(f" {' '.join(re.findall(r'[a-z0-9]+', phrase.lower()))} " in words
               for c in request.concepts for phrase in c.phrases)


def collect_request(
    encoder: TextEncoder,
    request: ConceptRequest,
    templates: Sequence[str] = CONCEPT_TEMPLATES,
    everyday_prompts: Sequence[str] = EVERYDAY_PROMPTS,
    all_positions: bool = False,
) -> RequestTokens:
    concepts = [collect_concept(encoder, c, templates, request.preserve, all_positions) for c in request.concepts]
    preserve_prompts = [fill(t, p) for p in request.preserve for t in templates]
    starts = [0 if all_positions else _prefix_tokens(encoder, t) for _ in request.preserve for t in templates]
    preserve_prompts += [p for p in everyday_prompts if not _mentions(p, request)]
    context, pooled = _encode(encoder, preserve_prompts)
    kept_mask = torch.zeros(context.shape[:2], dtype=torch.bool)
    for t, start in enumerate(starts):
        kept_mask[t, start:] = True
    return RequestTokens(concepts, preserve_prompts, context, kept_mask, pooled)
