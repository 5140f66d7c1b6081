"""The CUDA-only paths, checked on one GPU with random weights at real architecture sizes; one table.

    python benchmarks/gpu_check.py [--workdir bench-weights] [--only NAME,...]   # < 8 min on one GPU
    python benchmarks/gpu_check.py --tiny                                       # tiny models on CPU

Each check is one row (ok / FAILED / skipped, what was measured). CPU runs (`--tiny`) skip what
needs CUDA and say so; they check the script itself end to end.

- bf16: a final stage in bf16 gives a finite image of the right size without the fp32 retry.
- fp16-nan-fallback: the UNet is made to return NaN in fp16 (bf16 on CPU); the stage must be redone
  in fp32 (`fp32_retries` = 1), come out finite, and the restorer return to half precision.
- vlm-4bit: the Qwen2.5-VL-3B-shaped VLM loads through `load_vlm(load_in_4bit=True)` (bitsandbytes
  NF4) and generates; footprint and tokens/s.
- oom-tile-halving: GPU memory is capped (`torch.cuda.set_per_process_memory_fraction`) at 1.5× what
  a small-tile stage needs; a whole-image stage must run out of memory, halve its latent tile and
  finish, with the same image size.
- cpu-offload: `cpu_offload: true` (diffusers' model offload) runs a stage with less GPU memory.
- vae-slicing: GRPO's batched final stage (G = 8) with and without VAE slicing: the same images,
  less decode memory.
- full-profile: benchmarks/gpu_full_profile.py's end-to-end timings (VLM + three stages).
- restorer-rl: RL of the upscaler (training/restorer_rl.py) at real size: K = 8 samples, 6 sampler steps,
  final 512² from the middle stage, LoRA r 32, bf16 autocast, gradient checkpointing: seconds per
  NFT step, rollout samples/s batched against one by one, peak memory (benchmarks/restorer_rl_speed.py).
- onestep: the one-step restorer (SD 2.1-base-shaped, rank-4 OSEDiff-layout adapter, bf16) against the
  x4 upscaler's final stage, 128² → 512²: UNet evaluations, seconds, peak memory
  (benchmarks/onestep_speed.py). Target ≤ 0.15 s per 512² output on an H100/H200.
- onestep-full-profile: VLM + one-step restorer end to end, 128² → 512² (target ≤ 3 s per image).
- onestep-pairs: with `--pairs DIR` (LR/ and HR/ of real camera pairs) each LR restored by the
  one-step final stage (`rough: input`, OSEDiff's setting) and scored as published tables are (PSNR/SSIM
  on Y, NIQE): with the weights of `download full --restorer onestep` in REALSR_R1_WEIGHTS these are
  real scores, with the random models only a check that the path runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHECKS = ("bf16", "fp16-nan-fallback", "vlm-4bit", "oom-tile-halving", "cpu-offload", "vae-slicing",
          "full-profile", "restorer-rl", "onestep", "onestep-full-profile", "onestep-pairs")


class Skip(Exception):
    """A check that cannot run on this machine (the reason is the row's detail)."""


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _peak_gib(fn):
    """(fn(), peak GPU GiB during it; NaN on CPU)."""
    import torch

    if not _cuda():
        return fn(), float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() / 2**30


def _gib(value: float) -> str:
    return "n/a" if value != value else f"{value:.1f} GiB"  # NaN: no GPU to measure


def _image(size: int) -> np.ndarray:
    from gpu_full_profile import photo

    return photo(size)


def _restorer(ctx, **options):
    from realsr_r1.restorers.diffusion import DiffusionStages

    options = {"num_inference_steps": ctx.steps, "rough": "diffusion", **options}
    return DiffusionStages.from_pretrained(ctx.upscaler, device=ctx.device, **options)


def _final(restorer, size: int, n: int = 1) -> list[np.ndarray]:
    from realsr_r1.cot import parse_cot

    plan = parse_cot("<degradation>noise: light</degradation><final_understand>a dog on grass</final_understand>")
    return restorer.restore_final_batch(_image(size), [plan] * n, scale=4.0, seed=0)


def check_bf16(ctx) -> str:
    import torch

    if _cuda() and not torch.cuda.is_bf16_supported():
        raise Skip(f"{torch.cuda.get_device_name()} has no bf16")
    r = _restorer(ctx, dtype="bf16")
    t = time.perf_counter()
    (out,), peak = _peak_gib(lambda: _final(r, ctx.size))
    assert out.shape == (4 * ctx.size, 4 * ctx.size, 3) and np.isfinite(out).all()
    assert r.fp32_retries == 0, "bf16 needed the fp32 retry"
    return f"{ctx.size}² → {4 * ctx.size}² in {time.perf_counter() - t:.2f} s, peak {_gib(peak)}, finite"


def check_fp16_nan_fallback(ctx) -> str:
    """fp16 on CUDA; on CPU (which refuses fp16) the same fallback is checked from bf16."""
    import torch

    half = "fp16" if _cuda() else "bf16"
    r = _restorer(ctx, dtype=half)
    unet = r.pipe.unet
    low = unet.dtype
    real = unet.forward

    def overflowing(*args, **kwargs):  # what a half-precision overflow looks like to the loop
        out = real(*args, **kwargs)
        if unet.dtype != torch.float32:
            return (torch.full_like(out[0], float("nan")),) + tuple(out[1:])
        return out

    unet.forward = overflowing
    (out,) = _final(r, ctx.size)
    assert r.fp32_retries == 1, f"fp32 retries {r.fp32_retries}"
    assert np.isfinite(out).all() and unet.dtype == low, "not finite, or not back in half precision"
    return f"NaN in {half} → redone in fp32 once, finite, back to {half}"


def check_vlm_4bit(ctx) -> str:
    import torch

    from realsr_r1.decoding import Decoding
    from realsr_r1.vlm import load_vlm

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise Skip("bitsandbytes is not installed") from None
    model, processor, _, quant = load_vlm(ctx.vlm, device=ctx.device, load_in_4bit=True, max_pixels=401408)
    assert quant == "bnb-4bit-nf4" and any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    from PIL import Image

    from realsr_r1.cot import build_messages

    pil = Image.fromarray((_image(128) * 255).astype("uint8"))
    prompt = processor.apply_chat_template(build_messages(pil), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[pil], return_tensors="pt").to(model.device)
    tokens = 16 if ctx.tiny else 64
    gen = Decoding(max_new_tokens=tokens, min_new_tokens=tokens).generate_kwargs(model)
    t = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(**inputs, **gen)
    seconds = time.perf_counter() - t
    new = ids.shape[1] - inputs["input_ids"].shape[1]
    assert new == tokens, f"{new} tokens"
    return f"footprint {model.get_memory_footprint() / 2**30:.2f} GiB, {new / seconds:.0f} tokens/s"


def check_oom_tile_halving(ctx) -> str:
    if not _cuda():
        raise Skip("needs CUDA (a memory cap)")
    import torch

    size = ctx.size * 2  # a stage whose whole latent does not fit under the cap
    small = _restorer(ctx, dtype="auto", tile=32, tile_overlap=8)
    _, need = _peak_gib(lambda: _final(small, size))
    del small
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    cap = 1.5 * need
    r = _restorer(ctx, dtype="auto", tile=0)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    try:
        (out,) = _final(r, size)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert out.shape == (4 * size, 4 * size, 3) and np.isfinite(out).all()
    assert 0 < r.tile < size, f"latent tile {r.tile}: no halving happened under the cap"
    return f"cap {cap:.1f} GiB: whole {size}² latent → tile {r.tile}, finished"


def check_cpu_offload(ctx) -> str:
    if not _cuda():
        raise Skip("needs CUDA (offload moves models between CPU and GPU)")
    plain = _restorer(ctx, dtype="auto")
    (a,), peak_plain = _peak_gib(lambda: _final(plain, ctx.size))
    del plain
    offload = _restorer(ctx, dtype="auto", cpu_offload=True)
    t = time.perf_counter()
    (b,), peak_off = _peak_gib(lambda: _final(offload, ctx.size))
    assert np.abs(a - b).max() < 0.05, "offloaded output differs"
    assert peak_off < peak_plain, f"offload peak {peak_off:.2f} ≥ {peak_plain:.2f} GiB"
    return f"peak {peak_plain:.1f} → {peak_off:.1f} GiB, {time.perf_counter() - t:.1f} s, same image"


def check_vae_slicing(ctx) -> str:
    g = 8
    whole = _restorer(ctx, dtype="auto", vae_slicing=False)
    a, peak_whole = _peak_gib(lambda: _final(whole, ctx.size, g))
    sliced = _restorer(ctx, dtype="auto", vae_slicing=True)
    b, peak_sliced = _peak_gib(lambda: _final(sliced, ctx.size, g))
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    assert len(b) == g and diff < 0.02, f"sliced decode differs by {diff:.3f}"
    if _cuda():
        assert peak_sliced <= peak_whole, f"slicing peak {peak_sliced:.2f} > {peak_whole:.2f} GiB"
    return f"G = {g}: peak {_gib(peak_whole)} → {_gib(peak_sliced)}, max diff {diff:.4f}"


def check_full_profile(ctx) -> str:
    from gpu_full_profile import run_once

    from realsr_r1.profiles import build_pipeline, load_config

    tokens = 16 if ctx.tiny else 384
    overrides = [f"policy.model={ctx.vlm}", f"restorer.model={ctx.upscaler}", f"restorer.steps={ctx.steps}",
                 f"policy.generation.max_new_tokens={tokens}", f"policy.generation.min_new_tokens={tokens}"]
    if ctx.tiny:
        overrides += ["restorer.tile=16", "restorer.tile_overlap=4"]
    pipe = build_pipeline(load_config("full", overrides), device=ctx.device)
    run_once(pipe, 64)  # warm-up
    parts = []
    for size in ctx.full_sizes:
        total, tm, info = run_once(pipe, size)
        parts.append(f"{size}² → {4 * size}²: {total:.2f} s (VLM {tm['reason']:.2f} s, "
                     f"{info.get('reason_tokens', 0) / tm['reason']:.0f} tok/s; stages "
                     f"{tm['rough']:.2f}/{tm['middle']:.2f}/{tm['final']:.2f} s)")
    return "; ".join(parts)


def check_restorer_rl(ctx) -> str:
    import tempfile

    from restorer_rl_speed import measure

    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        m = measure(Path(ctx.upscaler), samples=2 if ctx.tiny else 8, sampling_steps=2 if ctx.tiny else 6,
                    hr=64 if ctx.tiny else 512, steps=1 if ctx.tiny else 2, micro_batch=4, lora_rank=32,
                    real_size=not ctx.tiny, workdir=Path(tmp))
    assert m["step_s"] > 0 and m["batched"] > 0
    return (f"{m['step_s']:.2f} s per NFT step ({m['rollout_s']:.2f} s rollouts + rewards); samples/s batched "
            f"{m['batched']:.2f} vs one by one {m['single']:.2f} ({m['batched'] / m['single']:.1f}×); "
            f"peak {m['mem_gb']:.1f} GB")


def _onestep_models(ctx) -> Path:
    from onestep_speed import build

    import torch

    half = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    return build(ctx.workdir, ctx.tiny, ctx.device, half)[1]


def check_onestep(ctx) -> str:
    import torch

    from onestep_speed import build, load, measure

    dtype = "bf16" if ctx.device == "cuda" else "fp32"
    x4, sd21 = build(ctx.workdir, ctx.tiny, ctx.device, torch.bfloat16 if ctx.device == "cuda" else None)
    rows = measure(load(x4, sd21, ctx.device, dtype), 4 * ctx.size, 1 if ctx.tiny else 3, ctx.device)
    one, up = rows["onestep"], rows["sd-x4"]
    s1, s4 = float(np.median(one["seconds"])), float(np.median(up["seconds"]))
    assert one["evaluations"] == 1 and up["evaluations"] >= 20 * one["evaluations"]
    return (f"{ctx.size}² → {4 * ctx.size}²: onestep {s1:.3f} s, {one['evaluations']} UNet evaluation, peak "
            f"{_gib(one['peak_gib'])}; sd-x4 {s4:.2f} s, {up['evaluations']} evaluations, peak {_gib(up['peak_gib'])} "
            f"({s4 / s1:.0f}× faster)")


def check_onestep_full_profile(ctx) -> str:
    from gpu_full_profile import run_once

    from realsr_r1.profiles import build_pipeline, load_config

    sd21 = _onestep_models(ctx)
    tokens = 16 if ctx.tiny else 384
    overrides = ["restorer.type=onestep", f"policy.model={ctx.vlm}", f"restorer.model={sd21}",
                 f"restorer.adapter={sd21 / 'osediff.pkl'}", f"policy.generation.max_new_tokens={tokens}",
                 f"policy.generation.min_new_tokens={tokens}"]
    pipe = build_pipeline(load_config("full", overrides), device=ctx.device)
    run_once(pipe, 64)  # warm-up
    size = ctx.full_sizes[0]
    total, tm, info = run_once(pipe, size)
    return (f"{size}² → {4 * size}²: {total:.2f} s (VLM {tm['reason']:.2f} s, {info.get('reason_tokens', 0)} tokens; "
            f"stages {tm['rough']:.2f}/{tm['middle']:.2f}/{tm['final']:.2f} s)")


def check_onestep_pairs(ctx) -> str:
    from real_pairs import score

    from realsr_r1.cot import parse_cot
    from realsr_r1.imageio import read_image, to_float
    from realsr_r1.restorers.onestep import OneStepStages

    if not ctx.pairs:
        raise Skip("no --pairs DIR (LR/ and HR/ of real pairs) given")
    from realsr_r1.weights import default_dir

    real = default_dir() / "sd-2-1-base"
    base = real if (real / "model_index.json").is_file() and (default_dir() / "osediff.pkl").is_file() else None
    sd21 = base or _onestep_models(ctx)
    adapter = default_dir() / "osediff.pkl" if base else sd21 / "osediff.pkl"
    r = OneStepStages.from_pretrained(sd21, device=ctx.device, rough="input", adapter=adapter)
    lr_dir, hr_dir = Path(ctx.pairs) / "LR", Path(ctx.pairs) / "HR"
    names = sorted(p.name for p in lr_dir.iterdir() if (hr_dir / p.name).is_file())[: 4 if ctx.tiny else None]
    plan = parse_cot("<final_understand></final_understand>")
    totals: dict[str, list[float]] = {}
    t = time.perf_counter()
    for name in names:
        lq, hr = read_image(lr_dir / name).rgb, to_float(read_image(hr_dir / name).rgb)
        (out,) = r.restore_final_batch(lq, [plan], scale=hr.shape[1] / lq.shape[1])
        for key, value in score(out[: hr.shape[0], : hr.shape[1]], hr).items():
            totals.setdefault(key, []).append(value)
    means = ", ".join(f"{k} {np.mean(v):.4f}" for k, v in totals.items())
    what = "OSEDiff's weights" if base else "random weights (a check of the path, not a score)"
    return f"{len(names)} pairs, {what}: {means}; {(time.perf_counter() - t) / max(1, len(names)):.2f} s per pair"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="bench-weights", help="where the random models are saved (reused)")
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU (checks the script)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(CHECKS)}")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", default=None, metavar="DIR", help="real LR/HR pairs for the onestep-pairs row")
    args = ap.parse_args()

    import torch

    from gpu_full_profile import build_models

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        print("no CUDA GPU here: use --tiny to check the script on CPU", file=sys.stderr)
        return 2
    ctx = argparse.Namespace(tiny=args.tiny, device=device, steps=2 if args.tiny else args.steps,
                             size=32 if args.tiny else 128, full_sizes=[32] if args.tiny else [128, 256],
                             workdir=Path(args.workdir).resolve(), pairs=args.pairs)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    # Real-ESRGAN (the rough stage) converts into the workdir, unless a weights folder is set.
    os.environ.setdefault("REALSR_R1_WEIGHTS", str(ctx.workdir))
    ctx.vlm, ctx.upscaler = build_models(ctx.workdir, args.tiny, device)
    chosen = [c for c in CHECKS if not args.only or c in args.only.split(",")]
    rows = []
    for name in chosen:
        t = time.perf_counter()
        try:
            status, detail = "ok", globals()[f"check_{name.replace('-', '_')}"](ctx)
        except Skip as e:
            status, detail = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
            status, detail = "FAILED", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            traceback.print_exc()
        rows.append((name, status, detail, time.perf_counter() - t))
        if device == "cuda":
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (tiny models)"
    print(f"\nGPU checks on {where}, torch {torch.__version__}; random weights, "
          f"{'tiny' if args.tiny else 'real architecture sizes'}, {ctx.steps} steps per stage\n")
    print("| check | result | detail | s |\n|---|---|---|---|")
    for name, status, detail, seconds in rows:
        print(f"| {name} | {status} | {detail} | {seconds:.1f} |")
    return 1 if any(r[1] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
