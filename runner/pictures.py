"""Pictures the demo writes: the before/after grid and the workflows' thumbnails.

The toy model's pictures are 16x16 pixels; they are enlarged by whole factors with nearest-
neighbour sampling, so every pixel stays a sharp square.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (32, 32, 36)
TEXT = (230, 230, 230)
DIM = (150, 150, 160)


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: the same on every machine


def enlarge(image: Image.Image, factor: int) -> Image.Image:
    return image.convert("RGB").resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


@dataclass
class Row:
    """One line of the grid: a label (first line bold-ish, the rest dimmer) and two sets of pictures."""

    label: list[str]
    before: list[Image.Image]
    after: list[Image.Image]


def before_after_grid(rows: list[Row], scale: int = 8, labels: bool = True, gap: int = 8) -> Image.Image:
    """Rows of pictures, the base model's on the left and the erased model's on the right, each
    enlarged `scale` times; with `labels`, a label column and the two column titles."""
    side = max(im.width for row in rows for im in row.before + row.after) * scale
    per_side = max(max(len(row.before), len(row.after)) for row in rows)
    block = per_side * side + (per_side - 1) * gap // 2
    label_w, head_h, text = (330, 36, font(17)) if labels else (0, 0, None)
    pad = gap * 2 if labels else gap
    width = label_w + 2 * block + 3 * pad
    height = head_h + len(rows) * (side + gap) + pad
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    left = [label_w + pad, label_w + 2 * pad + block]
    if labels:
        for x, title in zip(left, ("before: base model", "after: erased model")):
            draw.text((x, 8), title, fill=TEXT, font=text)
    for r, row in enumerate(rows):
        y = head_h + pad // 2 + r * (side + gap)
        if labels:
            for i, line in enumerate(row.label):
                draw.text((pad, y + 6 + i * 24), line, fill=TEXT if i == 0 else DIM, font=text if i == 0 else font(15))
        for x0, images in zip(left, (row.before, row.after)):
            for i, im in enumerate(images):
                grid.paste(enlarge(im, scale), (x0 + i * (side + gap // 2), y))
    return grid


def thumbnail(images: list[Image.Image], texts: list[str], caption: str, side: int = 512) -> Image.Image:
    """A square card: the images stacked and enlarged by the largest whole factor that fits
    (or, without images, the texts), with a caption along the bottom."""
    card = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(card)
    caption_h = 34
    box = side - 2 * 16, side - caption_h - 2 * 16
    if images:
        gap = 4
        w = max(im.width for im in images)
        h = sum(im.height for im in images) + gap * (len(images) - 1)
        factor = max(1, min(box[0] // w, (box[1] - gap * len(images)) // h))
        y = 16 + (box[1] - (h * factor + gap * (len(images) - 1))) // 2
        for im in images:
            big = enlarge(im, factor)
            card.paste(big, ((side - big.width) // 2, y))
            y += big.height + gap
    else:
        y, text = 24, font(18)
        for line in (line for t in texts for line in t.splitlines()):
            for part in _wrap(line, text, box[0]):
                draw.text((16, y), part, fill=TEXT, font=text)
                y += 26
            y += 10
    draw.text((16, side - caption_h + 6), caption, fill=DIM, font=font(16))
    return card


def _wrap(line: str, text: ImageFont.FreeTypeFont, width: int) -> list[str]:
    words, out = line.split(), [""]
    for word in words:
        trial = f"{out[-1]} {word}".strip()
        if text.getlength(trial) <= width or not out[-1]:
            out[-1] = trial
        else:
            out.append(word)
    return out
