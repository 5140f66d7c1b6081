"""`python -m realsr_r1.evaluate`: the metrics of published SR tables, over folders of results.

    python -m realsr_r1.evaluate --pred results/lite --pred results/bicubic --gt data/HR \
        --metrics psnr,ssim,lpips --out results.json --csv per_image.csv --plot metrics.png --grid figures

Files are paired by name (stem, case-insensitive; `--pred-suffix _out` strips a suffix). PSNR, SSIM, NIQE
and PIQE are the project's own, to the protocol of pyiqa-computed tables (metrics.py, niqe.py, piqe.py);
learned metrics come from pyiqa when it and its weights are installed, otherwise they are skipped with one
line saying what to install. `--infer LQ_DIR` restores the LQ folder first (resumable) with a profile.
`--grid DIR` writes the comparison figure of each image (figures.py): the same crop of the bicubic-upscaled
LQ (`--infer` or `--lq`), every method and the GT, labelled with that image's values.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import figures
from . import metrics as M
from .metrics import FULL_REFERENCE, PYIQA_NAMES, MetricUnavailable, PyiqaMetric
from .imageio import (ImageReadError, atomic_write_bytes, atomic_write_text, list_images, read_image, to_pil,
                      write_image)

NO_REFERENCE = ("niqe", "piqe", "musiq", "maniqa", "clipiqa", "topiq_nr")
LOWER_IS_BETTER = {"lpips", "dists", "niqe", "piqe"}


@dataclass
class FolderResult:
    name: str
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    unmatched_pred: list[str] = field(default_factory=list)
    unmatched_gt: list[str] = field(default_factory=list)

    def mean(self, metric: str) -> float | None:
        vals = [v[metric] for v in self.per_image.values() if metric in v]
        if not vals:
            return None
        if any(math.isinf(x) for x in vals):
            return float("inf") if metric == "psnr" else float(np.mean(vals))
        return float(np.mean(vals))


# --- Metric back ends ---------------------------------------------------------------------------
class OwnMetric:
    """PSNR/SSIM from metrics.py (exact protocol, no weights)."""

    needs_gt = True

    def __init__(self, name: str, crop_border: int = 0):
        self.name = name
        self.fn = {"psnr": M.psnr, "ssim": M.ssim}[name]
        self.crop_border = crop_border

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor | None) -> torch.Tensor:
        return self.fn(pred, gt, crop_border=self.crop_border)


class PiqeMetric:
    """PIQE per image (no reference, lower is better, 0-100), to pyiqa's protocol; numpy, no weights."""

    name = "piqe"
    needs_gt = False

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        from .piqe import piqe_batch

        return torch.from_numpy(piqe_batch(pred))


def build_metrics(names: list[str], device: torch.device, *, has_gt: bool, crop_border: int = 0):
    """Instantiate what can run; return (metrics, skipped lines)."""
    built, skipped = [], []
    for name in names:
        if name in FULL_REFERENCE and not has_gt:
            skipped.append(f"{name}: needs --gt (full-reference metric)")
            continue
        if name in ("psnr", "ssim"):
            built.append(OwnMetric(name, crop_border))
        elif name == "niqe":  # the project's own (niqe.py): no pyiqa, no weights
            built.append(M.NiqeMetric())
        elif name == "piqe":  # the project's own (piqe.py), likewise
            built.append(PiqeMetric())
        elif name in PYIQA_NAMES:
            try:
                built.append(PyiqaMetric(name, device))
            except MetricUnavailable as e:
                skipped.append(str(e))
        else:
            raise SystemExit(f"error: unknown metric {name!r} (known: {', '.join(FULL_REFERENCE + NO_REFERENCE)})")
    return built, skipped


# --- Pairing and evaluation ---------------------------------------------------------------------------
def _key(path: Path, suffix: str) -> str:
    stem = path.stem
    if suffix and stem.endswith(suffix):
        stem = stem[: -len(suffix)]
    return stem.lower()


