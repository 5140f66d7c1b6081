"""Accuracy of the classical degradation analyser on single synthetic degradations.

    python benchmarks/analyzer_accuracy.py [--images DIR] [--trials 10] [--seed 0]

Base images are the real photos in examples/ (RealSRSet). They are low quality themselves, so each
is area-downscaled first (factor min side / 80, rounded, kept within 2..4, giving 60-90 px bases):
averaging neighbouring pixels removes most of their own noise and JPEG blocking. What is left still
counts as error here: the truth is the degradation we add, not what the base already had.

On each base, one degradation at a time with the helpers of realsr_r1.degrade, parameters drawn
uniformly: Gaussian noise sigma 0..30 (grey noise with p 0.4, as Real-ESRGAN), Gaussian blur sigma
0.5..3, JPEG quality 30..95 (Pillow's encoder; the quality is read back from the file's tables and
estimated from the decoded pixels alone). A pixel estimate of "no JPEG" counts as quality 100.
Prints a markdown table with the targets; exits 1 if any target fails.

A second table (information, no target) runs the full second-order pipeline of degrade.py on the
photos as they are (as HR, ×4) and compares the analyser with its labels: this is where a
classical analyser is weakest (noise made spatially correlated by later resizes and JPEG, and
JPEG grids destroyed by a later resize).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from realsr_r1.analyze import analyze, jpeg_quality_from_file
from realsr_r1.cot import level_for
from realsr_r1.degrade import add_gaussian_noise, degrade, effective_degradation, gaussian_blur, image_seed
from realsr_r1.imageio import list_images, read_image, to_uint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def clean_base(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """Area-downscale by an integer factor (2..4) so the photo's own noise and blocking average out."""
    f = int(np.clip(round(min(rgb.shape[:2]) / 80), 2, 4))
    h, w = rgb.shape[0] // f * f, rgb.shape[1] // f * f
    base = rgb[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))
    return to_uint(base).astype(np.float32) / 255.0, f


def quantise(rgb: np.ndarray) -> np.ndarray:
    """What a saved 8-bit PNG holds."""
    return to_uint(rgb).astype(np.float32) / 255.0


