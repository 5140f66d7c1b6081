"""What the lite profile's reduced precisions cost in quality: OpenVINO INT8 (and bf16) against fp32.

Ground truth: the photos of $REALSR_R1_PHOTOS (e.g. RealSRSet, real low-quality photos; else the repo's
examples/), each trimmed to a multiple of 4, are the HR; the LQ is the project's own degradation
(degrade.degrade, seed = the photo's index). Each precision restores every LQ through the product
path (ESRGANRestorer.from_pretrained(backend="openvino"), default tiling, 8-bit output) and is scored
against the HR with Y-PSNR and SSIM (crop 4, metrics.py: the published tables' definitions). The
table gives the mean change against fp32 and the worst photo's, over all photos and over those not
in the default calibration set (the crops of examples/ are calibration data). The bar:
mean ≤ 0.05 dB Y-PSNR and ≤ 0.002 SSIM below fp32.

--keep-float replaces openvino_backend.INT8_KEEP_FLOAT for x4plus (regexes over the IR's node names,
comma separated) to try other layer choices; each choice is calibrated once and cached.

--max-isa avx2 measures on oneDNN's AVX2 kernels, as an AVX2-only CPU runs them (esrgan_speed.cap_isa).

--pairs DIR scores real camera pairs instead (DIR/LR, DIR/HR of same-named images, e.g. DRealSR's test
crops): each expert of --experts in fp32 and in each precision, Y-PSNR/SSIM against the HR (crop 4,
fullref.py, the same numbers as metrics.py), one table per fold (pair i of the sorted names is in fold
i % --folds) beside the table over all pairs, so a recipe tuned on one fold is reported on the others.
fp32 outputs are kept in --cache (default: a folder under the weights' compiled/ cache) between runs.

    python benchmarks/int8_quality.py [--precisions int8,bf16] [--keep-float '.*conv_(first|last)/.*'] [--max-isa avx2]
    python benchmarks/int8_quality.py --pairs DIR [--experts realesrgan-x4plus,realsr-df2k] [--folds 2] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from esrgan_speed import PHOTO_DIRS, cap_isa, photos  # noqa: E402  ($REALSR_R1_PHOTOS, else examples/)
PSNR_BAR, SSIM_BAR = 0.05, 0.002




def real_pairs(args) -> int:
    """Per expert and precision, the change from fp32 on real LR/HR pairs, per fold."""
    from PIL import Image

    from realsr_r1 import fullref, weights
    from realsr_r1.device import cpu_description
    from realsr_r1.restorers import openvino_backend
    from realsr_r1.restorers.esrgan import ESRGANRestorer

    root = Path(args.pairs)
    names = sorted(q.name for q in (root / "LR").iterdir() if (root / "HR" / q.name).is_file())[: args.limit]
    if not names:
        sys.exit(f"error: {root}: no same-named images in LR/ and HR/")
    load = lambda q: np.asarray(Image.open(q).convert("RGB"), np.float32) / 255  # noqa: E731
    lrs = [load(root / "LR" / n) for n in names]
    hrs = [load(root / "HR" / n) for n in names]
    if args.keep_float is not None:
        openvino_backend.INT8_KEEP_FLOAT["RRDBNet"] = tuple(x for x in args.keep_float.split(",") if x)
    core = openvino_backend._openvino().Core()
    precisions = [x for x in args.precisions.split(",") if x != "bf16" or openvino_backend.cpu_has_bf16(core)]
    cache = Path(args.cache) if args.cache else weights.default_dir() / "compiled" / "fp32-pairs"
    folds = np.arange(len(names)) % args.folds

    def scores(expert: str, precision: str) -> tuple[np.ndarray, np.ndarray]:
        # keyed by the runtime too: another OpenVINO may round fp32 differently
        keep = cache / f"{expert}-openvino-{openvino_backend.runtime_version()}-{root.name}-{len(names)}.npz"
        if precision == "fp32" and keep.is_file():
            out = np.load(keep)["out"]
        else:
            r = ESRGANRestorer.from_pretrained(expert, device="cpu", backend="openvino", precision=precision,
                                               calibration=args.calibration)
            out = np.stack([r.upscale(lr, np.uint8) for lr in lrs])
            if precision == "fp32":
                cache.mkdir(parents=True, exist_ok=True)
                np.savez(keep, out=out)
        c = 4  # the published protocol's crop
        sr = out[:, c:-c, c:-c].astype(np.float64) / 255
        hr = np.stack(hrs)[:, c:-c, c:-c].astype(np.float64)
        return fullref.psnr_y(sr, hr), fullref.ssim_y(sr, hr)

    print(f"\nOpenVINO precisions against fp32 on {len(names)} real pairs of {root.name} (Y-PSNR / SSIM vs HR, "
          f"crop 4); {cpu_description()}")
    print(f"INT8 layers kept in float (RRDBNet): {', '.join(openvino_backend.INT8_KEEP_FLOAT['RRDBNet']) or 'none'}\n")
    print("| expert | precision | pairs | fp32 Y-PSNR / SSIM | ΔY-PSNR mean dB | ΔY-PSNR worst dB | ΔSSIM mean | ΔSSIM worst | bar |")
    print("|---|---|---|---|---|---|---|---|---|")
    for expert in args.experts.split(","):
        ref_p, ref_s = scores(expert, "fp32")
        for precision in precisions:
            ps, ss = scores(expert, precision)
            for label, sel in [("all", folds >= 0)] + [(f"fold {k}", folds == k) for k in range(args.folds)]:
                dp, ds = ps[sel] - ref_p[sel], ss[sel] - ref_s[sel]
                ok = dp.mean() >= -PSNR_BAR and ds.mean() >= -SSIM_BAR
                print(f"| {expert} | {precision} | {label} ({sel.sum()}) | {ref_p[sel].mean():.3f} / {ref_s[sel].mean():.4f} "
                      f"| {dp.mean():+.4f} | {dp.min():+.3f} | {ds.mean():+.5f} | {ds.min():+.4f} | {'PASS' if ok else 'FAIL'} |",
                      flush=True)
            worst = np.argsort(ps - ref_p)[:3]
            print(f"  worst {precision}: " + ", ".join(f"{names[i]} {ps[i] - ref_p[i]:+.2f} dB" for i in worst), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", default="int8,bf16", help="compared with OpenVINO fp32")
    p.add_argument("--keep-float", default=None, help="x4plus layers kept in float (regexes, comma separated)")
    p.add_argument("--calibration", default=None, help="a folder of calibration images (default: the shipped crops)")
    p.add_argument("--max-isa", choices=("avx2",), help="cap oneDNN's kernels at this ISA (before any import of it)")
    p.add_argument("--pairs", default=None, help="a folder with LR/ and HR/: real camera pairs")
    p.add_argument("--experts", default="realesrgan-x4plus,realsr-df2k", help="with --pairs: the models to score")
    p.add_argument("--folds", type=int, default=2, help="with --pairs: pair i of the sorted names is in fold i %% K")
    p.add_argument("--limit", type=int, default=None, help="with --pairs: the first N pairs")
    p.add_argument("--cache", default=None, help="with --pairs: where fp32 outputs are kept between runs")
    args = p.parse_args()
    if args.max_isa:
        cap_isa(args.max_isa)
    if args.pairs:
        return real_pairs(args)

    from PIL import Image

    from realsr_r1 import degrade, metrics
    from realsr_r1.device import cpu_description
    from realsr_r1.restorers import openvino_backend
    from realsr_r1.restorers.esrgan import ESRGANRestorer

    if args.keep_float is not None:
        openvino_backend.INT8_KEEP_FLOAT["RRDBNet"] = tuple(x for x in args.keep_float.split(",") if x)
    core = openvino_backend._openvino().Core()
    precisions = [x for x in args.precisions.split(",") if x != "bf16" or openvino_backend.cpu_has_bf16(core)]
    calibrated = {q.name for q in (REPO / "examples").glob("*.png")}
    pairs = []
    for i, path in enumerate(photos()):
        hr = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
        hr = hr[: hr.shape[0] // 4 * 4, : hr.shape[1] // 4 * 4]
        pairs.append((path.name, hr, degrade.degrade(hr, seed=i).lq))

    def scores(precision: str) -> tuple[np.ndarray, np.ndarray]:
        r = ESRGANRestorer.from_pretrained(None, device="cpu", backend="openvino", precision=precision,
                                           calibration=args.calibration)
        ps, ss = [], []
        for _, hr, lq in pairs:
            sr = r.upscale(lq, np.uint8).astype(np.float32) / 255
            ps.append(float(metrics.psnr(sr, hr, y_channel=True, crop_border=4)))
            ss.append(float(metrics.ssim(sr, hr, y_channel=True, crop_border=4)))
        return np.array(ps), np.array(ss)

    ref_p, ref_s = scores("fp32")
    held = np.array([name not in calibrated for name, _, _ in pairs])
    print(f"\nReal-ESRGAN x4plus on OpenVINO against its fp32, {len(pairs)} photos of {PHOTO_DIRS[0].parent.name if held.any() else 'examples'} "
          f"degraded by degrade.degrade (Y-PSNR / SSIM vs HR, crop 4); {cpu_description()}")
    if "int8" in precisions:
        print(f"INT8 layers kept in float: {', '.join(openvino_backend.INT8_KEEP_FLOAT['RRDBNet']) or 'none'}")
    print(f"\nfp32: Y-PSNR {ref_p.mean():.3f} dB, SSIM {ref_s.mean():.4f}\n")
    print("| precision | photos | ΔY-PSNR mean dB | ΔY-PSNR worst dB | ΔSSIM mean | ΔSSIM worst | bar |")
    print("|---|---|---|---|---|---|---|")
    for precision in precisions:
        ps, ss = scores(precision)
        for label, sel in (("all", np.ones_like(held)), ("not calibrated on", held)):
            if not sel.any():
                continue
            dp, ds = ps[sel] - ref_p[sel], ss[sel] - ref_s[sel]
            ok = dp.mean() >= -PSNR_BAR and ds.mean() >= -SSIM_BAR
            print(f"| {precision} | {label} ({sel.sum()}) | {dp.mean():+.4f} | {dp.min():+.3f} | {ds.mean():+.5f} "
                  f"| {ds.min():+.4f} | {'PASS' if ok else 'FAIL'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
