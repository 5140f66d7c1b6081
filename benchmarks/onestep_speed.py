"""The one-step restorer against the x4 upscaler's final stage: UNet evaluations and seconds per
output, real architecture sizes with random weights (they run as fast as trained ones).

Both make the final stage of one image, 128² input → 512² output, from a middle image of 256², as
inference does:
- sd-x4: stable-diffusion-x4-upscaler's architecture with the restorer's defaults (20 steps at
  strength 0.8 = 16 steps, classifier-free guidance 7.5 = 2 samples per step), conditioned on the input;
- onestep: SD 2.1-base's architecture with a rank-4 OSEDiff-layout adapter (fused), one step.

UNet evaluations are counted by a forward hook (samples per call, summed), the VAE included in the
seconds. Runs are interleaved (onestep, sd-x4, onestep, …) after one small warm-up of each. Targets: ≥ 20×
fewer UNet evaluations and ≤ 1/10 of the wall time; on a GPU (H100/H200) ≤ 0.15 s per 512² output.

    python benchmarks/onestep_speed.py --workdir /tmp/realsr-bench [--repeats 2] [--device cuda]
    python benchmarks/onestep_speed.py --tiny                     # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PLAN = ("<degradation>noise: light; downsample: x4</degradation><rough_understand>a house</rough_understand>"
        "<rough_image></rough_image><middle_understand>a red brick house</middle_understand><middle_image>"
        "</middle_image><final_understand>brick texture, leaves, window frames</final_understand><final_image></final_image>")


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = re.search(r"model name\s*:\s*(.+)", text)
    flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx2)\b", text)))
    return f"{name.group(1).strip() if name else 'CPU'} ({', '.join(flags) or 'no AVX2'})"


def build(workdir: Path, tiny: bool, device: str, dtype) -> tuple[Path, Path]:
    from realsr_r1.tiny import build_tiny_sd21, build_tiny_upscaler

    x4 = workdir / ("tiny-upscaler" if tiny else "sd-x4-upscaler-random")
    sd21 = workdir / ("tiny-sd21" if tiny else "sd-2-1-base-random")
    if not (x4 / "model_index.json").is_file():
        build_tiny_upscaler(x4, real_size=not tiny, device=device, dtype=dtype)
    if not (sd21 / "model_index.json").is_file():
        build_tiny_sd21(sd21, real_size=not tiny, device=device, dtype=dtype)
    return x4, sd21


class Counter:
    """UNet evaluations: the batch size of every forward call, summed."""

    def __init__(self, unet):
        self.n = 0
        unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.n += int(sample.shape[0])


def load(x4: Path, sd21: Path, device: str, dtype: str):
    from realsr_r1.restorers.diffusion import DiffusionStages
    from realsr_r1.restorers.onestep import OneStepStages

    upscaler = DiffusionStages.from_pretrained(x4, device=device, dtype=dtype, rough="diffusion", preview_every=0)
    onestep = OneStepStages.from_pretrained(sd21, device=device, dtype=dtype, rough="input", preview_every=0,
                                            adapter=sd21 / "osediff.pkl")
    return {"onestep": onestep, "sd-x4": upscaler}


def measure(restorers: dict, size: int, repeats: int, device: str) -> dict:
    import torch

    from realsr_r1.cot import parse_cot

    rng = np.random.default_rng(0)
    plan = parse_cot(PLAN)
    counters = {name: Counter(r.pipe.unet if hasattr(r, "pipe") else r.unet) for name, r in restorers.items()}
    rows = {name: {"seconds": [], "evaluations": 0, "peak_gib": float("nan")} for name in restorers}

    def once(name, size=size):
        lq = rng.random((size // 4, size // 4, 3), dtype=np.float32)
        middle = rng.random((size // 2, size // 2, 3), dtype=np.float32)
        r = restorers[name]
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        counters[name].n = 0
        t = time.perf_counter()
        (out,) = r.restore_stage_batch(lq, [plan], stage="final", scale=4.0, previous=[middle])
        if device == "cuda":
            torch.cuda.synchronize()
            rows[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        assert out.shape == (size, size, 3) and np.isfinite(out).all()
        return time.perf_counter() - t

    for name in restorers:  # warm-up at a quarter of the side: kernels and allocator, not minutes of CPU
        once(name, max(64, size // 4))
    for _ in range(repeats):
        for name in restorers:
            rows[name]["seconds"].append(once(name))
            rows[name]["evaluations"] = counters[name].n
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="bench-weights", help="where the random real-size models are built (reused)")
    p.add_argument("--size", type=int, default=512, help="output side in pixels (input is a quarter)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--tiny", action="store_true", help="tiny models: checks the script, not the speed")
    args = p.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    build_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16 if dtype == "fp16" else torch.float32
    x4, sd21 = build(Path(args.workdir), args.tiny, device, build_dtype)
    rows = measure(load(x4, sd21, device, dtype), args.size, args.repeats, device)
    where = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"\n{where}; {dtype}; {'tiny' if args.tiny else 'real-size'} models, random weights; final stage "
          f"{args.size // 4}² → {args.size}², median of {args.repeats}\n")
    print("| restorer | UNet evaluations | seconds | peak GPU GiB |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['evaluations']} | {np.median(row['seconds']):.2f} | {row['peak_gib']:.2f} |")
    one, x4r = rows["onestep"], rows["sd-x4"]
    print(f"\nonestep / sd-x4: {x4r['evaluations'] / max(1, one['evaluations']):.0f}× fewer UNet evaluations, "
          f"{np.median(one['seconds']) / np.median(x4r['seconds']):.3f}× the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
