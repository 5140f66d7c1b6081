"""Classical degradation analyser: noise, blur and JPEG quality from pixels alone (no weights).

It writes the <degradation> items of the offline profile and is the reference the synthetic labels
of `degrade.py` are checked against, so it measures the same quantities, in the same units:

* noise: sigma on the 0-255 scale. Liu, Tanaka & Okutomi (TIP 2013) pick weak-texture patches
  (7x7, per channel): a patch whose summed squared gradient is below the 99% quantile of what
  noise alone would give (a gamma law scaled by sigma^2) is "flat". Sigma^2 comes from the
  eigenvalues of those patches' covariance with Chen, Zhu & Heng's rule (ICCV 2015): the mean of
  the smallest eigenvalues, as many as keep mean = median. Iterate select → estimate until it
  settles. Patches touching clipped pixels (0 or 255) are skipped, since clipping hides noise.
  That measures white noise. Noise that later resizes, blur or JPEG made spatially correlated
  (as in every second-order degradation) reads near 0 there, so the same estimate also runs at
  lags 2-4: on every L-th pixel (5x5 patches, the L*L phase images pooled) such noise is nearly
  white again and reads at its full sigma. A lagged reading counts when its flat set settled, at
  least half its eigenvalues sit on the noise plateau, each phase image is >= 32 px a side, and it
  reads >= 1.25x lag 1; the highest such reading wins.
  Confidence: "unknown" when lag 1 found too few flat patches to settle and no lag counts while
  some lag reads another level (texture and noise cannot be told apart: typical of small, busy
  images); "low" for a lagged reading (fine texture aliased at lag L looks like correlated noise),
  few flat patches, or larger lags pointing to another level; else "high". An unknown noise
  keeps the lowest reading's level and says so in its item: `noise: none (sigma 0.3, uncertain:
  12 flat patches)`.
* blur: Gaussian-equivalent sigma in pixels. At a step edge blurred by sigma, the gradient
  magnitude measured with Gaussian derivatives of scale s peaks at A / sqrt(2 pi (sigma^2 + s^2)).
  The ratio R of the peaks at s1 = 1 and s2 = 2 gives sigma^2 = (s2^2 - R^2 s1^2) / (R^2 - 1);
  the estimate is the median over the strongest 10% of edge points (maxima across the edge, as
  in Canny), after removing the expected noise energy from both gradients. A pixel-sampled ideal
  step reads 0.46 (the pixel itself); on photos that is offset by a slight downward bias from
  neighbouring texture, so no correction is made. Large blurs on small images read low (~10%).
  Fewer than 8 edge points: blur unknown (`blur: none (sigma 0, uncertain: 3 edge points)`).
* jpeg: from the file's quantisation tables when there are any (IJG's quality scaling inverted
  exactly), else from pixels: the 8x8 DCT coefficients of the luma of a decoded JPEG lie on
  multiples of the quantisation steps. For each IJG quality the score is the share of non-zero
  coefficients within 0.75 of a multiple of that quality's step, minus the share expected by
  chance; the best-scoring quality wins (ties go to the middle). The block grid is the one of
  the 64 phases with the most near-zero AC coefficients (quantisation zeroes them). No
  compression is reported when the best score is about zero or no better than on a grid shifted
  by half a block. Only a JPEG that was not resampled afterwards can be seen this way.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .cot import DegradationItem, level_for
from .imageio import ImageReadError, read_image

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # JFIF / BT.601 weights, as JPEG uses

# --- Noise -------------------------------------------------------------------------------------------
NOISE_PATCH = 7  # lag 1, as Liu et al.
NOISE_PATCH_LAGGED = 5  # lags 2-4: spans 9-17 pixels
NOISE_CONFIDENCE = 0.99
NOISE_MAX_PATCHES = 30000  # enough for a stable 49x49 covariance; keeps 512x512 well under 0.1 s
NOISE_MAX_PATCHES_LAGGED = 8000  # the same for the 25x25 covariance of the lagged readings
NOISE_MAX_LAG = 4
NOISE_LAG_MIN_SIDE = 32  # lag L is used when the image's shorter side is at least 32 L pixels
NOISE_MIN_FIT = 0.5  # a lagged estimate counts when half its eigenvalues sit on the noise plateau
NOISE_LAG_GAIN = 1.25  # ... and when it reads this much more than lag 1
NOISE_MIN_FLAT = 100  # fewer flat patches than this: low confidence
NOISE_PIXEL_BUDGET = 256 * 256  # lagged readings of large images use only some of the L*L phases


def _box_sum(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums over every h x w window ('valid' positions)."""
    c = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
    c[1:, 1:] = a.cumsum(0).cumsum(1)
    return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]


