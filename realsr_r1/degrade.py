"""Real-ESRGAN's second-order degradation, with every random draw recorded as a label.

The pipeline follows Real-ESRGAN's training code (`RealESRGANDataset` + `RealESRGANModel.feed_data`,
options of `train_realesrgan_x4plus.yml`) step by step:

    round 1: blur k1 → resize (up/down/keep) → Gaussian or Poisson noise → JPEG q1
    round 2: blur k2 (p 0.8) → resize relative to the LQ size → noise
    final  : [resize to HR/scale + sinc (p 0.8)] and [JPEG q2], in random order (p 0.5 each)

Kernels are drawn as basicsr draws them (iso/aniso/generalized/plateau Gaussians, or a circular
sinc with p 0.1), filtering is a reflect-padded 2-D correlation (by FFT) and resizing is torch's
`F.interpolate`, both as in Real-ESRGAN. Two deliberate differences: JPEG uses Pillow's real encoder
(4:2:0, integer quality) instead of DiffJPEG, and the HR is not unsharp-masked first (Real-ESRGAN
degrades a USM-sharpened GT; that sharpening is a training-target trick, not a degradation).
One `numpy.random.Generator` drives every draw, so a seed and an image give identical bytes.

From the recorded parameters `items_from_params` derives the VLCoT ground truth, each quantity as
it shows in the LQ image (levels via `cot.level_for`, so the analyser and the rewards agree):

* blur: Gaussian-equivalent sigma in LQ pixels. Each kernel (k1, k2, final sinc) gets an
  equivalent sigma in its own pixels: the Gaussian whose frequency response best fits (least
  squares, radially averaged) the kernel's over the band that survives into the LQ image. For a
  Gaussian this is its sigma (for aniso, about the RMS of the two axes); for generalized/plateau
  kernels it follows the visible fall-off rather than the heavy tails a second moment would weigh;
  for a sinc it tracks the cutoff (about 1.2/omega_c). Sigmas are scaled by (LQ size / size
  at which the kernel ran) and added in quadrature (variances add under convolution). The
  resampling filters themselves are not counted: an ideal downsample is the "sharp" reference.
* noise: the standard deviation (0-255 scale) of what the noise changed in the LQ image. The same
  degradation (same draws) runs a second time with the noise off and the two are compared, so the
  attenuation by the later blur, resizes, sinc and JPEG, and clipping, are all taken into account
  exactly (what JPEG makes of the noise counts as noise). Each noise stage also records its
  `sigma_equiv` where it was added: its sigma (Gaussian) or, for Poisson, the RMS sigma at the
  image's mean intensity, 255*scale*sqrt(mean/vals).
* jpeg: the lowest quality among the JPEG passes whose 8x8 blocks are still at least 4 LQ pixels
  wide (size ratio LQ/stage >= 0.5). The final-stage JPEG always qualifies; a round-1 JPEG that
  was followed by a strong downscale is averaged away and does not count.
* downsample: `x<scale>`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import signal, special

from .cot import DegradationItem, level_for, render_degradation
from .imageio import ImageReadError, atomic_write_text, list_images, read_image, to_uint, write_image

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
JPEG_VISIBLE_RATIO = 0.5  # a JPEG pass counts when its 8x8 blocks span >= 4 LQ pixels


@dataclass(frozen=True)
class RoundConfig:
    """The random ranges of one degradation round (Real-ESRGAN x4plus defaults: round 1)."""

    kernel_sizes: tuple[int, ...] = tuple(range(7, 22, 2))
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # order of KERNEL_TYPES
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag: tuple[float, float] = (0.5, 4.0)
    betap: tuple[float, float] = (1.0, 2.0)
    blur_prob: float = 1.0  # round 1 always blurs in Real-ESRGAN
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_sigma: tuple[float, float] = (1.0, 30.0)
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_quality: tuple[float, float] = (30.0, 95.0)


ROUND1 = RoundConfig()
ROUND2 = RoundConfig(
    blur_sigma=(0.2, 1.5), blur_prob=0.8, resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
    noise_sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5),
)
FINAL_SINC_PROB = 0.8


# --- Kernels (as basicsr.data.degradations builds them) ------------------------------------------
def _grid(size: int) -> np.ndarray:
    ax = np.arange(-size // 2 + 1.0, size // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x on the kernel grid, Sigma = R diag(sx^2, sy^2) R^T."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    g = _grid(size)
    return np.sum((g @ np.linalg.inv(cov)) * g, axis=-1)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0,
                    beta: float = 1.0, shape: str = "gaussian") -> np.ndarray:
    """Normalised bivariate kernel: plain/generalized Gaussian exp(-q^beta/2) or plateau 1/(q^beta+1)."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    if shape == "plateau":
        k = 1.0 / (np.power(q, beta) + 1.0)
    else:
        k = np.exp(-0.5 * np.power(q, beta))
    return k / k.sum()


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (2-D sinc / jinc) kernel with cutoff omega_c in radians per pixel."""
    c = (size - 1) / 2
    y, x = np.mgrid[:size, :size]
    r = np.hypot(x - c, y - c)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    k[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
    return k / k.sum()


def _draw_beta(rng: np.random.Generator, lo: float, hi: float) -> float:
    # basicsr picks the side of 1 first, so beta < 1 and beta > 1 are equally likely.
    return float(rng.uniform(lo, 1) if rng.uniform() < 0.5 else rng.uniform(1, hi))


def draw_kernel(rng: np.random.Generator, cfg: RoundConfig) -> dict:
    """The parameters of one blur kernel of a round, drawn as basicsr draws them."""
    size = int(rng.choice(cfg.kernel_sizes))
    if rng.uniform() < cfg.sinc_prob:
        lo = np.pi / 3 if size < 13 else np.pi / 5
        return {"type": "sinc", "kernel_size": size, "cutoff": float(rng.uniform(lo, np.pi))}
    kind = str(rng.choice(KERNEL_TYPES, p=cfg.kernel_prob))
    sx = float(rng.uniform(*cfg.blur_sigma))
    sy, theta = sx, 0.0
    if kind.endswith("aniso"):
        sy = float(rng.uniform(*cfg.blur_sigma))
        theta = float(rng.uniform(-np.pi, np.pi))
    p = {"type": kind, "kernel_size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta}
    if kind.startswith("generalized"):
        p["beta"] = _draw_beta(rng, *cfg.betag)
    elif kind.startswith("plateau"):
        p["beta"] = _draw_beta(rng, *cfg.betap)
    return p


def kernel_from_params(p: dict) -> np.ndarray:
    """Rebuild a kernel from its recorded parameters."""
    if p["type"] == "sinc":
        return sinc_kernel(p["kernel_size"], p["cutoff"])
    shape = "plateau" if p["type"].startswith("plateau") else "gaussian"
    return gaussian_kernel(p["kernel_size"], p["sigma_x"], p["sigma_y"], p["theta"],
                           p.get("beta", 1.0), shape)


def equivalent_sigma(kernel: np.ndarray, band: float = 1.0) -> float:
    """Sigma of the Gaussian whose frequency response best fits the kernel's on [0, band*pi].

    Least squares on the radially averaged response, so iso and aniso kernels, heavy-tailed
    plateaus and sincs all get one comparable number (exact for a Gaussian wider than a pixel).
    """
    n = 128 if band >= 0.5 else 256  # enough frequency samples inside a narrow band
    h = np.real(np.fft.fft2(kernel, (n, n)) * _centre_phase(kernel.shape[0], n))
    w = 2 * np.pi * np.fft.fftfreq(n)
    radius = np.hypot(*np.meshgrid(w, w))
    bins = np.linspace(0, band * np.pi, 33)
    idx = np.digitize(radius.ravel(), bins) - 1
    ok = (idx >= 0) & (idx < len(bins) - 1)
    counts = np.bincount(idx[ok], minlength=len(bins) - 1)
    resp = np.bincount(idx[ok], h.ravel()[ok], minlength=len(bins) - 1)
    keep = counts > 0
    wr = (np.bincount(idx[ok], radius.ravel()[ok], minlength=len(bins) - 1)[keep] / counts[keep])
    resp = resp[keep] / counts[keep]
    sigmas = np.linspace(0, 12, 2401)
    err = ((np.exp(-0.5 * np.outer(sigmas**2, wr**2)) - resp) ** 2).sum(axis=1)
    return float(sigmas[np.argmin(err)])


def _centre_phase(size: int, n: int) -> np.ndarray:
    """Phase that moves the kernel's centre to the origin, so a symmetric kernel's DFT is real."""
    f = np.fft.fftfreq(n) * 2 * np.pi * (size // 2)
    fx, fy = np.meshgrid(f, f)
    return np.exp(1j * (fx + fy))


# --- Single degradations ---------------------------------------------------------------------------
def _t(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]


def _np(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).numpy()


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every channel with `kernel`, reflect padding (basicsr's filter2D), via FFT."""
    r = kernel.shape[0] // 2
    padded = np.pad(img, ((r, r), (r, r), (0, 0)), mode="reflect")
    flipped = kernel[::-1, ::-1, None].astype(np.float32)  # correlation = convolution, kernel flipped
    return signal.fftconvolve(padded, flipped, mode="valid", axes=(0, 1)).astype(np.float32)


