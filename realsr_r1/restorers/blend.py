"""Candidates from several experts' outputs: which mixes to make, the fidelity dial, pixel blends,
and the crops a chooser scores them on (chooser.py picks among them by a reward).

Pixel blends, not weight blends: the experts were trained apart, so interpolating their weights
(DNI) is not clean, while a blend of outputs moves evenly between their looks.

Region blends (`gates`): the faithful expert (DF2K) keeps the camera's noise, which shows in flat
regions and costs there in every no-reference metric, while in textured regions it restores
texture the natural-looking expert (x4plus) smooths away. So a gated candidate takes the next
expert where the first one's output has local contrast (the luma's standard deviation over
GATE_BLOCK² blocks) above a threshold t, ramping in over t … 2.5·t, and keeps the first one where
it is flat. On the 93 DRealSR pairs, gates took most of DF2K's PSNR gain while keeping x4plus's
NIQE; a global 50 % blend gained as much PSNR but lost 1.8 NIQE points (README, "Choosing").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..imageio import to_float

SCORE_CROP = 128  # input pixels a side per scored crop: 512² outputs at ×4, NIQE's sweet spot
SCORE_CROPS = 4
GATE_BLOCK = 8  # output pixels a side of the blocks whose contrast gates a region blend
GATE_RAMP = 1.5  # the next expert's weight ramps from 0 at contrast t to 1 at (1 + GATE_RAMP)·t


@dataclass(frozen=True)
class Candidate:
    """One mix of the experts' outputs: weights (summing to 1) in expert order, and its label; with
    `gate` t, a region blend of expert `base` and the next one (module doc) instead."""

    label: str
    weights: tuple[float, ...]
    gate: float | None = None
    base: int = 0


def candidates(experts: list[str], blends: list[float], gates: list[float] = (),
               alone: set[int] | None = None) -> list[Candidate]:
    """Each expert alone (those at positions in `alone`, default all), then between each expert and
    the next: region blends at `gates` thresholds (high to low: more of the next expert), then pixel
    blends at `blends` weights (w of the next)."""
    n = len(experts)
    out = []
    for i in range(n):
        w = [0.0] * n
        w[i] = 1.0
        if alone is None or i in alone:
            out.append(Candidate(experts[i], tuple(w)))
        if i + 1 < n:
            for t in sorted(gates, reverse=True):
                out.append(Candidate(f"{experts[i + 1]} where {experts[i]} has texture, t {t:g}", tuple(w), t, i))
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


def texture(rgb: np.ndarray) -> np.ndarray:
    """Local contrast: the standard deviation of luma (0..1) over GATE_BLOCK² blocks, one value per
    block (partial blocks at the edges count what they have), computed a band of rows at a time."""
    h, w = rgb.shape[:2]
    b = GATE_BLOCK
    out = np.empty((-(-h // b), -(-w // b)), np.float32)
    luma = np.asarray((0.299, 0.587, 0.114), np.float32)
    for r in range(0, h, 32 * b):
        y = to_float(rgb[r:r + 32 * b])[..., :3] @ luma
        rows = -(-y.shape[0] // b)
        pad = np.pad(y, ((0, rows * b - y.shape[0]), (0, out.shape[1] * b - w)), mode="edge")
        blocks = pad.reshape(rows, b, out.shape[1], b)
        out[r // b:r // b + rows] = blocks.std(axis=(1, 3))
    return out


def gate_map(tex: np.ndarray, t: float) -> np.ndarray:
    """The next expert's weight per block: 0 below contrast t, 1 above (1 + GATE_RAMP)·t, smoothed
    over 3x3 blocks so the blend has no block edges."""
    g = np.clip((tex - t) / (GATE_RAMP * t), 0, 1)
    p = np.pad(g, 1, mode="edge")
    return sum(p[i:i + g.shape[0], j:j + g.shape[1]] for i in range(3) for j in range(3)) / 9


def _upsample(gmap: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows r0..r1, columns c0..c1 of the block map bilinearly upsampled to pixels (block centres)."""
    def axis(a0, a1, n):
        u = np.clip((np.arange(a0, a1) + 0.5) / GATE_BLOCK - 0.5, 0, n - 1)
        i = np.minimum(u.astype(int), n - 2) if n > 1 else np.zeros(a1 - a0, int)
        return i, (u - i).astype(np.float32) if n > 1 else np.zeros(a1 - a0, np.float32)

    yi, yf = axis(r0, r1, gmap.shape[0])
    xi, xf = axis(c0, c1, gmap.shape[1])
    y1, x1 = np.minimum(yi + 1, gmap.shape[0] - 1), np.minimum(xi + 1, gmap.shape[1] - 1)
    top = gmap[yi][:, xi] * (1 - xf) + gmap[yi][:, x1] * xf
    bottom = gmap[y1][:, xi] * (1 - xf) + gmap[y1][:, x1] * xf
    return (top * (1 - yf[:, None]) + bottom * yf[:, None]).astype(np.float32)


