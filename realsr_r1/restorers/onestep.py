"""Stage images from a one-step diffusion restorer on SD 2.1-base, OSEDiff's recipe, conditioned on
the chain of thought.

OSEDiff (`OSEDiff_test.forward`) upsamples the low-quality image ×4 (bicubic), encodes it with the VAE
(whose encoder carries a LoRA), runs the UNet (with a LoRA and a retrained conv_in) once at t = 999
on that latent as if it were x_999, takes the DDPM step to x_0 and decodes. One UNet evaluation per
image, no classifier-free guidance. We keep that step exactly and change what goes in:

    rough  (input size) = the lite experts and their chooser (`rough: realesrgan`), or the input
                          itself (`rough: input`: OSEDiff's own setting, what its published rows use)
    middle (×2)         = the rough image resized, for show (default), or one step from it
                          (`middle: true`, conditioned on <middle_understand>)
    final  (×scale)     = one step from the rough image (or the one-step middle), bicubic-resized to
                          the final size, conditioned on <final_understand>; with `rough: input` that
                          is OSEDiff's own input, the LQ image bicubic ×4

The prompt is the stage's understanding text alone, in place of OSEDiff's DAPE tags. The degradation
words are left out: OSEDiff's inference calls the UNet once with the prompt and no negative branch
(its negative prompt and CFG appear only in the VSD loss of training), so a negative prompt would
double the UNet evaluations and condition a branch the adapter was never trained to run.

The step: the scheduler is SD 2.1-base's, loaded as a DDPMScheduler (OSEDiff does the same), set to
the one timestep [T] (custom timesteps: `DDPMScheduler.previous_timestep` then gives −1, so ᾱ_prev = 1
and `step(...).prev_sample` is the x_0 prediction (z − √(1−ᾱ_T)·ε)/√ᾱ_T, plus DDPM's variance term,
which is 1e-10 there). OSEDiff's `set_timesteps(1)` relied on older diffusers computing the previous
timestep as t − 1000; current diffusers looks t up in `timesteps`, which holds [1] after that call.
The VAE encodes to the posterior's mode (OSEDiff samples it; the posterior's spread is the
difference, and `noise` below is our explicit randomness).

The fidelity dial (`fidelity`, `--fidelity`): x_0 ← x_0 + f·(z − x_0), z the start latent: the UNet's
correction scaled by 1 − f. That is PiSA-SR's dial (its output z − λ·prediction, λ scaling what the
adapter adds) with one adapter: f = 0 is the one-step image, f = 1 the rough stage's image through the
VAE. One UNet evaluation for any f.

Candidates (`candidates: K` > 1): K finals from one start, the first as above and the others from
the start latent plus Gaussian noise of std `noise` (seeds seed + 2 + k·SEED_STRIDE), as GDPO-SR makes
its one-step policy stochastic; the profile's chooser keeps one, as for the x4 upscaler's samples.

Memory: the UNet runs on Gaussian-blended latent tiles (`tile`, `tile_overlap`, latent pixels,
latent_tiling.py), as OSEDiff tiles its latent (96 with 32 overlap); out of GPU memory the tile
halves. The VAE fits its own memory (vae.py). Half precision that yields NaNs is redone in fp32.
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
from .blend import resize
from .color import COLOR_FIXES, color_fix
from .diffusion import SEED_STRIDE, _fit_within, _pad, choose_sample, drain
from .latent_tiling import tiled_predict
from .memory import OutOfMemoryError, free_cached
from .vae import LatentCodec

log = logging.getLogger(__name__)

ROUGH_METHODS = ("realesrgan", "input")
TIMESTEP = 999  # OSEDiff's: the start latent is taken for x_T
MIN_TILE = 16  # latent pixels: below this, halving on out-of-memory stops


def stage_prompt(plan: Plan | None, stage: str) -> str:
    """What the text encoder reads for `stage`: the plan's understanding of it ('' without one)."""
    understanding = getattr(plan, "understanding", None) if plan is not None else None
    return str((understanding or {}).get(stage) or "").strip() if isinstance(understanding, dict) else ""


def upscale(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize to `size` (w, h) as OSEDiff's test script upsamples its input: PIL's bicubic
    (a = −0.5, torch's is −0.75), here channel by channel in float so nothing is rounded to 8 bits."""
    from PIL import Image

    w, h = size
    if rgb.shape[:2] == (h, w):
        return rgb
    rgb = np.asarray(rgb, dtype=np.float32)
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c])).resize((w, h), Image.BICUBIC))
           for c in range(rgb.shape[2])]
    return np.clip(np.stack(out, axis=2), 0, 1)