def resize(img: np.ndarray, mode: str, size: tuple[int, int] | None = None,
           scale: float | None = None) -> np.ndarray:
    """torch F.interpolate as Real-ESRGAN calls it: by scale_factor (round 1) or to a size."""
    if size is not None:
        return _np(F.interpolate(_t(img), size=tuple(size), mode=mode))
    return _np(F.interpolate(_t(img), scale_factor=scale, mode=mode))


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic Gaussian blur, sigma in pixels (kernel radius 3 sigma)."""
    if sigma <= 0:
        return img.astype(np.float32, copy=True)
    radius = max(1, math.ceil(3 * sigma))
    return filter2d(img, gaussian_kernel(2 * radius + 1, sigma))


def add_gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator,
                       gray: bool = False) -> np.ndarray:
    """Add N(0, sigma) noise, sigma on the 0-255 scale; gray = one field for all channels. Clips."""
    shape = img.shape[:2] + ((1,) if gray else (img.shape[2],))
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma / 255.0)
    return np.clip(img + noise, 0, 1)


def _luma(img: np.ndarray) -> np.ndarray:
    return img[..., :1] * 0.2989 + img[..., 1:2] * 0.587 + img[..., 2:3] * 0.114


def add_poisson_noise(img: np.ndarray, scale: float, rng: np.random.Generator,
                      gray: bool = False) -> tuple[np.ndarray, float]:
    """Real-ESRGAN's Poisson noise. Returns the image and the noise's RMS sigma (0-255 scale)."""
    base = _luma(img) if gray else img
    base = np.clip(np.round(base * 255.0), 0, 255) / 255.0
    # Photon count per unit intensity: next power of two of the number of grey values, as in basicsr.
    vals = 2 ** math.ceil(math.log2(len(np.unique(base))))
    noise = (rng.poisson(base * vals) / vals - base) * scale
    sigma = 255.0 * scale * math.sqrt(float(base.mean()) / vals)
    return np.clip(img + noise.astype(np.float32), 0, 1), sigma


def jpeg_bytes(img: np.ndarray, quality: int) -> bytes:
    """The JPEG file Pillow writes for `img` at `quality`."""
    buf = io.BytesIO()
    Image.fromarray(to_uint(img), "RGB").save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """A real JPEG round trip through Pillow's encoder (IJG tables, 4:2:0) at `quality`."""
    with Image.open(io.BytesIO(jpeg_bytes(img, quality))) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


