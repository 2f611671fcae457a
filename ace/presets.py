"""Concept presets: curated concept lists to start an erasure from, so that nobody has to guess
which words cover "explicit content" or a famous painter's style.

A preset is a JSON file in the pack's `presets/` folder, named by its file name without `.json`:

    {
      "title": "Famous painters' styles",
      "description": "What it erases and what to check.",
      "anchor": "a painting",
      "concepts": [{"target": "Vincent van Gogh", "synonyms": ["Van Gogh", "The Starry Night"]},
                   {"target": "Snoopy", "synonyms": [], "anchor": "a cartoon dog"}],
      "preserve": ["an oil painting", "a landscape painting"]
    }

`anchor` is what the preset's concepts become (a concept may suggest its own); `preserve` lists
neighbours that should keep rendering. A preset is a starting point written by hand, not a
guarantee: what a model knows under other words still gets through.

`request_with_preset` combines a preset with what a user typed (the node's text boxes): the
preset's concepts, then the typed ones, one request.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .concepts import Concept, ConceptError, ConceptRequest, make_request, parse_request

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
NO_PRESET = "none"  # the node's and the command line's choice for "no preset"
_KEYS = {"title", "description", "anchor", "concepts", "preserve"}
_CONCEPT_KEYS = {"target", "synonyms", "anchor"}


class PresetError(ConceptError):
    """A preset that does not exist, or a preset file that cannot be used as written."""


@dataclass(frozen=True)
class Preset:
    name: str  # the file name without .json: what the node's list and --preset show
    title: str
    description: str
    anchor: str  # the anchor it suggests for concepts added to it
    concepts: tuple[Concept, ...]  # each with its suggested anchor
    preserve: tuple[str, ...]


def preset_names(folder: Path = PRESETS_DIR) -> list[str]:
    """The presets in `folder`, by name, sorted."""
    return sorted(p.stem for p in folder.glob("*.json"))


def load_preset(name: str, folder: Path = PRESETS_DIR) -> Preset:
    """Read and check one preset; `PresetError` says what is wrong with it."""
    names = preset_names(folder)
    if name not in names:
        raise PresetError(f"There is no concept preset '{name}'; the presets are: {', '.join(names) or 'none'}.")
    path = folder / f"{name}.json"
    where = f"The concept preset file {path.name}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PresetError(f"{where} cannot be read as JSON ({e}).") from None
    if not isinstance(data, dict) or set(data) - _KEYS or not {"title", "concepts"} <= set(data):
        raise PresetError(f"{where} must be an object with 'title' and 'concepts' (and optionally "
                          f"'description', 'anchor', 'preserve'), got keys {sorted(data) if isinstance(data, dict) else data!r}.")
    anchor = _text(data.get("anchor", ""), f"{where}: 'anchor'")
    concepts = []
    for i, c in enumerate(data["concepts"] if isinstance(data["concepts"], list) else [None], 1):
        if not isinstance(c, dict) or "target" not in c or set(c) - _CONCEPT_KEYS:
            raise PresetError(f"{where}: concept {i} must be an object with 'target' (and optionally 'synonyms', "
                              "'anchor').")
        synonyms = c.get("synonyms", [])
        if not isinstance(synonyms, list):
            raise PresetError(f"{where}: the synonyms of concept {i} must be a list.")
        concepts.append(Concept(_text(c["target"], f"{where}: concept {i}"),
                                tuple(_text(s, f"{where}: a synonym of concept {i}") for s in synonyms),
                                _text(c.get("anchor", anchor), f"{where}: the anchor of concept {i}")))
    preserve = data.get("preserve", [])
    if not isinstance(preserve, list):
        raise PresetError(f"{where}: 'preserve' must be a list.")
    try:  # the same checks as a typed request: lengths, duplicates, erased and preserved at once
        request = make_request(concepts, [_text(p, f"{where}: a preserve entry") for p in preserve])
    except ConceptError as e:
        raise PresetError(f"{where}: {e}") from None
    return Preset(name, _text(data["title"], f"{where}: 'title'"), _text(data.get("description", ""), f"{where}: 'description'"),
                  anchor, request.concepts, request.preserve)


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise PresetError(f"{what} must be text, got {type(value).__name__}.")
    return value


def request_with_preset(preset_name: str, concepts_text: str = "", anchor: str = "", preserve_text: str = "",
                        folder: Path = PRESETS_DIR) -> ConceptRequest:
    """The request a node or the command line erases: a preset (or NO_PRESET) plus typed text.

    - Concepts: the preset's, then the typed ones (`target: synonym, ...` per line). A typed
      concept that names one of the preset's concepts adds its synonyms to it.
    - Anchor: a typed anchor applies to every concept; left empty, the preset's concepts keep the
      anchors it suggests and typed concepts take the preset's anchor.
    - Preserve: the preset's list, less anything that names an erased concept, plus the typed list.

    Without a preset this is exactly `parse_request`.
    """
    if preset_name == NO_PRESET:
        return parse_request(concepts_text, anchor, preserve_text)
    preset = load_preset(preset_name, folder)
    typed = parse_request(concepts_text, anchor or preset.anchor, "") if _has_concepts(concepts_text) else None
    concepts = [Concept(c.target, c.synonyms, anchor or c.anchor) for c in preset.concepts]
    for c in typed.concepts if typed else ():
        phrases = {p.lower() for p in c.phrases}
        match = next((i for i, p in enumerate(concepts) if phrases & {x.lower() for x in p.phrases}), None)
        if match is None:
            concepts.append(c)
        else:
            known = concepts[match]
            extra = tuple(s for s in c.phrases if s.lower() not in {x.lower() for x in known.phrases})
            concepts[match] = Concept(known.target, known.synonyms + extra, known.anchor)
    erased = [p for c in concepts for p in c.phrases]
    suggested = [p for p in preset.preserve if not any(_names(p, phrase) for phrase in erased)]
    typed_preserve = [p.strip() for p in preserve_text.replace("\n", ",").split(",")]
    return make_request(concepts, suggested + typed_preserve)


def _has_concepts(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("#") for line in text.splitlines())


def _names(text: str, phrase: str) -> bool:
    """Whether `text` names `phrase` as whole words, ignoring case."""
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None
