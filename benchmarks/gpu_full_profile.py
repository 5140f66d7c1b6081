"""The full profile at real size on a GPU: random weights in the real architectures, timed end to end.

Random weights run exactly as fast as trained ones, so no download is needed: the script builds a
Qwen2.5-VL-3B-Instruct-shaped VLM and a stable-diffusion-x4-upscaler-shaped pipeline from their
configs (realsr_r1/tiny.py's builders with the real sizes), saves them into --workdir with `save_pretrained`
(reused on later runs) and loads them through the code users run (`build_pipeline` on
configs/full.yaml, with the model folders overridden). The random VLM never writes a closing tag,
so it always writes `--tokens` tokens (`min_new_tokens`), like a long real chain of thought.

Reported per input size: VLM seconds and tokens/s, restorer seconds per stage, end-to-end seconds
(analysis included, model loading excluded, after one warm-up run) and peak GPU memory.
Target: 128² → 512² in ≤ 5 s on an H100 at 20 steps per stage.

    python benchmarks/gpu_full_profile.py --workdir /tmp/realsr-bench [--sizes 128,512] [--steps 20]
    python benchmarks/gpu_full_profile.py --tiny --device cpu     # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# Qwen/Qwen2.5-VL-3B-Instruct's config.json (the parts that set the compute).
QWEN_3B_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
    num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
    fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    window_size=112,
)


def build_models(workdir: Path, tiny: bool, device: str) -> tuple[Path, Path]:
    import torch

    from realsr_r1.tiny import build_tiny_upscaler, build_tiny_vlm

    vlm = workdir / ("tiny-vlm" if tiny else "qwen2.5-vl-3b-random")
    sd = workdir / ("tiny-upscaler" if tiny else "sd-x4-upscaler-random")
    half = torch.bfloat16 if device == "cuda" else torch.float32
    if not (vlm / "config.json").is_file():
        t = time.perf_counter()
        build_tiny_vlm(vlm, text=None if tiny else QWEN_3B_TEXT, vision=None if tiny else QWEN_3B_VISION,
                       device=device, dtype=half)
        print(f"built {vlm.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if not (sd / "model_index.json").is_file():
        t = time.perf_counter()
        build_tiny_upscaler(sd, real_size=not tiny, device=device, dtype=half)
        print(f"built {sd.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if device == "cuda":
        torch.cuda.empty_cache()
    return vlm, sd


def photo(size: int) -> np.ndarray:
    from PIL import Image

    im = Image.open(REPO / "examples" / "dog.png").convert("RGB")
    return np.asarray(im.resize((size, size), Image.LANCZOS), np.float32) / 255


def run_once(pipe, size: int, seed: int = 0) -> tuple[float, dict, dict]:
    from realsr_r1.imageio import LoadedImage
    from realsr_r1.pipeline import Done, Failed

    t = time.perf_counter()
    for event in pipe.run(LoadedImage(rgb=photo(size)), seed=seed):
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        if isinstance(event, Done):
            return time.perf_counter() - t, event.result.timings, event.result.info
    raise RuntimeError("no result")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="bench-weights", help="where the random models are saved (reused)")
    ap.add_argument("--sizes", default="128,512", help="input sides; outputs are 4x")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=384, help="new tokens the VLM writes per image")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (checks the script, not a timing)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more profile overrides, e.g. --set policy.load_in_4bit=true")
    args = ap.parse_args()

    import torch

    from conftest import weights_env
    from realsr_r1.profiles import build_pipeline, load_config

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run on a GPU machine, or use --tiny --device cpu to check the script")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    vlm, sd = build_models(workdir, args.tiny, args.device)
    overrides = [f"policy.model={vlm}", f"restorer.model={sd}", f"restorer.steps={args.steps}",
                 f"policy.generation.max_new_tokens={args.tokens}", f"policy.generation.min_new_tokens={args.tokens}",
                 *args.set]
    with weights_env(workdir):
        t = time.perf_counter()
        pipe = build_pipeline(load_config("full", overrides), device=args.device)
        load_s = time.perf_counter() - t
        run_once(pipe, 64)  # warm-up: CUDA context, kernels, allocator
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            total, timings, info = run_once(pipe, size)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
            tokens = info.get("reason_tokens", 0)
            rows.append((size, total, timings, tokens, peak))

    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{'tiny models' if args.tiny else 'real-size random models'} on {name}; {args.steps} steps per stage "
          f"(middle/final run round(steps x strength)), {args.tokens} VLM tokens; models loaded in {load_s:.0f} s\n")
    print("| input → output | end to end s | VLM s | VLM tokens/s | rough s | middle s | final s | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for size, total, tm, tokens, peak in rows:
        reason = tm.get("reason", float("nan"))
        print(f"| {size}² → {4 * size}² | {total:.2f} | {reason:.2f} | {tokens / reason:.0f} | {tm.get('rough', 0):.2f} "
              f"| {tm.get('middle', 0):.2f} | {tm.get('final', 0):.2f} | {peak:.1f} |")
    first = next((r for r in rows if r[0] == 128), None)
    if first and not args.tiny:
        print(f"\n128² → 512²: {first[1]:.2f} s (target ≤ 5 s on an H100: {'met' if first[1] <= 5 else 'MISSED'})")


if __name__ == "__main__":
    main()