# --- The second-order pipeline -------------------------------------------------------------------
@dataclass
class Degraded:
    lq: np.ndarray  # float32 HxWx3 in [0, 1], values on the 8-bit grid
    params: dict
    items: list[DegradationItem] = field(default_factory=list)

    @property
    def degradation(self) -> str:
        return render_degradation(self.items)


def _draw_resize(rng: np.random.Generator, cfg: RoundConfig) -> dict:
    direction = str(rng.choice(("up", "down", "keep"), p=cfg.resize_prob))
    if direction == "up":
        scale = float(rng.uniform(1, cfg.resize_range[1]))
    elif direction == "down":
        scale = float(rng.uniform(cfg.resize_range[0], 1))
    else:
        scale = 1.0
    return {"direction": direction, "scale": scale, "mode": str(rng.choice(RESIZE_MODES))}


def _draw_noise(rng: np.random.Generator, cfg: RoundConfig) -> dict:
    gray = bool(rng.uniform() < cfg.gray_noise_prob)
    if rng.uniform() < cfg.gaussian_noise_prob:
        return {"kind": "gaussian", "sigma": float(rng.uniform(*cfg.noise_sigma)), "gray": gray}
    return {"kind": "poisson", "scale": float(rng.uniform(*cfg.poisson_scale)), "gray": gray}


def _draw_quality(rng: np.random.Generator, cfg: RoundConfig) -> dict:
    return {"quality": int(round(rng.uniform(*cfg.jpeg_quality)))}


def _draw_blur(rng: np.random.Generator, cfg: RoundConfig) -> dict:
    applied = bool(cfg.blur_prob >= 1 or rng.uniform() < cfg.blur_prob)
    return {"applied": True, **draw_kernel(rng, cfg)} if applied else {"applied": False}


