"""The upscaler's VAE between pixels and latents, fitting its own GPU memory.

After denoising, the decode is where memory peaks: GRPO decodes G samples of a large image at once.
Out of memory, the decode first goes one sample at a time (slicing), then halves its tile (diffusers'
tiled encode/decode, `tile` output pixels, `AutoencoderKL._decode`/`tiled_decode`) down to MIN_VAE_TILE,
and only then gives up. What it learns (slicing on, a smaller tile) is kept for later calls. Nothing
here reruns denoising: the UNet's tile halves only when the UNet runs out of memory (diffusion.py).

Previews decode the predicted clean latent averaged down (area) to at most half its side and at
most `max_side` output pixels on the long side. The x4 upscaler's VAE has no published latent→RGB
linear map and none can be fitted here without its weights; a decode at reduced size is honest. Its
cost, counted with torch's FlopCounterMode on the real architecture: a full decode costs about one
UNet step with CFG at the same latent size (64² latent: 671 vs 647 GFLOP), and decode cost goes with
the area, so half the side is ≤ 1/4 of a step; on a large stage (many latent tiles per step) the
max_side cap makes it ~1 %.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .memory import OutOfMemoryError, free_cached

log = logging.getLogger(__name__)

MIN_VAE_TILE = 64  # output pixels: below this, halving the VAE tile on out-of-memory stops
PREVIEW_SCALE = 0.5  # a preview decodes at most half the latent's side (module doc)


class LatentCodec:
    """Encode images to (scaled) latents and decode them back, with the out-of-memory fallbacks."""

    def __init__(self, vae, *, tile: int = 512, slicing: bool = False):
        self.vae = vae
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 4 for the x4 upscaler's VAE
        if tile and int(tile) < 8 * self.factor:  # a tile of a few latent pixels breaks the VAE's GroupNorm
            raise ValueError(f"vae_tile must be 0 (no tiling) or ≥ {8 * self.factor} pixels, got {tile}")
        self.tile = int(tile or 0)  # output pixels; 0: whole images
        # Decode one sample at a time: our own loop rather than diffusers' `use_slicing`, so each
        # decoded sample leaves the GPU before the next one is decoded.
        self.slicing = bool(slicing)

    def _configure(self) -> None:
        """Put our tiling on the VAE before each call: restorers that share a pipeline may differ."""
        vae = self.vae
        if not self.tile:
            vae.disable_tiling()
            return
        vae.enable_tiling()  # diffusers tiles only images larger than the tile
        vae.tile_sample_min_size = self.tile
        vae.tile_latent_min_size = self.tile // self.factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.post_quant_conv.parameters()).dtype  # as the pipeline's __call__ casts

    def _fit(self, run: Callable[[], object], batch: int, side: int):
        """run(), first one sample at a time, then with halved tiles, while the GPU runs out of memory."""
        while True:
            self._configure()
            try:
                return run()
            except OutOfMemoryError:
                free_cached()
                if batch > 1 and not self.slicing:
                    self.slicing = True
                    log.warning("out of GPU memory in the VAE: decoding one sample at a time")
                    continue
                current = self.tile or side
                if current <= MIN_VAE_TILE:
                    raise
                self.tile = max(MIN_VAE_TILE, current // 2 // self.factor * self.factor)
                log.warning("out of GPU memory in the VAE: retrying with VAE tile %d", self.tile)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Bx4xhxw latents → Bx(4h)x(4w)x3 float32 images in [0, 1]."""
        z = latents.to(self.dtype) / self.vae.config.scaling_factor

        def run():
            parts = z.split(1) if self.slicing else (z,)
            return np.concatenate([self._to_rgb(self.vae.decode(p, return_dict=False)[0]) for p in parts])

        return self._fit(run, z.shape[0], self.factor * max(z.shape[-2:]))

    @staticmethod
    def _to_rgb(img: torch.Tensor) -> np.ndarray:
        return (img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def encode(self, rgb: np.ndarray, device) -> torch.Tensor:
        """HxWx3 float image in [0, 1] → 1x4x(H/4)x(W/4) latents (the posterior's mode, scaled)."""
        x = torch.from_numpy(np.ascontiguousarray(rgb * 2 - 1, dtype=np.float32)).permute(2, 0, 1)[None]

        def run():
            return self.vae.encode(x.to(device, self.dtype)).latent_dist.mode() * self.vae.config.scaling_factor

        return self._fit(run, 1, max(rgb.shape[:2]))

    def preview(self, x0: torch.Tensor, max_side: int) -> np.ndarray | None:
        """A 1x4xhxw latent as an image ≤ max_side pixels on its long side; None when even that
        does not fit in memory (a preview is optional: it never costs the stage)."""
        h, w = x0.shape[-2:]
        scale = min(PREVIEW_SCALE, max_side / (self.factor * max(h, w)))
        x0 = F.interpolate(x0.float(), size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
        try:
            return self.decode(x0)[0]
        except OutOfMemoryError:
            free_cached()
            log.warning("out of GPU memory decoding a preview: skipped")
            return None
