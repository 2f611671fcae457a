"""The fine-tuning's loss curve as an IMAGE, drawn with PIL (no plotting library needed)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = {"erase": (220, 80, 60), "adversarial": (240, 170, 40), "preserve": (70, 140, 220), "gate": (120, 200, 120),
          "total": (230, 230, 230)}


def loss_curve_image(history: list[dict[str, float]], width: int = 512, height: int = 256) -> torch.Tensor:
    """`[1, H, W, 3]` float image: each loss against the step, log scale, with a legend."""
    image = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 40, 10, width - 10, height - 30
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    series = {k: [math.log10(max(h[k], 1e-12)) for h in history] for k in COLORS if history and k in history[0]}
    values = [v for s in series.values() for v in s]
    if values:
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1
        n = max(len(history) - 1, 1)
        for x, (name, s) in enumerate(series.items()):
            points = [(left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / (hi - lo)) for i, v in enumerate(s)]
            if len(points) > 1:
                draw.line(points, fill=COLORS[name], width=2)
            draw.text((left + 5 + 110 * x, bottom + 8), name, fill=COLORS[name])
        draw.text((2, top), f"1e{hi:.1f}", fill=(160, 160, 160))
        draw.text((2, bottom - 10), f"1e{lo:.1f}", fill=(160, 160, 160))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]
