"""Concept requests: what to erase, what to map it onto, and what to keep.

A request is a list of `Concept`s plus a shared preserve list. Users type concepts one per line
in ComfyUI, synonyms after a colon or separated by commas:

    Van Gogh: Vincent van Gogh, van gogh style
    Snoopy
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_CONCEPTS = 100
MAX_SYNONYMS = 32
MAX_PRESERVE = 256
MAX_PHRASE_CHARS = 200


class ConceptError(ValueError):
    """A concept request that cannot be erased as written."""


@dataclass(frozen=True)
class Concept:
    target: str
    synonyms: tuple[str, ...] = ()
    anchor: str = ""  # the neutral concept the target is mapped onto; "" maps it onto nothing

    @property
    def phrases(self) -> tuple[str, ...]:
        return (self.target, *self.synonyms)


@dataclass(frozen=True)
class ConceptRequest:
    concepts: tuple[Concept, ...]
    preserve: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        return {
            "concepts": [
                {"target": c.target, "synonyms": list(c.synonyms), "anchor": c.anchor}
                for c in self.concepts
            ],
            "preserve": list(self.preserve),
        }

    @classmethod
    def from_json(cls, data: dict) -> "ConceptRequest":
        concepts = [
            Concept(c["target"], tuple(c.get("synonyms", ())), c.get("anchor", ""))
            for c in data["concepts"]
        ]
        return make_request(concepts, data.get("preserve", ()))


def _clean(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise ConceptError(f"{what} must be text, got {type(text).__name__}.")
    text = " ".join(text.split())
    if len(text) > MAX_PHRASE_CHARS:
        raise ConceptError(
            f"{what} is {len(text)} characters long; keep it under {MAX_PHRASE_CHARS} "
            "(a concept is a name or a short phrase, not a prompt)."
        )
    return text


def make_request(concepts, preserve=()) -> ConceptRequest:
    """Validate and normalise a request; raise `ConceptError` saying what to fix."""
    concepts = list(concepts)
    if not concepts:
        raise ConceptError("No concept to erase: give at least one target concept.")
    if len(concepts) > MAX_CONCEPTS:
        raise ConceptError(f"{len(concepts)} concepts requested; at most {MAX_CONCEPTS} fit in one erasure.")
    cleaned: list[Concept] = []
    seen: set[str] = set()
    for i, c in enumerate(concepts, 1):
        target = _clean(c.target, f"Concept {i}")
        if not target:
            raise ConceptError(f"Concept {i} is empty: write the name or phrase to erase.")
        anchor = _clean(c.anchor, f"The anchor of '{target}'")
        if anchor.lower() == target.lower():
            raise ConceptError(
                f"'{target}' is its own anchor: the anchor is the neutral concept it is mapped onto "
                "(e.g. 'a painting' for an artist), or empty."
            )
        if len(c.synonyms) > MAX_SYNONYMS:
            raise ConceptError(f"'{target}' has {len(c.synonyms)} synonyms; at most {MAX_SYNONYMS}.")
        synonyms = []
        for s in c.synonyms:
            s = _clean(s, f"A synonym of '{target}'")
            if s and s.lower() != target.lower() and s.lower() not in (x.lower() for x in synonyms):
                synonyms.append(s)
        for phrase in (target, *synonyms):
            key = phrase.lower()
            if key in seen:
                raise ConceptError(f"'{phrase}' is requested twice; list each concept or synonym once.")
            seen.add(key)
        cleaned.append(Concept(target, tuple(synonyms), anchor))
    preserve = list(preserve)
    if len(preserve) > MAX_PRESERVE:
        raise ConceptError(f"{len(preserve)} preserve concepts; at most {MAX_PRESERVE}.")
    kept = []
    for p in preserve:
        p = _clean(p, "A preserve concept")
        if not p:
            continue
        if p.lower() in seen:
            raise ConceptError(f"'{p}' is both erased and preserved; remove it from one of the lists.")
        if p.lower() not in (k.lower() for k in kept):
            kept.append(p)
    return ConceptRequest(tuple(cleaned), tuple(kept))


def parse_request(concepts_text: str, anchor: str = "", preserve_text: str = "") -> ConceptRequest:
    """Parse the node's text boxes: one concept per line, `target: synonym, synonym`.

    Preserve concepts are separated by commas or new lines. Blank lines and lines starting
    with `#` are ignored.
    """
    concepts = []
    for line in concepts_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        target, _, rest = line.partition(":")
        synonyms = tuple(s.strip() for s in rest.split(",") if s.strip())
        concepts.append(Concept(target.strip(), synonyms, anchor))
    preserve = [p.strip() for p in preserve_text.replace("\n", ",").split(",")]
    return make_request(concepts, preserve)
