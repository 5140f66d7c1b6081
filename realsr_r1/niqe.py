"""NIQE (Mittal, Soundararajan & Bovik 2012), no-reference, lower is better: numpy, no weights.

To the protocol of the published SR tables, pyiqa's metric ``niqe`` (0.1.x, version 'original'),
which the tests check against reference values to 0.02 per image:

- RGB in [0, 1] as float32 (an 8-bit image divided by 255), Y of YIQ (0.299 R + 0.587 G + 0.114 B)
  on the 0-255 scale, rounded to integers; a one-channel image is taken as that Y. (BasicSR's own
  niqe.py uses the Y of BT.601 YCbCr instead and reads about 0.04-0.14 higher.)
- Cropped to multiples of 96 px; per scale, the image is normalised by its local 7x7 Gaussian
  (sigma 7/6) mean and deviation with replicate padding (MSCN coefficients), cut into 96x96 (then
  48x48) blocks, and each block gives 18 AGGD features (of the coefficients and of the products
  with their 4 neighbours, rolled within the block).
- Two scales, the second a MATLAB-style antialiased bicubic x0.5 of the first (float32, symmetric
  padding), not rounded.
- The 36 features' mean (NaN ignored per feature) and covariance (rows with a NaN dropped) against
  the pristine model: sqrt(d' pinv((C_pris + C)/2) d).

The pristine model is BasicSR's ``niqe_pris_params.npz`` (Apache-2.0, XPixelGroup / Xintao Wang et
al.; see realsr_r1/data/NOTICE.md), shipped in realsr_r1/data/.

    from realsr_r1.niqe import niqe
    niqe(rgb)            # HxWx3 / HxW array (uint8, or float in [0, 1]) -> float
    niqe_batch(tensor)   # N x C x H x W (C = 1 or 3) -> N values
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

BLOCK = 96
PARAMS_PATH = Path(__file__).with_name("data") / "niqe_pris_params.npz"

# The AGGD shape grid (9801 values), as pyiqa/BasicSR, and log Γ(k / shape) on it for k = 1, 2, 3:
# every shape NIQE uses is a grid value, so a table replaces scipy.special.gammaln (math.lgamma,
# checked against it in tests/test_niqe.py). The lite profile's chooser scores with NIQE, and
# importing scipy.ndimage and scipy.special was about 0.5 s of each of its runs' start-up.
_GAM = np.arange(0.2, 10 + 0.001, 0.001)
_LGAMMA = {k: np.array([math.lgamma(k / g) for g in _GAM]) for k in (1, 2, 3)}
_R_GAM = np.exp(2 * _LGAMMA[2] - (_LGAMMA[1] + _LGAMMA[3]))  # increasing
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@lru_cache(maxsize=1)
def pristine_params() -> tuple[np.ndarray, np.ndarray]:
    """(mu 36, cov 36x36) of the pristine model, float64."""
    with np.load(PARAMS_PATH) as d:
        return np.ravel(d["mu_pris_param"]).astype(np.float64), np.asarray(d["cov_pris_param"], np.float64)


@lru_cache(maxsize=1)
def _gauss_window() -> np.ndarray:
    """MATLAB fspecial('gaussian', 7, 7/6), rounded through float32 as pyiqa's kernel is."""
    m = 3.0
    y, x = np.ogrid[-m:m + 1, -m:m + 1]
    sigma = 7.0 / 6.0
    h = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    h /= h.sum()
    return h.astype(np.float32).astype(np.float64)


# --- MATLAB-style bicubic resize (antialiased when downsampling), as pyiqa's matlab_utils ---------
def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    c01 = ((a + 2) * ax3 - (a + 3) * ax2 + 1) * (ax <= 1)
    c12 = (a * ax3 - 5 * a * ax2 + 8 * a * ax - 4 * a) * ((ax > 1) & (ax <= 2))
    return c01 + c12