class OneStepStages:
    """StageRestorer over SD 2.1-base with an OSEDiff-format adapter (onestep_adapter.py)."""

    request_options = ("color_fix",)  # what the demo may change per request (demo.with_options)
    name = "onestep"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, device: torch.device, dtype: torch.dtype,
                 fidelity: float | str = 0.0, middle: bool = False, color_fix: str = "adain",
                 preview_every: int = 1, preview_size: int = 256, tile: int = 96, tile_overlap: int = 32,
                 vae_tile: int = 1024, vae_slicing: bool = False, candidates: int = 1, noise: float = 0.1,
                 timestep: int = TIMESTEP, regression=None, chooser=None):
        try:
            fidelity = float(fidelity)
        except (TypeError, ValueError):
            raise ValueError(f"fidelity: the one-step restorer takes a number in [0, 1] (how much of the UNet's "
                             f"correction of the rough image is taken back), got {fidelity!r}") from None
        if not 0 <= fidelity <= 1:
            raise ValueError(f"fidelity must be in [0, 1], got {fidelity}")
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown color fix {color_fix!r} (use {', '.join(COLOR_FIXES)})")
        if isinstance(candidates, bool) or int(candidates) != candidates or candidates < 1:
            raise ValueError(f"candidates must be a whole number ≥ 1, got {candidates}")
        if candidates > 1 and chooser is None:
            raise ValueError("candidates > 1 needs a chooser to pick among them (the profile gives one)")
        if noise < 0:
            raise ValueError(f"noise must be ≥ 0, got {noise}")
        if not 0 < int(timestep) < scheduler.config.num_train_timesteps:
            raise ValueError(f"timestep must be in (0, {scheduler.config.num_train_timesteps}), got {timestep}")
        self.latent_multiple = 2 ** (len(unet.config.block_out_channels) - 1)  # the UNet's downsamplings
        rounded = int(tile) // self.latent_multiple * self.latent_multiple
        if tile < 0 or (tile and not rounded) or tile_overlap < 0 or (rounded and tile_overlap >= rounded):
            raise ValueError(f"need tile 0 or ≥ {self.latent_multiple} and 0 ≤ tile_overlap < tile, "
                             f"got {tile} and {tile_overlap}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler
        self.timestep = int(timestep)
        scheduler.set_timesteps(timesteps=[self.timestep])  # module doc: the step lands on x_0
        self.device, self.dtype = device, dtype
        self.fidelity = fidelity
        self.middle = bool(middle)
        self.color_fix = color_fix
        self.preview_every = int(preview_every or 0)
        self.preview_size = max(1, int(preview_size))
        self.tile, self.tile_overlap = rounded, int(tile_overlap)
        self.candidates, self.noise = int(candidates), float(noise)
        self.regression, self.chooser = regression, chooser
        self.adapter = None  # {path, sha256, rank_unet, rank_vae} once loaded (from_pretrained)
        self.base = None
        self.fp32_retries = 0
        self._lock = threading.Lock()  # one step at a time: the tile and the fp32 retry are shared state
        self.codec = LatentCodec(vae, tile=vae_tile, slicing=vae_slicing)
        self.multiple = self.latent_multiple * self.codec.factor  # pixels
        self._place(dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "auto", dtype: str = "auto", rough: str = "realesrgan",
                        adapter: str | None = None, regression=None, **options) -> "OneStepStages":
        """Load SD 2.1-base's UNet, VAE, text encoder, tokenizer and scheduler from `path` (the hub's
        folder layout), the OSEDiff-format `adapter` file into the UNet and VAE, and for
        `rough="realesrgan"` the lite experts unless `regression` gives them; options as __init__."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..quiet import settle
        from ..weights import CorruptWeightsError

        settle("diffusers")
        if rough not in ROUGH_METHODS:
            raise ValueError(f"unknown rough method {rough!r} (use {', '.join(ROUGH_METHODS)})")
        dev = resolve_device(device)
        torch_dtype = weight_dtype(dev, dtype)
        path = Path(path)
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            # clip_sample: SD 2.1-base's config says false; a copy without the key would get DDPM's
            # default, clamping the x_0 latent to ±1
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", clip_sample=False)
        except (OSError, ValueError) as e:
            raise CorruptWeightsError(f"one-step base model {path}: not an SD 2.1-base folder "
                                      f"({' '.join(str(e).split())[:160]})") from None
        if unet.config.in_channels != vae.config.latent_channels:
            raise CorruptWeightsError(f"one-step base model {path}: its UNet takes {unet.config.in_channels} "
                                      f"channels, not the VAE's {vae.config.latent_channels} (an upscaler's UNet?)")
        loaded = None
        if adapter is not None:  # in fp32 on the CPU, before anything is cast or moved
            from .onestep_adapter import load_adapter

            loaded = load_adapter(unet, vae, adapter)
            # One evaluation per image: fuse the LoRA into the weights (peft `LoraLayer.merge` through
            # diffusers' `fuse_lora`) and drop its layers (`unload_lora`: `recurse_remove_peft_layers`).
            for model in (unet, vae):
                if getattr(model, "peft_config", None):
                    model.fuse_lora()
                    model.unload_lora()
        if rough == "input":
            regression = None
        elif regression is None:
            from .esrgan import ESRGANRestorer
            from .lite import LiteStages

            regression = LiteStages(ESRGANRestorer.from_pretrained(None, device=str(dev),
                                                                   precision="fp32" if dtype == "fp32" else "auto"))
        stages = cls(unet, vae, text_encoder, tokenizer, scheduler, device=dev, dtype=torch_dtype,
                     regression=regression, **options)
        stages.adapter, stages.base = loaded, str(path)
        return stages

    def _place(self, dtype: torch.dtype) -> None:
        for model in (self.unet, self.vae, self.text_encoder):
            model.to(self.device, dtype)
        if dtype == torch.float16 and self.vae.config.get("force_upcast", True):
            self.vae.to(dtype=torch.float32)  # SD's VAE overflows in fp16 (as diffusers' pipelines upcast it)
        if self.device.type == "cpu":  # oneDNN's convolutions: encode −23 %, decode −15 % at 512² (measured)
            self.vae.to(memory_format=torch.channels_last)
        for model in (self.unet, self.vae, self.text_encoder):
            model.eval().requires_grad_(False)
        self.current_dtype = dtype

    @property
    def precision(self) -> str:
        return {v: k for k, v in PRECISIONS.items()}[self.dtype]

    def describe(self) -> dict:
        return {"restorer": self.name, "base": self.base, "device": str(self.device), "precision": self.precision,
                "timestep": self.timestep, "unet_evaluations_per_stage": 1, "fidelity": self.fidelity,
                "middle": "one step" if self.middle else "resized",
                "tile": self.tile, "vae_tile": self.codec.tile, "vae_slicing": self.codec.slicing,
                "rough": "realesrgan" if self.regression is not None else "input",
                **({"rough_restorer": self.regression.describe()} if self.regression is not None else {}),
                **({"candidates": self.candidates, "noise": self.noise, "chooser": self.chooser.describe()}
                   if self.candidates > 1 else {}),
                "adapter": self.adapter}

    # the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP embeddings of `prompts`, padded and truncated to the tokenizer's 77 tokens (OSEDiff's
        encode_prompt)."""
        ids = self.tokenizer(prompts, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0].to(self.current_dtype)

    def start_latents(self, start: torch.Tensor, seeds: list[int | None]) -> torch.Tensor:
        """One start latent per seed: `start` itself for None, else `start` + noise·N(0, 1) drawn from
        that seed (the stochastic policy of candidates and RL)."""
        out = []
        for s in seeds:
            if s is None or self.noise == 0:
                out.append(start)
                continue
            g = torch.Generator("cpu").manual_seed(int(s))
            eps = torch.randn(start.shape, generator=g, dtype=torch.float32).to(start.device, start.dtype)
            out.append(start + self.noise * eps)
        return torch.cat(out)

    def predict_x0(self, z: torch.Tensor, embeds: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """The DDPM step from x_T = z with the UNet's ε at t = T: the x_0 latents, in fp32 (module doc).

        The step runs in fp32 whatever the UNet's dtype: x_0 = (z − √(1−ᾱ)·ε)/√ᾱ multiplies z and ε
        by about 14.6 at T = 999, and so their bf16 rounding."""
        t = torch.tensor(self.timestep, device=z.device)
        tile = self.tile if tile is None else tile
        dtype = self.current_dtype

        def predict(lat: torch.Tensor, _cond: torch.Tensor) -> torch.Tensor:
            return self.unet(lat.to(dtype), t, encoder_hidden_states=embeds, return_dict=False)[0]

        eps = tiled_predict(predict, z, z, tile, min(self.tile_overlap, tile // 2)).float()
        g = torch.Generator("cpu").manual_seed(0)  # DDPM's variance draw at T (≈ 1e-10: module doc)
        return self.scheduler.step(eps, self.timestep, z.float(), generator=g, return_dict=True).prev_sample

    def _x0(self, z, embeds):
        """predict_x0, halving the latent tile while the UNet runs out of GPU memory."""
        while True:
            try:
                return self.predict_x0(z, embeds)
            except OutOfMemoryError:
                current = self.tile or max(z.shape[-2:])
                if current <= MIN_TILE:
                    raise
                self.tile = max(MIN_TILE, current // 2 // self.latent_multiple * self.latent_multiple)
                free_cached()
                log.warning("out of GPU memory in the one-step stage: retrying with latent tile %d", self.tile)

    def _step(self, start: np.ndarray, prompts: list[str], seeds: list[int | None], preview):
        """Generator: start image (at the stage size, padded) → one image per prompt; one UNet call."""
        z0 = self.codec.encode(start, self.device).float()
        z = self.start_latents(z0, seeds)
        x0 = self._x0(z, self.encode_prompts(prompts))
        x0 = x0 + self.fidelity * (z0 - x0)  # the dial (module doc)
        if preview is not None and self.preview_every > 0:
            shown = preview(x0[:1])
            if shown is not None:
                yield shown
        return self.codec.decode(x0)

    def _run(self, start: np.ndarray, prompts: list[str], seeds: list[int | None], preview=None):
        """One stage with the fallbacks: smaller tiles on OOM, then fp32 on NaN."""
        with self._lock:
            out = yield from self._step(start, prompts, seeds, preview)
            if not np.isfinite(out).all() and self.dtype != torch.float32:
                log.warning("one-step stage produced NaNs in %s; retrying in fp32", self.precision)
                self.fp32_retries += 1
                self._place(torch.float32)
                try:
                    out = yield from self._step(start, prompts, seeds, preview)
                finally:
                    self._place(self.dtype)
        return np.nan_to_num(out, nan=0.5)

    def one_step(self, previous: np.ndarray, size: tuple[int, int], prompts: list[str], seeds: list[int | None],
                 preview=None):
        """Generator: `previous` bicubic-resized to `size` (w, h), one step per prompt; images at `size`."""
        w, h = size
        ph, pw = -(-h // self.multiple) * self.multiple, -(-w // self.multiple) * self.multiple
        start = _pad(upscale(to_float(previous), size), ph, pw)
        out = yield from self._run(start, prompts, seeds, self._previewer(preview, size, h, w))
        return [np.clip(o[:h, :w], 0, 1) for o in out]

    def _previewer(self, preview, size, h, w):
        if preview is None:
            return None
        f = self.codec.factor

        def show(x0: torch.Tensor):
            img = self.codec.preview(x0[..., : -(-h // f), : -(-w // f)], self.preview_size)
            return None if img is None else preview(resize(img, _fit_within(size, self.preview_size)))

        return show

    # stages ------------------------------------------------------------------------------------
    def _rough(self, inp: np.ndarray, plans: list[Plan | None]) -> list[tuple[np.ndarray, dict | None]]:
        if self.regression is None:
            return [(inp, None)] * len(plans)
        return self.regression.choose_batch(inp, plans, stage="rough", scale=4.0)

    def _rough_image(self, rough: np.ndarray, inp: np.ndarray, size) -> np.ndarray:
        """The rough stage's image at `size`: the experts' mix colour-fixed, or the input as it is."""
        rough = resize(rough, tuple(size))
        return rough if self.regression is None else color_fix(rough, inp, self.color_fix, device=self.device)

    def start_image(self, inp: np.ndarray, plan: Plan | None, stage: str, sizes: dict) -> np.ndarray:
        """The image `stage` (middle or final) starts from for one plan, as stages() makes it
        (before the stage's bicubic resize): what RL's rollouts start from too."""
        ((rough, _),) = self._rough(inp, [plan])
        rough = self._rough_image(rough, inp, sizes["rough"])
        if stage == "middle" or not self.middle:  # a resized middle is for show: the final starts from rough
            return rough
        (middle,) = drain(self.one_step(rough, tuple(sizes["middle"]), [stage_prompt(plan, "middle")], [None]))
        return color_fix(middle, inp, self.color_fix, device=self.device)

    def stages(self, image: LoadedImage, plan: Plan, *, sizes, seed: int = 0) -> Iterator:
        inp = to_float(image.rgb)
        previous = None
        for index, stage in enumerate(STAGES):
            t = time.perf_counter()
            size = tuple(sizes[stage])
            yield StageStarted(stage, size)
            choice, looks = None, None
            if stage == "rough":
                ((rough, choice),) = self._rough(inp, [plan])
                rgb = self._rough_image(rough, inp, size)
            elif stage == "middle" and not self.middle:
                rgb = resize(previous, size)
            else:
                def preview(img, stage=stage):
                    return StagePreview(stage, img, 1, 1)

                k = self.candidates if stage == "final" else 1
                seeds = [None] + [seed + index + j * SEED_STRIDE for j in range(1, k)]
                outs = yield from self.one_step(previous, size, [stage_prompt(plan, stage)] * k, seeds, preview)
                outs = [color_fix(o, inp, self.color_fix, device=self.device) for o in outs]
                best = 0
                if k > 1:
                    best, choice = choose_sample(self.chooser, outs, inp, plan, seeds)
                    looks = [resize(o, _fit_within(size, self.preview_size)) for o in outs]
                rgb = outs[best]
            alpha = None if image.alpha is None else resize(to_float(image.alpha), size)
            yield StageImage(stage, rgb, alpha, time.perf_counter() - t, choice=choice, candidates=looks)
            if stage == "rough" or self.middle:  # a resized middle is for show: the final starts from rough
                previous = rgb

    def restore_final_batch(self, rgb: np.ndarray, plans: list[Plan], *, scale: float = 4.0, seed: int = 0,
                            batch_size: int | None = None) -> list[np.ndarray]:
        """The final stage for many chains of thought about one image (GRPO's generation reward)."""
        return self.restore_stage_batch(rgb, plans, stage="final", scale=scale, seed=seed, batch_size=batch_size)

    def restore_stage_batch(self, rgb: np.ndarray, plans: list[Plan], *, stage: str = "final", scale: float = 4.0,
                            seed: int = 0, batch_size: int | None = None,
                            previous: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """One stage for many plans, as stages() makes it for each (no noise: the texts alone differ).

        The rough stage runs once; each plan's reading picks its mix. Without `previous` (each plan's
        image of the stage before) the middle is the rough resized or one step from it, as configured."""
        inp = to_float(rgb)
        h, w = inp.shape[:2]
        sizes = stage_sizes(w, h, scale)
        roughs = self._rough(inp, plans)
        fix = (lambda o: color_fix(o, inp, self.color_fix, device=self.device))
        if stage == "rough":
            return [self._rough_image(r, inp, sizes["rough"]) for r, _ in roughs]
        # Each plan's start image; plans whose readings picked the same rough mix share it and its calls.
        groups: dict = {}
        for j, (r, _) in enumerate(roughs):
            key = j if previous is not None else id(r)
            groups.setdefault(key, (r, []))[1].append(j)
        out: list[np.ndarray | None] = [None] * len(plans)
        step = batch_size or max(1, len(plans))
        for key, (r, rows) in groups.items():
            if previous is not None:
                start = to_float(previous[rows[0]])
            else:
                start = self._rough_image(r, inp, sizes["rough"])
            for i in range(0, len(rows), step):
                chunk = rows[i:i + step]
                if previous is None and stage == "final" and self.middle:  # each plan's own middle first
                    mids = drain(self.one_step(start, sizes["middle"], [stage_prompt(plans[j], "middle") for j in chunk],
                                               [None] * len(chunk)))
                    for j, m in zip(chunk, mids):
                        (o,) = drain(self.one_step(fix(m), sizes["final"], [stage_prompt(plans[j], "final")], [None]))
                        out[j] = fix(o)
                    continue
                if stage == "middle" and not self.middle:
                    for j in chunk:
                        out[j] = resize(start, sizes["middle"])
                    continue
                outs = drain(self.one_step(start, sizes[stage], [stage_prompt(plans[j], stage) for j in chunk],
                                           [None] * len(chunk)))
                for j, o in zip(chunk, outs):
                    out[j] = fix(o)
        return out
