"""Stage images from the Stable Diffusion ×4 upscaler (diffusers `StableDiffusionUpscalePipeline`).

The upscaler denoises latents at 1/4 of the output size, conditioned on a low-resolution image of
that same size (plus text and a `noise_level` augmentation). We run its denoising loop ourselves
(denoise.py, with the pipeline's own components) because three things need the loop: latent tiling,
starting from the previous stage's image, and previews without threads.

Scheme (design.md §2, each stage starts from the previous stage's image):

    rough  (input size) = the regression experts (`rough: realesrgan`, the default: a clean-up
                          first, as DiffBIR does; lite.py's LiteStages, so with several experts the
                          plan's degradation reading picks their mix) or a diffusion pass
                          (`rough: diffusion`)
    middle (×2)         = diffusion conditioned on the reference at middle/4, started from rough
    final  (×scale)     = diffusion conditioned on the reference at final/4,  started from middle

The reference is the rough image when it came from Real-ESRGAN (clean, every input pixel kept),
else the input itself: at ×4 the final stage conditions on it at full input resolution, so no
input detail is thrown away on the way. "Started from" is img2img: the previous stage's image,
resized to the stage size, is VAE-encoded and noised to `strength` (1.0 ignores it), and
round(steps × strength) steps run. A stage whose size is not a multiple of 4 runs at the nearest
and is Lanczos-resized; sizes are edge-padded to a multiple of 8 for the UNet and cropped back.

Conditioning per stage (conditioning.py): the positive prompt is the stage's understanding text and
quality words; the detected degradations go into the negative prompt; noise_level from the plan's
noise estimate.

Previews show the step's prediction of the clean image (the scheduler's `pred_original_sample`),
decoded at ≤ `preview_size` pixels on the long side (vae.py): x_t itself is mostly noise early on.

Memory: the UNet runs on latent tiles (`tile`, `tile_overlap`, Gaussian blending, latent_tiling.py);
when the UNet runs out of GPU memory the tile is halved and the denoising retried. The VAE fits its
own memory (vae.py: one sample at a time, then halved `vae_tile`) without redoing any denoising.
Half precision that yields NaNs is retried in fp32.

Colour: each stage is matched to the input's colours (color.py: "wavelet", "adain" or "none").

Candidates: with `candidates: K` > 1 the final stage draws K samples (seeds seed + 2 + k·SEED_STRIDE)
and a chooser (chooser.py, given by profiles.py) keeps the one its reward prefers under the plan's
degradation reading; the record lists each sample's scores. Training's batched calls draw one.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..cot import STAGES, Plan
from ..device import PRECISIONS, resolve_device, weight_dtype
from ..imageio import LoadedImage, to_float
from ..pipeline import StageImage, StagePreview, StageStarted, stage_sizes
from .color import COLOR_FIXES, color_fix
from .conditioning import DEFAULT_NEGATIVE, Condition, condition_for
from .denoise import denoise, initial_latents, model_inputs
from .blend import resize
from .memory import OutOfMemoryError, free_cached
from .vae import LatentCodec

log = logging.getLogger(__name__)

PAD_MULTIPLE = 8  # the x4 upscaler UNet downsamples its latent 3 times
MIN_TILE = 32  # latent pixels: below this, halving on out-of-memory stops
ROUGH_METHODS = ("realesrgan", "diffusion")
SEED_STRIDE = 1000  # apart from the seeds the stages take (seed + stage index)


def _pad(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    ph, pw = h - arr.shape[0], w - arr.shape[1]
    return np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else arr


def _fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


class DiffusionStages:
    """StageRestorer over a diffusers StableDiffusionUpscalePipeline (and optionally Real-ESRGAN)."""

    request_options = ("steps", "color_fix")  # what the demo may change per request (demo.with_options)

    name = "sd-x4-upscaler"

    def __init__(self, pipe, *, device: torch.device, dtype: torch.dtype, num_inference_steps: int = 20,
                 guidance_scale: float = 7.5, negative_prompt: str | None = DEFAULT_NEGATIVE,
                 color_fix: str = "wavelet", cpu_offload: bool = False, preview_every: int = 5,
                 preview_size: int = 256, strength: float = 0.8, tile: int = 128, tile_overlap: int = 32,
                 vae_tile: int = 512, vae_slicing: bool = False, candidates: int = 1, regression=None,
                 chooser=None):
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown color fix {color_fix!r} (use {', '.join(COLOR_FIXES)})")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if int(num_inference_steps) < 1:
            raise ValueError(f"steps must be ≥ 1, got {num_inference_steps}")
        if isinstance(candidates, bool) or int(candidates) != candidates or candidates < 1:
            raise ValueError(f"candidates must be a whole number ≥ 1, got {candidates}")
        if candidates > 1 and chooser is None:
            raise ValueError("candidates > 1 needs a chooser to pick among them (the profile gives one)")
        rounded = int(tile) // PAD_MULTIPLE * PAD_MULTIPLE  # tiles must fit the UNet's downsampling
        if tile < 0 or (tile and not rounded) or tile_overlap < 0 or (rounded and tile_overlap >= rounded):
            raise ValueError(f"need tile 0 or ≥ {PAD_MULTIPLE} and 0 ≤ tile_overlap < tile, got {tile} and {tile_overlap}")
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.color_fix = color_fix
        self.cpu_offload = bool(cpu_offload)
        self.preview_every = int(preview_every or 0)
        self.preview_size = max(1, int(preview_size))  # long side of preview images, in pixels
        self.strength = float(strength)
        self.tile = rounded  # 0: no latent tiling
        self.tile_overlap = int(tile_overlap)
        self.regression = regression  # LiteStages (the experts, maybe a chooser) for the rough stage, or None
        self.candidates = int(candidates)
        self.chooser = chooser
        self.fp32_retries = 0  # stages redone in fp32 after NaNs
        # One denoising at a time per model: the scheduler's timesteps and the fp32 retry are shared
        # state, and per-request copies (the demo's) share this lock with the original.
        self._lock = threading.Lock()
        self.pipe.set_progress_bar_config(disable=True)
        self.codec = LatentCodec(pipe.vae, tile=vae_tile, slicing=vae_slicing)
        self._place(dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "auto", dtype: str = "auto",
                        rough: str = "realesrgan", adapter: str | None = None, regression=None,
                        **options) -> "DiffusionStages":
        """Load the upscaler folder (and Real-ESRGAN x4plus for `rough="realesrgan"` unless
        `regression` gives the rough stage's LiteStages); options as __init__.

        `adapter`: a UNet LoRA folder from training (adapter.py): on for the stage it was trained
        on, or fused into the UNet for every stage when it names none."""
        from diffusers import StableDiffusionUpscalePipeline

        from ..quiet import settle

        settle("diffusers")  # its loading bars, now that it is imported
        if rough not in ROUGH_METHODS:
            raise ValueError(f"unknown rough method {rough!r} (use {', '.join(ROUGH_METHODS)})")
        dev = resolve_device(device)
        torch_dtype = weight_dtype(dev, dtype)
        if rough == "diffusion":
            regression = None
        elif regression is None:
            from .esrgan import ESRGANRestorer
            from .lite import LiteStages

            regression = LiteStages(ESRGANRestorer.from_pretrained(None, device=str(dev),
                                                                   precision="fp32" if dtype == "fp32" else "auto"))
        pipe = StableDiffusionUpscalePipeline.from_pretrained(str(path), dtype=torch_dtype)
        loaded = None
        if adapter is not None:  # before __init__ places the pipeline: fused where and as it was loaded
            from .adapter import load_restorer_adapter

            loaded = load_restorer_adapter(pipe, adapter)
        stages = cls(pipe, device=dev, dtype=torch_dtype, regression=regression, **options)
        stages.adapter = loaded
        return stages

    def _place(self, dtype: torch.dtype) -> None:
        if self.cpu_offload and self.device.type == "cuda":
            self.pipe.to(dtype=dtype)
            self.pipe.enable_model_cpu_offload(device=self.device)
        elif self.pipe.unet.dtype != dtype or self.pipe.device != self.device:
            self.pipe.to(self.device, dtype)
        if dtype == torch.float16 and self.pipe.vae.config.get("force_upcast", True):
            self.pipe.vae.to(dtype=torch.float32)  # the VAE overflows in fp16 (as the pipeline does)

    @property
    def precision(self) -> str:
        return {v: k for k, v in PRECISIONS.items()}[self.dtype]

    @property
    def vae_tile(self) -> int:
        return self.codec.tile

    def describe(self) -> dict:
        return {"restorer": self.name, "device": str(self.device), "precision": self.precision,
                "steps": self.steps, "strength": self.strength, "tile": self.tile, "vae_tile": self.codec.tile,
                "vae_slicing": self.codec.slicing,
                "rough": "realesrgan" if self.regression is not None else "diffusion",
                **({"rough_restorer": self.regression.describe()} if self.regression is not None else {}),
                **({"candidates": self.candidates, "chooser": self.chooser.describe()} if self.candidates > 1 else {}),
                "adapter": getattr(self, "adapter", None)}  # {path, sha256, stage} of a UNet LoRA, or None

    # one batch, text to images -----------------------------------------------------------------
    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        return self.codec.decode(latents)

    def _encode(self, rgb: np.ndarray, device) -> torch.Tensor:
        return self.codec.encode(rgb, device)

    @torch.no_grad()
    def _denoise(self, cond: np.ndarray, start: torch.Tensor | None, conditions: list[Condition], seed: int,
                 tile: int, preview):
        """Generator: yields previews, returns the denoised Bx4xhxw latents for an h x w `cond`.

        One image, B = len(conditions) samples denoised as one batch (GRPO scores many chains of
        thought about one image). `cond` is already padded to the UNet's multiple; `start` is the
        encoded start image (img2img) or None. `preview(x0, step, total)` gets the batch's predicted
        clean latents.
        """
        pipe = self.pipe
        device = pipe._execution_device
        # One generator per sample, by default all on the same seed: every text in a batch meets the
        # same noise, so differences between samples come from the texts (common random numbers for
        # GRPO); a list gives each sample its own (the final stage's candidates).
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(conditions)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        inputs = model_inputs(pipe, cond, conditions, gens, self.guidance_scale, device)
        shape = (len(conditions), pipe.vae.config.latent_channels, *inputs.image.shape[-2:])
        latents, timesteps = initial_latents(pipe.scheduler, shape, gens, self.steps, self.strength, start,
                                             device, inputs.embeds.dtype)
        return (yield from denoise(pipe, inputs, latents, timesteps, tile=tile,
                                   overlap=min(self.tile_overlap, tile // 2),
                                   extra=pipe.prepare_extra_step_kwargs(gens[0], 0.0),
                                   preview=preview, preview_every=self.preview_every))

    def _fit(self, cond, start, conditions, seed, preview):
        """_denoise, halving the latent tile while the UNet runs out of GPU memory."""
        while True:
            try:
                return (yield from self._denoise(cond, start, conditions, seed, self.tile, preview))
            except OutOfMemoryError:
                current = self.tile or max(cond.shape[:2])
                if current <= MIN_TILE:
                    raise
                self.tile = max(MIN_TILE, current // 2 // PAD_MULTIPLE * PAD_MULTIPLE)
                free_cached()
                log.warning("out of GPU memory in the diffusion stage: retrying with latent tile %d", self.tile)

    def _sample(self, cond: np.ndarray, init: list[np.ndarray] | None, conditions: list[Condition], seed, preview):
        """Generator: encode the start image (if any), denoise, decode: Bx(4h)x(4w)x3 float32 images.
        The VAE calls sit outside the UNet's retry: their memory is the codec's business."""
        start = None if init is None else torch.cat([self._encode(i, self.pipe._execution_device) for i in init])
        latents = yield from self._fit(cond, start, conditions, seed, preview)
        return self._decode(latents)

    def _weights_for(self, stage: str | None) -> None:
        """Turn a stage's LoRA adapter on for its own stage and off for the others (adapter.py);
        nothing to do for a fused adapter or none. Called under the lock: the UNet is shared."""
        only = (getattr(self, "adapter", None) or {}).get("stage")
        if only and stage is not None:
            if stage == only:
                self.pipe.unet.enable_adapters()
            else:
                self.pipe.unet.disable_adapters()

    def _run_stage(self, cond: np.ndarray, init: np.ndarray | None, conditions: list[Condition], seed: int,
                   preview, stage: str | None = None):
        """One stage with the fallbacks: smaller tiles on OOM, then fp32 (also tiled) on NaN."""
        with self._lock:
            self._weights_for(stage)
            out = yield from self._sample(cond, init, conditions, seed, preview)
            if not np.isfinite(out).all() and self.dtype != torch.float32:
                log.warning("diffusion stage produced NaNs in %s; retrying in fp32", self.precision)
                self.fp32_retries += 1
                self._place(torch.float32)
                try:
                    out = yield from self._sample(cond, init, conditions, seed, preview)
                finally:
                    self._place(self.dtype)
        return np.nan_to_num(out, nan=0.5)

    # stages ----------------------------------------------------------------------------------
    def _rough_reference(self, inp: np.ndarray, plans: list[Plan | None]) -> list[tuple[np.ndarray, dict | None]] | None:
        """(image at the input size, choice record) per plan from the regression experts: the clean
        image later stages condition on (None without them). The experts run once; each plan's
        degradation reading picks their mix, and plans that pick the same share one array."""
        if self.regression is None:
            return None
        return self.regression.choose_batch(inp, plans, stage="rough", scale=4.0)

    def _diffuse(self, reference: np.ndarray, previous: np.ndarray | list | None, size: tuple[int, int],
                 conditions: list[Condition], seed, preview=None, stage: str | None = None):
        """Generator: one diffusion stage of `size` for each condition; returns the images at `size`.
        `previous`: the image each sample starts from (one for all, or one per condition)."""
        tw, th = size
        lw, lh = max(1, round(tw / 4)), max(1, round(th / 4))
        ph, pw = -(-lh // PAD_MULTIPLE) * PAD_MULTIPLE, -(-lw // PAD_MULTIPLE) * PAD_MULTIPLE
        cond = _pad(resize(reference, (lw, lh)), ph, pw)
        starts_from_previous = previous is not None and self.strength < 1
        init = None
        if starts_from_previous:
            many = previous if isinstance(previous, list) else [previous]
            init = [_pad(resize(p, (4 * lw, 4 * lh)), 4 * ph, 4 * pw) for p in many]
        out = yield from self._run_stage(cond, init, conditions, seed, self._previewer(preview, size, lh, lw), stage)
        return [resize(np.clip(o[: 4 * lh, : 4 * lw], 0, 1), size) for o in out]

    def _previewer(self, preview, size: tuple[int, int], lh: int, lw: int):
        """The loop's preview callback: the first sample's x0 without the padding, decoded small."""
        if preview is None:
            return None

        def show(x0: torch.Tensor, step: int, total: int):
            img = self.codec.preview(x0[:1, :, :lh, :lw], self.preview_size)
            return None if img is None else preview(resize(img, _fit_within(size, self.preview_size)), step, total)

        return show

    def _condition(self, plan: Plan | None, stage: str) -> Condition:
        return condition_for(plan, stage, self.negative_prompt, int(self.pipe.config.get("max_noise_level", 350)))

    def stages(self, image: LoadedImage, plan: Plan, *, sizes, seed: int = 0) -> Iterator:
        inp = to_float(image.rgb)
        reference = inp  # what diffusion stages condition on (module doc)
        previous = None
        for index, stage in enumerate(STAGES):
            t = time.perf_counter()
            size = tuple(sizes[stage])
            yield StageStarted(stage, size)
            choice, looks = None, None
            if stage == "rough" and self.regression is not None:
                ((ref, choice),) = self._rough_reference(inp, [plan])
                rgb = reference = resize(ref, size)
                rgb = color_fix(rgb, inp, self.color_fix, device=self.device)
            else:
                def preview(img, step, total, stage=stage):
                    return StagePreview(stage, img, step, total)

                k = self.candidates if stage == "final" else 1
                seeds = [seed + index + j * SEED_STRIDE for j in range(k)]
                outs = yield from self._diffuse(reference, previous, size, [self._condition(plan, stage)] * k,
                                                seeds, preview, stage)
                outs = [color_fix(o, inp, self.color_fix, device=self.device) for o in outs]
                best = 0
                if k > 1:  # the chooser keeps one sample (module doc)
                    best, choice = choose_sample(self.chooser, outs, inp, plan, seeds)
                    looks = [resize(o, _fit_within(size, self.preview_size)) for o in outs]
                rgb = outs[best]
            alpha = None if image.alpha is None else resize(to_float(image.alpha), size)
            yield StageImage(stage, rgb, alpha, time.perf_counter() - t, choice=choice, candidates=looks)
            previous = rgb

    def restore_final_batch(self, rgb: np.ndarray, plans: list[Plan], *, scale: float = 4.0, seed: int = 0,
                            batch_size: int | None = None) -> list[np.ndarray]:
        """The final stage for many chains of thought about one image (GRPO's generation reward)."""
        return self.restore_stage_batch(rgb, plans, stage="final", scale=scale, seed=seed, batch_size=batch_size)

    def restore_stage_batch(self, rgb: np.ndarray, plans: list[Plan], *, stage: str = "final", scale: float = 4.0,
                            seed: int = 0, batch_size: int | None = None,
                            previous: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """One stage for many chains of thought about one image, in batched diffusion calls.

        For GRPO: each plan's text for `stage`, negative prompt and noise level condition one sample;
        the reference (Real-ESRGAN rough, or the input) is computed once; no previews. The stage's
        seed is `seed` + its index, as stages() draws it. With `previous` (each plan's image of the
        stage before, as reflective rollouts have it) each sample starts from it as inference does,
        so a plan and seed give the image stages() gives; without it, from noise. A Real-ESRGAN rough stage runs its experts once; each plan's reading picks their
        mix (with several experts), and the later stages condition on that plan's mix.
        `batch_size` caps how many samples share one call (GPU memory).
        """
        inp = to_float(rgb)
        h, w = inp.shape[:2]
        size = stage_sizes(w, h, scale)[stage]
        refs = self._rough_reference(inp, plans)
        if stage == "rough" and refs is not None:
            return [color_fix(resize(ref, size), inp, self.color_fix, device=self.device) for ref, _ in refs]
        # Plans whose readings picked the same rough mix share a reference and its batched calls.
        groups: dict[int, tuple[np.ndarray, list[int]]] = {}
        for i in range(len(plans)):
            ref = inp if refs is None else resize(refs[i][0], stage_sizes(w, h, scale)["rough"])
            groups.setdefault(id(refs[i][0]) if refs is not None else 0, (ref, []))[1].append(i)
        step = batch_size or max(1, len(plans))
        out: list[np.ndarray | None] = [None] * len(plans)
        stage_seed = seed + STAGES.index(stage)
        for reference, rows in groups.values():
            for j in range(0, len(rows), step):
                chunk = rows[j:j + step]
                starts = None if previous is None else [to_float(previous[i]) for i in chunk]
                done = drain(self._diffuse(reference, starts, size, [self._condition(plans[i], stage) for i in chunk],
                                           stage_seed, stage=stage))
                for i, o in zip(chunk, done):
                    out[i] = color_fix(o, inp, self.color_fix, device=self.device)
        return out


def choose_sample(chooser, images: list[np.ndarray], inp: np.ndarray, plan: Plan | None,
                  seeds: list[int | None]) -> tuple[int, dict]:
    """(the chooser's pick among a stage's samples, the record of its choice); a seed of None is a
    sample drawn without noise."""
    t = time.perf_counter()
    lq = to_float(inp)
    measured = chooser.measure(images, [lq] * len(images))  # whole images: every region counts
    best, rewards, facts = chooser.choose(measured, plan, lq)
    rows = [{"label": f"sample {k + 1} ({'no noise' if s is None else f'seed {s}'})", "seed": s,
             **{key: None if v is None else round(float(v), 4) for key, v in m.items()},
             "reward": None if r is None else round(float(r), 4)}
            for k, (s, m, r) in enumerate(zip(seeds, measured, rewards))]
    winner = rows[best]["label"]
    if rows[best]["reward"] is None:
        why = f"no sample could be scored by {chooser.name} (image too small): kept {winner}"
    else:
        why = (f"highest {chooser.name} reward ({rows[best]['reward']}) of {len(rows)} samples; "
               f"input quality Q_LR {facts['q_lr']} from the {facts['q_lr_source']}")
    return best, {"mode": "auto", **facts, "candidates": rows, "allowed": [r["label"] for r in rows],
                  "winner": winner, "why": why, "seconds": round(time.perf_counter() - t, 4)}


def drain(gen):
    """Run a generator to its end and return its return value (previews, if any, are dropped)."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