def seconds_512(path: Path) -> float:
    """Median wall time of analyze() on a 512x512 resize of a photo."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB").resize((512, 512), Image.BICUBIC), dtype=np.float32) / 255
    times = []
    for _ in range(3):
        t = time.perf_counter()
        analyze(rgb)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def pipeline_agreement(paths: list[Path], seeds: int, base_seed: int) -> list[tuple[str, float, float]]:
    """(type, MAE, level agreement) of the analyser against degrade.py's labels."""
    pairs = {"blur": [], "noise": [], "jpeg": []}
    for path in paths:
        hr = read_image(path).rgb
        for k in range(seeds):
            d = degrade(hr, 4, seed=image_seed(base_seed + k, path.name))
            truth, a = effective_degradation(d.params), analyze(d.lq)
            pairs["blur"].append((truth["blur_sigma"], a.blur_sigma))
            pairs["noise"].append((truth["noise_sigma"], a.noise_sigma))
            pairs["jpeg"].append((truth["jpeg_quality"], a.jpeg_quality))
    out = []
    for kind, tv in pairs.items():
        agree = np.mean([level_for(kind, t) == level_for(kind, v) for t, v in tv])
        q100 = [(100 if t is None else t, 100 if v is None else v) for t, v in tv]  # no JPEG = 100
        mae = np.mean([abs(t - v) for t, v in q100])
        out.append((kind, float(mae), float(agree)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=EXAMPLES,
                   help="folder of base photos (default: examples/)")
    p.add_argument("--trials", type=int, default=10, help="draws per image and degradation type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipeline-seeds", type=int, default=5,
                   help="second-order degradations per photo for the information table (0 = skip)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = {k: [] for k in ("noise", "blur", "jpeg_file", "jpeg_pixels")}  # (truth, estimate)
    clean_jpeg, clean_noise, factors = [], [], []
    paths = list_images(args.images)
    if not paths:
        print(f"no images in {args.images}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="analyzer_bench_"))
    for path in paths:
        base, f = clean_base(read_image(path).rgb)
        factors.append(f)
        a = analyze(base)
        clean_jpeg.append(a.jpeg_quality)
        clean_noise.append(a.noise_sigma)
        for _ in range(args.trials):
            sigma = float(rng.uniform(0, 30))
            noisy = quantise(add_gaussian_noise(base, sigma, rng, gray=bool(rng.uniform() < 0.4)))
            rows["noise"].append((sigma, analyze(noisy).noise_sigma))

            sigma = float(rng.uniform(0.5, 3))
            rows["blur"].append((sigma, analyze(quantise(gaussian_blur(base, sigma))).blur_sigma))

            q = int(rng.integers(30, 96))
            jpg = tmp / f"{path.stem}_q{q}.jpg"
            Image.fromarray(to_uint(base)).save(jpg, "JPEG", quality=q)
            rows["jpeg_file"].append((q, jpeg_quality_from_file(jpg)))
            est = analyze(read_image(jpg).rgb).jpeg_quality
            rows["jpeg_pixels"].append((q, 100 if est is None else est))
            jpg.unlink()
    tmp.rmdir()

    def stats(kind: str, level_kind: str) -> tuple[int, float, float]:
        truth, est = map(np.asarray, zip(*rows[kind]))
        acc = np.mean([level_for(level_kind, t) == level_for(level_kind, e) for t, e in zip(truth, est)])
        return len(truth), float(np.abs(truth - est).mean()), float(acc)

    n_noise, mae_noise, acc_noise = stats("noise", "noise")
    n_blur, mae_blur, acc_blur = stats("blur", "blur")
    n_file, mae_file, acc_file = stats("jpeg_file", "jpeg")
    n_pix, mae_pix, acc_pix = stats("jpeg_pixels", "jpeg")
    exact_file = all(t == e for t, e in rows["jpeg_file"])
    none_clean = sum(q is None for q in clean_jpeg)
    checks = [
        ("noise sigma (0-255)", "0–30", n_noise, f"{mae_noise:.2f}", acc_noise, "MAE ≤ 2",
         mae_noise <= 2),
        ("blur sigma (px)", "0.5–3", n_blur, f"{mae_blur:.2f}", acc_blur, "level acc ≥ 60%",
         acc_blur >= 0.6),
        ("JPEG quality, file tables", "30–95", n_file, f"{mae_file:.2f}", acc_file, "exact", exact_file),
        ("JPEG quality, pixels", "30–95", n_pix, f"{mae_pix:.2f}", acc_pix, "MAE ≤ 8", mae_pix <= 8),
        ("JPEG on never-compressed bases", "–", len(clean_jpeg), "–", none_clean / len(clean_jpeg),
         "all None", none_clean == len(clean_jpeg)),
    ]
    print(f"Bases: {len(paths)} photos from {args.images}, "
          f"area-downscaled ×{min(factors)}–×{max(factors)}; "
          f"{args.trials} draws per image and type (seed {args.seed}).")
    print(f"Analyser's noise reading on the clean bases (their own residual noise, counted as error): "
          f"mean {np.mean(clean_noise):.2f}, max {np.max(clean_noise):.2f}.")
    print(f"Analyser time on a 512×512 image: {seconds_512(paths[0]):.2f} s.\n")
    print("| degradation | range | n | MAE | level accuracy | target | result |")
    print("|---|---|---|---|---|---|---|")
    for name, rng_text, n, mae, acc, target, ok in checks:
        verdict = "pass" if ok else "FAIL"
        print(f"| {name} | {rng_text} | {n} | {mae} | {100 * acc:.0f}% | {target} | {verdict} |")
    if args.pipeline_seeds:
        rows_p = pipeline_agreement(paths, args.pipeline_seeds, args.seed)
        print(f"\nAnalyser vs degrade.py labels on the full second-order pipeline (photos as HR, ×4; "
              f"{args.pipeline_seeds} seeds each; information, no target):\n")
        print("| type | MAE | level agreement |")
        print("|---|---|---|")
        for kind, mae, agree in rows_p:
            print(f"| {kind} | {mae:.2f} | {100 * agree:.0f}% |")
    return 0 if all(c[-1] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
