"""Choose the lite chooser's constants by cross-validation on real LR/HR pairs, and report held-out folds.

The constants: the low/high split of the experts' difference (blend.DETAIL_SIGMA, `--sigmas`),
where a noise reading starts and stops lowering auto's ceiling (NOISE_RAMP, sigma), the same for
JPEG quality (JPEG_RAMP), the highest rung auto may take (AUTO_BELOW_TOP) and COMPASS's gamma. Each
pair's two expert outputs are computed once; for each split, every position on a 0.05 grid of the
ladder is composed, scored by the chooser's reward (its parts, independent of the other constants)
and measured against the HR (Y-PSNR/SSIM, NIQE, PIQE). A setting of the constants then picks, per pair,
what the real chooser would pick (the ceiling rounded down to the grid), so a grid of settings costs
arithmetic only.

Folds: pair i (sorted names) is in fold i % K. For each fold, the setting with the best objective on
the other folds is reported on this one, beside x4plus alone on the same pairs. Objective: PSNR, less
2 per NIQE point and 0.2 per PIQE point above x4plus's on the same pairs (so perception may not pay
for fidelity). The last table is the setting chosen on all pairs (the product's defaults).

    python benchmarks/cross_validate.py DIR [--folds 2] [--limit N] [--sigmas 1.5,2,3]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

GRID = np.round(np.arange(0, 1.0001, 0.05), 4)
NOISE_RAMPS = [(a, a + w) for a in (4.0, 6.0, 8.0) for w in (4.0, 6.0, 10.0)]
JPEG_RAMPS = [(90.0, 70.0), (85.0, 60.0), (75.0, 50.0)]
TOPS = [1, 2, 0]  # AUTO_BELOW_TOP: rungs below the last expert alone
GAMMAS = [4.0, 7.0, 14.0]


class Cached:
    """An expert that replays a stored ×4 output (float32) for the image it was computed on."""

    def __init__(self, expert, store: dict):
        self.name, self.scale, self.store = expert.name, expert.scale, store
        self.device, self.backend, self.precision, self.tile = "cpu", "cached", expert.precision, expert.tile

    def _out(self, img):
        return self.store[hashlib.sha1(np.ascontiguousarray(img, np.float32).tobytes()).hexdigest()]

    def stream(self, img, out_dtype=np.float32, gray=False, **_):  # turns, skip: a replay needs neither
        from realsr_r1.restorers.esrgan import _quantize

        yield 0, _quantize(self._out(img), out_dtype)

    def restore(self, rgb, alpha=None, outscale=4.0, out_dtype=np.float32):
        from realsr_r1.restorers.esrgan import _quantize

        return _quantize(self._out(rgb), out_dtype), None

    def weights(self):
        return None


def split(sigma: float) -> None:
    """Set the ladder's low/high split (blend.DETAIL_SIGMA and the halo that goes with it)."""
    from realsr_r1.restorers import blend

    blend.DETAIL_SIGMA, blend.HALO = sigma, blend.halo(sigma)


