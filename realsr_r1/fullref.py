"""Y-channel PSNR and SSIM in numpy, to the same protocol as metrics.py (its module doc), for paths
that must not import torch: the lite profile's chooser scores every region's candidates against the
input with these (rewards.visual.InputConsistency), and importing torch for that alone cost the
lite process about 1.6 s and 170 MB. metrics.psnr/ssim are the batched torch versions and take
their constants from here; tests check both give the same numbers."""

from __future__ import annotations

import numpy as np

Y_WEIGHTS = (65.481, 128.553, 24.966)  # BT.601: Y = 16 + w · RGB, RGB in [0, 1], Y on 0-255
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def gaussian_window() -> np.ndarray:
    """The normalised 1-D Gaussian (float64); SSIM's window is its outer product."""
    x = np.arange(SSIM_WINDOW, dtype=np.float64) - (SSIM_WINDOW - 1) / 2
    g = np.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """N x H x W x 3 (or HxWx3) float in [0, 1] → luma on 0-255, float64."""
    return 16.0 + np.asarray(rgb, np.float64)[..., :3] @ np.asarray(Y_WEIGHTS, np.float64)


def psnr_y(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """PSNR (dB) on the unrounded Y channel, per image of N x H x W x 3 batches."""
    p, g = y_channel(pred), y_channel(ref)
    mse = ((p - g) ** 2).reshape(p.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / mse)


def ssim_y(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """SSIM on the rounded Y channel per image of N x H x W x 3 batches ('valid' 11x11 Gaussian)."""
    p, g = np.round(y_channel(pred)), np.round(y_channel(ref))
    if min(p.shape[1:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got "
                         f"{p.shape[2]}x{p.shape[1]}")
    w = gaussian_window()

    def blur(x):  # separable: 11 along the rows, then 11 along the columns
        x = np.lib.stride_tricks.sliding_window_view(x, SSIM_WINDOW, axis=1) @ w
        return np.lib.stride_tricks.sliding_window_view(x, SSIM_WINDOW, axis=2) @ w

    mu_p, mu_g = blur(p), blur(g)
    var_p, var_g, cov = blur(p * p) - mu_p**2, blur(g * g) - mu_g**2, blur(p * g) - mu_p * mu_g
    luminance = (2 * mu_p * mu_g + SSIM_C1) / (mu_p**2 + mu_g**2 + SSIM_C1)
    cs = np.maximum((2 * cov + SSIM_C2) / (var_p + var_g + SSIM_C2), 0)
    return (luminance * cs).reshape(p.shape[0], -1).mean(axis=1)
