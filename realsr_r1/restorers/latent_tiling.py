"""Latent tiling for diffusion: run the denoiser on overlapping tiles, blend with Gaussian weights.

A diffusion UNet's memory grows with the latent's area (attention: faster), so large images are
denoised tile by tile. At every step each tile's prediction is weighted by a 2-D Gaussian that is
highest in the tile's centre and the weighted predictions are normalised by the summed weights
(Mixture of Diffusers / MultiDiffusion): seams fade out because no pixel depends on a tile border
alone, and the scheduler still steps the whole latent once, so stateful schedulers stay correct.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

SIGMA_FRACTION = 0.3  # Gaussian σ as a fraction of the tile side: flat enough in the middle, low at edges


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` overlapping by at least `overlap`."""
    if tile <= 0 or length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    n = math.ceil((length - overlap) / (tile - overlap))
    # Spread the tiles evenly: the overlap is never below the asked one, the last tile ends at `length`.
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple[slice, slice]]:
    """(rows, cols) slices of every tile of a height x width latent."""
    th, tw = min(tile, height) if tile > 0 else height, min(tile, width) if tile > 0 else width
    return [(slice(y, y + th), slice(x, x + tw))
            for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def gaussian_weight(height: int, width: int, device=None) -> torch.Tensor:
    """1x1xHxW weights, 1 at the centre, > 0 everywhere (so every pixel gets a normalisable sum)."""
    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (SIGMA_FRACTION * n)) ** 2)

    return (axis(height)[:, None] * axis(width)[None, :])[None, None]


def tiled_predict(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor,
                  cond: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """`predict(latents_tile, cond_tile)` over tiles, blended; `cond` is pixel-aligned with `latents`.

    One tile covering everything calls `predict` once with the full tensors (no blending cost).
    """
    h, w = latents.shape[-2:]
    parts = tiles(h, w, tile, overlap)
    if len(parts) == 1:
        return predict(latents, cond)
    out = None
    total = torch.zeros((1, 1, h, w), dtype=torch.float32, device=latents.device)
    for rows, cols in parts:
        pred = predict(latents[..., rows, cols], cond[..., rows, cols])
        weight = gaussian_weight(pred.shape[-2], pred.shape[-1], device=pred.device)
        if out is None:
            out = torch.zeros((*pred.shape[:-2], h, w), dtype=torch.float32, device=pred.device)
        out[..., rows, cols] += pred.float() * weight
        total[..., rows, cols] += weight
    return (out / total).to(latents.dtype)
