"""Speed and memory of RL of the restorer (training/restorer_rl.py): seconds per NFT step, samples per
second of the rollouts batched against one by one, peak memory. Random weights, real code paths.

    python benchmarks/restorer_rl_speed.py                        # tiny upscaler, CPU
    python benchmarks/restorer_rl_speed.py --real-size --samples 8 --sampling-steps 6 --hr 512   # GPU

`--real-size` builds the x4 upscaler's architecture (UNet, VAE, text encoder at their real sizes)
with random weights: the speed and memory of the real model, not its outputs. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_memory_gb(device: str) -> tuple[str, float]:
    import torch

    if device.startswith("cuda"):
        return "GPU peak allocated", torch.cuda.max_memory_allocated() / 2**30
    return "process peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_name() -> str:
    from realsr_r1.device import cpu_description

    return cpu_description()


def measure(model: Path, *, samples: int, sampling_steps: int, hr: int, steps: int, micro_batch: int,
            lora_rank: int, real_size: bool, workdir: Path) -> dict:
    """Seconds per NFT step (median after a warm-up step), rollout samples/s batched and one by one,
    peak memory, for the upscaler folder `model` (benchmarks/gpu_check.py calls this too)."""
    import numpy as np
    import torch
    from PIL import Image

    from realsr_r1.training.data import build_dataset
    from realsr_r1.training.restorer_rollouts import sample_stage
    from realsr_r1.training.restorer_rl import RestorerRL

    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = workdir / "hr"
    src.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["dog.png", "chip.png", "butterfly2.png"]):
        Image.open(REPO / "examples" / name).convert("RGB").resize((hr, hr), Image.LANCZOS).save(src / f"{i}.png")
    build_dataset(src, workdir / "data", log=lambda *a: None)
    cfg = {
        "data": str(workdir / "data"), "output_dir": str(workdir / "run"),
        "restorer": {"profile": "tiny", "model": str(model), "steps": 20, "strength": 0.8, "rough": "diffusion",
                     "color_fix": "none", "tile": 0, "dtype": "auto", "scale": 4},
        "samples": samples, "inputs_per_step": 1, "sampling_steps": sampling_steps,
        "rewards": {"generation": {"weight": 1.0, "expert": "fidelity"}}, "group_filter": None,
        "lora": {"r": lora_rank, "alpha": 2 * lora_rank}, "max_steps": steps + 1,
        "micro_batch": micro_batch, "save_steps": 10_000, "eval": {"steps": 0, "count": 1},
        "mixed_precision": "bf16" if device == "cuda" else "no", "gradient_checkpointing": real_size,
    }
    run = RestorerRL(cfg)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = [run.train_step() for _ in range(steps + 1)][1:]  # the first step warms up
    mem_label, mem = peak_memory_gb(device)
    row = run.train_rows[0]
    rgb = np.asarray(row["image"].convert("RGB"))
    plan = run._plan(row, rgb)

    def sample(seeds):
        with run.model.use("old"):
            return sample_stage(run.stages, rgb, plan, stage="final", scale=4.0, seeds=seeds,
                                steps=sampling_steps, previous_seed=0)

    sample([0])  # warm-up
    t = time.perf_counter()
    sample(list(range(samples)))
    batched = samples / (time.perf_counter() - t)
    t = time.perf_counter()
    for s in range(samples):
        sample([s])
    single = samples / (time.perf_counter() - t)
    return {"step_s": float(np.median([r["s_step"] for r in rows])),
            "rollout_s": float(np.median([r["s_rollout"] for r in rows])),
            "batched": batched, "single": single, "mem_label": mem_label, "mem_gb": mem, "device": device}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real-size", action="store_true", help="the x4 upscaler's real architecture (random weights)")
    p.add_argument("--samples", type=int, default=6, help="K per input")
    p.add_argument("--sampling-steps", type=int, default=3)
    p.add_argument("--hr", type=int, default=64, help="HR crop side (the final stage's size); LQ is a quarter")
    p.add_argument("--steps", type=int, default=4, help="training steps timed (after one warm-up step)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=32)
    args = p.parse_args()

    import torch

    from realsr_r1.tiny import build_tiny_upscaler

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_upscaler(tmp / "upscaler", real_size=args.real_size)
        m = measure(model, samples=args.samples, sampling_steps=args.sampling_steps, hr=args.hr, steps=args.steps,
                    micro_batch=args.micro_batch, lora_rank=args.lora_rank, real_size=args.real_size, workdir=tmp)
    where = torch.cuda.get_device_name() if m["device"] == "cuda" else cpu_name()
    size = "x4 upscaler architecture (random weights)" if args.real_size else "tiny random upscaler"
    print(f"\n{size}, {where}; K {args.samples}, {args.sampling_steps} sampler steps (img2img from the middle "
          f"stage at strength 0.8), final {args.hr}², LoRA r {args.lora_rank}, micro-batch {args.micro_batch}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| s per NFT step (rollouts + rewards + update) | {m['step_s']:.2f} |")
    print(f"| of which rollouts + rewards | {m['rollout_s']:.2f} |")
    print(f"| rollout samples/s, K batched | {m['batched']:.2f} |")
    print(f"| rollout samples/s, one by one | {m['single']:.2f} |")
    print(f"| batched / one by one | {m['batched'] / m['single']:.2f}× |")
    print(f"| {m['mem_label']} | {m['mem_gb']:.2f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
