"""Where the time of the lite profile goes: process start-up, then per image load, analyse, model,
blend, resample, encode and sidecar, measured on the real CLI path (`python -m realsr_r1.infer`).

Start-up is a fresh `python -c "import …"` of what a lite run imports (best of --repeats). The
per-image parts come from one in-process `infer.main` run over --images inputs of --size² (after a
warm-up run), with timers wrapped around the functions infer calls: `read_image` (load),
`analyze` (analyse), `ESRGANRestorer._forward` (model: the network on each tile),
`ESRGANRestorer.restore` minus the model (blend: tiling, seam blending, quantising), the Lanczos
`resize` of the stages (resample), `write_image` (encode) and the sidecar (`build_sidecar` and its
atomic write). "other" is the rest of each image's wall time (events, bookkeeping). One table.

    python benchmarks/lite_stages.py [--size 128] [--images 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LITE_IMPORTS = ("import realsr_r1.infer, realsr_r1.profiles, realsr_r1.restorers.lite, realsr_r1.analyze, "
                "realsr_r1.restorers.openvino_backend, openvino")  # what an auto run on CPU imports


def startup_seconds(repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", LITE_IMPORTS], check=True, cwd=str(REPO))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="input side in pixels")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="start-up measurements (best of)")
    args = p.parse_args()

    from PIL import Image

    from realsr_r1 import infer, pipeline
    from realsr_r1.restorers import esrgan, lite
    from realsr_r1.device import cpu_description as cpu_name

    spent: dict[str, float] = defaultdict(float)

    def timed(owner, name: str, key: str):
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    timed(infer, "read_image", "load")
    timed(pipeline, "analyze", "analyse")
    timed(esrgan.ESRGANRestorer, "_forward", "model")
    timed(esrgan.ESRGANRestorer, "restore", "restore")
    timed(lite, "resize", "resample")
    timed(infer, "write_image", "encode")
    timed(infer, "build_sidecar", "sidecar")
    timed(infer, "atomic_write_text", "sidecar")

    photos = sorted((REPO / "examples").glob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        src.mkdir()
        for i in range(args.images):
            im = Image.open(photos[i % len(photos)]).convert("RGB")
            side = min(im.size)
            im.crop((0, 0, side, side)).resize((args.size, args.size), Image.LANCZOS).save(src / f"{i}.png")
        warm = tmp / "warm"
        warm.mkdir()
        os.link(src / "0.png", warm / "0.png")
        assert infer.main(["--input", str(warm), "--output", str(tmp / "warm-out"), "--quiet"]) == 0
        spent.clear()
        t = time.perf_counter()
        assert infer.main(["--input", str(src), "--output", str(tmp / "out"), "--quiet"]) == 0
        wall = (time.perf_counter() - t) / args.images
    per = {k: v / args.images for k, v in spent.items()}
    per["blend"] = per.pop("restore") - per["model"]
    per["resample"] = per.get("resample", 0.0)
    order = ["load", "analyse", "model", "blend", "resample", "encode", "sidecar"]
    other = wall - sum(per[k] for k in order)
    start = startup_seconds(args.repeats)

    print(f"\nlite profile (Real-ESRGAN x4plus, automatic backend and precision), {cpu_name()}; {args.images} inputs of "
          f"{args.size}² → {4 * args.size}², per image\n")
    print("| part | ms per image | share |")
    print("|---|---|---|")
    for k in order + ["other"]:
        v = per[k] if k != "other" else other
        print(f"| {k} | {1000 * v:.1f} | {100 * v / wall:.1f} % |")
    print(f"| **total per image** | {1000 * wall:.1f} | 100 % |")
    print(f"\nprocess start-up (imports of a lite run, best of {args.repeats}): {start:.2f} s; "
          f"whole process for {args.images} images ≈ {start + wall * args.images:.1f} s + model loading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