def _chen(eigenvalues: np.ndarray) -> tuple[float, int]:
    """Chen et al.: the noise eigenvalues are the largest low set whose mean equals its median.
    Returns their mean and how many there are."""
    ev = np.sort(eigenvalues)
    n = np.arange(len(ev), 0, -1)  # candidate set sizes, largest first, all at once
    tau = np.cumsum(ev)[n - 1] / n  # mean of the k smallest, for every k
    inside = np.arange(len(ev))[None, :] < n[:, None]
    balanced = ((ev[None, :] > tau[:, None]) & inside).sum(1) == ((ev[None, :] < tau[:, None]) & inside).sum(1)
    if not balanced.any():
        return float(ev[0]), 1
    k = int(np.argmax(balanced))
    return float(tau[k]), int(n[k])


def _chen_sigma2(eigenvalues: np.ndarray) -> float:
    return _chen(eigenvalues)[0]


@lru_cache(maxsize=None)
def _texture_threshold(p: int) -> float:
    """Gamma quantile of a noise-only patch's texture per sigma^2 (once per size). The quantile of
    Gamma(a, scale) is scale · P⁻¹(a, q), the inverse regularised incomplete gamma function, which is
    what scipy.stats.gamma.ppf computes too (bit-identical here)."""
    trace = 4 * p * (p - 1)
    a, scale = p * p / 2, 2 * trace / (p * p)
    if (a, NOISE_CONFIDENCE) in GAMMAINCINV:
        return scale * GAMMAINCINV[a, NOISE_CONFIDENCE]
    from scipy import special

    return float(scale * special.gammaincinv(a, NOISE_CONFIDENCE))


# special.gammaincinv(a, q) for the shipped patch sizes (a = p²/2 for p = NOISE_PATCH_LAGGED and
# NOISE_PATCH), as scipy computes it (tests/test_analyze.py checks): importing scipy.special is about
# 0.2 s of every lite run's start-up, for these two numbers. Other sizes ask scipy.
GAMMAINCINV = {(12.5, 0.99): 22.157052448109575, (24.5, 0.99): 37.45973715423908}


@dataclass
class NoiseReading:
    """One lag's weak-texture PCA estimate."""

    lag: int
    sigma: float
    flat_patches: int  # patches under the noise-only texture threshold at that sigma
    patches: int  # patches looked at (all channels, all phases)
    fit: float  # share of the eigenvalues on the noise plateau (Chen's set): ~1 for pure noise
    settled: bool  # False: the flat set emptied before the estimate settled (too few flat patches)

    @property
    def usable(self) -> bool:
        return self.settled and self.fit >= NOISE_MIN_FIT