def draw_params(rng: np.random.Generator, round1: RoundConfig = ROUND1, round2: RoundConfig = ROUND2,
                final_sinc_prob: float = FINAL_SINC_PROB) -> dict:
    """Every random choice of one degradation, in Real-ESRGAN's order; no image needed."""
    r1 = {"blur": _draw_blur(rng, round1), "resize": _draw_resize(rng, round1),
          "noise": _draw_noise(rng, round1), "jpeg": _draw_quality(rng, round1)}
    # Round 2's JPEG is the final stage's.
    r2 = {"blur": _draw_blur(rng, round2), "resize": _draw_resize(rng, round2),
          "noise": _draw_noise(rng, round2)}
    order = "resize_sinc_then_jpeg" if rng.uniform() < 0.5 else "jpeg_then_resize_sinc"
    fin: dict = {"order": order, "resize": {"mode": str(rng.choice(RESIZE_MODES))},
                 "sinc": {"applied": bool(rng.uniform() < final_sinc_prob)}}
    if fin["sinc"]["applied"]:
        fin["sinc"].update(type="sinc", kernel_size=int(rng.choice(round2.kernel_sizes)),
                           cutoff=float(rng.uniform(np.pi / 3, np.pi)))
    fin["jpeg"] = _draw_quality(rng, round2)
    # The noise fields themselves come from their own stream, so a run without noise
    # (to measure how much of it shows) makes exactly the same other choices.
    return {"round1": r1, "round2": r2, "final": fin, "noise_seed": int(rng.integers(2**63))}


def _apply(hr: np.ndarray, params: dict, with_noise: bool = True) -> np.ndarray:
    """Run the recorded degradation on `hr`; fills in the sizes each step ran at. Float output."""
    h, w = params["hr_size"]
    lq_h, lq_w = params["lq_size"]
    scale = params["scale"]
    noise_rng = np.random.default_rng(params["noise_seed"])
    img = hr

    def blur(p: dict) -> None:
        nonlocal img
        kernel = kernel_from_params(p)
        img = filter2d(img, kernel)
        p["at_size"] = list(img.shape[:2])
        p["sigma_equiv"] = equivalent_sigma(kernel, band=min(1.0, lq_h / img.shape[0]))

    def noise(p: dict) -> None:
        nonlocal img
        p["at_size"] = list(img.shape[:2])
        if not with_noise:
            return
        if p["kind"] == "gaussian":
            img = add_gaussian_noise(img, p["sigma"], noise_rng, p["gray"])
            p["sigma_equiv"] = p["sigma"]
        else:
            img, p["sigma_equiv"] = add_poisson_noise(img, p["scale"], noise_rng, p["gray"])

    def jpeg(p: dict) -> None:
        nonlocal img
        p["at_size"] = list(img.shape[:2])
        img = jpeg_compress(np.clip(img, 0, 1), p["quality"])

    def resize_sinc(p: dict) -> None:
        nonlocal img
        img = resize(img, p["resize"]["mode"], size=(lq_h, lq_w))
        if p["sinc"]["applied"]:
            blur(p["sinc"])

    r1, r2, fin = params["round1"], params["round2"], params["final"]
    if r1["blur"]["applied"]:
        blur(r1["blur"])
    img = resize(img, r1["resize"]["mode"], scale=r1["resize"]["scale"])
    noise(r1["noise"])
    jpeg(r1["jpeg"])
    if r2["blur"]["applied"]:
        blur(r2["blur"])
    # Round 2 resizes relative to the LQ size, as in Real-ESRGAN.
    s = r2["resize"]["scale"]
    img = resize(img, r2["resize"]["mode"], size=(max(1, int(h / scale * s)), max(1, int(w / scale * s))))
    noise(r2["noise"])
    if fin["order"] == "resize_sinc_then_jpeg":
        resize_sinc(fin)
        jpeg(fin["jpeg"])
    else:
        jpeg(fin["jpeg"])
        resize_sinc(fin)
    return img


