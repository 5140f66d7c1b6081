"""The x4 upscaler's denoising loop on its own: diffusers' `StableDiffusionUpscalePipeline.__call__`
steps 5–9 (noised low-resolution image, latents, the denoising loop), plus what the pipeline lacks:
latent tiling, a start latent (img2img) and previews of the predicted clean latent.

The random draws (conditioning noise, then latent noise, from the caller's CPU generators) come in the
pipeline's order, so one prompt, one tile and no start latent give the pipeline's own result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .conditioning import Condition
from .latent_tiling import tiled_predict


@dataclass
class ModelInputs:
    """What the UNet sees besides the latents, doubled (negative first) under classifier-free guidance."""

    embeds: torch.Tensor  # text embeddings
    image: torch.Tensor  # the noised low-resolution image, pixel-aligned with the latents
    level: torch.Tensor  # its noise levels (the UNet's class labels)
    guidance_scale: float

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1


def model_inputs(pipe, cond: np.ndarray, conditions: list[Condition], gens: list[torch.Generator],
                 guidance_scale: float, device) -> ModelInputs:
    """Text embeddings and the noised `cond` (hxwx3 in [0, 1]) for each sample of the batch."""
    from diffusers.utils.torch_utils import randn_tensor

    cfg = guidance_scale > 1
    prompts = [c.prompt for c in conditions]
    negatives = [c.negative for c in conditions] if cfg else None
    pos, neg = pipe.encode_prompt(prompts, device, 1, cfg, negatives)
    embeds = torch.cat([neg, pos]) if cfg else pos
    image = torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32) * 2 - 1).permute(2, 0, 1)[None]
    image = image.to(device, embeds.dtype).repeat(len(conditions), 1, 1, 1)
    level = torch.tensor([c.noise_level for c in conditions], dtype=torch.long, device=device)
    noise = randn_tensor(image.shape, generator=gens, device=device, dtype=embeds.dtype)
    image = pipe.low_res_scheduler.add_noise(image, noise, level)
    batch = 2 if cfg else 1
    return ModelInputs(embeds, torch.cat([image] * batch), level.repeat(batch), guidance_scale)


def img2img_skip(steps: int, strength: float, order: int = 1) -> int:
    """How many of `steps` timesteps img2img at `strength` skips: round(steps × (1 − strength))."""
    return min(steps - 1, round(steps * (1 - strength))) * order


def initial_latents(sched, shape: tuple, gens: list[torch.Generator], steps: int, strength: float,
                    start: torch.Tensor | None, device, dtype, skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, timesteps): pure noise, or `start` (1x4xhxw, or one per sample) noised to `strength` with the first
    round(steps × (1 − strength)) steps skipped (or `skip` of them, when given)."""
    from diffusers.utils.torch_utils import randn_tensor

    sched.set_timesteps(steps, device=device)
    noise = randn_tensor(shape, generator=gens, device=device, dtype=dtype)
    if start is None or strength >= 1:
        return noise * sched.init_noise_sigma, sched.timesteps
    skip = img2img_skip(steps, strength, sched.order) if skip is None else int(skip)
    timesteps = sched.timesteps[skip:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(skip)
    start = start.to(device, dtype)
    if start.shape[0] == 1:  # one start image for every sample, else one each
        start = start.repeat(shape[0], 1, 1, 1)
    return sched.add_noise(start, noise, timesteps[:1].repeat(shape[0])), timesteps


def predicted_x0(sched, out, model_output: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor | None:
    """The step's prediction of the clean latent.

    DDIMScheduler.step (the x4 upscaler's sampler), DDPMScheduler.step and the Euler schedulers return
    it as `pred_original_sample`. Schedulers whose step returns only `prev_sample` (e.g.
    DPMSolverMultistepScheduler) get it from the model output and `alphas_cumprod[t]`, by the formulas
    of DDIMScheduler.step; a scheduler without `alphas_cumprod` or with another parametrisation gets
    None (no preview).
    """
    x0 = getattr(out, "pred_original_sample", None)
    alphas = getattr(sched, "alphas_cumprod", None)
    kind = sched.config.get("prediction_type", "epsilon")
    if x0 is not None or alphas is None or kind not in ("epsilon", "v_prediction", "sample"):
        return x0
    a = alphas.to(sample.device)[t].to(sample.dtype)
    if kind == "epsilon":
        return (sample - (1 - a) ** 0.5 * model_output) / a**0.5
    if kind == "v_prediction":
        return a**0.5 * sample - (1 - a) ** 0.5 * model_output
    return model_output


def denoise(pipe, inputs: ModelInputs, latents: torch.Tensor, timesteps: torch.Tensor, *, tile: int,
            overlap: int, extra: dict, preview: Callable | None = None, preview_every: int = 0) -> Iterator:
    """Generator: the scheduler's steps over `timesteps`, the UNet on latent tiles; returns the final
    latents. Every `preview_every` steps (not the last: that is the stage image) it yields
    `preview(x0, step, total)` unless that is None."""
    sched, batch = pipe.scheduler, 2 if inputs.cfg else 1

    def predict(lat: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.cat([lat] * batch), image], dim=1)
        out = pipe.unet(x, t, encoder_hidden_states=inputs.embeds, class_labels=inputs.level, return_dict=False)[0]
        if inputs.cfg:
            uncond, text = out.chunk(2)
            out = uncond + inputs.guidance_scale * (text - uncond)
        return out

    total = len(timesteps)
    for i, t in enumerate(timesteps):
        model_output = tiled_predict(predict, sched.scale_model_input(latents, t), inputs.image, tile, overlap)
        out = sched.step(model_output, t, latents, **extra, return_dict=True)
        if preview is not None and preview_every > 0 and (i + 1) % preview_every == 0 and i + 1 < total:
            x0 = predicted_x0(sched, out, model_output, t, latents)
            shown = None if x0 is None else preview(x0, i + 1, total)
            if shown is not None:
                yield shown
        latents = out.prev_sample
    return latents
