"""Stage images from the Stable Diffusion ×4 upscaler (diffusers `StableDiffusionUpscalePipeline`).

The upscaler denoises latents at 1/4 of the output size, conditioned on a low-resolution image of
that same size (plus text and a `noise_level` augmentation). We run its denoising loop ourselves
(with the pipeline's own components) because three things need the loop: latent tiling, starting
from the previous stage's image, and previews without threads.

Scheme (design.md §2, each stage starts from the previous stage's image):

    rough  (input size) = Real-ESRGAN at ×1 (`rough: realesrgan`, the default: a regression
                          clean-up first, as DiffBIR does) or a diffusion pass (`rough: diffusion`)
    middle (×2)         = diffusion conditioned on the reference at middle/4, started from rough
    final  (×scale)     = diffusion conditioned on the reference at final/4,  started from middle

The reference is the rough image when it came from Real-ESRGAN (clean, every input pixel kept),
else the input itself: at ×4 the final stage conditions on it at full input resolution, so no
input detail is thrown away on the way. "Started from" is img2img: the previous stage's image,
resized to the stage size, is VAE-encoded and noised to `strength` (1.0 ignores it), and
round(steps × strength) steps run. A stage whose size is not a multiple of 4 runs at the nearest
and is Lanczos-resized; sizes are edge-padded to a multiple of 8 for the UNet and cropped back.

Prompt per stage: the stage's understanding text, then quality words and the degradation items,
e.g. "a dog on grass; clean, sharp, high quality; remove heavy noise, light blur".

noise_level (the upscaler's augmentation level, 0..max_noise_level) from the plan's noise level:
none → 10, light → 20, medium → 40, heavy → 80, clamped to the pipeline's `max_noise_level`.
Higher values let the model discard more of the (noisy) conditioning image.

Large images: the UNet runs on latent tiles (`tile`, `tile_overlap`, Gaussian blending, see
latent_tiling.py), the VAE on its own tiles (diffusers' tiling, `vae_tile` output pixels); out of GPU memory, the
tile is halved and the stage retried. Half precision that yields NaNs is retried in fp32.

Colour: each stage is matched to the input's colours: "wavelet" keeps the input's low frequencies
and the stage's high frequencies (StableSR's wavelet reconstruction); "adain" matches per-channel
mean/std; "none" skips it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..cot import STAGES, Plan
from ..device import PRECISIONS, resolve_device
from ..imageio import LoadedImage, to_float
from ..pipeline import StageImage, StagePreview, StageStarted, stage_sizes
from .latent_tiling import tiled_predict
from .lite import resize

log = logging.getLogger(__name__)

NOISE_LEVELS = {"none": 10, "light": 20, "medium": 40, "heavy": 80}
QUALITY_WORDS = "clean, sharp, high quality"
DEFAULT_NEGATIVE = "blurry, noisy, jpeg artifacts, oversmoothed, low quality"
COLOR_FIXES = ("wavelet", "adain", "none")
PAD_MULTIPLE = 8  # the x4 upscaler UNet downsamples its latent 3 times
MIN_TILE = 32  # latent pixels: below this, halving on out-of-memory stops
ROUGH_METHODS = ("realesrgan", "diffusion")


# --- Plan → conditioning ---------------------------------------------------------------------------
def noise_level_for(plan: Plan | None, max_noise_level: int = 350) -> int:
    """The upscaler's noise_level for the plan's noise estimate (see the module doc)."""
    level = plan.level("noise") if plan is not None else "none"
    return int(max(0, min(NOISE_LEVELS.get(level, NOISE_LEVELS["none"]), max_noise_level)))


def _degradation_words(plan: Plan | None) -> str:
    words = []
    for item in getattr(plan, "degradation", None) or []:
        if item.type == "downsample" or item.level in (None, "", "none"):
            continue
        words.append(f"{item.level} {'jpeg artifacts' if item.type == 'jpeg' else item.type}")
    return ", ".join(words)


def stage_prompt(plan: Plan | None, stage: str) -> str:
    """"<understanding>; clean, sharp, high quality; remove <level type>, …" (parts that are empty go)."""
    understanding = ""
    if plan is not None and isinstance(getattr(plan, "understanding", None), dict):
        understanding = str(plan.understanding.get(stage) or "").strip()
    parts = [understanding, QUALITY_WORDS]
    degr = _degradation_words(plan)
    if degr:
        parts.append("remove " + degr)
    return "; ".join(p for p in parts if p)


# --- Colour fix ------------------------------------------------------------------------------------
def _to_t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]


def _from_t(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).numpy().astype(np.float32)


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The à-trous [1 2 1]/4 ⊗ [1 2 1]/4 blur with holes of `radius`, as two shifted sums (separable:
    several times faster than the equivalent depthwise dilated convolution on CPU)."""
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    r = radius
    p = F.pad(x, (r, r, r, r), mode=mode)
    p = p[..., :, : -2 * r] + 2 * p[..., :, r:-r] + p[..., :, 2 * r:]
    return (p[..., : -2 * r, :] + 2 * p[..., r:-r, :] + p[..., 2 * r:, :]) / 16


