"""ACE Inspect Prompt's picture: each prompt's gates as a grid, one row per token, one column per
concept slot, drawn with PIL (no plotting library needed)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

CELL_W, CELL_H, LABEL_W, PAD = 44, 16, 130, 8
BACKGROUND, TEXT, DIM = (24, 24, 24), (225, 225, 225), (140, 140, 140)
SHUT, OPEN = np.array([40, 44, 52]), np.array([228, 87, 74])  # gate 0 -> 1


def gate_map_image(tables: list[tuple[str, list[tuple[str, torch.Tensor]]]], names: list[str]) -> torch.Tensor:
    """`[1, H, W, 3]` float image: per prompt, its rows of (token label, gate of each slot)."""
    width = LABEL_W + CELL_W * len(names) + 2 * PAD
    legend_h = 14 * len(names) + PAD
    height = PAD + legend_h + sum(2 * CELL_H + CELL_H * len(rows) + PAD for _, rows in tables)
    image = Image.new("RGB", (max(width, 360), height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = PAD
    for k, name in enumerate(names):
        draw.text((PAD, y), f"[{k + 1}] {name}"[:60], fill=DIM)
        y += 14
    y += PAD
    for prompt, rows in tables:
        draw.text((PAD, y), prompt[:70], fill=TEXT)
        y += CELL_H
        for k in range(len(names)):
            draw.text((PAD + LABEL_W + CELL_W * k + 10, y), f"[{k + 1}]", fill=DIM)
        y += CELL_H
        for label, gates in rows:
            draw.text((PAD, y + 2), label[:18], fill=TEXT)
            for k, g in enumerate(gates.tolist()):
                x = PAD + LABEL_W + CELL_W * k
                colour = tuple(int(c) for c in SHUT + (OPEN - SHUT) * min(max(g, 0.0), 1.0))
                draw.rectangle([x, y, x + CELL_W - 2, y + CELL_H - 2], fill=colour)
                draw.text((x + 8, y + 2), f"{g:.2f}", fill=TEXT)
            y += CELL_H
        y += PAD
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]
