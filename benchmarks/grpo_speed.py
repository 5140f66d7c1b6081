"""GRPO speed on CPU with the tiny models: seconds per training step, and the batched generation
reward against scoring the G completions one by one.

1. Step time: `python -m realsr_r1.train --config configs/grpo-tiny.yaml` for --steps steps on a
   dataset built from the repo's example photos; TRL logs each step's time, the median is reported
   (the first step, which pays one-off costs, is left out).
2. Generation reward: G different final texts about one image rendered by the diffusion upscaler
   (rough by Real-ESRGAN, as the full profile does) and scored (fidelity) in one batched call,
   against G single calls, best of --repeats. Target: speed-up ≥ 0.7 × G. On a GPU,
   `--device cuda --real-size` times the real x4-upscaler architecture (random weights).

    python benchmarks/grpo_speed.py [--steps 6] [--g 8] [--size 32] [--repeats 3] [--rough diffusion]
    python benchmarks/grpo_speed.py --skip-train --device cuda --real-size --size 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

COT = ("<degradation>noise: medium</degradation><rough_understand>a photo</rough_understand><rough_image>"
       "</rough_image><middle_understand>a photo</middle_understand><middle_image></middle_image>"
       "<final_understand>{}</final_understand><final_image></final_image>")
WORDS = ["fur", "grass", "a red roof", "brick texture", "leaves", "sky", "water ripples", "a wooden fence",
         "hair", "stone", "clouds", "text on a sign", "a face", "a window", "sand", "snow"]


def step_times(root: Path, steps: int) -> list[float]:
    from conftest import photo, weights_env

    from realsr_r1 import train
    from realsr_r1.training.data import build_dataset
    from realsr_r1.tiny import build_tiny_upscaler, build_tiny_vlm

    weights, hr = root / "weights", root / "hr"
    build_tiny_vlm(weights / "tiny-vlm")
    build_tiny_upscaler(weights / "tiny-upscaler")
    hr.mkdir()
    for i, p in enumerate(sorted((REPO / "examples").glob("*.png"))):
        photo((64, 48), p.name).save(hr / f"{i}.png")
    with weights_env(weights):
        build_dataset(hr, root / "data", log=lambda *a: None)
        rc = train.main(["--config", str(REPO / "configs" / "grpo-tiny.yaml"), "--set", f"data={root / 'data'}",
                         "--set", f"output_dir={root / 'run'}", "--set", f"trainer.max_steps={steps}",
                         "--set", f"trainer.save_steps={steps}"])
    if rc:
        sys.exit(f"training failed (exit {rc})")
    rows = [json.loads(x) for x in (root / "run" / "log.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in rows if "step_time" in r]


def reward_times(root: Path, g: int, size: int, repeats: int, rough: str = "realesrgan", device: str = "cpu",
                 real_size: bool = False) -> tuple[float, float]:
    import numpy as np
    from PIL import Image

    from realsr_r1.restorers.diffusion import DiffusionStages
    from realsr_r1.rewards.visual import FidelityScorer, Restorations, make_generation_reward
    from realsr_r1.tiny import build_tiny_upscaler

    from conftest import weights_env

    with weights_env(root / "weights"):  # Real-ESRGAN converts there on first use
        stages = DiffusionStages.from_pretrained(build_tiny_upscaler(root / "sd", real_size=real_size), device=device,
                                                 rough=rough, num_inference_steps=10, guidance_scale=7.5)
    photo = Image.open(REPO / "examples" / "dog.png").convert("RGB")
    hr = photo.resize((4 * size, 4 * size), Image.LANCZOS)
    hr.save(root / "hr.png")
    lq = hr.resize((size, size), Image.BICUBIC)
    texts = [COT.format(WORDS[i % len(WORDS)] + f" {i}") for i in range(g)]
    scorer = FidelityScorer(use_pyiqa=False)

    def batched():
        reward = make_generation_reward(Restorations(stages), scorer)
        return reward(prompts=[None] * g, completions=texts, image=[lq] * g, hr_path=[str(root / "hr.png")] * g)

    def one_by_one():
        reward = make_generation_reward(Restorations(stages), scorer)
        return [reward(prompts=[None], completions=[t], image=[lq], hr_path=[str(root / "hr.png")])[0] for t in texts]

    a, b = batched(), one_by_one()  # warm-up, and the two ways must agree
    assert np.allclose(a, b, atol=1e-3), (a, b)
    best = {}
    for name, fn in (("batched", batched), ("one by one", one_by_one)):
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        best[name] = min(runs)
    return best["batched"], best["one by one"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--g", type=int, default=8, help="completions per input (GRPO's G)")
    ap.add_argument("--size", type=int, default=32, help="LQ side for the reward benchmark (final = 4x)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rough", default="realesrgan", choices=["realesrgan", "diffusion"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real-size", action="store_true", help="the real x4-upscaler architecture (for GPUs)")
    ap.add_argument("--skip-train", action="store_true", help="only the reward benchmark")
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        times = [] if args.skip_train else step_times(Path(tmp), args.steps)
        batched, single = reward_times(Path(tmp), args.g, args.size, args.repeats, args.rough, args.device,
                                       args.real_size)
    later = times[1:] or times
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{where}; {'real-size' if args.real_size else 'tiny'} upscaler, rough {args.rough}\n")
    print("| measure | value |")
    print("|---|---|")
    if times:
        print(f"| GRPO step, grpo-tiny.yaml (median of steps 2–{len(times)}) | {statistics.median(later):.2f} s |")
    print(f"| generation reward, G={args.g}, {args.size}² → {4 * args.size}², batched | {batched:.2f} s |")
    print(f"| generation reward, G={args.g}, one by one | {single:.2f} s |")
    speedup = single / batched
    verdict = "met" if speedup >= 0.7 * args.g else "MISSED"
    print(f"\nbatched speed-up {speedup:.2f}x (target ≥ 0.7 × G = {0.7 * args.g:.1f}x: {verdict})")


if __name__ == "__main__":
    main()
