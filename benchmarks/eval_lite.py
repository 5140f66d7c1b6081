"""Lite profile against bicubic on pairs made by the project, through the evaluate CLI.

HR: the example photos (RealSRSet, themselves low quality) area-downscaled ×2, which averages away
most of their own noise and JPEG blocking; LQ: `python -m realsr_r1.degrade` (Real-ESRGAN's
second-order degradation, ×4, seed 0). Then `python -m realsr_r1.evaluate --infer LQ --bicubic`
prints the table. Usage: python benchmarks/eval_lite.py [--work DIR]
"""

import argparse
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "results" / "eval_lite"))
    ap.add_argument("--metrics", default="psnr,ssim")
    args = ap.parse_args()
    work = Path(args.work)
    hr = work / "hr"
    hr.mkdir(parents=True, exist_ok=True)
    for src in sorted((REPO / "examples").glob("*.png")):
        im = Image.open(src).convert("RGB")
        w, h = im.size[0] // 2, im.size[1] // 2
        im.resize((w, h), Image.BOX).crop((0, 0, w // 4 * 4, h // 4 * 4)).save(hr / src.name)
    py = sys.executable
    subprocess.run([py, "-m", "realsr_r1.degrade", "--input", str(hr), "--output", str(work / "lq"), "--scale", "4",
                    "--seed", "0"], check=True)
    return subprocess.run([py, "-m", "realsr_r1.evaluate", "--infer", str(work / "lq"), "--profile", "lite",
                           "--pred", str(work / "lite"), "--bicubic", "--gt", str(hr), "--metrics", args.metrics,
                           "--out", str(work / "results.json"), "--plot", str(work / "metrics.png"),
                           "--quiet"]).returncode


if __name__ == "__main__":
    sys.exit(main())
