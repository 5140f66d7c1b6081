"""Figures of an evaluation: the comparison grid SR papers show, and the chart of the means.

Comparison grid, one per image: a thumbnail of the ground truth with the crop drawn on it, then the
same crop of every method (bicubic first, the ground truth last), each labelled with its name and
that image's metric values, the best of each metric in red. The crop is chosen where the methods
differ most, or given. Drawing is Pillow only; the chart is matplotlib (already a dependency).
No CLI concerns here: `evaluate.py` reads the images, computes the values and writes the files.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .imageio import to_pil
from .fullref import Y_WEIGHTS

PANEL_H = 192  # display height of every crop and of the thumbnail, pixels
GAP, MARGIN = 6, 8
BEST, TEXT = (200, 0, 0), (20, 20, 20)
SMALL_RANGE = 0.10  # chart: means closer than 10 % of the largest are drawn as dots on a zoomed axis


@dataclass
class Panel:
    name: str
    rgb: np.ndarray  # HxWx3 float in [0, 1], the ground truth's size
    values: dict[str, float] = field(default_factory=dict)  # this image's metrics, e.g. {"psnr": 24.3}


# --- Crops -------------------------------------------------------------------------------------------------
def parse_crop(text: str) -> tuple[int, int, int, int]:
    """"x,y,w,h" → ints; ValueError with a one-line reason."""
    parts = text.replace(" ", "").split(",")
    try:
        x, y, w, h = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--crop {text!r}: expected x,y,w,h as four integers (GT pixels), e.g. 40,60,64,64") from None
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise ValueError(f"--crop {text!r}: x and y must be >= 0, w and h >= 1")
    return x, y, w, h


def check_crop(crop: tuple[int, int, int, int], size: tuple[int, int]) -> None:
    """ValueError unless the crop lies inside an image of `size` (width, height)."""
    x, y, w, h = crop
    if x + w > size[0] or y + h > size[1]:
        raise ValueError(f"--crop {x},{y},{w},{h} reaches ({x + w}, {y + h}), outside the "
                         f"{size[0]}x{size[1]} image")


def _luma(rgb: np.ndarray) -> np.ndarray:
    # The Y that PSNR and SSIM measure, so the crop shows what the numbers are about.
    return rgb[..., :3].astype(np.float32) @ (np.asarray(Y_WEIGHTS, np.float32))


def default_crop_side(size: tuple[int, int]) -> int:
    """A quarter of the short side, 16-128 px: small enough to enlarge, big enough to recognise."""
    short = min(size)
    return min(short, max(16, min(128, short // 4)))


def auto_crop(images: list[np.ndarray], gt: np.ndarray, side: int | None = None) -> tuple[int, int, int, int]:
    """The square window where the images differ most: the largest variance across them of the per-pixel
    error (for one image: its squared error against the ground truth). Searched on a map at most ~256 px
    across, so a 4K image costs about what a small one does."""
    height, width = gt.shape[:2]
    side = side or default_crop_side((width, height))
    g = _luma(gt)
    if len(images) > 1:
        # Running sums, not a stack: M full-size error maps would not fit for large images.
        s = np.zeros_like(g)
        s2 = np.zeros_like(g)
        for im in images:
            e = _luma(im) - g
            s += e
            s2 += e * e
        score = np.maximum(s2 / len(images) - (s / len(images)) ** 2, 0)
    else:
        score = (_luma(images[0]) - g) ** 2
    f = max(1, min(max(height, width) // 256, side))  # side <= the short side: the map keeps a window
    hc, wc = height // f, width // f
    coarse = score[: hc * f, : wc * f].reshape(hc, f, wc, f).mean(axis=(1, 3))
    k = max(1, side // f)
    k_h, k_w = min(k, hc), min(k, wc)
    integral = np.pad(coarse.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = (integral[k_h:, k_w:] - integral[:-k_h, k_w:] - integral[k_h:, :-k_w] + integral[:-k_h, :-k_w])
    if sums.max() <= 0:  # identical images: nothing to point at, show the centre
        return (width - side) // 2, (height - side) // 2, side, side
    cy, cx = np.unravel_index(int(np.argmax(sums)), sums.shape)
    # Centre the full-resolution window on the coarse window's centre, inside the image.
    x = int(min(max(cx * f + k_w * f // 2 - side // 2, 0), width - side))
    y = int(min(max(cy * f + k_h * f // 2 - side // 2, 0), height - side))
    return x, y, side, side


# --- The comparison figure ---------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable, offline
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit(size: tuple[int, int], box_h: int = PANEL_H, max_w: int = 2 * PANEL_H) -> tuple[int, int]:
    """Display size of `size` scaled to `box_h` high, at most `max_w` wide (very wide crops)."""
    s = min(box_h / size[1], max_w / size[0])
    return max(1, round(size[0] * s)), max(1, round(size[1] * s))


def _enlarge(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    # Enlarged crops keep their pixels (nearest), as a reader wants to see them; reductions filter.
    up = size[0] >= im.size[0]
    return im.resize(size, Image.NEAREST if up else Image.LANCZOS)


def _ellipsize(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _best(panels: list[Panel], lower_is_better: set[str]) -> dict[str, float]:
    best = {}
    for m in {m for p in panels for m in p.values}:
        vals = [p.values[m] for p in panels if m in p.values and not math.isnan(p.values[m])]
        if len(vals) > 1:  # a lone value is not "best" of anything
            best[m] = min(vals) if m in lower_is_better else max(vals)
    return best


def comparison(gt: np.ndarray, panels: list[Panel], crop: tuple[int, int, int, int], *, title: str,
               fmt=lambda m, v: f"{v:.4g}", lower_is_better: set[str] = frozenset()) -> Image.Image:
    """Thumbnail of `gt` with the crop drawn, then the crop of every panel and of `gt` (labelled "GT")."""
    font, small = _font(14), _font(12)
    line = 17
    x, y, w, h = crop
    gt_im = to_pil(gt)
    thumb_size = _fit(gt_im.size)
    crop_size = _fit((w, h))
    best = _best(panels, lower_is_better)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    # Label lines per panel: the name, then "PSNR 24.31" items wrapped to the panel's width.
    labels = []
    for p in [*panels, Panel("GT", gt)]:
        items = [(f"{m.upper()} {fmt(m, v)}", best.get(m) == v) for m, v in p.values.items()]
        rows, row, used = [], [], 0
        for text, is_best in items:
            tw = scratch.textlength(text, font=small)
            if row and used + 8 + tw > crop_size[0]:
                rows.append(row)
                row, used = [], 0
            row.append((text, is_best))
            used += tw + (8 if used else 0)
        if row:
            rows.append(row)
        labels.append((p, rows))
    thumb_rows = 2
    text_h = 6 + line * (1 + max(thumb_rows - 1, *(len(r) for _, r in labels)))

    width = MARGIN * 2 + thumb_size[0] + (GAP + crop_size[0]) * len(labels)
    height = MARGIN * 2 + PANEL_H + text_h
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)

    # Thumbnail with the crop rectangle (scaled to the thumbnail), and what and where.
    top = MARGIN + (PANEL_H - thumb_size[1]) // 2
    fig.paste(gt_im.resize(thumb_size, Image.LANCZOS), (MARGIN, top))
    sx, sy = thumb_size[0] / gt_im.size[0], thumb_size[1] / gt_im.size[1]
    draw.rectangle([MARGIN + x * sx, top + y * sy, MARGIN + (x + w) * sx - 1, top + (y + h) * sy - 1],
                   outline=(255, 32, 32), width=2)
    ty = MARGIN + PANEL_H + 4
    draw.text((MARGIN, ty), _ellipsize(draw, title, font, thumb_size[0]), fill=TEXT, font=font)
    draw.text((MARGIN, ty + line), _ellipsize(draw, f"crop {x},{y} {w}x{h} of {gt_im.size[0]}x{gt_im.size[1]}",
                                              small, thumb_size[0]), fill=TEXT, font=small)

    left = MARGIN + thumb_size[0] + GAP
    for p, rows in labels:
        im = _enlarge(to_pil(p.rgb).crop((x, y, x + w, y + h)), crop_size)
        fig.paste(im, (left, MARGIN + (PANEL_H - crop_size[1]) // 2))
        draw.text((left, ty), _ellipsize(draw, p.name, font, crop_size[0]), fill=TEXT, font=font)
        for i, row in enumerate(rows):
            cx = left
            for text, is_best in row:
                draw.text((cx, ty + line * (i + 1)), text, fill=BEST if is_best else TEXT, font=small)
                cx += scratch.textlength(text, font=small) + 8
        left += crop_size[0] + GAP
    return fig


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


# --- The chart of the means --------------------------------------------------------------------------------
def chart_scale(values: list[float | None]) -> tuple[str, tuple[float, float]]:
    """("bar", limits from 0) or, where the means differ by under 10 % of the largest, ("dot", zoomed
    limits): bars on a cut axis would exaggerate the differences; dots carry no length to misread."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "bar", (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    top = max(abs(lo), abs(hi))
    if len(vals) > 1 and top > 0 and (hi - lo) < SMALL_RANGE * top and (lo > 0 or hi < 0):
        pad = max(hi - lo, 0.01 * top) * 0.25
        return "dot", (lo - pad, hi + pad)
    return "bar", (min(0.0, lo) * 1.15, max(0.0, hi) * 1.15 or 1.0)


