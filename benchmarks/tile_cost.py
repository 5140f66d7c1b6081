"""Real-ESRGAN's time per input megapixel across image sizes: does tiling make some sizes dearer?

The default lite restorer (`ESRGANRestorer.from_pretrained()`: on CPU, OpenVINO in auto's precision;
--backend and --precision choose another) upscales square crops of a real photo (examples/dog.png,
Lanczos-resized to each size) to uint8, as the pipeline asks. Each size is run once to warm up (a
new window shape: the dynamic model's first call, or a static compile), then all sizes are timed in
turn, --repeats rounds in alternating order, so that a change in the machine's load falls on every
size alike; the best is kept. The table gives the tiles per axis and their window (input px), the
pixels the network computes per input pixel (windows overlap by 2·tile_pad at each cut), the
seconds, the seconds per input megapixel and that figure against the cheapest size, and the same for
the CPU time of this process's threads, which other jobs on the machine disturb far less. The
spread, max/min − 1 of (CPU) seconds per megapixel, should stay within SPREAD_LIMIT: time grows with
pixels, not in steps at tile boundaries. The 1-minute load average at each size's best run is
printed beside it: other jobs distort timings.

    python benchmarks/tile_cost.py [--sizes 192:512:32] [--repeats 3] [--precision bf16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTO = REPO / "examples" / "dog.png"
SPREAD_LIMIT = 0.25


def sizes_arg(text: str) -> list[int]:
    """'192:512:32' (first:last:step, last included) or '256,280'."""
    if ":" in text:
        first, last, step = (int(v) for v in text.split(":"))
        return list(range(first, last + 1, step))
    return [int(v) for v in text.split(",")]


def photo(size: int) -> np.ndarray:
    im = Image.open(PHOTO).convert("RGB")
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS))


def windows(r, size: int) -> tuple[str, float]:
    """("tiles per axis × window", pixels the network computes per input pixel) for a size² input."""
    from realsr_r1.restorers.esrgan import _spans

    spans = _spans(size, r.tile, r.tile_pad, r.scale)
    return f"{len(spans)} × {spans[0].ctx1 - spans[0].ctx0}", (sum(s.ctx1 - s.ctx0 for s in spans) / size) ** 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=sizes_arg, default=sizes_arg("192:512:32"),
                   help="square input sizes: first:last:step or a comma-separated list (default 192:512:32)")
    p.add_argument("--repeats", type=int, default=3, help="timing rounds over all sizes; each size's best is kept")
    p.add_argument("--backend", default="auto", help="auto | torch | openvino | ncnn")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | int8 (OpenVINO)")
    p.add_argument("--tile", type=int, default=None, help="input pixels per tile side (default: the backend's)")
    args = p.parse_args(argv)

    from realsr_r1.device import cpu_description
    from realsr_r1.restorers.esrgan import ESRGANRestorer

    r = ESRGANRestorer.from_pretrained(None, device="cpu", backend=args.backend, precision=args.precision,
                                       tile=args.tile)
    inputs = {size: photo(size) for size in args.sizes}
    for lr in inputs.values():
        r.upscale(lr, np.uint8)  # warm-up: this size's window shape
    wall = {size: (float("inf"), 0.0) for size in args.sizes}  # best (seconds, load average then)
    cpu = {size: float("inf") for size in args.sizes}  # best CPU seconds of this process's threads
    for k in range(args.repeats):
        for size, lr in list(inputs.items())[::-1 if k % 2 else 1]:
            load = os.getloadavg()[0]
            t, c = time.perf_counter(), time.process_time()
            r.upscale(lr, np.uint8)
            sec, cpu_sec = time.perf_counter() - t, time.process_time() - c
            wall[size], cpu[size] = min(wall[size], (sec, load)), min(cpu[size], cpu_sec)
            print(f"  round {k + 1}, {size}²: {sec:.2f} s, CPU {cpu_sec:.2f} s (load {load:.1f})", file=sys.stderr,
                  flush=True)
    rows = [(size, *windows(r, size), sec, cpu[size], load) for size, (sec, load) in wall.items()]

    per_mp = {size: (sec / (size * size / 1e6), cpu_sec / (size * size / 1e6)) for size, _, _, sec, cpu_sec, _ in rows}
    cheapest = [min(v[i] for v in per_mp.values()) for i in (0, 1)]
    print(f"\nReal-ESRGAN {r.name}, {r.backend} {r.precision}, tile {r.tile}, pad {r.tile_pad}; "
          f"CPU {cpu_description()}; best of {args.repeats}\n")
    print("| input | tiles per axis × window | computed px per px | s | s per MP | vs cheapest "
          "| CPU s per MP | vs cheapest | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, win, computed, sec, _, load in rows:
        w, c = per_mp[size]
        print(f"| {size}² | {win} | {computed:.2f} | {sec:.2f} | {w:.2f} | {w / cheapest[0]:.2f} "
              f"| {c:.2f} | {c / cheapest[1]:.2f} | {load:.1f} |")
    for i, what in enumerate(("s per MP", "CPU s per MP")):
        spread = max(v[i] for v in per_mp.values()) / cheapest[i] - 1
        print(f"\nSpread of {what}: {spread:.0%} (limit {SPREAD_LIMIT:.0%}): {'PASS' if spread <= SPREAD_LIMIT else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