def _wavelet_low(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The low-frequency residual of a `levels`-level à-trous wavelet decomposition."""
    for i in range(levels):
        x = _wavelet_blur(x, 2**i)
    return x


def color_fix(output: np.ndarray, source: np.ndarray, method: str = "wavelet", device=None) -> np.ndarray:
    """Match `output`'s colour to `source` (resized to output's size first). Float32 [0,1] out.

    Wavelet: high(output) + low(source) = output + low(source − output), as the decomposition is
    linear: one decomposition instead of two, run on `device` (the restorer's GPU) when given.
    """
    if method == "none":
        return np.clip(output, 0, 1).astype(np.float32)
    if method not in COLOR_FIXES:
        raise ValueError(f"unknown color fix {method!r} (use {', '.join(COLOR_FIXES)})")
    out = to_float(output)
    src = resize(to_float(source), (out.shape[1], out.shape[0]))
    if method == "adain":
        mu_o, sd_o = out.mean((0, 1)), out.std((0, 1)) + 1e-6
        mu_s, sd_s = src.mean((0, 1)), src.std((0, 1))
        res = (out - mu_o) / sd_o * sd_s + mu_s
    else:
        with torch.no_grad():
            res = out + _from_t(_wavelet_low(_to_t(src - out).to(device or "cpu")).cpu())
    return np.clip(res, 0, 1).astype(np.float32)


# --- Restorer --------------------------------------------------------------------------------------
def _resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = resolve_device(device)
    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        if dev.type == "cuda":
            return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return dev, torch.float32
    if dtype not in PRECISIONS:
        raise ValueError(f"unknown dtype {dtype!r} (use auto, fp32, fp16 or bf16)")
    return dev, PRECISIONS[dtype]


def _pad(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    ph, pw = h - arr.shape[0], w - arr.shape[1]
    return np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else arr


class DiffusionStages:
    """StageRestorer over a diffusers StableDiffusionUpscalePipeline (and optionally Real-ESRGAN)."""

    name = "sd-x4-upscaler"

    def __init__(self, pipe, *, device: torch.device, dtype: torch.dtype, num_inference_steps: int = 20,
                 guidance_scale: float = 7.5, negative_prompt: str | None = DEFAULT_NEGATIVE,
                 color_fix: str = "wavelet", cpu_offload: bool = False, preview_every: int = 5,
                 strength: float = 0.8, tile: int = 128, tile_overlap: int = 32, vae_tile: int = 512,
                 regression=None):
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown color fix {color_fix!r} (use {', '.join(COLOR_FIXES)})")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
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
        self.strength = float(strength)
        self.tile = rounded  # 0: no latent tiling
        self.tile_overlap = int(tile_overlap)
        self.regression = regression  # an ESRGANRestorer for the rough stage, or None
        self.fp32_retries = 0  # stages redone in fp32 after NaNs
        # One denoising at a time per model: the scheduler's timesteps and the fp32 retry are shared
        # state, and per-request copies (the demo's) share this lock with the original.
        self._lock = threading.Lock()
        self.pipe.set_progress_bar_config(disable=True)
        self.vae_tile = int(vae_tile or 0)  # output pixels; 0: decode/encode whole images
        if self.vae_tile:
            vae = self.pipe.vae
            vae.enable_tiling()  # diffusers tiles only images larger than the tile
            vae.tile_sample_min_size = self.vae_tile
            vae.tile_latent_min_size = self.vae_tile // 4  # the upscaler VAE's factor
        self._place(dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "auto", dtype: str = "auto",
                        rough: str = "realesrgan", **options) -> "DiffusionStages":
        """Load the upscaler folder (and Real-ESRGAN for `rough="realesrgan"`); options as __init__."""
        from diffusers import StableDiffusionUpscalePipeline

        if rough not in ROUGH_METHODS:
            raise ValueError(f"unknown rough method {rough!r} (use {', '.join(ROUGH_METHODS)})")
        dev, torch_dtype = _resolve(device, dtype)
        regression = None
        if rough == "realesrgan":
            from .esrgan import ESRGANRestorer

            regression = ESRGANRestorer.from_pretrained(None, device=str(dev),
                                                        precision="fp32" if dtype == "fp32" else "auto")
        pipe = StableDiffusionUpscalePipeline.from_pretrained(str(path), dtype=torch_dtype)
        return cls(pipe, device=dev, dtype=torch_dtype, regression=regression, **options)

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

    def describe(self) -> dict:
        return {"restorer": self.name, "device": str(self.device), "precision": self.precision,
                "steps": self.steps, "strength": self.strength, "tile": self.tile, "vae_tile": self.vae_tile,
                "rough": "realesrgan" if self.regression is not None else "diffusion"}

    # VAE -------------------------------------------------------------------------------------
    def _vae_dtype(self) -> torch.dtype:
        return next(self.pipe.vae.post_quant_conv.parameters()).dtype

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """Bx4xhxw latents → Bx(4h)x(4w)x3 float32 images."""
        vae = self.pipe.vae
        img = vae.decode(latents.to(self._vae_dtype()) / vae.config.scaling_factor, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def _encode(self, rgb: np.ndarray, device) -> torch.Tensor:
        vae = self.pipe.vae
        x = torch.from_numpy(np.ascontiguousarray(rgb * 2 - 1, dtype=np.float32)).permute(2, 0, 1)[None]
        dist = vae.encode(x.to(device, self._vae_dtype())).latent_dist
        return dist.mode() * vae.config.scaling_factor

    # one denoising run -------------------------------------------------------------------------
    @torch.no_grad()
    def _denoise(self, cond: np.ndarray, init: np.ndarray | None, prompts: list[str], noise_levels: list[int],
                 seed: int, tile: int, preview):
        """Generator: yields previews, returns Bx(4h)x(4w)x3 float32 images for an h x w `cond`.

        One image, B = len(prompts) texts and noise levels, denoised as one batch (GRPO scores many
        chains of thought about one image). `cond` and `init` ((4h)x(4w)x3 or None) are already
        padded to the UNet's multiple. The random draws (conditioning noise, then latent noise, both
        from a CPU generator) come in the pipeline's order, so one prompt, one tile and no init give
        the pipeline's own result.
        """
        from diffusers.utils.torch_utils import randn_tensor

        pipe, sched = self.pipe, self.pipe.scheduler
        device = pipe._execution_device
        cfg = self.guidance_scale > 1
        n = len(prompts)
        negative = [self.negative_prompt or ""] * n if cfg else None
        pos, neg = pipe.encode_prompt(list(prompts), device, 1, cfg, negative)
        embeds = torch.cat([neg, pos]) if cfg else pos
        dtype = embeds.dtype
        # One generator per sample, all on the same seed: every text in a batch meets the same noise,
        # so differences between samples come from the texts (common random numbers for GRPO).
        gens = [torch.Generator("cpu").manual_seed(int(seed)) for _ in range(n)]

        image = torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32) * 2 - 1).permute(2, 0, 1)[None]
        image = image.to(device, dtype).repeat(n, 1, 1, 1)
        level = torch.tensor(list(noise_levels), dtype=torch.long, device=device)
        image = pipe.low_res_scheduler.add_noise(image, randn_tensor(image.shape, generator=gens, device=device,
                                                                     dtype=dtype), level)
        batch = 2 if cfg else 1
        image, level = torch.cat([image] * batch), level.repeat(batch)

        sched.set_timesteps(self.steps, device=device)
        timesteps = sched.timesteps
        shape = (n, pipe.vae.config.latent_channels, *image.shape[-2:])
        noise = randn_tensor(shape, generator=gens, device=device, dtype=dtype)
        if init is None or self.strength >= 1:
            latents = noise * sched.init_noise_sigma
        else:
            skip = min(self.steps - 1, round(self.steps * (1 - self.strength))) * sched.order
            timesteps = timesteps[skip:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(skip)
            start = self._encode(init, device).to(dtype).repeat(n, 1, 1, 1)
            latents = sched.add_noise(start, noise, timesteps[:1].repeat(n))
        extra = pipe.prepare_extra_step_kwargs(gens[0], 0.0)

        def predict(lat: torch.Tensor, cond_tile: torch.Tensor) -> torch.Tensor:
            x = torch.cat([torch.cat([lat] * batch), cond_tile], dim=1)
            eps = pipe.unet(x, t, encoder_hidden_states=embeds, class_labels=level, return_dict=False)[0]
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + self.guidance_scale * (text - uncond)
            return eps

        total = len(timesteps)
        for i, t in enumerate(timesteps):
            scaled = sched.scale_model_input(latents, t)
            eps = tiled_predict(predict, scaled, image, tile, min(self.tile_overlap, tile // 2))
            latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
            if preview is not None and 0 < self.preview_every and (i + 1) % self.preview_every == 0 \
                    and i + 1 < total:  # the last step's image is the stage image itself
                yield preview(self._decode(latents[:1])[0], i + 1, total)
        return self._decode(latents)

    def _fit(self, cond, init, prompts, noise_levels, seed, preview):
        """_denoise, halving the latent tile while the GPU runs out of memory."""
        while True:
            try:
                return (yield from self._denoise(cond, init, prompts, noise_levels, seed, self.tile, preview))
            except torch.OutOfMemoryError:
                current = self.tile or max(cond.shape[:2])
                if current <= MIN_TILE:
                    raise
                self.tile = max(MIN_TILE, current // 2 // PAD_MULTIPLE * PAD_MULTIPLE)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of GPU memory in the diffusion stage: retrying with latent tile %d", self.tile)

    def _run_stage(self, cond: np.ndarray, init: np.ndarray | None, prompts: list[str], noise_levels: list[int],
                   seed: int, preview):
        """One stage with the fallbacks: smaller tiles on OOM, then fp32 (also tiled) on NaN."""
        with self._lock:
            out = yield from self._fit(cond, init, prompts, noise_levels, seed, preview)
            if not np.isfinite(out).all() and self.dtype != torch.float32:
                log.warning("diffusion stage produced NaNs in %s; retrying in fp32", self.precision)
                self.fp32_retries += 1
                self._place(torch.float32)
                try:
                    out = yield from self._fit(cond, init, prompts, noise_levels, seed, preview)
                finally:
                    self._place(self.dtype)
        return np.nan_to_num(out, nan=0.5)

    # stages ----------------------------------------------------------------------------------
    def _rough_reference(self, inp: np.ndarray) -> np.ndarray | None:
        """Real-ESRGAN at the input size: the clean image later stages condition on (None without it)."""
        if self.regression is None:
            return None
        rgb, _ = self.regression.restore(inp, None, outscale=1.0)
        return resize(rgb, (inp.shape[1], inp.shape[0]))

    def _diffuse(self, reference: np.ndarray, previous: np.ndarray | None, size: tuple[int, int],
                 prompts: list[str], noise_levels: list[int], seed: int, preview=None):
        """Generator: one diffusion stage of `size` for each prompt; returns the images at `size`."""
        tw, th = size
        lw, lh = max(1, round(tw / 4)), max(1, round(th / 4))
        ph, pw = -(-lh // PAD_MULTIPLE) * PAD_MULTIPLE, -(-lw // PAD_MULTIPLE) * PAD_MULTIPLE
        cond = _pad(resize(reference, (lw, lh)), ph, pw)
        starts_from_previous = previous is not None and self.strength < 1
        init = _pad(resize(previous, (4 * lw, 4 * lh)), 4 * ph, 4 * pw) if starts_from_previous else None
        crop = lambda img: img[: 4 * lh, : 4 * lw]  # noqa: E731 - the padding goes
        wrapped = None if preview is None else (lambda img, step, total: preview(resize(crop(img), size), step, total))
        out = yield from self._run_stage(cond, init, prompts, noise_levels, seed, wrapped)
        return [resize(np.clip(crop(o), 0, 1), size) for o in out]

    def stages(self, image: LoadedImage, plan: Plan, *, sizes, seed: int = 0) -> Iterator:
        noise_level = noise_level_for(plan, int(self.pipe.config.get("max_noise_level", 350)))
        inp = to_float(image.rgb)
        reference = inp  # what diffusion stages condition on (module doc)
        previous = None
        for index, stage in enumerate(STAGES):
            t = time.perf_counter()
            size = tuple(sizes[stage])
            yield StageStarted(stage, size)
            if stage == "rough" and self.regression is not None:
                rgb = reference = resize(self._rough_reference(inp), size)
            else:
                def preview(img, step, total, stage=stage):
                    return StagePreview(stage, img, step, total)

                (rgb,) = yield from self._diffuse(reference, previous, size, [stage_prompt(plan, stage)],
                                                  [noise_level], seed + index, preview)
            rgb = color_fix(rgb, inp, self.color_fix, device=self.device)
            alpha = None if image.alpha is None else resize(to_float(image.alpha), size)
            yield StageImage(stage, rgb, alpha, time.perf_counter() - t)
            previous = rgb

    def restore_final_batch(self, rgb: np.ndarray, plans: list[Plan], *, scale: float = 4.0, seed: int = 0,
                            batch_size: int | None = None) -> list[np.ndarray]:
        """The final stage for many chains of thought about one image, in batched diffusion calls.

        For GRPO's generation reward: each plan's final text and noise level condition one sample;
        the reference (Real-ESRGAN rough, or the input) is computed once; no init image and no
        previews. `batch_size` caps how many samples share one call (GPU memory).
        """
        inp = to_float(rgb)
        h, w = inp.shape[:2]
        size = stage_sizes(w, h, scale)["final"]
        reference = self._rough_reference(inp)
        reference = inp if reference is None else reference
        max_level = int(self.pipe.config.get("max_noise_level", 350))
        prompts = [stage_prompt(p, "final") for p in plans]
        levels = [noise_level_for(p, max_level) for p in plans]
        step = batch_size or max(1, len(plans))
        out: list[np.ndarray] = []
        for i in range(0, len(plans), step):
            out += drain(self._diffuse(reference, None, size, prompts[i:i + step], levels[i:i + step], seed))
        return [color_fix(o, inp, self.color_fix, device=self.device) for o in out]


def drain(gen):
    """Run a generator to its end and return its return value (previews, if any, are dropped)."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