def measure_pairs(folder: Path, limit: int | None, sigmas: list[float]):
    """Per pair: name, reading (plan), and per split and grid position its chooser parts and metrics."""
    from real_pairs import score

    from realsr_r1.analyze import analyze
    from realsr_r1.chooser import Chooser
    from realsr_r1.cot import parse_cot
    from realsr_r1.imageio import LoadedImage, read_image, to_float
    from realsr_r1.profiles import build_pipeline, load_config
    from realsr_r1.restorers.lite import LiteStages

    pipe = build_pipeline(load_config("lite", []))
    experts = pipe.restorer.experts
    chooser = Chooser()
    names = sorted(p.name for p in (folder / "LR").iterdir())[:limit]
    pairs = []
    t0 = time.perf_counter()
    for k, name in enumerate(names):
        lr = to_float(read_image(folder / "LR" / name).rgb)
        hr = to_float(read_image(folder / "HR" / name).rgb)
        key = hashlib.sha1(np.ascontiguousarray(lr, np.float32).tobytes()).hexdigest()
        image = LoadedImage(rgb=lr)
        text = "".join(pipe.policy.stream(image, analyze(lr), seed=0, scale=4.0))
        plan = parse_cot(text)
        rows = {}
        cached = [Cached(e, {key: e.upscale(lr)}) for e in experts]
        for sigma in sigmas:
            split(sigma)
            rows[sigma] = []
            for p in GRID:
                ((img, _),) = LiteStages(cached, None, fidelity=float(p)).choose_batch(lr, [plan])
                parts = chooser.measure([img], [lr])[0]
                rows[sigma].append({"parts": parts, **score(img, hr)})
        pairs.append({"name": name, "plan": plan, "rows": rows})
        print(f"  {k + 1}/{len(names)} {name} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return pairs, chooser


def choose(pair, setting, chooser) -> tuple[float, int]:
    """(the split, the grid index) the chooser picks for this pair under `setting`."""
    from realsr_r1.restorers import ladder as L
    from realsr_r1.rewards.text import compass_reward_value
    from realsr_r1.rewards.visual import q_lr_for

    sigma, noise, jpeg, below, gamma = setting
    L.NOISE_RAMP, L.JPEG_RAMP = noise, jpeg
    lad = L.Ladder(["x4plus", "df2k"])
    top = lad.position(max(0, len(lad.rungs) - 1 - below))
    ceil, _ = L.ceiling(pair["plan"], top)
    rungs = [lad.position(k) for k in range(len(lad.rungs)) if lad.position(k) <= ceil + 1e-9]
    cands = sorted({int(round(r / 0.05)) for r in rungs} | {int(np.floor(ceil / 0.05 + 1e-9))})
    q_lr = q_lr_for(pair["plan"].degradation) or 5.0
    best, value = cands[0], None
    for j in cands:
        m = pair["rows"][sigma][j]["parts"]
        if m["F"] is None or m["Q_SR"] is None:
            continue
        r = compass_reward_value(m["F"], q_lr, m["Q_SR"], gamma)
        if value is None or r > value:
            best, value = j, r
    return sigma, best


def table(pairs, picks) -> dict:
    """Mean metrics of each pair's pick, (split, grid index)."""
    keys = ("psnr", "ssim", "niqe", "piqe")
    return {k: float(np.mean([p["rows"][sigma][j][k] for p, (sigma, j) in zip(pairs, picks)])) for k in keys}


def fixed(pairs, j: int) -> list[tuple[float, int]]:
    """Grid index j for every pair (0 and the last: one expert alone, the same under every split)."""
    return [(next(iter(p["rows"])), j) for p in pairs]


def objective(m, base) -> float:
    return m["psnr"] - 2 * max(0.0, m["niqe"] - base["niqe"]) - 0.2 * max(0.0, m["piqe"] - base["piqe"])


def best_setting(pairs, chooser, settings):
    base = table(pairs, fixed(pairs, 0))
    scored = [(objective(table(pairs, [choose(p, s, chooser) for p in pairs]), base), s) for s in settings]
    return max(scored, key=lambda x: x[0])[1]


def fmt(s) -> str:
    sigma, noise, jpeg, below, gamma = s
    return f"split sigma {sigma:g}, noise {noise[0]:g}→{noise[1]:g}, jpeg {jpeg[0]:g}→{jpeg[1]:g}, top rung −{below}, γ {gamma:g}"


def row(label, m, n) -> str:
    return f"| {label} | {n} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['niqe']:.2f} | {m['piqe']:.2f} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--sigmas", default="1.5,2,3", help="low/high splits to try (output pixels, comma-separated)")
    args = ap.parse_args()
    from realsr_r1.device import cpu_description
    from realsr_r1.restorers import blend
    from realsr_r1.restorers import ladder as L

    defaults = (blend.DETAIL_SIGMA, L.NOISE_RAMP, L.JPEG_RAMP, L.AUTO_BELOW_TOP, 7.0)
    sigmas = sorted({float(x) for x in args.sigmas.split(",")} | {blend.DETAIL_SIGMA})
    pairs, chooser = measure_pairs(args.dir, args.limit, sigmas)
    settings = list(itertools.product(sigmas, NOISE_RAMPS, JPEG_RAMPS, TOPS, GAMMAS))
    print(f"CPU: {cpu_description()}; {len(pairs)} pairs, {len(settings)} settings, {args.folds} folds\n")
    head = "| rows | pairs | PSNR | SSIM | NIQE ↓ | PIQE ↓ |\n|---|---|---|---|---|---|"
    held = []
    for f in range(args.folds):
        test = [p for i, p in enumerate(pairs) if i % args.folds == f]
        train = [p for i, p in enumerate(pairs) if i % args.folds != f]
        s = best_setting(train, chooser, settings)
        m = table(test, [choose(p, s, chooser) for p in test])
        held.append((test, [choose(p, s, chooser) for p in test]))
        print(f"Fold {f + 1} (held out), setting chosen on the other folds: {fmt(s)}\n\n{head}")
        print(row("x4plus alone", table(test, fixed(test, 0)), len(test)))
        print(row("auto, product defaults", table(test, [choose(p, defaults, chooser) for p in test]), len(test)))
        print(row("auto, setting chosen on the other folds", m, len(test)) + "\n")
    allp = [p for t, _ in held for p in t]
    allpicks = [pick for _, picks in held for pick in picks]
    print(f"All folds, each pair scored by the setting chosen without it\n\n{head}")
    print(row("x4plus alone", table(allp, fixed(allp, 0)), len(allp)))
    print(row("DF2K alone", table(allp, fixed(allp, len(GRID) - 1)), len(allp)))
    print(row("auto, held-out settings", table(allp, allpicks), len(allp)) + "\n")
    s = best_setting(pairs, chooser, settings)
    print(f"Chosen on all pairs (for the defaults): {fmt(s)}; product defaults now: {fmt(defaults)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
