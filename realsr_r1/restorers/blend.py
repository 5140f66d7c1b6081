"""Pixel blends of several experts' outputs by per-block weights, and the regions a chooser scores.

Region blends (ladder.py's gated rungs): the faithful expert (DF2K) keeps the camera's noise, which
shows in flat regions and costs there in every no-reference metric, while in textured regions it
restores texture the natural-looking expert (x4plus) smooths away. So a gated rung takes the next
expert where the first one's output has local contrast (the luma's standard deviation over
GATE_BLOCK² blocks) above a threshold t, ramping in over t … (1 + GATE_RAMP)·t, and keeps the first
one where it is flat. Weights live on that block grid and are upsampled bilinearly between block
centres to pixels, so a blend has no block edges, and a position map that changes from region to
region changes the weights as smoothly.

Low frequencies (`lowpass`): most of what the faithful expert gains in fidelity on real camera
pairs is in its low frequencies (colour, shading, where edges sit), and most of what it costs in
perception is in its high ones (kept camera noise, grain). So the ladder's first step from x4plus
takes only DF2K's low frequencies, a Gaussian of DETAIL_SIGMA output pixels over their difference,
under x4plus's detail; the region blends add DF2K's detail where x4plus has texture.

Regions (`cells`): a grid sized to the image, cells of about SCORE_CELL input pixels a side (512²
outputs at ×4, NIQE's sweet spot), covering the whole image: the cost of scoring is bounded per
megapixel, and the centre of a photo counts as much as its corners.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..imageio import to_float

SCORE_CELL = 128  # input pixels a side per scored region (about: the grid divides the image evenly)
GATE_BLOCK = 8  # output pixels a side of the blocks whose contrast gates a region blend
GATE_RAMP = 1.5  # the next expert's weight ramps from 0 at contrast t to 1 at (1 + GATE_RAMP)·t
# The low/high split of the two experts' difference, in output pixels. On DRealSR's 93 pairs, x4plus
# plus DF2K's low frequencies gave +1.4 dB over x4plus alone (+1.2 and +1.5 on the two folds) and a
# lower PIQE at sigma 2; at sigma 1 it kept more of DF2K's grain (NIQE +1.1), at 3 it gave back 0.3 dB.
DETAIL_SIGMA = 2.0


def halo(sigma: float) -> int:
    """Rows or columns of context a low-pass of `sigma` needs on each side (its kernel's radius)."""
    return int(np.ceil(3 * sigma))


HALO = halo(DETAIL_SIGMA)
LUMA = np.asarray((0.299, 0.587, 0.114), np.float32)


def texture(rgb: np.ndarray) -> np.ndarray:
    """Local contrast: the standard deviation of luma (0..1) over GATE_BLOCK² blocks, one value per
    block (partial blocks at the edges count what they have), computed a band of rows at a time."""
    h, w = rgb.shape[:2]
    b = GATE_BLOCK
    out = np.empty((-(-h // b), -(-w // b)), np.float32)
    for r in range(0, h, 32 * b):
        y = to_float(rgb[r:r + 32 * b])[..., :3] @ LUMA
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


def block_axis(a0: int, a1: int, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For pixels a0..a1 of one axis: (index of the block centre at or before each, relative to block
    `first`; the fraction towards the next), over `n` blocks from `first` (clamped at the ends)."""
    u = np.clip((np.arange(a0, a1) + 0.5) / GATE_BLOCK - 0.5, first, first + n - 1) - first
    if n == 1:
        return np.zeros(a1 - a0, int), np.zeros(a1 - a0, np.float32)
    i = np.minimum(u.astype(int), n - 2)
    return i, (u - i).astype(np.float32)


def upsample(blocks: np.ndarray, rows: tuple[int, int, int], cols: tuple[int, int, int]) -> np.ndarray:
    """A (…, bh, bw) block map, whose block (0, 0) is block (rows[2], cols[2]) of the image, bilinearly
    upsampled to pixel rows rows[0]..rows[1] and columns cols[0]..cols[1] (block centres)."""
    yi, yf = block_axis(rows[0], rows[1], rows[2], blocks.shape[-2])
    xi, xf = block_axis(cols[0], cols[1], cols[2], blocks.shape[-1])
    y1, x1 = np.minimum(yi + 1, blocks.shape[-2] - 1), np.minimum(xi + 1, blocks.shape[-1] - 1)
    top = blocks[..., yi, :][..., xi] * (1 - xf) + blocks[..., yi, :][..., x1] * xf
    bottom = blocks[..., y1, :][..., xi] * (1 - xf) + blocks[..., y1, :][..., x1] * xf
    return (top * (1 - yf[:, None]) + bottom * yf[:, None]).astype(np.float32)


def lowpass(img: np.ndarray, sigma: float = DETAIL_SIGMA) -> np.ndarray:
    """A Gaussian blur (sigma pixels, radius ceil(3 sigma), edges repeated) of an HxW(xC) image, in
    float32, as two separable passes of shifted sums (numpy only: a lite run loads no SciPy). Where
    a caller passes HALO pixels of context beyond the part it keeps, the kept part is exact."""
    r = halo(sigma)
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).astype(np.float32)
    out = to_float(img)
    for axis in (0, 1):
        a = np.moveaxis(out, axis, 0)
        n = a.shape[0]
        p = np.pad(a, [(r, r)] + [(0, 0)] * (a.ndim - 1), mode="edge")
        acc = k[0] * p[:n]
        for i in range(1, 2 * r + 1):
            acc += k[i] * p[i:i + n]
        out = np.moveaxis(acc, 0, axis)
    return out


def compose(images: list[np.ndarray | None], weights: np.ndarray, out: np.ndarray,
            lows: list[tuple[np.ndarray, np.ndarray]] = ()) -> np.ndarray:
    """Σ weights[i] · images[i] + Σ a · low into `out` (its dtype; integers rounded), all HxW(xC)
    and pixel weights (n, H, W); `lows`: (pixel weights, low-passed difference of two experts); an
    image whose weight is zero everywhere may be None."""
    acc = None
    terms = [(im, w) for im, w in zip(images, weights)] + [(low, a) for a, low in lows]
    for im, w in terms:
        if im is None or not w.any():
            continue
        term = to_float(im) * (w[..., None] if im.ndim == 3 else w)
        acc = term if acc is None else acc + term
    if acc is None:
        raise ValueError("every expert's weight is zero")
    store(out, acc)
    return out


def store(out: np.ndarray, acc: np.ndarray) -> None:
    """Float in [0, 1] into `out`, rounded to its integer range when it has one."""
    if out.dtype.kind == "f":
        out[...] = acc
    else:
        out[...] = np.clip(acc, 0, 1) * np.iinfo(out.dtype).max + 0.5


def cells(length: int, cell: int = SCORE_CELL) -> list[int]:
    """Cell boundaries along one axis of `length` input pixels: about `cell` apart, evenly spread."""
    n = max(1, round(length / cell))
    return [round(i * length / n) for i in range(n + 1)]


# Source pixels from which resize works in horizontal strips: a whole 16384² output as one PIL image
# (and as float32, a channel at a time for 16-bit) would add 1 GB or more beside the output itself.
STRIP_PIXELS = 1 << 24
STRIP_SOURCE = 1 << 22  # source pixels per strip


def resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lanczos resize of an HxW or HxWx3 array (uint8 stays uint8; others go through float)."""
    w, h = size
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr
    H, W = arr.shape[:2]
    if H * W < STRIP_PIXELS:
        return _resize(arr, size)
    # In strips of output rows, each from its source rows and a margin beyond Lanczos's support
    # (3 source pixels per output pixel when shrinking), placed by PIL's `box`: the same image as
    # one resize (to within one 8-bit level where the scale is not a whole number).
    sy = H / h
    margin = int(np.ceil(3 * max(sy, 1.0))) + 2
    rows = max(1, int(STRIP_SOURCE / (W * max(sy, 1.0))))
    parts = []
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        y0, y1 = max(0, int(np.floor(r0 * sy)) - margin), min(H, int(np.ceil(r1 * sy)) + margin)
        parts.append(_resize(arr[y0:y1], (w, r1 - r0), (0, r0 * sy - y0, W, r1 * sy - y0)))
    out = np.empty((h, w) + parts[0].shape[2:], parts[0].dtype)
    r = 0
    for p in parts:
        out[r:r + p.shape[0]] = p
        r += p.shape[0]
    return out


def _resize(arr: np.ndarray, size: tuple[int, int], box=None) -> np.ndarray:
    w, h = size
    if arr.dtype == np.uint8:
        mode = "L" if arr.ndim == 2 else "RGB"
        return np.asarray(Image.fromarray(np.ascontiguousarray(arr), mode).resize((w, h), Image.LANCZOS, box=box))
    chans = [arr] if arr.ndim == 2 else [arr[..., c] for c in range(arr.shape[2])]
    # A channel at a time into float: a 16-bit RGB photo is twice its size as float32 whole.
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(to_float(c)), "F").resize((w, h), Image.LANCZOS, box=box))
           for c in chans]
    res = out[0] if arr.ndim == 2 else np.stack(out, axis=2)
    res = np.clip(res, 0, 1)
    if arr.dtype == np.uint16:
        return (res * 65535 + 0.5).astype(np.uint16)
    return res.astype(np.float32)