def pair_files(pred_dir: Path, gt_dir: Path | None, suffix: str = ""):
    preds = {_key(p, suffix): p for p in list_images(pred_dir)}
    if gt_dir is None:
        return [(k, p, None) for k, p in sorted(preds.items())], [], []
    gts = {_key(p, ""): p for p in list_images(gt_dir)}
    pairs = [(k, preds[k], gts[k]) for k in sorted(preds.keys() & gts.keys())]
    return pairs, sorted(preds[k].name for k in preds.keys() - gts.keys()), \
        sorted(gts[k].name for k in gts.keys() - preds.keys())


def _tensor(path: Path, device: torch.device) -> torch.Tensor:
    im = read_image(path, max_pixels=None)
    return torch.from_numpy(im.rgb).permute(2, 0, 1).unsqueeze(0).to(device)


def evaluate_folder(pred_dir: Path, gt_dir: Path | None, metrics, *, device: torch.device, suffix: str = "",
                    batch_size: int = 8, quiet: bool = False) -> FolderResult:
    """Every metric on every pair. Same-size images are stacked into batches of `batch_size`."""
    pairs, only_pred, only_gt = pair_files(pred_dir, gt_dir, suffix)
    result = FolderResult(pred_dir.name, unmatched_pred=only_pred, unmatched_gt=only_gt)
    loaded: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    for _, p, g in tqdm(pairs, disable=quiet, unit="img", desc=pred_dir.name, file=sys.stderr):
        try:
            pt = _tensor(p, device)
            gt = _tensor(g, device) if g is not None else None
            if gt is not None and pt.shape != gt.shape:
                raise ValueError(f"size {pt.shape[-1]}x{pt.shape[-2]} differs from ground truth "
                                 f"{gt.shape[-1]}x{gt.shape[-2]}")
            loaded.append((p.name, pt, gt))
        except (ImageReadError, ValueError) as e:
            result.errors[p.name] = str(e)
        if len(loaded) >= batch_size:
            _score_batch(loaded, metrics, result)
            loaded = []
    _score_batch(loaded, metrics, result)
    return result


def _score_batch(items, metrics, result: FolderResult) -> None:
    by_shape: dict[tuple, list] = {}
    for name, p, g in items:
        by_shape.setdefault(tuple(p.shape), []).append((name, p, g))
    for group in by_shape.values():
        names = [n for n, _, _ in group]
        pred = torch.cat([p for _, p, _ in group])
        gt = torch.cat([g for _, _, g in group]) if group[0][2] is not None else None
        for name in names:
            result.per_image.setdefault(name, {})
        for metric in metrics:
            try:
                vals = metric(pred, gt)
            except (ValueError, RuntimeError) as e:
                for name in names:
                    result.errors.setdefault(name, f"{metric.name}: {' '.join(str(e).split())}")
                continue
            for name, v in zip(names, vals.tolist()):
                result.per_image[name][metric.name] = float(v)


def bicubic_baseline(lq_dir: Path, gt_dir: Path, out_dir: Path) -> Path:
    """LQ images upscaled with bicubic interpolation to their ground truth's size (the classic baseline)."""
    from PIL import Image

    gts = {_key(p, ""): p for p in list_images(gt_dir)}
    for lq in list_images(lq_dir):
        gt = gts.get(_key(lq, ""))
        target = out_dir / f"{lq.stem}.png"
        if gt is None or target.exists():
            continue
        try:
            im = read_image(lq, max_pixels=None)
            with Image.open(gt) as g:
                size = g.size
        except (ImageReadError, OSError):
            continue  # reported when the restored folder is evaluated

        write_image(target, bicubic_up(im.rgb, size))
    return out_dir


