"""The benchmark's prompt files: which words an erasure request names, which it leaves out, and
templates the toy model never saw in training (`prompts/heldout.json`, or any file in its schema,
given with `--prompts`).

The erasure methods never read these files: a method receives only the request (the words the
file's "request" names) and the model. The files say what to measure.

Prompt splits of a concept:
  train     every learned synonym in the training templates (the untouched model's check);
  request   the request's words in the training templates (Acc_e);
  left_out  the words the request leaves out, in the training templates (half of Acc_g);
  heldout   every learned synonym in the file's templates, which training never saw (the other half).
"""
from __future__ import annotations

import json
from pathlib import Path

from toy import world

HELDOUT = Path(__file__).resolve().parent / "prompts" / "heldout.json"
SPLITS = ("train", "request", "left_out", "heldout")


def load_prompt_file(path: Path | str | None = None) -> dict:
    """A prompt file (default `prompts/heldout.json`), checked so that a bad file fails here with a
    message saying what to fix."""
    path = Path(path) if path else HELDOUT
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"prompt file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"prompt file {path} is not valid JSON: {e}") from None
    check_prompt_file(data, str(path))
    return data


def check_prompt_file(data, where: str = "the prompt file") -> None:
    """Raise ValueError unless `data` has heldout.json's schema and covers every concept of the world."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with templates, entity_templates, request, left_out")
    for key in ("templates", "entity_templates"):
        templates = data.get(key)
        if not (isinstance(templates, list) and templates and all(isinstance(t, str) and "{x}" in t for t in templates)):
            raise ValueError(f"{where}: '{key}' must be a non-empty list of strings, each with {{x}} for the concept")
    names = [name for _, name in world.all_concepts()]
    for key in ("request", "left_out"):
        words = data.get(key)
        if not isinstance(words, dict):
            raise ValueError(f"{where}: '{key}' must map every concept of the world to a list of words")
        missing = [n for n in names if n not in words]
        if missing:
            raise ValueError(f"{where}: '{key}' has no words for {', '.join(missing)}")
        bad = [n for n in names if not (isinstance(words[n], list) and words[n]
                                        and all(isinstance(w, str) and w.strip() for w in words[n]))]
        if bad:
            raise ValueError(f"{where}: '{key}' must give each concept a non-empty list of words; see {', '.join(bad)}")


def split_prompts(kind: str, name: str, split: str, prompt_file: dict) -> list[world.Prompt]:
    """The prompts of one concept in one split (see the module's docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; choose one of {SPLITS}")
    if split == "train":
        return world.concept_prompts(kind, name)
    if split == "heldout":
        templates = prompt_file["entity_templates" if kind == "entity" else "templates"]
        return world.concept_prompts(kind, name, templates=templates)
    return world.concept_prompts(kind, name, words=prompt_file[split][name])


def kept_request_words(erased: list[str], prompt_file: dict) -> list[str]:
    """The words a benchmark request erasing `erased` keeps: every other concept's first request word."""
    return [prompt_file["request"][name][0] for _, name in world.all_concepts() if name not in erased]
