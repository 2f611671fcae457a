"""Pictures: labelled grids of renders (the demo's and the command line's before/after grids, the
benchmark's one column per method) and the workflows' thumbnails.

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


def to_image(picture) -> Image.Image:
    """A PIL picture from a PIL picture or a tensor in 0..1, (3, H, W) or (H, W, 3)."""
    if isinstance(picture, Image.Image):
        return picture.convert("RGB")
    array = picture.detach().float().cpu().clamp(0, 1)
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.permute(1, 2, 0)
    return Image.fromarray((array * 255).round().byte().numpy(), "RGB")


def fit(image: Image.Image, side: int) -> Image.Image:
    """`image` scaled to `side` pixels wide: small pictures (the toy's 16 px) by whole pixels,
    large renders smoothly."""
    if image.width == side:
        return image
    if side % image.width == 0:
        return enlarge(image, side // image.width)
    return image.convert("RGB").resize((side, side * image.height // image.width), Image.Resampling.LANCZOS)


@dataclass
class Row:
    """One line of a grid: a label (first line bright, the rest dimmer) and the pictures of each column."""

    label: list[str]
    columns: list[list]  # per column, its pictures (PIL images or tensors in 0..1)


def grid(rows: list[Row], titles: list[str], cell: int | None = None, scale: int = 8, labels: bool = True,
         gap: int = 8, label_width: int = 330) -> Image.Image:
    """Rows of pictures in titled columns (before | after, or one column per method), every picture
    `cell` pixels wide (default: the largest picture enlarged `scale` times); with `labels`, a label
    column and the column titles."""
    rows = [Row(r.label, [[to_image(p) for p in column] for column in r.columns]) for r in rows]
    pictures = [p for r in rows for column in r.columns for p in column]
    side = cell or max(p.width for p in pictures) * scale
    per_column = max(len(column) for r in rows for column in r.columns)
    block = per_column * side + (per_column - 1) * gap // 2
    label_w, head_h, text = (label_width, 36, font(17)) if labels else (0, 0, None)
    pad = gap * 2 if labels else gap
    n_columns = max(len(r.columns) for r in rows)
    width = label_w + n_columns * (block + pad) + pad
    height = head_h + len(rows) * (side + gap) + pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    left = [label_w + pad + c * (block + pad) for c in range(n_columns)]
    if labels:
        for x, title in zip(left, titles):
            draw.text((x, 8), title, fill=TEXT, font=text)
    for r, row in enumerate(rows):
        y = head_h + pad // 2 + r * (side + gap)
        if labels:
            for i, line in enumerate(row.label):
                draw.text((pad, y + 6 + i * 24), line, fill=TEXT if i == 0 else DIM, font=text if i == 0 else font(15))
        for x0, column in zip(left, row.columns):
            for i, picture in enumerate(column):
                canvas.paste(fit(picture, side), (x0 + i * (side + gap // 2), y))
    return canvas


BEFORE_AFTER = ["before: base model", "after: erased model"]


def thumbnail(images: list[Image.Image], texts: list[str], caption: str, side: int = 512) -> Image.Image:
    """A square card: the images stacked and enlarged by the largest whole factor that fits, or
    shrunk when they do not fit (without images, the texts), with a caption along the bottom."""
    card = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(card)
    caption_h = 34
    box = side - 2 * 16, side - caption_h - 2 * 16
    if images:
        gap = 4
        w = max(im.width for im in images)
        h = sum(im.height for im in images) + gap * (len(images) - 1)
        scale = min(box[0] / w, (box[1] - gap * len(images)) / h)
        if scale >= 1:  # enlarged by a whole factor: crisp pixels
            sized = [enlarge(im, int(scale)) for im in images]
            used = h * int(scale) + gap * (len(images) - 1)
        else:  # larger than the card: shrunk
            sized = [im.convert("RGB").resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                                              Image.Resampling.LANCZOS) for im in images]
            used = sum(im.height for im in sized) + gap * (len(sized) - 1)
        y = 16 + (box[1] - used) // 2
        for big in sized:
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
