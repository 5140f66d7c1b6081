"""Stage images from the Stable Diffusion ×4 upscaler (diffusers `StableDiffusionUpscalePipeline`).

Scheme (design.md §2: each stage starts from the previous stage's image):

    source(rough)  = the input image            target = input size
    source(middle) = the rough image            target = sizes["middle"]
    source(final)  = the middle image           target = sizes["final"]

The upscaler always multiplies by 4, so for a target S the source is Lanczos-downscaled to S/4
(rounded, at least 1 px), edge-padded to a multiple of 8 (the VAE factor 4 times the UNet's
stride; the pipeline's image processor would otherwise round the size *down*), upscaled ×4
conditioned on the stage text, cropped back and, if rounding differs, resized exactly to S.
The rough stage therefore restores at the input size (input/4 → ×4): a generative clean-up
pass, as DiffBIR's first stage is.

Prompt per stage: the stage's understanding text, then quality words and the degradation items,
e.g. "a dog on grass; clean, sharp, high quality; remove heavy noise, light blur".

noise_level (the upscaler's augmentation level, 0..max_noise_level) from the plan's noise level:
none → 10, light → 20, medium → 40, heavy → 80, clamped to the pipeline's `max_noise_level`.
Higher values let the model discard more of the (noisy) input.

After each stage a colour fix matches the output to its source resized to the stage size:
"wavelet" keeps the source's low frequencies (colour) and the output's high frequencies
(StableSR's wavelet reconstruction); "adain" matches per-channel mean/std; "none" skips it.

Previews: this diffusers version's upscale pipeline has only the legacy `callback`/`callback_steps`
(no `callback_on_step_end`). The pipeline runs in a worker thread; every `preview_every` steps
the callback decodes the current latents and puts a StagePreview on a queue, which `stages()`
yields as they come.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..cot import Plan
from ..imageio import LoadedImage, to_float
from ..pipeline import StageImage, StagePreview, StageStarted
from .lite import resize

log = logging.getLogger(__name__)

NOISE_LEVELS = {"none": 10, "light": 20, "medium": 40, "heavy": 80}
QUALITY_WORDS = "clean, sharp, high quality"
DEFAULT_NEGATIVE = "blurry, noisy, jpeg artifacts, oversmoothed, low quality"
COLOR_FIXES = ("wavelet", "adain", "none")
PAD_MULTIPLE = 8
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STAGE_ORDER = ("rough", "middle", "final")


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
    k = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]], dtype=x.dtype)
    k = k[None, None].repeat(x.shape[1], 1, 1, 1)
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)
    return F.conv2d(x, k, groups=x.shape[1], dilation=radius)


def _wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def color_fix(output: np.ndarray, source: np.ndarray, method: str = "wavelet") -> np.ndarray:
    """Match `output`'s colour to `source` (resized to output's size first). Float32 [0,1] out."""
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
        high, _ = _wavelet_split(_to_t(out))
        _, low = _wavelet_split(_to_t(src))
        res = _from_t(high + low)
    return np.clip(res, 0, 1).astype(np.float32)


# --- Restorer --------------------------------------------------------------------------------------
def _resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    device = (device or "auto").lower()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        if dev.type == "cuda":
            return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return dev, torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use auto, fp32, fp16 or bf16)")
    return dev, _DTYPES[dtype]


class DiffusionStages:
    """StageRestorer over a diffusers StableDiffusionUpscalePipeline."""

    name = "sd-x4-upscaler"

    def __init__(self, pipe, *, device: torch.device, dtype: torch.dtype, num_inference_steps: int = 20,
                 guidance_scale: float = 7.0, negative_prompt: str | None = DEFAULT_NEGATIVE,
                 color_fix: str = "wavelet", cpu_offload: bool = False, preview_every: int = 5):
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown color fix {color_fix!r} (use {', '.join(COLOR_FIXES)})")
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.color_fix = color_fix
        self.cpu_offload = bool(cpu_offload)
        self.preview_every = int(preview_every or 0)
        self.fallbacks: list[str] = []  # stages retried in fp32
        self.pipe.set_progress_bar_config(disable=True)
        self._place(dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "auto", dtype: str = "auto",
                        num_inference_steps: int = 20, guidance_scale: float = 7.0,
                        negative_prompt: str | None = DEFAULT_NEGATIVE, color_fix: str = "wavelet",
                        cpu_offload: bool = False, preview_every: int = 5) -> "DiffusionStages":
        from diffusers import StableDiffusionUpscalePipeline

        dev, torch_dtype = _resolve(device, dtype)
        pipe = StableDiffusionUpscalePipeline.from_pretrained(str(path), dtype=torch_dtype)
        return cls(pipe, device=dev, dtype=torch_dtype, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, negative_prompt=negative_prompt, color_fix=color_fix,
                   cpu_offload=cpu_offload, preview_every=preview_every)

    def _place(self, dtype: torch.dtype) -> None:
        if self.cpu_offload and self.device.type == "cuda":
            self.pipe.to(dtype=dtype)
            self.pipe.enable_model_cpu_offload(device=self.device)
        elif self.pipe.unet.dtype != dtype or self.pipe.device != self.device:
            self.pipe.to(self.device, dtype)

    @property
    def precision(self) -> str:
        return {v: k for k, v in _DTYPES.items()}[self.dtype]

    def describe(self) -> dict:
        return {"restorer": self.name, "device": str(self.device), "precision": self.precision,
                "steps": self.steps}

    # one ×4 pass ------------------------------------------------------------------------------
    def _decode(self, latents: torch.Tensor, crop: tuple[int, int]) -> np.ndarray:
        vae = self.pipe.vae
        with torch.no_grad():
            lat = latents.to(next(vae.post_quant_conv.parameters()).dtype)
            img = vae.decode(lat / vae.config.scaling_factor, return_dict=False)[0]
        img = (img.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        return np.ascontiguousarray(img[: crop[1], : crop[0]], dtype=np.float32)

    def _upscale(self, low: np.ndarray, prompt: str, noise_level: int, seed: int, on_preview) -> np.ndarray:
        """×4 of an HxWx3 float image; returns (4H)x(4W)x3 float32 (NaNs possible in half precision)."""
        h, w = low.shape[:2]
        ph, pw = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
        padded = np.pad(low, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else low
        image = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)).permute(2, 0, 1)[None]
        gen = torch.Generator("cpu").manual_seed(int(seed))
        callback, every = None, 1
        if on_preview is not None and 0 < self.preview_every < self.steps:
            every = self.preview_every

            def callback(step, _t, latents):
                if step + 1 < self.steps:  # the last one is the stage image itself
                    on_preview(step + 1, self._decode(latents, (4 * w, 4 * h)))  # resized by the caller

        with torch.no_grad():
            out = self.pipe(prompt=prompt, image=image, num_inference_steps=self.steps,
                            guidance_scale=self.guidance_scale, noise_level=noise_level,
                            negative_prompt=self.negative_prompt if self.guidance_scale > 1 else None,
                            generator=gen, output_type="np", callback=callback, callback_steps=every).images
        return np.asarray(out[0], dtype=np.float32)[: 4 * h, : 4 * w]

    def _stage_rgb(self, source: np.ndarray, size, prompt, noise_level, seed, on_preview) -> np.ndarray:
        tw, th = size
        low = resize(source, (max(1, round(tw / 4)), max(1, round(th / 4))))
        out = self._upscale(low, prompt, noise_level, seed, on_preview)
        if not np.isfinite(out).all() and self.dtype != torch.float32:
            log.warning("diffusion stage produced NaNs in %s; retrying in fp32", self.precision)
            self.fallbacks.append(prompt)
            self.pipe.to(dtype=torch.float32)
            try:
                out = self._upscale(low, prompt, noise_level, seed, on_preview)
            finally:
                self.pipe.to(dtype=self.dtype)
        out = np.nan_to_num(out, nan=0.5)
        return resize(np.clip(out, 0, 1), (tw, th))

    # the stage stream ---------------------------------------------------------------------------
    def stages(self, image: LoadedImage, plan: Plan, *, sizes, seed: int = 0) -> Iterator:
        noise_level = noise_level_for(plan, int(self.pipe.config.get("max_noise_level", 350)))
        source = to_float(image.rgb)
        for index, stage in enumerate(_STAGE_ORDER):
            t = time.perf_counter()
            size = tuple(sizes[stage])
            yield StageStarted(stage, size)
            prompt = stage_prompt(plan, stage)
            q: queue.Queue = queue.Queue()
            done = object()
            result: dict = {}

            def work(src=source, stage_seed=seed + index, prompt=prompt, size=size):
                try:
                    result["rgb"] = self._stage_rgb(
                        src, size, prompt, noise_level, stage_seed,
                        lambda step, img: q.put(StagePreview(stage, resize(img, size), step, self.steps)))
                except BaseException as e:  # handed to the consumer thread
                    result["error"] = e
                finally:
                    q.put(done)

            worker = threading.Thread(target=work, name=f"diffusion-{stage}", daemon=True)
            worker.start()
            while (item := q.get()) is not done:
                yield item
            worker.join()
            if "error" in result:
                raise result["error"]
            rgb = color_fix(result["rgb"], source, self.color_fix)
            alpha = None if image.alpha is None else resize(to_float(image.alpha), size)
            yield StageImage(stage, rgb, alpha, time.perf_counter() - t)
            source = rgb