def degrade(hr: np.ndarray, scale: int = 4, seed: int | np.random.Generator | None = 0,
            round1: RoundConfig = ROUND1, round2: RoundConfig = ROUND2,
            final_sinc_prob: float = FINAL_SINC_PROB) -> Degraded:
    """HxWx3 float HR → LQ of size (H//scale, W//scale) with recorded parameters and VLCoT items."""
    hr = np.asarray(hr, dtype=np.float32)
    if hr.ndim != 3 or hr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB array, got shape {hr.shape}")
    h, w = hr.shape[:2]
    if min(h // scale, w // scale) < 1:
        raise ValueError(f"image {w}x{h} is smaller than the scale factor {scale}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    params: dict = {"scale": scale, "hr_size": [h, w], "lq_size": [h // scale, w // scale]}
    if not isinstance(seed, np.random.Generator):
        params["seed"] = seed
    params.update(draw_params(rng, round1, round2, final_sinc_prob))
    out = _apply(hr, params)
    # Visible noise: what the noise changed in the final image, after every later step
    # (blur, resizes, JPEG) had its say. Same draws, noise off.
    clean = _apply(hr, copy.deepcopy(params), with_noise=False)
    params["measured"] = {"noise_sigma": float(255.0 * np.std(out - clean))}
    lq = (np.clip(np.round(out * 255.0), 0, 255) / 255.0).astype(np.float32)
    return Degraded(lq, params, items_from_params(params))


# --- Labels -----------------------------------------------------------------------------------------
def _ratio(lq_size: list[int], size: list[int]) -> float:
    return lq_size[0] / size[0]


def effective_degradation(params: dict) -> dict:
    """The LQ-visible quantities behind the items (see the module docstring)."""
    lq = params["lq_size"]
    kernels = [params["round1"]["blur"], params["round2"]["blur"], params["final"]["sinc"]]
    var = sum((k["sigma_equiv"] * _ratio(lq, k["at_size"])) ** 2 for k in kernels if k["applied"])
    jpegs = [params["round1"]["jpeg"], params["final"]["jpeg"]]
    visible = [j["quality"] for j in jpegs if _ratio(lq, j["at_size"]) >= JPEG_VISIBLE_RATIO]
    return {"blur_sigma": math.sqrt(var), "noise_sigma": params["measured"]["noise_sigma"],
            "jpeg_quality": min(visible) if visible else None, "scale": params["scale"]}


def items_from_params(params: dict) -> list[DegradationItem]:
    """VLCoT items [blur, noise, jpeg, downsample] for a recorded degradation."""
    eff = effective_degradation(params)
    q = eff["jpeg_quality"]
    return [
        DegradationItem("blur", level_for("blur", eff["blur_sigma"]), {"sigma": eff["blur_sigma"]}),
        DegradationItem("noise", level_for("noise", eff["noise_sigma"]), {"sigma": eff["noise_sigma"]}),
        DegradationItem("jpeg", level_for("jpeg", q), {"quality": q} if q is not None else {}),
        DegradationItem("downsample", level_for("downsample", eff["scale"])),
    ]


# --- CLI --------------------------------------------------------------------------------------------
def image_seed(base_seed: int, name: str) -> int:
    """Per-image seed from the base seed and the file name: stable when other files come and go."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: exact in any JSON reader


def one_line(e: BaseException) -> str:
    """A one-line reason: read errors as they are, anything else with its type."""
    text = " ".join(str(e).split())
    return text if isinstance(e, ImageReadError) else f"{type(e).__name__}: {text}"


def build_parser() -> argparse.ArgumentParser:
    from .cli import Parser

    p = Parser(
        prog="python -m realsr_r1.degrade",
        description="Synthesise low-quality images from HR images with Real-ESRGAN's second-order "
        "degradation. Writes NAME.png per input and labels.jsonl (every drawn parameter and the "
        "VLCoT degradation items).",
    )
    p.add_argument("--input", "-i", required=True, help="folder of HR images")
    p.add_argument("--output", "-o", required=True, help="output folder (created if missing)")
    p.add_argument("--scale", type=int, default=4, help="downsampling factor HR → LQ (default 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; each image's seed comes from it and the file name (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src, out = Path(args.input), Path(args.output)
    if not src.is_dir():
        print(f"error: --input {src} is not a folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    lines, failed, taken = [], 0, {}
    for path in list_images(src):
        name = path.stem + ".png"
        try:
            if name in taken:
                raise ValueError(f"output {name} would overwrite the one from {taken[name]}")
            result = degrade(read_image(path).rgb, args.scale, image_seed(args.seed, path.name))
            write_image(out / name, result.lq)
        except Exception as e:  # one bad image must not end the batch
            print(f"{path.name}: {one_line(e)}", file=sys.stderr)
            failed += 1
            continue
        taken[name] = path.name
        lines.append(json.dumps({
            "file": name, "source": path.name, "params": result.params,
            "items": [i.to_dict() for i in result.items], "degradation": result.degradation,
        }))
    atomic_write_text(out / "labels.jsonl", "".join(line + "\n" for line in lines))
    summary = f"wrote {len(lines)} image(s) and labels.jsonl to {out}"
    print(summary + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
