"""Real-ESRGAN x4plus on CPU: every backend and precision of our restorer (`auto` as this machine
resolves it; PyTorch fp32 and bf16; OpenVINO fp32, bf16 and INT8; our ncnn backend) against the
plain pip `ncnn` runtime running the very same .param/.bin, in one run, with PSNR against the HR and
against PyTorch fp32. bf16 rows run only where the CPU has bf16 units.

Inputs: for size s, an HR mosaic of g×g real photos (g = s // 256, at least 1; $REALSR_R1_PHOTOS,
e.g. RealSRSet, else the repo's examples/), each centre-cropped square and Lanczos-resized to 4s/g
pixels; the input is that mosaic downscaled ×4 with PIL bicubic (antialiased). The mosaic is the
reference for PSNR (RGB, 8-bit outputs). Since the photos are small, the HR is upsampled content and
PSNR values are low in absolute terms; what matters is the difference between precisions.

Every measurement runs in a fresh subprocess, so peak RSS (ru_maxrss) is per configuration; the
time is the best of --repeats calls (model loading, conversion and INT8 calibration excluded: they
are cached under the weights folder). Tiles: each backend's default (what a user gets; plain ncnn
takes our ncnn backend's), or --tile input pixels for all, with --tile-pad context (plain ncnn gets a
crop-the-core tiler, like realesrgan-ncnn-vulkan's; ours blends the seams). Outputs are uint8, as the pipeline asks for 8-bit
images. The 1-minute load average is printed per run: other jobs on the machine distort timings.

--max-isa avx2 stands in for an AVX2-only CPU on a larger one (oneDNN's ISA cap; see cap_isa).

    python benchmarks/esrgan_speed.py --sizes 128,256,512 --repeats 3
    python benchmarks/esrgan_speed.py --sizes 128 --max-isa avx2
    nohup python benchmarks/esrgan_speed.py --sizes 2048 --repeats 1 --workdir /tmp/esrgan_2048 \
        > /tmp/esrgan_bench.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Real low-quality photos to time on: $REALSR_R1_PHOTOS (e.g. the full RealSRSet), else the examples
PHOTO_DIRS = [Path(p) for p in [os.environ.get("REALSR_R1_PHOTOS")] if p] + [REPO / "examples"]
# most wanted first: partial logs of long runs still help
RUNTIMES = ("auto", "torch-fp32", "torch-bf16", "openvino-fp32", "openvino-bf16", "openvino-int8", "ours-ncnn", "ncnn")
OURS = {"auto": ("auto", "auto"), "torch-fp32": ("torch", "fp32"), "torch-bf16": ("torch", "bf16"),
        "openvino-fp32": ("openvino", "fp32"), "openvino-bf16": ("openvino", "bf16"),
        "openvino-int8": ("openvino", "int8"), "ours-ncnn": ("ncnn", "fp32")}  # backend, precision
RSS_LIMIT_MB = 1536


def photos() -> list[Path]:
    for d in PHOTO_DIRS:
        found = sorted(p for p in d.glob("*.png"))
        if found:
            return found
    sys.exit(f"no photos found in {' or '.join(map(str, PHOTO_DIRS))}")


def build_pair(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR uint8 size², HR uint8 (4·size)²) as described in the module docstring."""
    g = max(1, size // 256)
    cell = 4 * size // g
    hr = Image.new("RGB", (4 * size, 4 * size))
    srcs = photos()
    for k in range(g * g):
        im = Image.open(srcs[k % len(srcs)]).convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        hr.paste(im.crop((left, top, left + side, top + side)).resize((cell, cell), Image.LANCZOS),
                 ((k % g) * cell, (k // g) * cell))
    lr = hr.resize((size, size), Image.BICUBIC)
    return np.asarray(lr), np.asarray(hr)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """RGB PSNR of two uint8 images, in row bands to keep 8192² images cheap."""
    se = 0.0
    for y in range(0, a.shape[0], 512):
        se += float(np.sum((a[y:y + 512].astype(np.float32) - b[y:y + 512]) ** 2))
    return 10 * np.log10(255.0 ** 2 / (se / a.size))


# ---- child side: one runtime, one input, timings and peak RSS as one JSON line ----

def ncnn_upscale(lr: np.ndarray, tile: int, pad: int) -> np.ndarray:
    import ncnn

    from realsr_r1 import weights  # imports no torch: the ncnn process stays torch-free

    param, bin_, _ = weights.source_files("realesrgan-x4plus")
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False  # ncnn's defaults otherwise (fp16 storage, winograd)
    net.opt.num_threads = os.cpu_count()
    net.load_param(str(param))
    net.load_model(str(bin_))
    h, w = lr.shape[:2]
    step = tile if tile > 0 else max(h, w)
    out = np.empty((4 * h, 4 * w, 3), np.uint8)
    for y0 in range(0, h, step):
        for x0 in range(0, w, step):
            y1, x1 = min(y0 + step, h), min(x0 + step, w)
            cy0, cx0 = max(0, y0 - pad), max(0, x0 - pad)
            cy1, cx1 = min(h, y1 + pad), min(w, x1 + pad)
            chw = np.ascontiguousarray(lr[cy0:cy1, cx0:cx1].transpose(2, 0, 1), np.float32) / 255
            ex = net.create_extractor()
            ex.input("data", ncnn.Mat(chw))  # borrows chw, alive until extract returns
            ret, mat = ex.extract("output")
            if ret != 0:
                raise RuntimeError(f"ncnn extract failed ({ret})")
            core = np.array(mat)[:, 4 * (y0 - cy0):4 * (y1 - cy0), 4 * (x0 - cx0):4 * (x1 - cx0)]
            out[4 * y0:4 * y1, 4 * x0:4 * x1] = (np.clip(core.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)
    return out


def child(spec: dict) -> None:
    lr = np.load(spec["input"])
    if spec["runtime"] == "ncnn":
        run, precision = (lambda: ncnn_upscale(lr, spec["tile"], spec["tile_pad"])), f"ncnn default, tile {spec['tile']}"
    else:
        from realsr_r1.restorers.esrgan import ESRGANRestorer

        backend, precision = OURS[spec["runtime"]]
        r = ESRGANRestorer.from_pretrained(None, device="cpu", precision=precision, backend=backend,
                                           tile=spec["tile"], tile_pad=spec["tile_pad"])
        run, precision = (lambda: r.upscale(lr, np.uint8)), f"{r.backend} {r.precision}, tile {r.tile}"
    times = []
    for _ in range(spec["repeats"]):
        load = os.getloadavg()[0]
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
    np.save(spec["output"], out)
    rss_mb = peak_rss_mb()
    print(json.dumps({"seconds": min(times), "rss_mb": rss_mb, "precision": precision, "load": load}))


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries that over fork and exec, so a child
    would report at least its parent's size; VmHWM belongs to the process's own memory map."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


# ---- parent side ----

def cap_isa(isa: str) -> None:
    """Cap oneDNN (OpenVINO's CPU plugin, PyTorch's convolutions) and PyTorch's own kernels at `isa`,
    for this process and the children it starts: the same code paths as on a CPU without AVX-512.
    Call before torch or openvino run anything."""
    os.environ["ONEDNN_MAX_CPU_ISA"] = isa.upper()
    os.environ["ATEN_CPU_CAPABILITY"] = isa.lower()


def measure(runtime: str, size: int, lr_path: Path, work: Path, args) -> dict:
    from realsr_r1.restorers.esrgan import BACKEND_TILE

    tile = BACKEND_TILE["ncnn"] if args.tile is None and runtime == "ncnn" else args.tile  # the child has no torch
    spec = {"runtime": runtime, "input": str(lr_path), "output": str(work / f"{runtime}_{size}.npy"),
            "repeats": args.repeats, "tile": tile, "tile_pad": args.tile_pad, "version": 3,
            "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    done = work / f"{runtime}_{size}.json"  # a finished measurement: --workdir runs resume after it
    if done.is_file() and json.loads(done.read_text())["spec"] == spec:
        res = json.loads(done.read_text())["result"]
    else:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.exit(f"{runtime} at {size}² failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        done.write_text(json.dumps({"spec": spec, "result": res}))
    print(f"  {size}² {runtime:>4}: {res['seconds']:8.2f} s  {res['rss_mb']:6.0f} MB  "
          f"({res['precision']}, load {res['load']:.1f})", file=sys.stderr, flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="128,256,512,2048", help="input sizes (square), comma separated")
    p.add_argument("--repeats", type=int, default=3, help="calls per measurement; the best is kept")
    p.add_argument("--tile", type=int, default=None,
                   help="input pixels per tile side for every runtime (0 = whole image; default: each backend's own)")
    p.add_argument("--tile-pad", type=int, default=16)
    p.add_argument("--workdir", help="keep inputs, outputs and finished measurements here, so an "
                                     "interrupted run resumes (default: a temporary folder)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated subset of the runtimes "
                   "(without ncnn, the reference of the ratios, they are left out: e.g. a 2048² memory check)")
    p.add_argument("--max-isa", choices=("avx2",), help="stand in for an AVX2-only CPU: cap oneDNN's kernels "
                   "(OpenVINO's and PyTorch's) at AVX2 (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY); plain ncnn "
                   "has no such cap and keeps this CPU's AVX-512, a peer at least as fast as on an AVX2 CPU")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.max_isa:
        cap_isa(args.max_isa)

    from realsr_r1 import weights
    from realsr_r1.device import choose_precision, cpu_has_bf16

    weights.realesrgan_x4plus()  # convert once, outside the timed children
    bf16_cpu = cpu_has_bf16()
    auto = choose_precision("cpu")
    asked = set(args.runtimes.split(","))
    if asked - set(RUNTIMES):
        sys.exit(f"unknown runtimes: {', '.join(sorted(asked - set(RUNTIMES)))} (known: {', '.join(RUNTIMES)})")
    runtimes = [rt for rt in RUNTIMES if rt in asked and (bf16_cpu or not rt.endswith("bf16"))]
    from realsr_r1.restorers.esrgan import ESRGANRestorer

    for rt in runtimes:  # OpenVINO's conversion and INT8 calibration, once, out of the children's RSS
        if OURS.get(rt, ("",))[0] in ("openvino", "auto"):
            ESRGANRestorer.from_pretrained(None, device="cpu", backend=OURS[rt][0], precision=OURS[rt][1])
    print(f"CPU: {os.cpu_count()} cores, bf16 units: {bf16_cpu}; auto precision = {auto}; "
          f"tile {'per backend' if args.tile is None else args.tile}, pad {args.tile_pad}; best of {args.repeats}", file=sys.stderr, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="esrgan_bench_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for size in [int(s) for s in args.sizes.split(",")]:
            lr, hr = build_pair(size)
            lr_path = work / f"lr_{size}.npy"
            np.save(lr_path, lr)
            del lr
            res = {rt: measure(rt, size, lr_path, work, args) for rt in runtimes}
            out = {rt: np.load(work / f"{rt}_{size}.npy", mmap_mode="r") for rt in runtimes}
            ref = out.get("torch-fp32")
            quality = {rt: (psnr(out[rt], hr), psnr(out[rt], ref) if ref is not None and rt != "torch-fp32" else None)
                       for rt in runtimes}
            rows.append((size, res, quality))
            del hr, out

    capped = " plain ncnn is not capped (it has no such switch)," if os.environ.get("ONEDNN_MAX_CPU_ISA") else ""
    print(f"\nReal-ESRGAN x4plus, CPU ({cpu_label()}),{capped} time = best of {args.repeats}, RSS = peak per process; "
          f"auto resolves to {rows[0][1]['auto']['precision'] if rows and 'auto' in rows[0][1] else '(not run)'}\n")
    print("| input | runtime | backend, precision | s | vs ncnn | RSS MB | PSNR vs HR dB | PSNR vs torch fp32 dB |")
    print("|---|---|---|---|---|---|---|---|")
    for size, r, q in rows:
        n = r["ncnn"]["seconds"] if "ncnn" in r else None
        for rt in r:
            cross = "–" if q[rt][1] is None else ("∞" if q[rt][1] == float("inf") else f"{q[rt][1]:.1f}")
            vs = f"{r[rt]['seconds'] / n:.2f}" if n else "–"
            print(f"| {size}² | {rt} | {r[rt]['precision']} | {r[rt]['seconds']:.2f} | {vs} "
                  f"| {r[rt]['rss_mb']:.0f} | {q[rt][0]:.3f} | {cross} |")
    print("\nTargets :")
    for size, r, q in rows:
        if "auto" in r and "ncnn" in r:
            ratio = r["auto"]["seconds"] / r["ncnn"]["seconds"]
            if bf16_cpu:  # the bf16 target is for the whole process (benchmarks/lite_process.py)
                verdict = f"model call auto/ncnn {ratio:.2f} (bf16 units; the ≤ 0.45× target is for the whole process)"
            else:
                verdict = f"model call auto/ncnn {ratio:.2f} ≤ 0.6 (AVX2 only): {'PASS' if ratio <= 0.6 else 'FAIL'}"
            if "torch-fp32" in r:
                # The quality bar itself is Y-PSNR/SSIM on degraded photos (benchmarks/int8_quality.py);
                # these clean bicubic mosaics are a second, harder view of the same precision.
                drop = q["torch-fp32"][0] - q["auto"][0]
                verdict += (f"; RGB-PSNR drop vs fp32 on these clean bicubic inputs {drop:+.3f} dB "
                            f"({'within' if drop <= 0.05 else 'over'} 0.05; the bar is int8_quality.py's)")
            print(f"- {size}²: {verdict}")
        if size >= 2048:
            for rt in (rt for rt in r if rt in OURS):
                peak = r[rt]["rss_mb"]
                print(f"- {size}²: {rt} peak RSS {peak:.0f} MB ≤ {RSS_LIMIT_MB} MB: "
                      f"{'PASS' if peak <= RSS_LIMIT_MB else 'FAIL'}")
    return 0


def cpu_label() -> str:
    from realsr_r1.device import cpu_description

    return cpu_description()


if __name__ == "__main__":
    sys.exit(main())