def compose(images: list[np.ndarray], cand: Candidate, out_dtype=None, textures: dict | None = None,
            box: tuple[int, int, int, int] | None = None, in_place: bool = False) -> np.ndarray:
    """The candidate's image (or its `box` (x0, y0, x1, y1) in output pixels), in `out_dtype`. A
    region blend reads `textures[base]`, texture() of the base expert's whole output. `in_place`
    writes over an expert's output of that dtype (each row chunk is read before it is written): a
    large image then needs no third output-sized array beside the two experts'."""
    if cand.gate is None:
        if box is not None:
            x0, y0, x1, y1 = box
            images = [None if im is None else im[y0:y1, x0:x1] for im in images]
        return mix(images, cand.weights, out_dtype, in_place)
    a, b = images[cand.base], images[cand.base + 1]
    gmap = gate_map(textures[cand.base], cand.gate)
    x0, y0, x1, y1 = box or (0, 0, a.shape[1], a.shape[0])
    out_dtype = np.dtype(out_dtype or a.dtype)
    if in_place and box is None and a.dtype == out_dtype:
        out = a
    else:
        out = np.empty((y1 - y0, x1 - x0) + a.shape[2:], out_dtype)
    for r in range(y0, y1, 256):
        r1 = min(y1, r + 256)
        m = _upsample(gmap, r, r1, x0, x1)
        m = m[..., None] if a.ndim == 3 else m
        fa, fb = to_float(a[r:r1, x0:x1]), to_float(b[r:r1, x0:x1])
        _store(out, r - y0, fa + (fb - fa) * m, out_dtype)
    return out


def _store(out: np.ndarray, r: int, acc: np.ndarray, out_dtype: np.dtype) -> None:
    if out_dtype.kind == "f":
        out[r:r + acc.shape[0]] = acc
    else:
        out[r:r + acc.shape[0]] = np.clip(acc, 0, 1) * np.iinfo(out_dtype).max + 0.5


def mix(images: list[np.ndarray], weights: tuple[float, ...], out_dtype=None, in_place: bool = False) -> np.ndarray:
    """The weighted sum of equally shaped images, in `out_dtype` (default: the first's; integers rounded).
    Works in row chunks, so a large output needs no float copy of its own size; `in_place` writes
    over the first image used when it has that dtype."""
    used = [(im, w) for im, w in zip(images, weights) if w != 0]
    out_dtype = np.dtype(out_dtype or used[0][0].dtype)
    if len(used) == 1 and used[0][1] == 1 and used[0][0].dtype == out_dtype:
        return used[0][0]
    out = used[0][0] if in_place and used[0][0].dtype == out_dtype else np.empty(used[0][0].shape, out_dtype)
    for r in range(0, out.shape[0], 256):
        _store(out, r, sum(to_float(im[r:r + 256]) * np.float32(w) for im, w in used), out_dtype)
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


def scored_crops(lq: np.ndarray, out_size: tuple[int, int]) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    """(the input's crops as float, the same boxes in an output of `out_size` (w, h)) to score
    candidates on: crop_boxes over the input, scaled to the output."""
    h, w = lq.shape[:2]
    boxes = crop_boxes(w, h)
    sx, sy = out_size[0] / w, out_size[1] / h
    return ([to_float(lq[y0:y1, x0:x1]) for x0, y0, x1, y1 in boxes],
            [(round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)) for x0, y0, x1, y1 in boxes])
