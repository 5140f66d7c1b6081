"""Accuracy of the classical degradation analyser, by input size (64², 128², 256², 512²).

    python benchmarks/analyzer_accuracy.py [--sizes 64 128 256 512] [--samples 40] [--seed 0]

Bases. Two kinds of photo: the RealSRSet photos in examples/, which are low quality themselves, are
area-downscaled ×2 first (averaging neighbouring pixels removes most of their own noise and JPEG
blocking); the clean photos that scikit-image ships (astronaut, coffee, motorcycle; a
development dependency, skipped when it is missing) are used as they are. A base of size S is an
S×S crop of one of these (up to 4 non-overlapping crops per photo, centred), after a mild bicubic
enlargement (at most ×1.3) where the photo is a little smaller than S. What the base still has of
its own counts as error: the truth is the degradation we add.

Table 1, single degradations on each base, parameters drawn uniformly: Gaussian noise sigma 0..30
(grey noise with p 0.4, as Real-ESRGAN), Gaussian blur sigma 0.5..3, JPEG quality 30..95 (Pillow's
encoder; read back from the file's tables, and estimated from the decoded pixels alone, where "no
JPEG" counts as quality 100). `--samples` draws per size and type, spread over that size's bases.

Table 2, the full second-order pipeline of degrade.py (HR = the base enlarged ×4, bicubic; LQ = S×S)
against its labels: the case the analyser was weakest at (noise made spatially correlated by the
later resizes, sinc and JPEG; JPEG grids destroyed by a later resize).

Each table gives, per type, the mean absolute error (sigma on 0-255 for noise, pixels for blur,
quality for JPEG) and the level accuracy (cot.level_for of truth and estimate agree). For the noise
it also gives the share of estimates the analyser marks as low confidence, and the level accuracy of
the others. Exits 1 if a target of table 1 fails at any size.

`--before FILE` also runs another version of the analyser (e.g. one taken from git history with
`git show REV:realsr_r1/analyze.py > /tmp/analyze_before.py`) on the same cases, for a before/after.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from realsr_r1.cot import level_for
from realsr_r1.degrade import add_gaussian_noise, degrade, effective_degradation, gaussian_blur
from realsr_r1.imageio import list_images, read_image, to_uint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLEAN_PHOTOS = ("astronaut.png", "coffee.png", "motorcycle_left.png")  # chelsea is a JPEG at q 98
SIZES = (64, 128, 256, 512)
MAX_ENLARGE = 1.3
CROPS_PER_PHOTO = 4


def quantise(rgb: np.ndarray) -> np.ndarray:
    """What a saved 8-bit PNG holds."""
    return to_uint(rgb).astype(np.float32) / 255.0


def area_down(rgb: np.ndarray, f: int) -> np.ndarray:
    h, w = rgb.shape[0] // f * f, rgb.shape[1] // f * f
    return quantise(rgb[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3)))


def resize(rgb: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(to_uint(rgb)).resize((w, h), Image.BICUBIC), np.float32) / 255.0


def photos(images: Path) -> list[tuple[str, np.ndarray]]:
    """(name, working image): RealSRSet photos downscaled ×2, scikit-image's clean photos as they are."""
    out = [(p.name, area_down(read_image(p).rgb, 2)) for p in list_images(images)]
    try:
        import skimage
    except ImportError:
        return out
    folder = Path(skimage.__file__).parent / "data"
    for name in CLEAN_PHOTOS:
        if (folder / name).is_file():
            out.append((name, read_image(folder / name).rgb))
    return out


def bases(photo_list: list[tuple[str, np.ndarray]], size: int) -> list[tuple[str, np.ndarray]]:
    """Up to CROPS_PER_PHOTO non-overlapping, centred size×size crops of every photo big enough."""
    out = []
    for name, rgb in photo_list:
        h, w = rgb.shape[:2]
        if min(h, w) < size:
            k = size / min(h, w)
            if k > MAX_ENLARGE:
                continue
            rgb = resize(rgb, max(size, round(w * k)), max(size, round(h * k)))
            h, w = rgb.shape[:2]
        ny, nx = h // size, w // size
        cells = [(i, j) for i in range(ny) for j in range(nx)]
        cells.sort(key=lambda c: (abs(c[0] - (ny - 1) / 2) + abs(c[1] - (nx - 1) / 2), c))
        top, left = (h - ny * size) // 2, (w - nx * size) // 2
        for i, j in cells[:CROPS_PER_PHOTO]:
            y, x = top + i * size, left + j * size
            out.append((f"{name}@{x},{y}", rgb[y:y + size, x:x + size].copy()))
    return out


