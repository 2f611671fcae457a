"""The report's charts, drawn with PIL (no plotting library needed): a bar chart and a line chart.
(Its sample grids are `runner.pictures.grid`.)"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (215, 215, 215)
PALETTE = [(52, 101, 164), (204, 0, 0), (78, 154, 6), (245, 121, 0), (117, 80, 123), (193, 125, 17), (85, 87, 83),
           (32, 74, 135)]


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