def _resize_1d(x: np.ndarray, axis: int, scale: float) -> np.ndarray:
    """One axis of MATLAB imresize(x, scale, 'bicubic') in float32, with MATLAB's symmetric padding.

    The taps are summed one after another in float32, as pyiqa's resize does: the features of a
    one-block image are sensitive to the last bit here (an AGGD shape fit moves by one 0.001 grid step)."""
    f32 = np.float32
    n_in = x.shape[axis]
    n_out = math.ceil(n_in * scale)
    kernel_size = 4
    aa = f32(scale) if scale < 1 else f32(1)
    if scale < 1:
        kernel_size = math.ceil(kernel_size / scale)
    kernel_size += 2
    pos = np.linspace(0, n_out - 1, n_out, dtype=f32)
    pos = (pos + f32(0.5)) / f32(scale) - f32(0.5)
    base = np.floor(pos) - (kernel_size // 2) + 1
    dist = pos - base
    w = _cubic((dist[None, :] - np.arange(kernel_size, dtype=f32)[:, None]) * aa).astype(f32)  # (taps, n_out)
    w = w / w.sum(axis=0, keepdims=True, dtype=f32)
    idx = base.astype(np.int64)[None, :] + np.arange(kernel_size)[:, None]  # unpadded source index
    period = 2 * n_in  # symmetric padding, edge pixels repeated: -1 -> 0, n -> n-1
    idx = np.mod(idx, period)
    idx = np.where(idx >= n_in, period - 1 - idx, idx)
    xm = np.moveaxis(x, axis, 0)
    shape = (n_out,) + (1,) * (xm.ndim - 1)
    acc = xm[idx[0]] * w[0].reshape(shape)
    for j in range(1, kernel_size):
        acc = acc + xm[idx[j]] * w[j].reshape(shape)
    return np.moveaxis(acc, 0, axis)


def imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB imresize(img, scale, 'bicubic') of a 2-D array (antialiased when downsampling), in
    float32 like pyiqa's matlab_utils.imresize: rows first, then columns."""
    x = np.asarray(img).astype(np.float32)
    return _resize_1d(_resize_1d(x, 0, scale), 1, scale)


# --- Features -------------------------------------------------------------------------------------
def _aggd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AGGD (alpha, beta_l, beta_r) of each block of x (n, h, w), as pyiqa estimate_aggd_param, and
    alpha's index on the grid."""
    flat = x.reshape(x.shape[0], -1)
    pos, neg = flat > 0, flat < 0
    sq = flat * flat
    s_pos, s_neg = np.einsum("ij,ij->i", sq, pos), np.einsum("ij,ij->i", sq, neg)
    s_all = sq.sum(1)
    n_pos, n_neg = np.count_nonzero(pos, 1), np.count_nonzero(neg, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        left_std = np.sqrt(s_neg / n_neg)  # 0 / 0 = NaN for a side without values, as pyiqa's
        right_std = np.sqrt(s_pos / n_pos)
        gammahat = left_std / right_std
        rhat = np.abs(flat).mean(1) ** 2 / (s_all / flat.shape[1])
        rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
    # argmin |r - rhatnorm| over the grid; r rises with the shape, so a binary search finds the two
    # neighbours (a tie keeps the lower, as argmin does); a NaN picks index 0, as torch does
    i = np.clip(np.searchsorted(_R_GAM, rhatnorm), 1, len(_R_GAM) - 1)
    pos_idx = np.where(np.abs(_R_GAM[i - 1] - rhatnorm) <= np.abs(_R_GAM[i] - rhatnorm), i - 1, i)
    pos_idx[np.isnan(rhatnorm)] = 0
    k = np.sqrt(np.exp(_LGAMMA[1][pos_idx] - _LGAMMA[3][pos_idx]))
    return _GAM[pos_idx], left_std * k, right_std * k, pos_idx


def _block_features(blocks: np.ndarray) -> np.ndarray:
    """18 features per block (n, h, w) -> (n, 18)."""
    alpha, bl, br, _ = _aggd(blocks)
    feats = [alpha, (bl + br) / 2]
    for s in _SHIFTS:
        prod = blocks * np.roll(blocks, s, axis=(1, 2))
        alpha, bl, br, idx = _aggd(prod)
        mean = (br - bl) * np.exp(_LGAMMA[2][idx] - _LGAMMA[1][idx])
        feats.extend((alpha, mean, bl, br))
    return np.stack(feats, axis=1)


def correlate_nearest(img: np.ndarray, win: np.ndarray) -> np.ndarray:
    """scipy.ndimage.correlate(img, win, mode="nearest") of a 2-D array by an odd square window that
    is mirror-symmetric on both axes (as a Gaussian is): the edge pixels repeated, and each pair of
    mirrored taps summed before it is weighted, so a 7x7 window takes 16 weighted sums rather than
    49 (the same numbers to rounding: tests/test_niqe.py checks them against scipy)."""
    r = win.shape[0] // 2
    if not (np.array_equal(win, win[::-1]) and np.array_equal(win, win[:, ::-1])):
        raise ValueError("correlate_nearest needs a mirror-symmetric window")
    pad = np.pad(img, r, mode="edge")
    h, w = img.shape
    rows = pad.shape[0]
    # cols[b]: the sum of the pixels b to the left and b to the right (the pixel itself for b = 0)
    cols = [pad[:, r:r + w]] + [pad[:, r - b:r - b + w] + pad[:, r + b:r + b + w] for b in range(1, r + 1)]
    out = np.zeros_like(img)
    for a in range(r + 1):
        t = np.zeros((rows, w))
        for b in range(r + 1):
            t += win[r + a, r + b] * cols[b]
        out += t[r + a:r + a + h] if a == 0 else t[r - a:r - a + h] + t[r + a:r + a + h]
    return out


def _mscn(img: np.ndarray) -> np.ndarray:
    win = _gauss_window()
    mu = correlate_nearest(img, win)
    var = correlate_nearest(img * img, win)
    sigma = np.sqrt(np.abs(var - mu * mu) + np.finfo(np.float64).eps)
    return (img - mu) / (sigma + 1.0)


def _blocks(img: np.ndarray, bh: int, bw: int) -> np.ndarray:
    nh, nw = img.shape[0] // bh, img.shape[1] // bw
    b = img[: nh * bh, : nw * bw].reshape(nh, bh, nw, bw).transpose(0, 2, 1, 3)
    return b.reshape(nh * nw, bh, bw)


def niqe_y(y: np.ndarray) -> float:
    """NIQE of a 2-D luma array on the 0-255 scale, already rounded (as the protocol has it)."""
    y = np.asarray(y, np.float64)
    h, w = y.shape
    if h < BLOCK or w < BLOCK:
        raise ValueError(f"NIQE needs an image of at least {BLOCK}x{BLOCK} pixels, got {w}x{h}")
    img = y[: h // BLOCK * BLOCK, : w // BLOCK * BLOCK]
    feats = []
    for scale in (1, 2):
        feats.append(_block_features(_blocks(_mscn(img), BLOCK // scale, BLOCK // scale)))
        if scale == 1:
            img = imresize((img / 255.0).astype(np.float32), 0.5).astype(np.float64) * 255.0
    dist = np.concatenate(feats, axis=1)  # (blocks, 36)
    mu_pris, cov_pris = pristine_params()
    with warnings.catch_warnings():  # an all-NaN feature is reported below, not as a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        mu = np.nanmean(dist, axis=0)
    rows = dist[~np.isnan(dist).any(axis=1)]
    if len(rows) == 0 or np.isnan(mu).any():
        raise ValueError("NIQE is undefined for this image: every block is flat")
    cov = np.cov(rows, rowvar=False, ddof=1 if len(rows) > 1 else 0)
    a = (cov_pris + cov) / 2
    inv = np.linalg.pinv(a, rcond=np.finfo(np.float64).eps * max(a.shape))
    d = mu_pris - mu
    return float(np.sqrt(d @ inv @ d))


def to_luma(img) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped) array, uint8/uint16 or float in [0, 1], to the
    protocol's rounded Y on the 0-255 scale (float64 HxW)."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / np.float32(255)
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float32) / np.float32(65535)
    else:
        x = arr.astype(np.float32)
    if x.ndim == 3 and x.shape[2] in (1, 3, 4):
        x = x[..., 0] if x.shape[2] == 1 else x[..., :3]
    if x.ndim == 2:
        y = x * np.float32(255)
    elif x.ndim == 3:
        wr, wg, wb = np.float32(0.299), np.float32(0.587), np.float32(0.114)
        y = (x[..., 0] * wr + x[..., 1] * wg + x[..., 2] * wb) * np.float32(255)
    else:
        raise ValueError(f"NIQE takes an HxW or HxWx(1|3|4) image, got shape {arr.shape}")
    return np.round(y).astype(np.float64)


def niqe(img) -> float:
    """NIQE of one image (HxW / HxWxC array, uint8 or float in [0, 1]); lower is better."""
    return niqe_y(to_luma(img))


def niqe_batch(batch) -> np.ndarray:
    """NIQE per image of an N x C x H x W (C = 1 or 3) tensor or array in [0, 1] -> (N,) float64."""
    from .imageio import batch_images

    return np.array([niqe(a) for a in batch_images(batch, "NIQE")], np.float64)
