"""The lite profile on whole photos rather than 128² crops: quality on real mosaics, and memory.

Two commands, each printing markdown tables and the CPU they ran on (device.cpu_description()):

`mosaic DIR [--k 3] [--limit N] [--precision P] [--set KEY=VALUE]`: DIR holds LR/ and HR/ of
same-named real camera pairs (DRealSR's test crops: 128² LR, 512² HR). In sorted order the pairs are
grouped k×k (the remainder dropped) and tiled row by row into one (128k)² LR mosaic and the matching
(512k)² HR mosaic, so auto's region-by-region choice meets a photo with several different scenes.
The lite pipeline (built once, as `python -m realsr_r1.infer --profile lite` builds it) runs auto
(i) on each mosaic and (ii) on each crop one by one, and (iii) x4plus alone and DF2K alone
(`--fidelity 0` and `1`, LiteStages over the same experts) on the mosaics and on the crops: those
rows show what the mosaic costs the networks themselves, near the seams between photos, apart from
the choice. Each mosaic's output is cut back into its 512² tiles, and every tile is scored against
its HR (real_pairs.score: Y-PSNR/SSIM, NIQE, PIQE), and by Y-PSNR again away from the seams
(`--margin`, default 64 output pixels left out on every side of every tile, crop or mosaic alike):
near a seam DF2K sees an unrelated photo, and on DRealSR that alone costs it about 1 dB over whole
tiles while its output away from the seams is the crop's. Table: the rows, means over tiles, tile
count, and auto's mean ladder position (the record's `position`). Each expert's output on an input is
computed once and replayed for the one-expert rows (real_pairs.ExpertCache; the networks are
deterministic, so those rows are what `--fidelity 0` and `1` write).

`memory [--sizes 512,1024,2048] [--photo FILE]`: for each size, a size² input made by
reflect-tiling a real photo (examples/dog.png by default), saved to a temp folder, and
`python -m realsr_r1.infer --profile lite --input FILE --output DIR --quiet --overwrite` run as a
separate process under `/usr/bin/time -v` (else a python wrapper that reports its own
ru_maxrss) for `--fidelity auto`, `--fidelity 0` and ncnn x4plus
(`--set restorer.backend=ncnn --fidelity 0`). Table: size, mode, wall seconds, peak RSS of the
child (MB), auto's RSS over `--fidelity 0`'s; a failed run shows its one-line error.
`--rgba16` makes the inputs 16-bit RGBA. `--stand-in` replaces OpenVINO's inference by nearest ×4
in the child (the models still load), so 2048² and 4096² take minutes on 2 cores instead of hours,
and adds to each peak one runtime's buffers for a large image's window, measured apart: the experts
take turns with one set of them (regions.py), so that is what the real run holds beside the rest.

    python benchmarks/whole_photos.py mosaic /path/to/drealsr --k 3 --limit 27
    python benchmarks/whole_photos.py memory --sizes 512,1024
    python benchmarks/whole_photos.py memory --sizes 2048 --stand-in
    python benchmarks/whole_photos.py memory --sizes 4096 --stand-in --rgba16
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

METRICS = ("psnr", "ssim", "niqe", "piqe", "inner")


def tile_score(rgb: np.ndarray, hr: np.ndarray, margin: int) -> dict[str, float]:
    """real_pairs.score, and `inner`: Y-PSNR with `margin` pixels left out on every side."""
    from real_pairs import score

    out = score(rgb, hr)
    if margin > 0:
        out["inner"] = score(np.asarray(rgb)[margin:-margin, margin:-margin], hr[margin:-margin, margin:-margin],
                             psnr_only=True)["psnr"]
    else:
        out["inner"] = out["psnr"]
    return out


# --- mosaic ---------------------------------------------------------------------------------------
def mosaic(args) -> None:
    from real_pairs import ExpertCache, build, run_auto, run_fixed

    from realsr_r1.device import cpu_description
    from realsr_r1.imageio import LoadedImage, read_image, to_float

    folder = Path(args.dir)
    k = args.k
    names = sorted(p.name for p in (folder / "LR").iterdir() if (folder / "HR" / p.name).is_file())
    names = names[: args.limit]
    groups = [names[i:i + k * k] for i in range(0, len(names) - k * k + 1, k * k)]
    if not groups:
        raise SystemExit(f"error: fewer than {k * k} pairs")
    args.set = list(args.set)
    pipe, stages, fixed = build(args)
    cache = ExpertCache(stages.experts)
    x4, df2k = fixed[0.0], fixed[1.0]
    tiles: dict[str, list] = {"auto on mosaics": [], "auto on crops one by one": [], "x4plus alone on mosaics": [],
                              "x4plus alone": [], "DF2K alone on mosaics": [], "DF2K alone": []}
    positions: dict[str, list] = {"auto on mosaics": [], "auto on crops one by one": []}
    regions: dict[str, list] = {"auto on mosaics": [], "auto on crops one by one": []}
    seconds: dict[str, float] = {key: 0.0 for key in ("auto on mosaics", "auto on crops one by one", "x4plus alone")}
    t0 = time.perf_counter()
    for g, group in enumerate(groups):
        lrs = [to_float(read_image(folder / "LR" / n).rgb) for n in group]
        hrs = [to_float(read_image(folder / "HR" / n).rgb) for n in group]
        lh, lw = lrs[0].shape[:2]
        hh, hw = hrs[0].shape[:2]
        if any(a.shape[:2] != (lh, lw) for a in lrs) or any(a.shape[:2] != (hh, hw) for a in hrs):
            raise SystemExit(f"error: mosaic {g + 1}: the crops differ in size")
        lr_m = np.concatenate([np.concatenate(lrs[r * k:(r + 1) * k], axis=1) for r in range(k)], axis=0)
        # (i) auto on the mosaic
        cache.clear()
        result, sec = run_auto(pipe, LoadedImage(np.ascontiguousarray(lr_m, np.float32), format="PNG"))
        seconds["auto on mosaics"] += sec
        choice = result.info.get("choice") or {}
        positions["auto on mosaics"].append(float(choice.get("position", np.nan)))
        regions["auto on mosaics"] += np.ravel(choice.get("positions", [])).tolist()
        out = np.asarray(result.rgb)
        sy, sx = out.shape[0] // k, out.shape[1] // k
        if (sy, sx) != (hh, hw):
            raise SystemExit(f"error: mosaic output {out.shape[:2]} does not cut into {k}×{k} tiles of {hh}×{hw}")
        # each expert alone on the mosaic (its pass replayed): what the mosaic costs the networks themselves
        mosaic_image = LoadedImage(np.ascontiguousarray(lr_m, np.float32), format="PNG")
        alone = {"x4plus alone on mosaics": run_fixed(x4, mosaic_image),
                 "DF2K alone on mosaics": run_fixed(df2k, mosaic_image)}
        for j in range(k * k):
            r, c = divmod(j, k)
            cut = (slice(r * sy, (r + 1) * sy), slice(c * sx, (c + 1) * sx))
            tiles["auto on mosaics"].append(tile_score(out[cut], hrs[j], args.margin))
            for label, img in alone.items():
                tiles[label].append(tile_score(img[cut], hrs[j], args.margin))
        print(f"mosaic {g + 1}/{len(groups)}: {sec:.1f} s, position {positions['auto on mosaics'][-1]:.3f}, "
              f"regions {choice.get('grid')} {choice.get('positions')}", file=sys.stderr, flush=True)
        # (ii) auto on each crop, (iii) x4plus alone on each crop (its x4plus pass replayed)
        for j, name in enumerate(group):
            cache.clear()
            image = read_image(folder / "LR" / name)
            result, sec = run_auto(pipe, image)
            seconds["auto on crops one by one"] += sec
            choice = result.info.get("choice") or {}
            positions["auto on crops one by one"].append(float(choice.get("position", np.nan)))
            regions["auto on crops one by one"] += np.ravel(choice.get("positions", [])).tolist()
            tiles["auto on crops one by one"].append(tile_score(result.rgb, hrs[j], args.margin))
            t = time.perf_counter()
            tiles["x4plus alone"].append(tile_score(run_fixed(x4, image), hrs[j], args.margin))
            seconds["x4plus alone"] += time.perf_counter() - t
            tiles["DF2K alone"].append(tile_score(run_fixed(df2k, image), hrs[j], args.margin))
        print(f"  crops of mosaic {g + 1}: done ({time.perf_counter() - t0:.0f} s so far)", file=sys.stderr, flush=True)
    desc = stages.describe()
    print(f"\n### whole photos: {len(groups)} mosaics of {k}×{k} DRealSR pairs ({len(groups) * k * k} tiles); "
          f"{cpu_description()}; backend {desc['backend']}, precision {desc['precision']}\n")
    print(f"| restorer | PSNR | SSIM | NIQE ↓ | PIQE ↓ | PSNR {args.margin} px from the seams | tiles "
          "| auto's mean position | s (total) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, vals in tiles.items():
        m = {key: float(np.mean([v[key] for v in vals])) for key in METRICS}
        pos = f"{np.nanmean(positions[label]):.3f}" if label in positions else ("1" if "DF2K" in label else "0")
        secs = f"{seconds[label]:.0f}" if label in seconds else ""
        print(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['niqe']:.2f} | {m['piqe']:.2f} | {m['inner']:.2f} "
              f"| {len(vals)} "
              f"| {pos} | {secs} |")
    print("\nper-region positions auto chose (count of regions at each):")
    for label, vals in regions.items():
        vals = np.round(np.asarray(vals, float), 3)
        hist = ", ".join(f"{p:g}: {int(np.sum(vals == p))}" for p in sorted(set(vals.tolist())))
        print(f"- {label}: {hist} ({vals.size} regions)")
    print("\nOne expert alone: its network pass is the one auto ran on the same input, replayed (seconds: "
          "composition and scoring only; blank where not timed). Its mosaic rows against its crop rows are "
          "what the mosaic costs the networks themselves (each sees its neighbours' pixels near a seam).")


# --- memory ---------------------------------------------------------------------------------------
def make_input(photo: Path, size: int, path: Path, rgba16: bool = False) -> None:
    from PIL import Image

    src = np.asarray(Image.open(photo).convert("RGB"))
    tiled = src
    while tiled.shape[0] < size or tiled.shape[1] < size:  # reflect: the seams match
        tiled = np.pad(tiled, ((0, max(0, min(size - tiled.shape[0], tiled.shape[0]))),
                               (0, max(0, min(size - tiled.shape[1], tiled.shape[1]))), (0, 0)), mode="symmetric")
    tiled = np.ascontiguousarray(tiled[:size, :size])
    if not rgba16:
        Image.fromarray(tiled).save(path)
        return
    from realsr_r1.imageio import write_image  # 16-bit RGBA: the photo ×257, alpha a diagonal ramp

    ramp = np.add.outer(np.arange(size), np.arange(size)) / max(1, 2 * size - 2)
    write_image(path, tiled.astype(np.float32) / 255, alpha=ramp.astype(np.float32), bit_depth=16)


def measure(cmd: list[str], env: dict) -> tuple[float | None, float | None, str | None]:
    """(wall seconds, peak RSS MB, error line or None) of one child process."""
    timer = shutil.which("time") and Path("/usr/bin/time").is_file()
    if timer:
        full = ["/usr/bin/time", "-v"] + cmd
    else:
        wrap = ("import resource, runpy, sys; sys.argv = ['realsr_r1.infer'] + sys.argv[1:]\n"
                "try:\n    runpy.run_module('realsr_r1.infer', run_name='__main__')\n"
                "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
                "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
                "sys.exit(code)")
        full = [cmd[0], "-c", wrap] + cmd[3:]  # cmd = [python, -m, realsr_r1.infer, ...]
    t = time.perf_counter()
    proc = subprocess.run(full, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    err = proc.stderr
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err) or re.search(r"MAXRSS_KB (\d+)", err)
    rss = int(m.group(1)) / 1024 if m else None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in err.splitlines()
                 if ln.strip() and not ln.startswith("\t") and "Command exited" not in ln and "MAXRSS" not in ln]
        msg = lines[-1] if lines else f"exit status {proc.returncode}"
        return wall, rss, f"exit {proc.returncode}: {msg[:200]}"
    return wall, rss, None


# The child of `memory --stand-in`: the infer CLI with OpenVINO's inference replaced by nearest ×scale
# (the models still load and compile; their intermediate buffers are never allocated).
STAND_IN = ("import runpy, sys, numpy as np\n"
            "from realsr_r1.restorers import openvino_backend as ob\n"
            "ob.OpenVINONet.__call__ = lambda self, t: np.repeat(np.repeat(t, self.scale, 0), self.scale, 1)\n"
            "sys.argv = ['realsr_r1.infer'] + sys.argv[1:]\n"
            "runpy.run_module('realsr_r1.infer', run_name='__main__')\n")


def runtime_buffers(precision: str | None) -> float:
    """MB that one OpenVINO runtime's intermediate buffers add for the static window of a large image
    (one x4plus inference on a 288² tile, RSS after against before): what a stand-in run leaves out."""
    code = ("import resource, numpy as np\n"
            "from realsr_r1.restorers.esrgan import ESRGANRestorer\n"
            f"r = ESRGANRestorer.from_pretrained('realesrgan-x4plus', backend='openvino', precision={precision or 'auto'!r})\n"
            "r.net.fix_shape((288, 288)); x = np.random.default_rng(0).random((288, 288, 3), np.float32)\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
            "a = rss(); r.net(x); print('BUFFERS', rss() - a)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    m = re.search(r"BUFFERS ([\d.]+)", out.stdout)
    if not m:
        raise SystemExit(f"measuring the runtime's buffers failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(m.group(1))


def memory(args) -> None:
    from realsr_r1.device import cpu_description

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    modes = {
        "auto": ["--fidelity", "auto"],
        "fidelity 0": ["--fidelity", "0"],
    }
    if not args.stand_in:
        modes["ncnn x4plus (fidelity 0)"] = ["--set", "restorer.backend=ncnn", "--fidelity", "0"]
    extra = ["--precision", args.precision] if args.precision else []
    env = dict(os.environ)
    rows = []
    buffers = runtime_buffers(args.precision) if args.stand_in else 0.0
    with tempfile.TemporaryDirectory(prefix="whole_photos_") as tmp:
        tmp = Path(tmp)
        for size in sizes:
            src = tmp / f"photo_{size}.{'png' if not args.rgba16 else 'rgba16.png'}"
            make_input(Path(args.photo), size, src, args.rgba16)
            got = {}
            for mode, flags in modes.items():
                out = tmp / f"out_{size}_{mode.split()[0]}"
                head = [sys.executable, "-c", STAND_IN] if args.stand_in else [sys.executable, "-m", "realsr_r1.infer"]
                cmd = head + ["--profile", "lite", "--input", str(src),
                              "--output", str(out), "--quiet", "--overwrite"] + flags + extra
                wall, rss, err = measure(cmd, env)
                if rss is not None:
                    rss += buffers
                got[mode] = rss if err is None else None
                rows.append((size, mode, wall, rss, err))
                print(f"{size}² {mode}: {wall:.1f} s, {rss if rss is None else round(rss)} MB"
                      + (f" — {err}" if err else ""), file=sys.stderr, flush=True)
            ratio = (got["auto"] / got["fidelity 0"]) if got.get("auto") and got.get("fidelity 0") else None
            rows.append((size, "ratio", ratio))
    print(f"\n### peak memory and time of one `python -m realsr_r1.infer` process; {cpu_description()}; "
          f"input: {Path(args.photo).name} reflect-tiled to size²"
          + (" in 16-bit RGBA" if args.rgba16 else "")
          + (f"; stand-in networks, one runtime's buffers ({buffers:.0f} MB, measured apart) added" if args.stand_in
             else "") + "\n")
    print("| size | mode | seconds | peak RSS MB | auto RSS / fidelity 0 RSS |")
    print("|---|---|---|---|---|")
    for row in rows:
        if row[1] == "ratio":
            continue
        size, mode, wall, rss, err = row
        ratio = next((r[2] for r in rows if r[0] == size and r[1] == "ratio"), None)
        rtxt = f"{ratio:.2f}" if mode == "auto" and ratio is not None else ""
        if err:
            print(f"| {size}² | {mode} | {wall:.1f} | {'' if rss is None else f'{rss:.0f}'} | failed: {err} |")
        else:
            print(f"| {size}² | {mode} | {wall:.1f} | {rss:.0f} | {rtxt} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mosaic", help="auto on k×k mosaics of real pairs vs crop by crop")
    m.add_argument("dir", help="a folder with LR/ and HR/ (DRealSR's test crops)")
    m.add_argument("--k", type=int, default=3, help="crops per mosaic side (default 3: 9 per mosaic)")
    m.add_argument("--limit", type=int, default=None, help="the first N pairs (sorted)")
    m.add_argument("--precision", default=None, help="restorer.precision (default: the profile's auto)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a lite profile override")
    m.add_argument("--margin", type=int, default=64, help="output pixels left out around each tile for the "
                   "PSNR away from the seams (default 64)")
    r = sub.add_parser("memory", help="wall time and peak RSS of infer runs on big inputs")
    r.add_argument("--sizes", default="512,1024,2048", help="input sizes, comma-separated (default 512,1024,2048)")
    r.add_argument("--photo", default=str(REPO / "examples" / "dog.png"), help="the photo to reflect-tile")
    r.add_argument("--precision", default=None, help="--precision for the runs (default: the profile's auto)")
    r.add_argument("--rgba16", action="store_true", help="16-bit RGBA inputs (alpha a ramp) instead of 8-bit RGB")
    r.add_argument("--stand-in", action="store_true",
                   help="OpenVINO's inference replaced by nearest ×4 (minutes, not hours, at 2048² and 4096²): "
                        "RSS of everything else, plus one runtime's buffers measured apart (the experts take turns "
                        "with one set); no ncnn row")
    args = ap.parse_args()
    if args.cmd == "mosaic":
        mosaic(args)
    else:
        memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
