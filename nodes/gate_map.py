"""ACE Inspect Prompt's picture: each prompt's gates as a block, one row per token and one column
per concept gate, the blocks side by side in a square-ish grid, drawn with PIL (no plotting
library needed)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

CELL_W, CELL_H, LABEL_W, PAD, GAP = 40, 16, 96, 8, 16
BACKGROUND, TEXT, DIM = (24, 24, 24), (225, 225, 225), (140, 140, 140)
SHUT, OPEN = np.array([40, 44, 52]), np.array([228, 87, 74])  # gate 0 -> 1


def gate_map_image(tables: list[tuple[str, list[tuple[str, torch.Tensor]]]], names: list[str]) -> torch.Tensor:
    """`[1, H, W, 3]` float image: per prompt, its rows of (token label, each gate)."""
    block_w = LABEL_W + CELL_W * len(names)
    columns = math.ceil(math.sqrt(len(tables)))
    block_h = [2 * CELL_H + CELL_H * len(rows) for _, rows in tables]
    row_h = [max(block_h[i:i + columns]) for i in range(0, len(tables), columns)]
    legend_h = 14 * len(names) + PAD
    width = 2 * PAD + columns * block_w + (columns - 1) * GAP
    height = 2 * PAD + legend_h + sum(row_h) + GAP * (len(row_h) - 1)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for k, name in enumerate(names):
        draw.text((PAD, PAD + 14 * k), _fit(draw, f"[{k + 1}] {name}", width - 2 * PAD), fill=DIM)
    for n, (prompt, rows) in enumerate(tables):
        x = PAD + (n % columns) * (block_w + GAP)
        y = PAD + legend_h + sum(row_h[: n // columns]) + GAP * (n // columns)
        draw.text((x, y), _fit(draw, prompt, block_w), fill=TEXT)
        for k in range(len(names)):
            draw.text((x + LABEL_W + CELL_W * k + 8, y + CELL_H), f"[{k + 1}]", fill=DIM)
        for r, (label, gates) in enumerate(rows):
            top = y + CELL_H * (2 + r)
            draw.text((x, top + 2), _fit(draw, label, LABEL_W - 4), fill=TEXT)
            for k, g in enumerate(gates.tolist()):
                left = x + LABEL_W + CELL_W * k
                colour = tuple(int(c) for c in SHUT + (OPEN - SHUT) * min(max(g, 0.0), 1.0))
                draw.rectangle([left, top, left + CELL_W - 2, top + CELL_H - 2], fill=colour)
                draw.text((left + 6, top + 2), f"{g:.2f}", fill=TEXT)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def _fit(draw: ImageDraw.ImageDraw, text: str, width: float) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
