"""The report's pictures, drawn with PIL (no plotting library needed): labelled sample grids, a bar
chart and a line chart."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (215, 215, 215)
PALETTE = [(52, 101, 164), (204, 0, 0), (78, 154, 6), (245, 121, 0), (117, 80, 123), (193, 125, 17), (85, 87, 83),
           (32, 74, 135)]


def _tile(image: torch.Tensor, scale: int) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    tile = Image.fromarray(array)
    return tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)


def sample_grid(rows: list[tuple[str, list[torch.Tensor]]], columns: list[str], path: Path, scale: int = 4) -> None:
    """rows: (label, one (3, H, W) image per column); nearest-neighbour enlarged, labelled."""
    h, w = rows[0][1][0].shape[-2:]
    cell_w, cell_h = max(w * scale + 8, 84), h * scale + 8
    label_w, head_h = 230, 24
    canvas = Image.new("RGB", (label_w + cell_w * len(columns), head_h + cell_h * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((label_w + j * cell_w + 4, 6), name, fill=INK)
    for i, (label, images) in enumerate(rows):
        y = head_h + i * cell_h
        draw.text((4, y + cell_h // 2 - 6), label, fill=INK)
        for j, image in enumerate(images):
            canvas.paste(_tile(image, scale), (label_w + j * cell_w + 4, y + 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _frame(draw, box, y_range, y_label: str, title: str):
    left, top, right, bottom = box
    lo, hi = y_range
    for k in range(6):
        value = lo + (hi - lo) * k / 5
        y = bottom - (bottom - top) * k / 5
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((4, y - 6), f"{value:.2f}", fill=INK)
    draw.rectangle(box, outline=INK)
    draw.text((left, 6), title, fill=INK)
    draw.text((left, bottom + 22), y_label, fill=INK)


def bar_chart(values: dict[str, float], path: Path, title: str, y_label: str = "", y_range=(0.0, 1.0)) -> None:
    width, height = 120 + 90 * len(values), 300
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    box = (50, 30, width - 20, height - 50)
    _frame(draw, box, y_range, y_label, title)
    left, top, right, bottom = box
    slot = (right - left) / len(values)
    for i, (name, v) in enumerate(values.items()):
        x0 = left + i * slot + slot * 0.2
        y = bottom - (bottom - top) * (min(max(v, y_range[0]), y_range[1]) - y_range[0]) / (y_range[1] - y_range[0])
        draw.rectangle([x0, y, x0 + slot * 0.6, bottom], fill=PALETTE[i % len(PALETTE)])
        draw.text((x0, y - 14), f"{v:.2f}", fill=INK)
        draw.text((left + i * slot + 2, bottom + 6), name, fill=INK)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def line_chart(series: dict[str, list[tuple[float, float]]], path: Path, title: str, x_label: str = "",
               y_range=(0.0, 1.0)) -> None:
    width, height = 560, 320
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    box = (50, 30, width - 160, height - 50)
    _frame(draw, box, y_range, x_label, title)
    left, top, right, bottom = box
    xs = sorted({x for points in series.values() for x, _ in points})
    for x in xs:
        px = left + (right - left) * (xs.index(x) + 0.5) / len(xs)
        draw.text((px - 6, bottom + 6), f"{x:g}", fill=INK)

    def at(x, y):
        px = left + (right - left) * (xs.index(x) + 0.5) / len(xs)
        py = bottom - (bottom - top) * (min(max(y, y_range[0]), y_range[1]) - y_range[0]) / (y_range[1] - y_range[0])
        return px, py

    for i, (name, points) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [at(x, y) for x, y in points]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((right + 10, top + 16 * i), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