def _noise_reading(img: np.ndarray, lag: int, p: int) -> NoiseReading:
    """Liu et al. + Chen et al. on the lag x lag phase images of `img` (0-255), pooled."""
    texture, usable, parts = [], [], []
    # Phases spread over the lattice: (0, 0), (1, 1), ...; as many as the pixel budget allows.
    phases = sorted(((dy, dx) for dy in range(lag) for dx in range(lag)), key=lambda d: ((d[1] - d[0]) % lag, d))
    n_phases = max(1, min(len(phases), math.ceil(NOISE_PIXEL_BUDGET * lag * lag / (img.shape[0] * img.shape[1]))))
    for dy, dx in phases[:n_phases] if lag > 1 else [(0, 0)]:
        sub = img[dy::lag, dx::lag]
        if sub.shape[0] < p + 1 or sub.shape[1] < p + 1:
            continue
        for c in range(img.shape[2]):
            ch = sub[..., c]
            gh, gv = np.diff(ch, axis=1) ** 2, np.diff(ch, axis=0) ** 2
            texture.append((_box_sum(gh, p, p - 1) + _box_sum(gv, p - 1, p)).ravel())
            clipped = ((ch <= 0.5) | (ch >= 254.5)).astype(np.float64)
            usable.append((_box_sum(clipped, p, p) < 0.5).ravel())
            parts.append(ch)
    if not texture:
        return NoiseReading(lag, 0.0, 0, 0, 0.0, False)
    sizes = np.cumsum([0] + [len(t) for t in texture])
    texture, usable = np.concatenate(texture), np.concatenate(usable)
    if usable.sum() < 4 * p * p:  # nearly all clipped: use what there is
        usable[:] = True
    # Every part (channel of a phase image) stacked into one float64 plane of a common width, so
    # that each iteration gathers its patches with one indexing: patch n is the p*p pixels at
    # `offsets` from its top-left pixel top_left[n] in the flat plane.
    width = max(ch.shape[1] for ch in parts)
    plane = np.zeros((sum(ch.shape[0] for ch in parts), width))
    first_row = np.cumsum([0] + [ch.shape[0] for ch in parts])
    for ch, r in zip(parts, first_row):
        plane[r:r + ch.shape[0], : ch.shape[1]] = ch
    plane = plane.ravel()
    valid_width = np.array([ch.shape[1] - p + 1 for ch in parts])
    rows, cols = np.divmod(np.arange(p * p), p)
    offsets = rows * width + cols
    # A noise-only patch's texture is gamma distributed with mean sigma^2 * tr(Dh'Dh + Dv'Dv).
    threshold = _texture_threshold(p)
    max_patches = NOISE_MAX_PATCHES if lag == 1 else NOISE_MAX_PATCHES_LAGGED
    selected, sigma2, flat, fit, settled = usable, None, 0, 0.0, False
    for _ in range(8):
        idx = np.flatnonzero(selected)
        if len(idx) < 2 * p * p:
            settled = False
            break
        idx = idx[:: len(idx) // max_patches + 1]  # even subsample, deterministic
        part = np.searchsorted(sizes, idx, side="right") - 1
        i, j = np.divmod(idx - sizes[part], valid_width[part])
        patches = plane[((first_row[part] + i) * width + j)[:, None] + offsets]
        patches -= patches.mean(axis=0)
        new, k_noise = _chen(np.linalg.eigvalsh(patches.T @ patches / len(patches)))
        fit = k_noise / (p * p)
        converged = sigma2 is not None and abs(new - sigma2) <= 1e-3 * max(sigma2, 1.0)
        sigma2 = new
        selected = usable & (texture < sigma2 * threshold)
        flat, settled = int(selected.sum()), True
        if converged:
            break
    if sigma2 is None:
        return NoiseReading(lag, 0.0, 0, len(texture), 0.0, False)
    return NoiseReading(lag, math.sqrt(max(sigma2, 0.0)), flat, len(texture), fit,
                        settled and flat >= 2 * p * p)


@dataclass
class NoiseEstimate:
    """The noise sigma and how far to trust it.

    `confidence`: "high"; "low" (few flat patches, or the readings at larger lags point to another
    level); "unknown" (no lag found enough flat patches to separate noise from texture: `sigma` is
    then only the lowest reading, and `sigma_max` the highest)."""

    sigma: float
    confidence: str
    lag: int  # the lag whose reading was taken (1: white noise; 2-4: spatially correlated noise)
    flat_patches: int
    patches: int
    sigma_max: float  # highest reading over all lags (texture can inflate it)
    reason: str = ""
    readings: list[NoiseReading] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"lag": self.lag, "flat_patches": self.flat_patches, "patches": self.patches,
                "sigma_max": round(self.sigma_max, 2), "reason": self.reason or None}


