"""The benchmark's procedural image world: shapes, colours, fill styles and made-up named entities.

Every image is a 16x16 RGB picture of one shape, nearly centred on a plain grey background.
A shape has an object (its outline), a colour and a style (how it is filled). A named entity is a
made-up name bound to one object + colour + style, the world's analogue of a celebrity.

Rendering is deterministic: the same specification and seed give the same pixels on every machine
(the only randomness is a `torch.Generator` seeded by the caller). Images are float tensors in
[0, 1], shaped (3, 16, 16) for one image and (B, 3, 16, 16) for a batch.

The words a text-to-image model learns for each concept, and the templates it learns them in,
live in `benchmark/prompts/concepts.json`; `benchmark/prompts/heldout.json` holds rewordings and
templates that training never sees (the "generality" prompts of an erasure benchmark).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

RESOLUTION = 16
SUPERSAMPLE = 4  # sub-pixels per pixel side, for anti-aliased edges

OBJECTS = ["square", "circle", "triangle", "diamond", "cross", "ring", "hourglass", "crescent"]
COLOURS = ["red", "green", "blue", "yellow"]
STYLES = ["solid", "striped", "checkered"]

RGB = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
BACKGROUND = 0.5  # plain mid grey
DARK = 0.3  # the second tone of striped and checkered fills: this fraction of the colour

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


@dataclass(frozen=True)
class Spec:
    """What one image shows."""

    object: str
    colour: str
    style: str


def load_concepts() -> dict:
    """The concept vocabulary and training templates (`prompts/concepts.json`)."""
    return json.loads((PROMPTS_DIR / "concepts.json").read_text())


def load_heldout(path: Path | str | None = None) -> dict:
    """Templates and rewordings never seen in training (`prompts/heldout.json`, or another file in
    its schema), checked so that a bad file fails here with a message saying what to fix."""
    path = Path(path) if path else PROMPTS_DIR / "heldout.json"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"prompt file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"prompt file {path} is not valid JSON: {e}") from None
    check_heldout(data, str(path))
    return data


def check_heldout(data, where: str = "the prompt file") -> None:
    """Raise ValueError unless `data` has heldout.json's schema and covers every concept of the world."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with templates, entity_templates, request, left_out")
    for key, placeholder in (("templates", "{x}"), ("entity_templates", "{x}")):
        templates = data.get(key)
        if not (isinstance(templates, list) and templates and all(isinstance(t, str) and placeholder in t for t in templates)):
            raise ValueError(f"{where}: '{key}' must be a non-empty list of strings, each with {placeholder} for the concept")
    names = [name for _, name in all_concepts()]
    for key in ("request", "left_out"):
        words = data.get(key)
        if not isinstance(words, dict):
            raise ValueError(f"{where}: '{key}' must map every concept of the world to a list of words")
        missing = [n for n in names if n not in words]
        if missing:
            raise ValueError(f"{where}: '{key}' has no words for {', '.join(missing)}")
        bad = [n for n in names if not (isinstance(words[n], list) and words[n] and all(isinstance(w, str) and w.strip() for w in words[n]))]
        if bad:
            raise ValueError(f"{where}: '{key}' must give each concept a non-empty list of words; see {', '.join(bad)}")


def entity_specs() -> dict[str, Spec]:
    """Each made-up named entity and the one object + colour + style it always looks like."""
    return {name: Spec(**e["looks_like"]) for name, e in load_concepts()["entities"].items()}


# --- rendering -----------------------------------------------------------------------------------