@dataclass
class Case:
    kind: str  # noise | blur | jpeg | clean | pipeline
    base: str
    rgb: np.ndarray
    truth: dict
    jpeg_path: Path | None = None
    estimates: dict = field(default_factory=dict)


def make_cases(base_list, samples: int, rng: np.random.Generator, tmp: Path, size: int) -> list[Case]:
    cases = [Case("clean", name, rgb, {"noise": 0.0, "blur": None, "jpeg": None}) for name, rgb in base_list]
    for k in range(samples):
        name, base = base_list[k % len(base_list)]
        sigma = float(rng.uniform(0, 30))
        noisy = quantise(add_gaussian_noise(base, sigma, rng, gray=bool(rng.uniform() < 0.4)))
        cases.append(Case("noise", name, noisy, {"noise": sigma}))
        sigma = float(rng.uniform(0.5, 3))
        cases.append(Case("blur", name, quantise(gaussian_blur(base, sigma)), {"blur": sigma}))
        q = int(rng.integers(30, 96))
        jpg = tmp / f"s{size}_{k}_q{q}.jpg"
        Image.fromarray(to_uint(base)).save(jpg, "JPEG", quality=q)
        cases.append(Case("jpeg", name, read_image(jpg).rgb, {"jpeg": q}, jpg))
        hr = resize(base, 4 * size, 4 * size)
        d = degrade(hr, 4, seed=int(rng.integers(2**62)))
        t = effective_degradation(d.params)
        cases.append(Case("pipeline", name, d.lq,
                          {"noise": t["noise_sigma"], "blur": t["blur_sigma"], "jpeg": t["jpeg_quality"]}))
    return cases