def chart_figure(methods: list[str], means: dict[str, list[float | None]], titles: dict[str, str], fmt):
    """One panel per metric (scales differ), one bar or dot per method, the value written on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(means), figsize=(3.2 * len(means) + 0.8, 3.6), squeeze=False)
    colors = [plt.get_cmap("tab10").colors[i % 10] for i in range(len(methods))]
    xs = list(range(len(methods)))
    for ax, (m, vals) in zip(axes[0], means.items()):
        kind, (lo, hi) = chart_scale(vals)
        finite = [(i, v) for i, v in enumerate(vals) if v is not None and math.isfinite(v)]
        if kind == "bar":
            ax.bar([i for i, _ in finite], [v for _, v in finite], color=[colors[i] for i, _ in finite])
        else:
            ax.scatter([i for i, _ in finite], [v for _, v in finite], color=[colors[i] for i, _ in finite],
                       s=60, zorder=3)
            ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(lo, hi)
        for i, v in enumerate(vals):
            shown = v if v is not None and math.isfinite(v) else (lo if kind == "dot" else 0.0)
            text = fmt(m, v)
            ax.annotate(text, (i, shown), xytext=(0, 4 if kind == "bar" else 7), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(titles[m] + (" (axis not from 0)" if kind == "dot" else ""), fontsize=10)
        ax.set_xticks(xs, methods, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(methods) - 0.4)
    fig.tight_layout()
    return fig


def chart_png(methods: list[str], means: dict[str, list[float | None]], titles: dict[str, str], fmt) -> bytes:
    import matplotlib.pyplot as plt

    fig = chart_figure(methods, means, titles, fmt)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