def bicubic_up(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize to `size` (width, height) of the 8-bit image, as the baseline folder stores it."""
    from PIL import Image

    return np.asarray(to_pil(rgb).resize(size, Image.BICUBIC), np.float32) / 255.0


# --- Reporting -------------------------------------------------------------------------------------
def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "–"
    if math.isinf(v):
        return "inf"
    return f"{v:.2f}" if metric in ("psnr", "musiq", "piqe") else f"{v:.4f}"


def markdown_table(results: list[FolderResult], metric_names: list[str]) -> str:
    arrows = {m: ("↓" if m in LOWER_IS_BETTER else "↑") for m in metric_names}
    head = "| method | images | " + " | ".join(f"{m.upper()} {arrows[m]}" for m in metric_names) + " |"
    sep = "|---|---|" + "---|" * len(metric_names)
    rows = [f"| {r.name} | {len(r.per_image)} | " + " | ".join(_fmt(m, r.mean(m)) for m in metric_names) + " |"
            for r in results]
    return "\n".join([head, sep, *rows])


def write_csv(path: Path, results: list[FolderResult], metric_names: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "image", *metric_names])
    for r in results:
        for image, vals in sorted(r.per_image.items()):
            w.writerow([r.name, image, *(vals.get(m, "") for m in metric_names)])
    atomic_write_text(path, buf.getvalue())


def to_json(results: list[FolderResult], metric_names: list[str], skipped: list[str]) -> dict:
    def clean(v):
        return None if v is None else ("inf" if math.isinf(v) else v)

    return {
        "metrics": metric_names,
        "protocol": "PSNR/SSIM on BT.601 Y (0-255), SSIM on rounded Y, 11x11 Gaussian σ1.5, valid window",
        "skipped_metrics": skipped,
        "results": [{
            "method": r.name,
            "mean": {m: clean(r.mean(m)) for m in metric_names},
            "per_image": {k: {m: clean(v) for m, v in vals.items()} for k, vals in r.per_image.items()},
            "errors": r.errors,
            "unmatched_pred": r.unmatched_pred,
            "unmatched_gt": r.unmatched_gt,
        } for r in results],
    }


def plot(path: Path, results: list[FolderResult], metric_names: list[str]) -> None:
    """One panel per metric, one bar (from 0) or, where the means are close, one dot per method."""
    shown = [m for m in metric_names if any(r.mean(m) is not None and math.isfinite(r.mean(m)) for r in results)]
    if not shown:
        raise ValueError("nothing to plot: no finite metric values")
    means = {m: [r.mean(m) for r in results] for m in shown}
    titles = {m: f"{m.upper()} {'↓' if m in LOWER_IS_BETTER else '↑'}" for m in shown}
    atomic_write_bytes(path, figures.chart_png([r.name for r in results], means, titles, _fmt))


# --- Comparison figures --------------------------------------------------------------------------------
def grid_images(gt_dir: Path, patterns: list[str]) -> list[Path]:
    """The GT images named by --grid-images (file names, stems or globs, any case); all without it."""
    gts = list_images(gt_dir)
    if not patterns:
        return gts
    chosen = set()
    for pat in patterns:
        hits = [g for g in gts if fnmatch(g.name.lower(), pat.lower()) or fnmatch(g.stem.lower(), pat.lower())]
        if not hits:
            raise ValueError(f"--grid-images {pat!r} matches no image in {gt_dir}")
        chosen.update(hits)
    return sorted(chosen)


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as read_image will give it (EXIF rotation applied), without decoding."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
    except Exception:  # unreadable: the evaluation reports it
        return None


def _score_one(metrics, pred: np.ndarray, gt: np.ndarray, device: torch.device) -> dict[str, float]:
    p, g = (torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).unsqueeze(0).to(device) for a in (pred, gt))
    values = {}
    for metric in metrics:
        try:
            values[metric.name] = float(metric(p, g if metric.needs_gt else None)[0])
        except (ValueError, RuntimeError):
            continue  # a label without this value; the table is the record
    return values


def write_grids(out_dir: Path, gts: list[Path], pred_dirs: list[Path], results: list[FolderResult], metrics, *,
                lq_dir: Path | None, suffix: str, crop: tuple[int, int, int, int] | None,
                device: torch.device) -> int:
    """One comparison figure per GT image, out_dir/NAME.png; returns how many were written."""
    preds = [{_key(p, suffix): p for p in list_images(d)} for d in pred_dirs]
    named_bicubic = any(r.name.lower() == "bicubic" for r in results)
    lqs = {_key(p, ""): p for p in list_images(lq_dir)} if lq_dir and not named_bicubic else {}
    if not named_bicubic and not lq_dir:
        print("note: --grid: no bicubic panel (name the LQ folder with --lq or --infer)", file=sys.stderr)
    written = 0
    for g in gts:
        key = _key(g, "")
        try:
            gt = read_image(g, max_pixels=None).rgb
        except ImageReadError:
            continue  # reported by the evaluation
        panels = []
        if key in lqs:
            try:
                up = bicubic_up(read_image(lqs[key], max_pixels=None).rgb, (gt.shape[1], gt.shape[0]))
                panels.append(figures.Panel("bicubic", up, _score_one(metrics, up, gt, device)))
            except ImageReadError as e:
                print(f"warning: {lqs[key]}: {e}: no bicubic panel", file=sys.stderr)
        for found, r in zip(preds, results):
            p = found.get(key)
            if p is None or p.name not in r.per_image:
                continue  # missing or an error, both already reported
            rgb = read_image(p, max_pixels=None).rgb
            panels.append(figures.Panel(r.name, rgb, dict(r.per_image[p.name])))
        panels.sort(key=lambda panel: panel.name.lower() != "bicubic")  # the baseline first, as papers do
        if not panels:
            print(f"warning: {g.name}: no method has this image, no figure", file=sys.stderr)
            continue
        box = crop or figures.auto_crop([panel.rgb for panel in panels], gt)
        fig = figures.comparison(gt, panels, box, title=g.stem, fmt=_fmt, lower_is_better=LOWER_IS_BETTER)
        atomic_write_bytes(out_dir / f"{g.stem}.png", figures.png_bytes(fig))
        written += 1
    return written


# --- CLI --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .cli import Parser

    p = Parser(prog="python -m realsr_r1.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--pred", action="append", required=True, help="folder of results (repeatable: one row each)")
    p.add_argument("--gt", help="folder of ground-truth HR images (without it: no-reference metrics only)")
    p.add_argument("--metrics", default=None,
                   help=f"comma list (default: psnr,ssim with --gt, else {','.join(NO_REFERENCE)}); "
                        f"known: {', '.join(FULL_REFERENCE + NO_REFERENCE)}")
    p.add_argument("--pred-suffix", default="", help="strip this from prediction stems before pairing, e.g. _out")
    p.add_argument("--crop-border", type=int, default=0, help="pixels cropped at each border (published: 0)")
    p.add_argument("--out", help="write results as JSON")
    p.add_argument("--csv", help="write per-image values as CSV")
    p.add_argument("--plot", help="write a chart of the means (PNG): bars from 0, dots where they differ by < 10%%")
    p.add_argument("--grid", metavar="DIR",
                   help="write DIR/NAME.png per image: the same crop of bicubic, each --pred and the GT, "
                        "with that image's values (needs --gt)")
    p.add_argument("--grid-images", metavar="NAMES",
                   help="with --grid: only these images, comma list of names or globs, e.g. frog,'b*'")
    p.add_argument("--crop", metavar="X,Y,W,H",
                   help="with --grid: this crop in GT pixels (default: where the methods differ most)")
    p.add_argument("--lq", metavar="LQ_DIR",
                   help="the LQ inputs of the --pred results, for --bicubic and the grid's bicubic panel "
                        "(--infer names them already)")
    p.add_argument("--infer", metavar="LQ_DIR",
                   help="first restore LQ_DIR into the first --pred folder (skips finished images)")
    p.add_argument("--profile", default="auto", help="profile for --infer")
    p.add_argument("--bicubic", action="store_true",
                   help="with --infer or --lq, and --gt: add a bicubic-upscaling row (LQ resized to each GT's size)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument("--verbose", action="store_true", help="also show the libraries' logs and warnings")
    return p


def _lq_dir(args) -> Path | None:
    if args.lq and args.infer and Path(args.lq).resolve() != Path(args.infer).resolve():
        raise ValueError(f"--lq {args.lq} and --infer {args.infer} name two LQ folders: give one")
    lq = args.infer or args.lq
    if lq and not Path(lq).is_dir():
        raise ValueError(f"{lq}: no such folder")
    return Path(lq) if lq else None


def _grid_plan(args, pred_dirs: list[Path], gt_dir: Path | None, lq_dir: Path | None):
    """(DIR, GT images, crop or None) for --grid, or None; ValueError for every bad combination."""
    if not args.grid:
        for flag, val in (("--grid-images", args.grid_images), ("--crop", args.crop)):
            if val:
                raise ValueError(f"{flag} needs --grid DIR")
        return None
    if not gt_dir:
        raise ValueError("--grid needs --gt (the figures compare with the ground truth)")
    if not gt_dir.is_dir():
        raise ValueError(f"{gt_dir}: no such folder")
    out_dir = Path(args.grid)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--grid {out_dir}: exists and is not a folder")
    bicubic = [("--bicubic", pred_dirs[0].parent / "bicubic")] if args.bicubic else []
    for flag, d in [("--gt", gt_dir), ("--lq", lq_dir), *(("--pred", p) for p in pred_dirs), *bicubic]:
        if d is not None and out_dir.resolve() == d.resolve():
            raise ValueError(f"--grid {out_dir} is the {flag} folder: its figures would replace those images")
    patterns = [p.strip() for p in (args.grid_images or "").split(",") if p.strip()]
    gts = grid_images(gt_dir, patterns)
    crop = figures.parse_crop(args.crop) if args.crop else None
    if crop:
        for g in gts:
            size = _header_size(g)
            if size:
                try:
                    figures.check_crop(crop, size)
                except ValueError as e:
                    raise ValueError(f"{g.name}: {e}") from None
    try:  # an unwritable DIR is found now, not after the evaluation
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--grid {out_dir}: cannot create ({e.strerror or e})") from None
    return out_dir, gts, crop


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import quiet

    quiet.configure(args.verbose)
    from .device import resolve_device

    pred_dirs = [Path(p) for p in args.pred]
    gt_dir = Path(args.gt) if args.gt else None
    try:  # every usage error before --infer spends minutes restoring
        lq_dir = _lq_dir(args)
        grid = _grid_plan(args, pred_dirs, gt_dir, lq_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.infer:
        from . import infer

        rc = infer.main(["--input", args.infer, "--output", str(pred_dirs[0]), "--profile", args.profile,
                         "--device", args.device] + (["--quiet"] if args.quiet else []))
        if rc == 2:
            return 2
    if args.bicubic:
        if not (lq_dir and gt_dir):
            print("error: --bicubic needs --infer LQ_DIR (or --lq LQ_DIR) and --gt", file=sys.stderr)
            return 2
        pred_dirs.append(bicubic_baseline(lq_dir, gt_dir, pred_dirs[0].parent / "bicubic"))
    for d in pred_dirs + ([gt_dir] if gt_dir else []):
        if not d.is_dir():
            print(f"error: {d}: no such folder", file=sys.stderr)
            return 2
    names = [m.strip().lower() for m in (args.metrics or ("psnr,ssim" if gt_dir else ",".join(NO_REFERENCE))).split(",")
             if m.strip()]
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics, skipped = build_metrics(names, device, has_gt=gt_dir is not None, crop_border=args.crop_border)
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    if not metrics:
        print("error: no metric can run (see the skipped lines above)", file=sys.stderr)
        return 2
    ran = [m.name for m in metrics]
    results = []
    for d in pred_dirs:
        r = evaluate_folder(d, gt_dir, metrics, device=device, suffix=args.pred_suffix, batch_size=args.batch_size,
                            quiet=args.quiet)
        for name, err in sorted(r.errors.items()):
            print(f"error: {d / name}: {err}", file=sys.stderr)
        if r.unmatched_pred or r.unmatched_gt:
            print(f"warning: {d}: {len(r.unmatched_pred)} prediction(s) without ground truth "
                  f"{r.unmatched_pred[:5]}, {len(r.unmatched_gt)} ground truth image(s) without prediction "
                  f"{r.unmatched_gt[:5]}", file=sys.stderr)
        results.append(r)
    print(markdown_table(results, ran))
    if args.out:
        atomic_write_text(args.out, json.dumps(to_json(results, ran, skipped), indent=2) + "\n")
    if args.csv:
        write_csv(Path(args.csv), results, ran)
    if args.plot:
        plot(Path(args.plot), results, ran)
    if grid:
        out_dir, gts, crop = grid
        try:
            n = write_grids(out_dir, gts, pred_dirs, results, metrics, lq_dir=lq_dir, suffix=args.pred_suffix,
                            crop=crop, device=device)
        except OSError as e:
            print(f"error: --grid {out_dir}: cannot write ({e.strerror or e})", file=sys.stderr)
            return 1
        print(f"wrote {n} comparison figure(s) to {out_dir}", file=sys.stderr)
    failed = any(r.errors for r in results) or not any(r.per_image for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