def estimate_noise_detail(rgb: np.ndarray) -> NoiseEstimate:
    """Noise sigma (0-255 scale) of an HxWx3 float image in [0, 1], with its confidence.

    White noise is read at lag 1 (neighbouring pixels). Noise that later resizes, blur or JPEG made
    spatially correlated hides there: its weakest direction is nearly noise-free. Every L-th pixel
    (lag L, all L*L phases pooled) sees it nearly white again, at its full sigma, so lags 2..4 are
    read too (where the image is large enough for each phase image to hold flat patches), and the
    highest reading whose flat patches settled on a noise plateau wins."""
    img = np.asarray(rgb, dtype=np.float32) * 255.0
    p = NOISE_PATCH
    if img.ndim != 3 or img.shape[0] < 2 * p or img.shape[1] < 2 * p:
        return NoiseEstimate(0.0, "unknown", 1, 0, 0, 0.0, "image too small to measure noise")
    first = _noise_reading(img, 1, p)
    max_lag = max(1, min(NOISE_MAX_LAG, min(img.shape[:2]) // NOISE_LAG_MIN_SIDE))
    lagged = [_noise_reading(img, lag, NOISE_PATCH_LAGGED) for lag in range(2, NOISE_MAX_LAG + 1)
              if min(img.shape[:2]) // lag >= 2 * NOISE_PATCH_LAGGED]
    allowed = [r for r in lagged if r.lag <= max_lag and r.usable]
    best = max(allowed, key=lambda r: r.sigma, default=None)
    # White noise reads the same at every lag: lag 1 stays unless a lag reads clearly more.
    chosen = best if best is not None and best.sigma > NOISE_LAG_GAIN * first.sigma else first
    readings = [first] + lagged
    # The highest reading: over the lags this image is large enough for, and over all of them.
    sigma_max = max([chosen.sigma] + [r.sigma for r in lagged if r.lag <= max_lag])
    sigma_any = max([sigma_max] + [r.sigma for r in lagged])
    other_level = level_for("noise", sigma_max) != level_for("noise", chosen.sigma)
    noise_free = level_for("noise", sigma_max) == "none"  # every lag agrees: a settled "none"
    if chosen is first and not first.settled and level_for("noise", sigma_any) != level_for("noise", chosen.sigma):
        return NoiseEstimate(chosen.sigma, "unknown", 1, first.flat_patches, first.patches, sigma_any,
                             f"too few flat patches ({first.flat_patches}) to tell noise from texture",
                             readings)
    confidence, reason = "high", ""
    if other_level:
        confidence, reason = "low", f"readings at larger lags reach sigma {sigma_max:.1f}"
    elif chosen.flat_patches < NOISE_MIN_FLAT and not noise_free:
        confidence, reason = "low", f"few flat patches ({chosen.flat_patches})"
    elif chosen.lag > 1 and level_for("noise", chosen.sigma) != "none":
        # Correlated noise and fine texture (aliased at lag L) look alike; two of three such
        # readings get the level right on degrade.py's pipeline (benchmarks/analyzer_accuracy.py).
        confidence, reason = "low", f"spatially correlated noise, read at lag {chosen.lag}"
    return NoiseEstimate(chosen.sigma, confidence, chosen.lag, chosen.flat_patches, chosen.patches,
                         sigma_max, reason, readings)


def estimate_noise(rgb: np.ndarray) -> float:
    """Noise sigma (0-255 scale) of an HxWx3 float image in [0, 1]; 0.0 if too small to tell."""
    return estimate_noise_detail(rgb).sigma


# --- Blur --------------------------------------------------------------------------------------------
BLUR_SCALES = (1.0, 2.0)
BLUR_EDGE_FRACTION = 0.10


def _filter1d(a: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Convolve along `axis` with an odd-length kernel that is symmetric or antisymmetric, mirroring
    the edges (scipy's "reflect"). Like scipy, the mirrored taps are paired: (anti)symmetric sums are
    exact, so a flat image has a zero derivative, not rounding noise."""
    r, n = len(kernel) // 2, a.shape[axis]
    sign = 1.0 if np.array_equal(kernel, kernel[::-1]) else -1.0
    assert sign == 1.0 or np.array_equal(kernel, -kernel[::-1]), "kernel neither symmetric nor antisymmetric"
    width = [(0, 0)] * a.ndim
    width[axis] = (r, r)
    padded = np.moveaxis(np.pad(a, width, mode="symmetric"), axis, 0).astype(np.float64)
    out = kernel[r] * padded[r:r + n]  # in[i + e] is padded[r + e + i]
    for d in range(1, r + 1):  # convolution: out[i] = sum over d of kernel[r + d] * in[i - d]
        out += kernel[r + d] * (padded[r - d:r - d + n] + sign * padded[r + d:r + d + n])
    return np.moveaxis(out, 0, axis).astype(a.dtype)


def _gaussian_derivative(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """The derivative along `axis` of `a` smoothed by a Gaussian of `sigma`: what
    `scipy.ndimage.gaussian_filter(a, sigma, order=1 along axis, 0 along the other, mode="reflect")`
    computes, with its kernels (radius int(4 sigma + 0.5); the normalised Gaussian g, and -x/sigma² g),
    passes (the other axis first) and float32 intermediate. In numpy, because importing
    scipy.ndimage is about 0.15 s of every lite run's start-up, for these two filters."""
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * x * x / (sigma * sigma))
    g /= g.sum()
    return _filter1d(_filter1d(a, g, 1 - axis), -x / (sigma * sigma) * g, axis)


def _gradient(gray: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    return _gaussian_derivative(gray, s, 1), _gaussian_derivative(gray, s, 0)


def _edge_ridges(energy: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression along the gradient direction (as in Canny), 4 directions."""
    direction = np.round(np.arctan2(gy, gx) / (np.pi / 4)).astype(int) % 4
    ridges = np.zeros(energy.shape, dtype=bool)
    for k, step in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead = np.roll(energy, step, axis=(0, 1))
        behind = np.roll(energy, (-step[0], -step[1]), axis=(0, 1))
        ridges |= (direction == k) & (energy >= ahead) & (energy >= behind)
    return ridges


BLUR_MIN_EDGES = 8  # fewer edge points: blur unknown
BLUR_FEW_EDGES = 30  # fewer strong edge points than this: low confidence


@dataclass
class BlurEstimate:
    sigma: float
    confidence: str  # high | low | unknown (too few edges to measure: sigma is then 0)
    edge_points: int  # strong edge points the median is taken over
    reason: str = ""


def estimate_blur(rgb: np.ndarray, noise_sigma: float = 0.0) -> float:
    """Gaussian-equivalent blur sigma in pixels from the two-scale gradient ratio at strong edges."""
    return estimate_blur_detail(rgb, noise_sigma).sigma


def estimate_blur_detail(rgb: np.ndarray, noise_sigma: float = 0.0) -> BlurEstimate:
    """`estimate_blur` with the number of edge points it rests on and a confidence."""
    gray = np.asarray(rgb, dtype=np.float32) @ LUMA
    s1, s2 = BLUR_SCALES
    border = int(2 * s2)
    if min(gray.shape) < 4 * border:
        return BlurEstimate(0.0, "unknown", 0, "image too small to measure blur")
    # Noise energy in a Gaussian-derivative gradient: sigma^2 / (4 pi s^4). Luma noise lies between
    # 0.67 sigma (independent colour noise) and sigma (grey noise): take the mean of the squares.
    n2 = 0.72 * (noise_sigma / 255.0) ** 2
    gx, gy = _gradient(gray, s1)
    e1 = gx * gx + gy * gy - n2 / (4 * np.pi * s1**4)
    gx, gy = _gradient(gray, s2)
    e2 = gx * gx + gy * gy - n2 / (4 * np.pi * s2**4)
    peaks = _edge_ridges(e2, gx, gy)
    peaks[:border] = peaks[-border:] = False
    peaks[:, :border] = peaks[:, -border:] = False
    peaks &= e2 > 9 * n2 / (4 * np.pi * s2**4)  # edges well above the noise
    values = e2[peaks]
    if values.size < BLUR_MIN_EDGES:
        return BlurEstimate(0.0, "unknown", int(values.size), f"too few edges ({values.size}) to measure blur")
    strong = peaks & (e2 >= np.quantile(values, 1 - BLUR_EDGE_FRACTION))
    n_strong = int(strong.sum())
    confidence = "high" if n_strong >= BLUR_FEW_EDGES else "low"
    reason = "" if confidence == "high" else f"few strong edge points ({n_strong})"
    r2 = np.maximum(e1[strong], 0) / e2[strong]
    r2 = r2[r2 > 1 + 1e-6]
    if r2.size == 0:  # ratios at the limit: wider than the scales can resolve
        return BlurEstimate(float(2 * s2), confidence, n_strong, reason)
    sigma2 = np.median((s2**2 - r2 * s1**2) / (r2 - 1))
    return BlurEstimate(float(math.sqrt(max(sigma2, 0.0))), confidence, n_strong, reason)


# --- JPEG ----------------------------------------------------------------------------------------------
# IJG (libjpeg) base tables, natural order: Annex K of the JPEG standard.
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)
_IJG_CHROMA = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32, dtype=np.float64)
QUALITIES = np.arange(1, 101)
JPEG_TOLERANCE = 0.75  # |coefficient - multiple| counted as on the lattice (8-bit rounding ~0.35 rms)
JPEG_MIN_SCORE = 0.01
JPEG_MIN_MARGIN = 0.01


def ijg_table(quality: int, base: np.ndarray = _IJG_LUMA) -> np.ndarray:
    """The table libjpeg's jpeg_set_quality (baseline) writes for `quality`."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((base * scale + 50) / 100), 1, 255)


_LUMA_TABLES = np.stack([ijg_table(q) for q in QUALITIES])  # 100 x 64
_CHROMA_TABLES = np.stack([ijg_table(q, _IJG_CHROMA) for q in QUALITIES])


def quality_from_tables(tables: dict | list) -> int | None:
    """IJG quality of JPEG quantisation tables (natural order): exact when they are IJG's, else the
    quality whose tables are closest in log step."""
    tables = list(tables.values()) if isinstance(tables, dict) else list(tables)
    if not tables:
        return None
    refs = [_LUMA_TABLES, _CHROMA_TABLES]
    cost = np.zeros(len(QUALITIES))
    exact = np.ones(len(QUALITIES), dtype=bool)
    for k, table in enumerate(tables[:2]):
        t = np.asarray(table, dtype=np.float64).reshape(-1)[:64]
        exact &= (refs[k] == t).all(axis=1)
        cost += np.abs(np.log(refs[k]) - np.log(np.maximum(t, 1))).sum(axis=1)
    if exact.any():
        return int(QUALITIES[exact][0])  # IJG luma tables differ for every quality
    return int(QUALITIES[np.argmin(cost)])


def jpeg_quality_from_file(path) -> int | None:
    """Quality of a JPEG file from its quantisation tables; None if it is not a JPEG."""
    try:
        with Image.open(path) as im:
            if im.format != "JPEG":
                return None
            return quality_from_tables(getattr(im, "quantization", None) or {})
    except (OSError, SyntaxError, ValueError):
        return None


def _dct_matrix() -> np.ndarray:
    n = np.arange(8)
    d = np.sqrt(2 / 8) * np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 16)
    d[0] /= np.sqrt(2)
    return d


_DCT = _dct_matrix()


def _block_dct(y: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """DCT coefficients (n_blocks x 64, natural order) of the 8x8 blocks starting at (dy, dx)."""
    h, w = (y.shape[0] - dy) // 8 * 8, (y.shape[1] - dx) // 8 * 8
    blocks = y[dy:dy + h, dx:dx + w].reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)
    return (_DCT @ blocks.reshape(-1, 8, 8) @ _DCT.T).reshape(-1, 64)


def _grid_offset(y: np.ndarray, window: int = 320) -> tuple[int, int]:
    """Block grid phase: quantisation zeroes many AC coefficients, but only on the true grid."""
    top, left = ((y.shape[0] - window) // 16 * 8, (y.shape[1] - window) // 16 * 8)
    crop = y[max(top, 0):max(top, 0) + window, max(left, 0):max(left, 0) + window]  # phase kept
    zeros = {(dy, dx): (np.abs(_block_dct(crop, dy, dx)[:, 1:]) < 1.0).mean()
             for dy in range(8) for dx in range(8)}
    return max(zeros, key=zeros.get)


# Per DCT frequency: the distinct quantiser steps over all qualities, and each quality's index into them.
_STEPS = [(steps, np.searchsorted(steps, _LUMA_TABLES[:, f]))
          for f, steps in ((f, np.unique(_LUMA_TABLES[:, f])) for f in range(64))]


def _quality_scores(coef: np.ndarray) -> np.ndarray:
    """Lattice-fit score of every IJG quality for these DCT coefficients (see the module docstring)."""
    scores = np.zeros(len(QUALITIES))
    total = 0
    for f in range(64):
        c = coef[:, f]
        c = c[np.abs(c) >= JPEG_TOLERANCE]  # the zero bin fits every step: no evidence
        if c.size < 8:
            continue
        steps, index = _STEPS[f]
        dist = np.abs(c[None, :] - steps[:, None] * np.round(c[None, :] / steps[:, None]))
        hit = (dist <= JPEG_TOLERANCE).sum(axis=1) / c.size - np.minimum(2 * JPEG_TOLERANCE / steps, 1)
        scores += c.size * hit[index]
        total += c.size
    return scores / total if total else scores


JPEG_FEW_BLOCKS = 64  # fewer 8x8 blocks than this (an image under 64x64): low confidence


def estimate_jpeg_quality(rgb: np.ndarray) -> int | None:
    """IJG quality of the last (unresampled) JPEG compression, or None when none is detected."""
    return estimate_jpeg_detail(rgb)[0]


def estimate_jpeg_detail(rgb: np.ndarray) -> tuple[int | None, str, str]:
    """(quality or None, confidence high | low, reason) from the pixels."""
    y = (np.asarray(rgb, dtype=np.float64) @ LUMA.astype(np.float64)) * 255.0 - 128.0
    if min(y.shape) < 16:
        return None, "low", "image too small to see JPEG blocks"
    blocks = (y.shape[0] // 8) * (y.shape[1] // 8)
    confidence, reason = ("high", "") if blocks >= JPEG_FEW_BLOCKS else ("low", f"few 8x8 blocks ({blocks})")
    best_q, best_s, null_s = None, -np.inf, 0.0
    found = _grid_offset(y)
    for dy, dx in [(0, 0)] + ([found] if found != (0, 0) else []):
        scores = _quality_scores(_block_dct(y, dy, dx))
        top = scores.max()
        if top > best_s:
            tied = QUALITIES[scores >= top - 1e-9]
            best_q, best_s = int(tied[len(tied) // 2]), top
            null_s = _quality_scores(_block_dct(y, (dy + 4) % 8, (dx + 4) % 8)).max()
    if best_s < JPEG_MIN_SCORE or best_s - null_s < JPEG_MIN_MARGIN:
        return None, confidence, reason
    if best_s - null_s < 2 * JPEG_MIN_MARGIN and confidence == "high":
        confidence, reason = "low", "block lattice barely stands out"
    return best_q, confidence, reason


# --- The analysis ----------------------------------------------------------------------------------
@dataclass
class MeasuredItem(DegradationItem):
    """A <degradation> item with a note after its numbers: `noise: none (sigma 0.3, uncertain: 12
    flat patches)`. cot's parser reads the note's number as a parameter (`uncertain`: 12)."""

    note: str = ""

    def render(self) -> str:
        text = super().render()
        if not self.note:
            return text
        return text[:-1] + f", {self.note})" if self.params else f"{text} ({self.note})"

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.note:
            d["note"] = self.note
        return d


CONFIDENCES = ("high", "low", "unknown")
# The number a "low" noise or JPEG reading carries in its item (`confidence 0.5`), and a JPEG level
# read from the file's tables whose blocks the pixels do not show: the lite restorer scales the
# reading's effect by it (restorers/ladder.py), so an unsure reading restricts less than a sure one.
LOW_CONFIDENCE = 0.5
UNSEEN_BLOCKS = 0.25


@dataclass
class Analysis:
    noise_sigma: float  # 0-255 scale
    blur_sigma: float  # pixels of this image
    jpeg_quality: int | None  # None: no compression detected
    jpeg_source: str | None  # "file", "pixels", or None
    items: list[DegradationItem] = field(default_factory=list)
    # Per type: "high", "low" or "unknown" (not measurable here: the value is a guess, the item says so).
    confidence: dict[str, str] = field(default_factory=dict)
    confidence_reasons: dict[str, str] = field(default_factory=dict)  # why, for types not "high"
    noise: NoiseEstimate | None = None
    blur: BlurEstimate | None = None

    def to_dict(self) -> dict:
        d = {
            "noise_sigma": round(self.noise_sigma, 2),
            "blur_sigma": round(self.blur_sigma, 2),
            "jpeg_quality": self.jpeg_quality,
            "jpeg_source": self.jpeg_source,
            "items": [i.to_dict() for i in self.items],
            "confidence": dict(self.confidence),
            "confidence_reasons": dict(self.confidence_reasons),
        }
        if self.noise is not None:
            d["noise_detail"] = self.noise.to_dict()
        if self.blur is not None:
            d["blur_edge_points"] = self.blur.edge_points
        return d


def analyze(rgb: np.ndarray, jpeg_quality_from_file: int | None = None) -> Analysis:
    """Measure blur, noise and JPEG quality of an HxWx3 float image in [0, 1].

    `jpeg_quality_from_file` (from the file's tables) wins over the pixel estimate when given.
    An item whose confidence is "unknown" carries a note in its text (see `MeasuredItem`).
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    noise = estimate_noise_detail(rgb)
    blur = estimate_blur_detail(rgb, noise.sigma)
    if jpeg_quality_from_file is not None:
        quality, source, jpeg_conf, jpeg_reason = int(jpeg_quality_from_file), "file", "high", ""
        if level_for("jpeg", quality) != "none" and estimate_jpeg_detail(rgb)[0] is None:
            # The tables say how it was saved, not whether blocks show: resampled or mild, they may not.
            jpeg_conf, jpeg_reason = "low", f"the file's tables say quality {quality}, but no block lattice shows in the pixels"
    else:
        quality, jpeg_conf, jpeg_reason = estimate_jpeg_detail(rgb)
        source = "pixels" if quality is not None else None
    confidence = {"blur": blur.confidence, "noise": noise.confidence, "jpeg": jpeg_conf}
    reasons = {k: r for k, r in (("blur", blur.reason), ("noise", noise.reason), ("jpeg", jpeg_reason))
               if confidence[k] != "high" and r}
    noise_note = (f"uncertain: {noise.flat_patches} flat patches" if noise.confidence == "unknown"
                  else f"confidence {LOW_CONFIDENCE}" if noise.confidence == "low" and level_for("noise", noise.sigma) != "none"
                  else "")
    jpeg_note = ""
    if jpeg_conf == "low" and quality is not None:
        jpeg_note = f"confidence {UNSEEN_BLOCKS if source == 'file' else LOW_CONFIDENCE}"
    blur_note = f"uncertain: {blur.edge_points} edge points" if blur.confidence == "unknown" else ""
    items = [
        MeasuredItem("blur", level_for("blur", blur.sigma), {"sigma": blur.sigma}, note=blur_note),
        MeasuredItem("noise", level_for("noise", noise.sigma), {"sigma": noise.sigma}, note=noise_note),
        MeasuredItem("jpeg", level_for("jpeg", quality), {"quality": quality} if quality else {}, note=jpeg_note),
    ]
    return Analysis(noise.sigma, blur.sigma, quality, source, items, confidence, reasons, noise, blur)


# --- Regions, in words ---------------------------------------------------------------------------
# What the lite restorer's choice sees, said before it runs: local contrast of the input (the luma's
# standard deviation over REGION_BLOCK² blocks), as flat, textured or edges. The thresholds sit where
# the region blends' gates do on the output (blend.py: 0.04 … 0.16).
REGION_BLOCK = 4
REGION_CLASSES = (("flat", 0.0, 0.04), ("textured", 0.04, 0.16), ("edges", 0.16, 2.0))
PARTS = (("top", "middle", "bottom"), ("left", "centre", "right"))


def part_name(r: int, c: int) -> str:
    """The name of ninth (r, c) of an image (rows top → bottom, columns left → right)."""
    rows, cols = PARTS
    if (r, c) == (1, 1):
        return "centre"
    if r == 1:
        return cols[c]
    return rows[r] if c == 1 else f"{rows[r]} {cols[c]}"


def region_words(rgb: np.ndarray) -> dict[str, str]:
    """Plain-words `rough` and `middle` understanding of an HxWx3 float image: the share and place of
    flat, textured and edge regions (rough), and the dominant kind in each ninth of it (middle)."""
    y = np.asarray(rgb, np.float32)[..., :3] @ LUMA.astype(np.float32)
    b = REGION_BLOCK
    h, w = (y.shape[0] // b) * b, (y.shape[1] // b) * b
    if h == 0 or w == 0:
        return {"rough": "too small to describe", "middle": "too small to describe"}
    std = y[:h, :w].reshape(h // b, b, w // b, b).std(axis=(1, 3))
    kind = np.digitize(std, [hi for _, _, hi in REGION_CLASSES[:-1]])
    total = kind.size
    rows3 = np.array_split(np.arange(kind.shape[0]), 3)
    cols3 = np.array_split(np.arange(kind.shape[1]), 3)
    parts = [[kind[np.ix_(rr, cc)] for cc in cols3] for rr in rows3]
    rough = []
    for k, (name, _, _) in enumerate(REGION_CLASSES):
        share = (kind == k).sum() / total
        if share < 0.005:
            continue
        shares = [[(p == k).mean() if p.size else 0.0 for p in row] for row in parts]
        r, c = np.unravel_index(int(np.argmax(shares)), (3, 3))
        rough.append(f"{name} {100 * share:.0f} % (most in the {part_name(r, c)})")
    middle = []
    for r in range(3):
        for c in range(3):
            p = parts[r][c]
            if not p.size:
                continue
            counts = np.bincount(p.ravel(), minlength=3) / p.size
            main = [REGION_CLASSES[k][0] for k in np.argsort(-counts) if counts[k] >= 0.25]
            middle.append(f"{part_name(r, c)}: {' and '.join(main[:2])}")
    return {"rough": "; ".join(rough), "middle": "; ".join(middle)}


# --- CLI ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .cli import Parser

    p = Parser(
        prog="python -m realsr_r1.analyze",
        description="Estimate noise sigma, blur sigma and JPEG quality of images without any model. "
        "Prints one JSON object per image.",
    )
    p.add_argument("images", nargs="+", help="image files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    failed = 0
    for name in args.images:
        path = Path(name)
        try:
            image = read_image(path)
            file_q = jpeg_quality_from_file(path) if image.format == "JPEG" else None
            a = analyze(image.rgb, jpeg_quality_from_file=file_q)
        except Exception as e:  # one bad image must not end the batch
            reason = " ".join(str(e).split())
            print(f"{name}: {reason if isinstance(e, ImageReadError) else f'{type(e).__name__}: {reason}'}",
                  file=sys.stderr)
            failed += 1
            continue
        print(json.dumps({
            "file": name, "noise_sigma": round(a.noise_sigma, 2), "blur_sigma": round(a.blur_sigma, 2),
            "jpeg_quality": a.jpeg_quality, "jpeg_source": a.jpeg_source,
            "items": [i.render() for i in a.items], "confidence": a.confidence,
        }), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
