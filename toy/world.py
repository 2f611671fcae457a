"""The toy world: procedural 16x16 pictures of shapes, colours, fill styles and made-up named entities.

Every image is a 16x16 RGB picture of one shape, nearly centred on a plain grey background.
A shape has an object (its outline), a colour and a style (how it is filled). A named entity is a
made-up name bound to one object + colour + style, the world's analogue of a celebrity.

Rendering is deterministic: the same specification and seed give the same pixels on every machine
(the only randomness is a `torch.Generator` seeded by the caller). Images are float tensors in
[0, 1], shaped (3, 16, 16) for one image and (B, 3, 16, 16) for a batch.

The words the toy model learns for each concept, and the templates it learns them in, are its
vocabulary (`toy/vocabulary.json`). The benchmark's own prompt files (rewordings and templates
training never saw) live with the benchmark, in `benchmark/prompts/`.
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

VOCABULARY = Path(__file__).resolve().parent / "vocabulary.json"


@dataclass(frozen=True)
class Spec:
    """What one image shows."""

    object: str
    colour: str
    style: str


def load_vocabulary() -> dict:
    """The concept vocabulary and training templates (`toy/vocabulary.json`)."""
    return json.loads(VOCABULARY.read_text())


def entity_specs() -> dict[str, Spec]:
    """Each made-up named entity and the one object + colour + style it always looks like."""
    return {name: Spec(**e["looks_like"]) for name, e in load_vocabulary()["entities"].items()}


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
    c = concepts or load_vocabulary()
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


GROUPS = {"object": "objects", "colour": "colours", "style": "styles", "entity": "entities"}


def learned_words(kind: str, name: str, vocabulary: dict | None = None) -> list[str]:
    """Every word the toy model learned for a concept (its synonyms in the vocabulary)."""
    return (vocabulary or load_vocabulary())[GROUPS[kind]][name]["synonyms"]


def concept_prompts(kind: str, name: str, words: list[str] | None = None, templates: list[str] | None = None,
                    vocabulary: dict | None = None) -> list[Prompt]:
    """Prompts that ask for one concept, for measuring whether a model renders it.

    kind is 'object', 'colour', 'style' or 'entity'; `words` name the concept (default: every
    learned synonym) in `templates` (default: the training templates of its kind, '{a}' the
    article and '{x}' the noun phrase). The other attributes are filled in so that each prompt
    asks for a definite picture of the concept.
    """
    c = vocabulary or load_vocabulary()
    words = words or learned_words(kind, name, c)
    if kind == "entity":
        look = c["entities"][name]["looks_like"]
        return [Prompt(t.replace("{x}", s), look["object"], look["colour"], look["style"], name)
                for s in words for t in (templates or c["entity_templates"])]
    out = []
    for i, t in enumerate(templates or c["templates"]):
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
    c = load_vocabulary()
    return ([("object", o) for o in OBJECTS] + [("colour", k) for k in COLOURS]
            + [("style", s) for s in STYLES] + [("entity", e) for e in sorted(c["entities"])])


CHANCE = {"object": 1 / len(OBJECTS), "colour": 1 / len(COLOURS), "style": 1 / len(STYLES),
          "entity": 1 / (len(OBJECTS) * len(COLOURS) * len(STYLES))}
"""Chance level of the classifier's verdict for a concept of each kind (entity: all three right)."""
