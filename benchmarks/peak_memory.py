"""Peak memory of a whole lite run on one large photo, per backend and precision: the bar is
1.5 GB for a 2048² input (8192² output) on every backend.

Each configuration runs `realsr_r1.infer.main` (what `python -m realsr_r1.infer` runs: loading,
analyser, tiled model, blending, PNG encoding, sidecar) in a fresh process on one --size² photo
($REALSR_R1_PHOTOS, e.g. RealSRSet, else the repo's examples/, centre-cropped and Lanczos-resized), and
reports that process's own peak RSS (VmHWM, in MiB; not ru_maxrss, which Linux carries over fork
and exec). A warm-up run on a 32² image first fills the weights and OpenVINO caches, so conversion
and INT8 calibration (which import PyTorch) are not counted, as on a user's second run.

A 2048² photo is 64 tiles of 256²: about 8 minutes on 2 cores in bf16, 15 in fp32, so the full
set takes over an hour there.

    python benchmarks/peak_memory.py [--size 2048] [--runtimes auto,openvino-fp32,torch,int8,ncnn]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from esrgan_speed import photos  # noqa: E402  ($REALSR_R1_PHOTOS, else examples/)

BAR_MIB = 1.5e9 / 2**20  # 1.5 GB
# name → (what runs, CLI flags)
RUNTIMES = {
    "auto": ("auto", []),
    "openvino-fp32": ("openvino fp32", ["--set", "restorer.backend=openvino", "--precision", "fp32"]),
    "openvino-bf16": ("openvino bf16", ["--set", "restorer.backend=openvino", "--precision", "bf16"]),
    "int8": ("openvino int8", ["--set", "restorer.backend=openvino", "--precision", "int8"]),
    "torch": ("torch, auto precision", ["--set", "restorer.backend=torch"]),
    "ncnn": ("ncnn fp32, tile 128", ["--set", "restorer.backend=ncnn"]),
}
CHILD = r"""
import re, sys
from realsr_r1 import infer
rc = infer.main(sys.argv[1:])
hwm = re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)
print(f"VmHWM {int(hwm) / 1024:.0f}", file=sys.stderr)
sys.exit(rc)
"""


def run(flags: list[str], src: Path, dst: Path) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of one CLI run in a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, "--input", str(src), "--output", str(dst), "--quiet", *flags],
                       cwd=str(REPO), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"run failed ({' '.join(flags) or 'auto'}): {p.stderr.strip().splitlines()[-1:]}")
    lines = [line for line in p.stderr.splitlines() if line.startswith("VmHWM ")]
    return float(lines[-1].split()[1]), seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="input side in pixels")
    p.add_argument("--runtimes", default="auto,openvino-fp32,int8,torch,ncnn",
                   help=f"comma separated, of: {', '.join(RUNTIMES)}")
    args = p.parse_args()
    asked = [r for r in args.runtimes.split(",") if r]
    unknown = sorted(set(asked) - set(RUNTIMES))
    if unknown:
        sys.exit(f"unknown runtimes: {', '.join(unknown)} (known: {', '.join(RUNTIMES)})")

    from PIL import Image, ImageOps

    from realsr_r1.device import cpu_description

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photo = Image.open(photos()[0]).convert("RGB")
        for name, side in (("big", args.size), ("warm", 32)):
            (tmp / name).mkdir()
            ImageOps.fit(photo, (side, side), Image.LANCZOS).save(tmp / name / "photo.png")
        rows = []
        for name in asked:
            label, flags = RUNTIMES[name]
            run(flags, tmp / "warm", tmp / f"warm-{name}")  # caches filled: conversion not counted
            mib, seconds = run(flags, tmp / "big", tmp / f"out-{name}")
            rows.append((label, mib, seconds))
            print(f"  {label}: {mib:.0f} MiB, {seconds:.0f} s", file=sys.stderr, flush=True)

    print(f"\nPeak RSS of one lite CLI run on a {args.size}² photo ({4 * args.size}² output); {cpu_description()}\n")
    print("| runtime | peak RSS | bar (1.5 GB = 1431 MiB) | wall time |")
    print("|---|---|---|---|")
    for label, mib, seconds in rows:
        print(f"| {label} | {mib:.0f} MiB | {'pass' if mib <= BAR_MIB else 'FAIL'} | {seconds:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
