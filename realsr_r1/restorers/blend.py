"""Candidates from several experts' outputs: which mixes to make, the fidelity dial, pixel blends,
and the crops a chooser scores them on (chooser.py picks among them by a reward).

Pixel blends, not weight blends: the experts were trained apart, so interpolating their weights
(DNI) is not clean, while a blend of outputs moves evenly between their looks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..imageio import to_float

SCORE_CROP = 128  # input pixels a side per scored crop: 512² outputs at ×4, NIQE's sweet spot
SCORE_CROPS = 4


@dataclass(frozen=True)
class Candidate:
    """One mix of the experts' outputs: weights (summing to 1) in expert order, and its label."""

    label: str
    weights: tuple[float, ...]


def candidates(experts: list[str], blends: list[float]) -> list[Candidate]:
    """Each expert alone, then `blends` weights between each expert and the next (w of the next)."""
    n = len(experts)
    out = []
    for i in range(n):
        w = [0.0] * n
        w[i] = 1.0
        out.append(Candidate(experts[i], tuple(w)))
        if i + 1 < n:
            for b in blends:
                if 0 < b < 1:
                    w = [0.0] * n
                    w[i], w[i + 1] = 1 - b, b
                    out.append(Candidate(f"{experts[i]} {1 - b:.2f} + {experts[i + 1]} {b:.2f}", tuple(w)))
    return out


def dial(n_experts: int, fidelity: float) -> tuple[float, ...]:
    """The weights the fidelity dial means: 0 = the first (most natural-looking) expert, 1 = the last
    (most faithful), in between a linear path along the experts in their order."""
    if not 0 <= fidelity <= 1:
        raise ValueError(f"fidelity must be auto or a number in [0, 1], got {fidelity}")
    pos = fidelity * (n_experts - 1)
    i = min(int(math.floor(pos)), n_experts - 2) if n_experts > 1 else 0
    w = [0.0] * n_experts
    if n_experts == 1:
        return (1.0,)
    w[i], w[i + 1] = 1 - (pos - i), pos - i
    return tuple(w)


def mix(images: list[np.ndarray], weights: tuple[float, ...], out_dtype=None) -> np.ndarray:
    """The weighted sum of equally shaped images, in `out_dtype` (default: the first's; integers rounded).
    Works in row chunks, so a large output needs no float copy of its own size."""
    out_dtype = np.dtype(out_dtype or images[0].dtype)
    used = [(im, w) for im, w in zip(images, weights) if w != 0]
    if len(used) == 1 and used[0][1] == 1 and used[0][0].dtype == out_dtype:
        return used[0][0]
    out = np.empty(images[0].shape, out_dtype)
    for r in range(0, out.shape[0], 256):
        acc = sum(to_float(im[r:r + 256]) * np.float32(w) for im, w in used)
        if out_dtype.kind == "f":
            out[r:r + 256] = acc
        else:
            out[r:r + 256] = np.clip(acc, 0, 1) * np.iinfo(out_dtype).max + 0.5
    return out


def crop_boxes(width: int, height: int, crop: int = SCORE_CROP, count: int = SCORE_CROPS) -> list[tuple[int, int, int, int]]:
    """Input-pixel boxes (x0, y0, x1, y1) to score on: the whole image when it fits one crop, else up
    to `count` crops spread evenly over a grid (deterministic: the same image is scored the same way)."""
    cw, ch = min(crop, width), min(crop, height)
    nx = min(max(1, math.ceil(width / crop)), max(1, round(math.sqrt(count))))
    ny = min(max(1, math.ceil(height / crop)), max(1, count // nx))

    def starts(length: int, size: int, n: int) -> list[int]:
        return [round(i * (length - size) / (n - 1)) if n > 1 else (length - size) // 2 for i in range(n)]

    return [(x, y, x + cw, y + ch) for y in starts(height, ch, ny) for x in starts(width, cw, nx)]