def load_analyzer(path: str | None):
    """The analyser module: this checkout's, or another version of analyze.py given as a file."""
    if path is None:
        from realsr_r1 import analyze
        return analyze
    spec = importlib.util.spec_from_file_location("realsr_r1._analyze_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # its relative imports resolve inside realsr_r1
    return module


def run(module, cases: list[Case], tag: str) -> list[float]:
    times = []
    for c in cases:
        t = time.perf_counter()
        a = module.analyze(c.rgb)
        times.append(time.perf_counter() - t)
        conf = getattr(a, "confidence", None) or {}
        c.estimates[tag] = {
            "noise": a.noise_sigma, "blur": a.blur_sigma, "jpeg": a.jpeg_quality,
            "noise_low": conf.get("noise", "high") != "high",
            "jpeg_file": module.jpeg_quality_from_file(c.jpeg_path) if c.jpeg_path else None,
        }
    return times


def _q(v):
    return 100 if v is None else v  # no JPEG = quality 100


def score(cases: list[Case], tag: str, kind: str, quantity: str) -> dict:
    pairs = [(c.truth[quantity], c.estimates[tag][quantity], c.estimates[tag]["noise_low"])
             for c in cases if c.kind == kind]
    if quantity == "jpeg":
        pairs = [(_q(t), _q(e), low) for t, e, low in pairs]
    if not pairs:
        return {}
    truth = np.array([p[0] for p in pairs], float)
    est = np.array([p[1] for p in pairs], float)
    ok = np.array([level_for(quantity, t) == level_for(quantity, e) for t, e in zip(truth, est)])
    low = np.array([p[2] for p in pairs])
    return {"n": len(pairs), "mae": float(np.abs(truth - est).mean()), "acc": float(ok.mean()),
            "low": float(low.mean()), "acc_confident": float(ok[~low].mean()) if (~low).any() else float("nan")}


def pct(v: float) -> str:
    return "–" if v != v else f"{100 * v:.0f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=EXAMPLES, help="folder of RealSRSet-like photos (default: examples/)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--samples", type=int, default=40, help="draws per size and degradation type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--before", help="another analyze.py to run on the same cases (before/after)")
    args = p.parse_args(argv)
    photo_list = photos(args.images)
    if not photo_list:
        print(f"no images in {args.images}", file=sys.stderr)
        return 2
    versions = {"after": load_analyzer(None)}
    if args.before:
        versions = {"before": load_analyzer(args.before), **versions}
    rng = np.random.default_rng(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="analyzer_bench_"))
    results, failed = {}, []
    for size in args.sizes:
        base_list = bases(photo_list, size)
        if not base_list:
            print(f"{size}²: no photo big enough, skipped", file=sys.stderr)
            continue
        cases = make_cases(base_list, args.samples, rng, tmp, size)
        times = {tag: run(m, cases, tag) for tag, m in versions.items()}
        results[size] = (base_list, cases, times)
        for c in cases:
            if c.jpeg_path:
                c.jpeg_path.unlink()
    tmp.rmdir()

    print(f"Photos: {len(photo_list)} ({args.images.name}/ ×2 downscaled, and scikit-image's clean photos); "
          f"{args.samples} draws per size and type (seed {args.seed}); "
          f"bases per size: {', '.join(f'{s}²: {len(r[0])}' for s, r in results.items())}.\n")
    print("Table 1: single degradations (noise σ 0–30, blur σ 0.5–3, JPEG q 30–95). "
          "MAE / level accuracy; 'low conf.' = share of noise estimates marked low confidence.\n")
    print("| size | version | noise MAE | noise acc | low conf. | acc (confident) | clean: noise none "
          "| blur MAE | blur acc | JPEG file exact | JPEG pixels MAE | JPEG pixels acc | clean: no JPEG | ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, (base_list, cases, times) in results.items():
        for tag in versions:
            n, b, j = score(cases, tag, "noise", "noise"), score(cases, tag, "blur", "blur"), score(cases, tag, "jpeg", "jpeg")
            clean = [c for c in cases if c.kind == "clean"]
            none_noise = np.mean([level_for("noise", c.estimates[tag]["noise"]) == "none" for c in clean])
            none_jpeg = np.mean([c.estimates[tag]["jpeg"] is None for c in clean])
            exact = np.mean([c.estimates[tag]["jpeg_file"] == c.truth["jpeg"] for c in cases if c.kind == "jpeg"])
            ms = 1000 * float(np.median(times[tag]))
            print(f"| {size}² | {tag} | {n['mae']:.2f} | {pct(n['acc'])} | {pct(n['low'])} | {pct(n['acc_confident'])} "
                  f"| {pct(none_noise)} | {b['mae']:.2f} | {pct(b['acc'])} | {pct(exact)} | {j['mae']:.1f} "
                  f"| {pct(j['acc'])} | {pct(none_jpeg)} | {ms:.0f} |")
            if tag == "after":
                checks = [("noise MAE ≤ 2", n["mae"] <= 2), ("blur level acc ≥ 60%", b["acc"] >= 0.6),
                          ("JPEG file tables exact", exact == 1), ("JPEG pixels MAE ≤ 8", j["mae"] <= 8),
                          ("no JPEG found on never-compressed bases", none_jpeg == 1)]
                failed += [f"{size}²: {name}" for name, ok in checks if not ok]
    print("\nTable 2: the full second-order pipeline of degrade.py (×4, LQ of the size given) against its "
          "labels (information, no target).\n")
    print("| size | version | noise MAE | noise acc | low conf. | acc (confident) | blur MAE | blur acc "
          "| JPEG MAE | JPEG acc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, (base_list, cases, times) in results.items():
        for tag in versions:
            n = score(cases, tag, "pipeline", "noise")
            b, j = score(cases, tag, "pipeline", "blur"), score(cases, tag, "pipeline", "jpeg")
            print(f"| {size}² | {tag} | {n['mae']:.2f} | {pct(n['acc'])} | {pct(n['low'])} | {pct(n['acc_confident'])} "
                  f"| {b['mae']:.2f} | {pct(b['acc'])} | {j['mae']:.1f} | {pct(j['acc'])} |")
    print("\nTargets (table 1, every size): noise MAE ≤ 2, blur level acc ≥ 60%, JPEG file tables exact, "
          "JPEG pixels MAE ≤ 8, no JPEG found on never-compressed bases: "
          + ("all pass" if not failed else "FAIL " + "; ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
