"""Full-reference metrics to the protocol of published SR tables (pyiqa's, as OSEDiff and RealSR-R1 use).

- Y channel of ITU-R BT.601 YCbCr: Y = 16 + 65.481 R + 128.553 G + 24.966 B, RGB in [0, 1], Y on 0-255.
- PSNR on the unrounded Y; identical images give +inf.
- SSIM on Y rounded to integers; 11x11 Gaussian window, sigma 1.5, 'valid' filtering, C1 = (0.01*255)^2,
  C2 = (0.03*255)^2, contrast-structure term clamped at 0, mean over the map, no downsampling.

Batched torch in, numbers out: images are tensors N x 3 x H x W (or HxWx3 numpy arrays) in [0, 1].
No CLI concerns here; `evaluate.py` and the rewards both call these.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .fullref import SSIM_C1, SSIM_C2, SSIM_SIGMA, SSIM_WINDOW, Y_WEIGHTS


def as_batch(img) -> torch.Tensor:
    """HxWx3 / HxW numpy (float [0,1] or uint8/uint16) or N x C x H x W tensor → float64 N x C x H x W."""
    if isinstance(img, torch.Tensor):
        t = img
        if t.dim() == 3:
            t = t.unsqueeze(0)
        return t.to(torch.float64)
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        arr = arr / 255.0
    elif arr.dtype == np.uint16:
        arr = arr / 65535.0
    if arr.ndim == 2:
        arr = arr[..., None]
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).permute(2, 0, 1)
    return t.unsqueeze(0)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W in [0,1] → N x 1 x H x W, BT.601 luma on the 0-255 scale (16..235)."""
    if x.shape[1] == 1:
        return x * 255.0  # already one channel: treat as luma
    w = torch.tensor(Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return 16.0 + (x * w).sum(dim=1, keepdim=True)


def _prepare(pred, gt, crop_border: int) -> tuple[torch.Tensor, torch.Tensor]:
    p, g = as_batch(pred), as_batch(gt)
    if p.shape[-2:] != g.shape[-2:]:
        raise ValueError(f"size mismatch: prediction {tuple(p.shape[-2:][::-1])} vs ground truth "
                         f"{tuple(g.shape[-2:][::-1])} (width, height)")
    if crop_border:
        p = p[..., crop_border:-crop_border, crop_border:-crop_border]
        g = g[..., crop_border:-crop_border, crop_border:-crop_border]
    return p, g.to(p.device)


def psnr(pred, gt, *, y_channel: bool = True, crop_border: int = 0) -> torch.Tensor:
    """PSNR in dB per image (N,). On Y (0-255 scale) by default, else on RGB."""
    p, g = _prepare(pred, gt, crop_border)
    if y_channel:
        p, g = rgb_to_y(p), rgb_to_y(g)
    else:
        p, g = p * 255.0, g * 255.0
    mse = ((p - g) ** 2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)  # mse 0 → +inf, as it should


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, *, dtype=torch.float64,
                     device=None) -> torch.Tensor:
    """The normalised 1-D Gaussian; SSIM's 2-D window is its outer product, applied as two passes."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(pred, gt, *, y_channel: bool = True, crop_border: int = 0) -> torch.Tensor:
    """SSIM per image (N,). On the rounded Y channel by default (channel mean of SSIM otherwise)."""
    p, g = _prepare(pred, gt, crop_border)
    if y_channel:
        p, g = rgb_to_y(p).round(), rgb_to_y(g).round()
    else:
        p, g = p * 255.0, g * 255.0
    n, c, h, w = p.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {w}x{h}")
    g1 = _gaussian_window(dtype=p.dtype, device=p.device)
    # The five local moments in one grouped convolution, the 11x11 window as 11x1 then 1x11 ('valid',
    # no padding): the same sums, 5x fewer multiplications; float64 has no fast 2-D kernel on CPU.
    stack = torch.cat([p, g, p * p, g * g, p * g], dim=1)
    k = 5 * c
    n1 = SSIM_WINDOW
    moments = F.conv2d(F.conv2d(stack, g1.view(1, 1, n1, 1).expand(k, 1, n1, 1), groups=k),
                       g1.view(1, 1, 1, n1).expand(k, 1, 1, n1), groups=k)
    mu_p, mu_g, pp, gg, pg = moments.split(c, dim=1)

    c1, c2 = SSIM_C1, SSIM_C2
    var_p = pp - mu_p**2
    var_g = gg - mu_g**2
    cov = pg - mu_p * mu_g
    luminance = (2 * mu_p * mu_g + c1) / (mu_p**2 + mu_g**2 + c1)
    cs = torch.relu((2 * cov + c2) / (var_p + var_g + c2))
    return (luminance * cs).mean(dim=(1, 2, 3))


# --- NIQE: the project's own (niqe.py), no weights ----------------------------------------------
class NiqeMetric:
    """NIQE per image (no reference, lower is better), to pyiqa's protocol; numpy, no pyiqa needed."""

    name = "niqe"
    needs_gt = False

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        from .niqe import niqe_batch

        return torch.from_numpy(niqe_batch(pred))


# --- Learned metrics through pyiqa (optional extra) ----------------------------------------------
FULL_REFERENCE = ("psnr", "ssim", "lpips", "dists")
# Learned metrics by the names pyiqa registers them under (MANIQA and TOPIQ as in the published tables).
# NIQE has a pyiqa name too, but evaluate uses NiqeMetric above (and the rewards niqe.py).
PYIQA_NAMES = {"lpips": "lpips", "dists": "dists", "niqe": "niqe", "musiq": "musiq",
               "maniqa": "maniqa-pipal", "clipiqa": "clipiqa", "topiq_nr": "topiq_nr"}
PYIQA_CACHE_HINT = "~/.cache/torch/hub/pyiqa (pyiqa's DEFAULT_CACHE_DIR)"


class MetricUnavailable(Exception):
    """A metric that cannot run here; the message is one line naming what is missing."""


class PyiqaMetric:
    """A learned metric through pyiqa (PolyForm Noncommercial licence; optional extra)."""

    def __init__(self, name: str, device: torch.device):
        try:
            import pyiqa  # noqa: F401
        except Exception as e:  # ImportError, or its own imports (torchvision) failing
            raise MetricUnavailable(
                f"{name}: needs pyiqa (pip install -e .[metrics]); import failed: {' '.join(str(e).split())[:120]}"
            ) from None
        self.name = name
        self.needs_gt = name in FULL_REFERENCE
        try:
            self.metric = pyiqa.create_metric(PYIQA_NAMES[name], device=device, as_loss=False)
        except Exception as e:  # no network and no cached weights, most often
            raise MetricUnavailable(
                f"{name}: pyiqa could not load its weights ({type(e).__name__}); download them once "
                f"with network (pyiqa.create_metric('{PYIQA_NAMES[name]}')) or copy them into {PYIQA_CACHE_HINT}"
            ) from None

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor | None) -> torch.Tensor:
        pred = pred.float()
        out = self.metric(pred, gt.float()) if self.needs_gt else self.metric(pred)
        return out.reshape(-1).double().cpu()
