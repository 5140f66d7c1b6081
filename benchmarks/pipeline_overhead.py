"""What the pipeline costs on top of its model calls, with the tiny full-profile models on CPU.

"bare" makes the model calls of one restoration directly, as a script using the libraries would:
the VLM's `generate` (same prompt, same number of new tokens), Real-ESRGAN for rough, and the
diffusers `StableDiffusionUpscalePipeline.__call__` for middle and final (same conditioning image,
prompt, steps and noise level). "pipeline" runs `RestorationPipeline.run` on the same image with
the same settings (strength 1.0, so both do the same denoising; previews off, as bare has none).
The difference is everything the pipeline adds: the classical analyser, streaming and parsing the
text, our denoising loop, resizing, colour fix, events. Models load once, before timing; each
configuration is timed --repeats times, alternating; the overhead is the median over the pairs of
(pipeline / bare − 1), as runs back to back share the machine's load (other jobs on a shared box
move absolute times by ±15%).

    python benchmarks/pipeline_overhead.py [--size 64] [--tokens 64] [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # conftest.weights_env

TARGET = 0.05


def build(weights: Path, args):
    from realsr_r1.profiles import build_pipeline, load_config
    from realsr_r1.tiny import build_tiny_upscaler, build_tiny_vlm

    build_tiny_vlm(weights / "tiny-vlm")
    build_tiny_upscaler(weights / "tiny-upscaler")
    cfg = load_config("tiny", [f"policy.generation.max_new_tokens={args.tokens}",
                               f"policy.generation.min_new_tokens={args.tokens}",
                               f"restorer.steps={args.steps}", "restorer.strength=1.0",
                               "restorer.preview_every=0", "restorer.tile=0", "restorer.guidance_scale=1.0"])
    return build_pipeline(cfg, device="cpu")


def bare_run(pipe, image, seed: int, tokens: int) -> None:
    """The model calls of one restoration, made directly."""
    import torch

    from realsr_r1.restorers.conditioning import noise_level_for, stage_prompt
    from realsr_r1.restorers.lite import resize
    from realsr_r1.cot import Plan
    from realsr_r1.pipeline import stage_sizes

    policy, restorer = pipe.policy, pipe.restorer
    inputs = policy._inputs(image)
    torch.manual_seed(seed)
    with torch.no_grad():
        policy.model.generate(**inputs, **policy.generation)
    plan = Plan()
    ((rough, _),) = restorer._rough_reference(image.rgb, [plan])
    sizes = stage_sizes(*image.size, pipe.scale)
    for index, stage in enumerate(("middle", "final")):
        w, h = sizes[stage]
        cond = resize(rough, (w // 4, h // 4))
        with torch.no_grad():
            restorer.pipe(prompt=stage_prompt(plan, stage), image=torch.from_numpy(cond).permute(2, 0, 1)[None],
                          num_inference_steps=restorer.steps, guidance_scale=restorer.guidance_scale,
                          noise_level=noise_level_for(plan), generator=torch.Generator("cpu").manual_seed(seed + index),
                          output_type="np")


def pipeline_run(pipe, image, seed: int) -> dict:
    from realsr_r1.pipeline import Done, Failed

    for event in pipe.run(image, seed=seed):
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        if isinstance(event, Done):
            return event.result.timings
    raise RuntimeError("the pipeline ended without a result")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="input side in pixels (final = 4x)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens the VLM writes")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per diffusion stage")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    from conftest import weights_env
    from realsr_r1.imageio import LoadedImage
    from PIL import Image

    torch.set_num_threads(max(1, torch.get_num_threads()))
    photo = Image.open(REPO / "examples" / "dog.png").convert("RGB").resize((args.size, args.size), Image.LANCZOS)
    image = LoadedImage(rgb=np.asarray(photo, np.float32) / 255)
    with tempfile.TemporaryDirectory() as tmp, weights_env(Path(tmp)):
        pipe = build(Path(tmp), args)
        bare_run(pipe, image, 0, args.tokens)  # warm-up both: first calls pay one-off costs
        pipeline_run(pipe, image, 0)
        bare, ours, phases = [], [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            bare_run(pipe, image, r, args.tokens)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            phases.append(pipeline_run(pipe, image, r))
            ours.append(time.perf_counter() - t)
        tokens = pipe.policy.last_stats["new_tokens"]

    b, o = statistics.median(bare), statistics.median(ours)
    ratios = sorted(x / y - 1 for x, y in zip(ours, bare))
    overhead = statistics.median(ratios)
    print(f"tiny full profile on CPU ({torch.get_num_threads()} threads): {args.size}² → {4 * args.size}², "
          f"{tokens} tokens, {args.steps} steps per diffusion stage, medians of {args.repeats}\n")
    print("| run | seconds |")
    print("|---|---|")
    print(f"| bare model calls | {b:.3f} |")
    print(f"| pipeline | {o:.3f} |")
    for name in ("analyse", "reason", "rough", "middle", "final"):
        print(f"| pipeline: {name} | {statistics.median(p.get(name, 0.0) for p in phases):.3f} |")
    verdict = "met" if overhead <= TARGET else "MISSED"
    print(f"\noverhead: {100 * overhead:+.1f}% median of pairs (range {100 * ratios[0]:+.1f}% … {100 * ratios[-1]:+.1f}%; "
          f"target ≤ {100 * TARGET:.0f}%: {verdict})")


if __name__ == "__main__":
    main()
