"""PIQE (Venkatanath et al., NCC 2015), no-reference, lower is better (0-100): numpy only, no weights.

The definition is MATLAB's ``piqe`` (Image Processing Toolbox, 2018); the protocol is that of pyiqa's
metric ``piqe`` (pyiqa/archs/piqe_arch.py), which published SR tables use. Where the two differ, pyiqa
is followed and MATLAB's choice is noted:

- RGB in [0, 1] (an 8-bit image divided by 255) to Y of YIQ (0.299 R + 0.587 G + 0.114 B) in float32;
  a one-channel image is taken as that Y. Y is divided by its own maximum, times 255 and rounded (MATLAB:
  rgb2gray, then round(255 * I) without the division by the maximum).
- A height or width that is not a multiple of 16 is padded by its remainder ``n % 16`` (not up to the
  next multiple), symmetrically at the bottom/right; only whole 16x16 blocks from the top left are scored,
  so a remainder of 8 or more adds one block that is partly mirrored (MATLAB: replicate-pads up to the next
  multiple and scores every block).
- MSCN: (I - mu) / (sigma + 1), mu and sigma from a 7x7 Gaussian window (sigma 7/6, normalised to sum 1)
  with replicate padding; sigma = sqrt(|E[I^2] - mu^2| + eps), eps float32's (pyiqa's safe_sqrt).
- Per 16x16 block of the MSCN map, sample variance v (n - 1). Active (salient) when v > 0.1.
- Noticeable distortion: any segment of 6 contiguous pixels (stride 1, 11 per edge) along the block's
  top, right, bottom or left edge with sample std < 0.1.
- Noise: sqrt(v) > 2 beta, beta = |sqrt(v) - r| / max(sqrt(v), r), r = std(centre) / std(surround)
  (sample stds). The centre is columns 8 and 9 (1-based) of the block; the surround is what MATLAB's two
  successive column deletions leave, i.e. every column but 8 and 10 (1-based), as pyiqa copies. NaN r is 0.
- Score = (sum over active blocks of [distorted] (1 - v) + [noisy] v, plus C) / (number of active
  blocks + C) * 100, C = 1. So a flat image (no active block) scores (0 + 1) / (0 + 1) * 100 = 100.

An all-black image (maximum 0) scores 100 as any flat image does (pyiqa's division by the maximum gives
NaN). A side under 16 pixels is a ValueError (pyiqa's padding would mirror 8-15 pixels into one block).
Everything after the luma is float64 (pyiqa: float32, whose E[I^2] - mu^2 on the 0-255 scale moves MSCN
values by up to ~0.01), so scores agree with pyiqa's to a few thousandths, unless a block sits on one of
the thresholds and tips one way there and the other here.

    from realsr_r1.piqe import piqe
    piqe(rgb)            # HxWx3 / HxW array (uint8, uint16, or float in [0, 1]) -> float
    piqe_batch(tensor)   # N x C x H x W (C = 1 or 3) -> N values
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

BLOCK = 16  # block side
ACTIVITY_THRESHOLD = 0.1  # block variance above which a block is salient
IMPAIRED_THRESHOLD = 0.1  # edge-segment std below which a block shows a noticeable artifact
SEGMENT = 6  # pixels per edge segment
C = 1.0  # stabiliser of the pooled score
_EPS = float(np.finfo(np.float32).eps)  # pyiqa's safe_sqrt, in its float32


def _gauss_1d() -> np.ndarray:
    """1-D factor of fspecial('gaussian', 7, 7/6): the normalised 2-D window is its outer product."""
    x = np.arange(-3, 4, dtype=np.float64)
    g = np.exp(-(x * x) / (2 * (7.0 / 6.0) ** 2))
    return g / g.sum()


_G = _gauss_1d()


def _smooth(img: np.ndarray) -> np.ndarray:
    """7x7 Gaussian with replicate padding, as two 1-D passes."""
    p = np.pad(img, 3, mode="edge")
    h, w = img.shape
    rows = sum(_G[k] * p[k:k + h, :] for k in range(7))
    return sum(_G[k] * rows[:, k:k + w] for k in range(7))


def mscn(y: np.ndarray) -> np.ndarray:
    """MSCN coefficients of a 2-D luma array on the 0-255 scale (float64)."""
    mu = _smooth(y)
    sigma = np.sqrt(np.abs(_smooth(y * y) - mu * mu) + _EPS)
    return (y - mu) / (sigma + 1.0)


def to_luma(img) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped) array, uint8/uint16 or float in [0, 1], to the
    protocol's Y: divided by its maximum, on the 0-255 scale, rounded (float64 HxW)."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / np.float32(255)
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float32) / np.float32(65535)
    else:
        x = arr.astype(np.float32)
    if x.ndim == 3 and x.shape[2] in (1, 3, 4):
        x = x[..., 0] if x.shape[2] == 1 else x[..., :3]
    if x.ndim == 3:
        wr, wg, wb = np.float32(0.299), np.float32(0.587), np.float32(0.114)
        x = x[..., 0] * wr + x[..., 1] * wg + x[..., 2] * wb
    elif x.ndim != 2:
        raise ValueError(f"PIQE takes an HxW or HxWx(1|3|4) image, got shape {arr.shape}")
    top = x.max() if x.size else np.float32(0)
    if top <= 0:  # all black: flat, not 0/0
        return np.zeros(x.shape, np.float64)
    return np.round(np.float32(255) * (x / top)).astype(np.float64)


def block_stats(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per 16x16 block of a 0-255 luma array, row-major: (variance, active, distorted, noisy)."""
    h, w = y.shape
    if h < BLOCK or w < BLOCK:
        raise ValueError(f"PIQE needs an image of at least {BLOCK}x{BLOCK} pixels, got {w}x{h}")
    # pyiqa pads by the remainder (not up to a multiple), then keeps whole blocks only
    padded = np.pad(y, ((0, h % BLOCK), (0, w % BLOCK)), mode="symmetric")
    norm = mscn(padded)
    nh, nw = norm.shape[0] // BLOCK, norm.shape[1] // BLOCK
    b = norm[: nh * BLOCK, : nw * BLOCK].reshape(nh, BLOCK, nw, BLOCK).transpose(0, 2, 1, 3)
    b = b.reshape(nh * nw, BLOCK, BLOCK)

    var = b.reshape(len(b), -1).var(axis=1, ddof=1)
    active = var > ACTIVITY_THRESHOLD

    edges = np.stack([b[:, 0, :], b[:, :, -1], b[:, -1, :], b[:, :, 0]], axis=1)  # top, right, bottom, left
    seg_std = sliding_window_view(edges, SEGMENT, axis=-1).std(axis=-1, ddof=1)  # (n, 4, 11)
    distorted = (seg_std < IMPAIRED_THRESHOLD).any(axis=(1, 2))

    # MATLAB's centerSurDev with blockSize 15: centre columns 8, 9; deleting column 8 and then column 9 of
    # what is left removes original columns 8 and 10 (1-based), so column 9 stays in the surround.
    c1 = BLOCK // 2 - 1  # column 8, 1-based
    centre = b[:, :, [c1, c1 + 1]].reshape(len(b), -1)
    keep = [j for j in range(BLOCK) if j not in (c1, c1 + 2)]
    surround = b[:, :, keep].reshape(len(b), -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.nan_to_num(centre.std(axis=1, ddof=1) / surround.std(axis=1, ddof=1))
        sigma = np.sqrt(var)
        beta = np.abs(sigma - ratio) / np.maximum(sigma, ratio)
        noisy = sigma > 2 * beta  # NaN beta (both zero) is not noise
    return var, active, distorted, noisy


def piqe_y(y: np.ndarray) -> float:
    """PIQE of a 2-D luma array already on the protocol's rounded 0-255 scale."""
    var, active, distorted, noisy = block_stats(np.asarray(y, np.float64))
    dist = np.where(distorted, 1 - var, 0.0) + np.where(noisy, var, 0.0)
    return float((dist[active].sum() + C) / (active.sum() + C) * 100)


def piqe(img) -> float:
    """PIQE of one image (HxW / HxWxC array, uint8/uint16 or float in [0, 1]); lower is better."""
    return piqe_y(to_luma(img))


def piqe_batch(batch) -> np.ndarray:
    """PIQE per image of an N x C x H x W (C = 1 or 3) tensor or array in [0, 1] -> (N,) float64."""
    from .imageio import batch_images

    return np.array([piqe(a) for a in batch_images(batch, "PIQE")], np.float64)