def _object_mask(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-test of an object in shape coordinates (u right, v up, the shape fills about [-1, 1])."""
    r = torch.sqrt(u * u + v * v)
    if name == "square":
        return (u.abs() <= 0.8) & (v.abs() <= 0.8)
    if name == "circle":
        return r <= 0.92
    if name == "triangle":  # pointing up
        return (v >= -0.8) & (u.abs() <= 0.55 * (0.95 - v))
    if name == "diamond":
        return u.abs() + v.abs() <= 1.0
    if name == "cross":
        return ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
    if name == "ring":
        return (r <= 0.95) & (r >= 0.5)
    if name == "hourglass":  # two triangles meeting at their tips, top and bottom
        return (u.abs() <= v.abs() * 0.9 + 0.08) & (v.abs() <= 0.9)
    if name == "crescent":  # opening to the right
        return (r <= 0.95) & ((u - 0.45) ** 2 + v * v >= 0.72 ** 2)
    raise ValueError(f"unknown object {name!r}; the world has {OBJECTS}")


def _style_tone(style: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 where the fill shows the full colour, DARK where it shows the second tone (pixel grid)."""
    full = torch.ones_like(x)
    if style == "solid":
        return full
    if style == "striped":  # horizontal bands two pixels high
        return torch.where((torch.floor(y / 2) % 2) == 0, full, full * DARK)
    if style == "checkered":  # two-pixel checks
        return torch.where(((torch.floor(x / 2) + torch.floor(y / 2)) % 2) == 0, full, full * DARK)
    raise ValueError(f"unknown style {style!r}; the world has {STYLES}")


def render(spec: Spec, generator: torch.Generator) -> torch.Tensor:
    """One image of `spec`, (3, 16, 16) in [0, 1]; position, size and tint drawn from `generator`."""
    n = RESOLUTION * SUPERSAMPLE
    # Jitter: whole-pixel offsets of the centre (so fills stay on the pixel grid), continuous size.
    dx, dy = (torch.randint(-1, 2, (2,), generator=generator)).tolist()
    radius = 6.0 + float(torch.rand((), generator=generator)) * 1.0  # pixels
    tint = 0.9 + 0.1 * float(torch.rand((), generator=generator))
    centre = RESOLUTION / 2 + torch.tensor([dx, dy], dtype=torch.float32)

    # Sub-pixel centres in pixel units; y grows downwards as in the image.
    s = (torch.arange(n, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    y, x = torch.meshgrid(s, s, indexing="ij")
    u = (x - centre[0]) / radius
    v = -(y - centre[1]) / radius
    inside = _object_mask(spec.object, u, v).float()
    tone = _style_tone(spec.style, torch.floor(x) - centre[0] + 100, torch.floor(y) - centre[1] + 100)

    colour = torch.tensor(RGB[spec.colour]).view(3, 1, 1) * tint
    fine = BACKGROUND * (1 - inside) + colour * (tone * inside)
    return torch.nn.functional.avg_pool2d(fine.unsqueeze(0), SUPERSAMPLE).squeeze(0).clamp(0, 1)


def render_seeded(spec: Spec, seed: int) -> torch.Tensor:
    """`render` with a generator seeded by `seed`: the same picture everywhere."""
    return render(spec, torch.Generator().manual_seed(seed))


def render_batch(specs: list[Spec], generator: torch.Generator) -> torch.Tensor:
    """(B, 3, 16, 16) images of `specs`, drawn one after another from `generator`."""
    return torch.stack([render(s, generator) for s in specs])


# --- prompts -------------------------------------------------------------------------------------

def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def describe(object_word: str | None, colour_word: str | None = None, style_word: str | None = None) -> str:
    """The noun phrase for a shape, e.g. 'striped red triangle' (without an article)."""
    return " ".join(w for w in (style_word, colour_word, object_word) if w)


def fill_template(template: str, phrase: str) -> str:
    """Put a noun phrase into a template: '{a}' becomes 'a' or 'an', '{x}' the phrase."""
    return template.replace("{a}", _article(phrase)).replace("{x}", phrase)


@dataclass(frozen=True)
class Prompt:
    """A prompt and what it asks for (None: the prompt leaves that attribute open)."""

    text: str
    object: str | None
    colour: str | None
    style: str | None
    entity: str | None = None


def sample_training_prompt(rng: random.Random, concepts: dict | None = None,
                           p_colour: float = 0.75, p_style: float = 0.5, p_entity: float = 0.08) -> Prompt:
    """One random training prompt: every learned synonym and training template is fair game."""
    c = concepts or load_concepts()
    if rng.random() < p_entity:
        name = rng.choice(sorted(c["entities"]))
        e = c["entities"][name]
        text = rng.choice(c["entity_templates"]).replace("{x}", rng.choice(e["synonyms"]))
        look = e["looks_like"]
        return Prompt(text, look["object"], look["colour"], look["style"], name)
    obj = rng.choice(OBJECTS)
    col = rng.choice(COLOURS) if rng.random() < p_colour else None
    sty = rng.choice(STYLES) if rng.random() < p_style else None
    phrase = describe(rng.choice(c["objects"][obj]["synonyms"]),
                      rng.choice(c["colours"][col]["synonyms"]) if col else None,
                      rng.choice(c["styles"][sty]["synonyms"]) if sty else None)
    return Prompt(fill_template(rng.choice(c["templates"]), phrase), obj, col, sty)


def complete_spec(p: Prompt, rng: random.Random) -> Spec:
    """The picture for a prompt: attributes the prompt leaves open are drawn at random."""
    return Spec(p.object or rng.choice(OBJECTS), p.colour or rng.choice(COLOURS), p.style or rng.choice(STYLES))


SPLITS = ("train", "request", "left_out", "heldout")


def concept_prompts(kind: str, name: str, split: str = "train", concepts: dict | None = None,
                    heldout: dict | None = None) -> list[Prompt]:
    """Prompts that ask for one concept, for measuring whether a model renders it.

    kind is 'object', 'colour', 'style' or 'entity'. split:
      'train'    every learned synonym in the training templates;
      'request'  only the words an erasure request names (heldout.json "request");
      'left_out' only the learned synonyms the request leaves out (heldout.json "left_out");
      'heldout'  every learned synonym in templates training never saw.
    Other attributes are filled in so that each prompt asks for a definite picture of the concept.
    """
    c = concepts or load_concepts()
    h = heldout or load_heldout()
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; choose one of {SPLITS}")
    group = {"object": "objects", "colour": "colours", "style": "styles", "entity": "entities"}[kind]
    words = {"request": h["request"][name], "left_out": h["left_out"][name]}.get(split, c[group][name]["synonyms"])
    if kind == "entity":
        look = c["entities"][name]["looks_like"]
        templates = h["entity_templates"] if split == "heldout" else c["entity_templates"]
        return [Prompt(t.replace("{x}", s), look["object"], look["colour"], look["style"], name)
                for s in words for t in templates]
    templates = h["templates"] if split == "heldout" else c["templates"]
    out = []
    for i, t in enumerate(templates):
        for j, w in enumerate(words):
            k = i * len(words) + j
            obj = name if kind == "object" else OBJECTS[k % len(OBJECTS)]
            col = name if kind == "colour" else (COLOURS[k % len(COLOURS)] if k % 3 else None)
            sty = name if kind == "style" else (STYLES[(k // 2) % len(STYLES)] if k % 2 else None)
            ow = w if kind == "object" else c["objects"][obj]["synonyms"][0]
            cw = w if kind == "colour" else (c["colours"][col]["synonyms"][0] if col else None)
            sw = w if kind == "style" else (c["styles"][sty]["synonyms"][0] if sty else None)
            out.append(Prompt(fill_template(t, describe(ow, cw, sw)), obj, col, sty))
    return out


def all_concepts() -> list[tuple[str, str]]:
    """(kind, name) of every concept in the world."""
    c = load_concepts()
    return ([("object", o) for o in OBJECTS] + [("colour", k) for k in COLOURS]
            + [("style", s) for s in STYLES] + [("entity", e) for e in sorted(c["entities"])])


CHANCE = {"object": 1 / len(OBJECTS), "colour": 1 / len(COLOURS), "style": 1 / len(STYLES),
          "entity": 1 / (len(OBJECTS) * len(COLOURS) * len(STYLES))}
"""Chance level of the classifier's verdict for a concept of each kind (entity: all three right)."""
