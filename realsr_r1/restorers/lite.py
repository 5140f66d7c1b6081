"""Stage images for the lite profile: one Real-ESRGAN pass, stages by resampling its output.

Real-ESRGAN is a single ×4 regression model, so rough (input size), middle (×2) and final (×scale)
are its output resampled with Lanczos: one network pass instead of three, and the stages agree
with each other exactly as the contract's coarse-to-fine reading expects.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
from PIL import Image

from ..cot import Plan
from ..imageio import LoadedImage, to_float
from ..pipeline import StageImage, StageStarted, stage_sizes
from .esrgan import ESRGANRestorer


def resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lanczos resize of an HxW or HxWx3 array (uint8 stays uint8; others go through float)."""
    w, h = size
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr
    if arr.dtype == np.uint8:
        mode = "L" if arr.ndim == 2 else "RGB"
        return np.asarray(Image.fromarray(arr, mode).resize((w, h), Image.LANCZOS))
    f = to_float(arr)
    chans = [f] if f.ndim == 2 else [f[..., c] for c in range(f.shape[2])]
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(c), "F").resize((w, h), Image.LANCZOS)) for c in chans]
    res = out[0] if f.ndim == 2 else np.stack(out, axis=2)
    res = np.clip(res, 0, 1)
    if arr.dtype == np.uint16:
        return (res * 65535 + 0.5).astype(np.uint16)
    return res.astype(np.float32)


class LiteStages:
    """StageRestorer over an ESRGANRestorer."""

    request_options = ()  # Real-ESRGAN has no steps or colour fix to change per request

    def __init__(self, esrgan: ESRGANRestorer):
        self.esrgan = esrgan

    @property
    def name(self) -> str:
        """The weights in use (`restorer.path`), as the sidecar records them."""
        return self.esrgan.name

    def describe(self) -> dict:
        return {"restorer": self.name, "weights": self.esrgan.weights(), "device": str(self.esrgan.device),
                "backend": self.esrgan.backend, "precision": self.esrgan.precision, "tile": self.esrgan.tile}

    def stages(self, image: LoadedImage, plan: Plan, *, sizes, seed: int = 0) -> Iterator:
        t = time.perf_counter()
        yield StageStarted("rough", sizes["rough"])
        out_dtype = np.uint16 if image.bit_depth == 16 else np.uint8
        final_w, final_h = sizes["final"]
        outscale = final_w / image.size[0]
        rgb, alpha = self.esrgan.restore(image.rgb, image.alpha, outscale=outscale, out_dtype=out_dtype)
        if rgb.shape[1] != final_w or rgb.shape[0] != final_h:  # rounding of outscale
            rgb = resize(rgb, (final_w, final_h))
            alpha = None if alpha is None else resize(alpha, (final_w, final_h))
        network_seconds = time.perf_counter() - t
        for stage in ("rough", "middle"):
            t = time.perf_counter()
            if stage != "rough":
                yield StageStarted(stage, sizes[stage])
            s_rgb = resize(rgb, sizes[stage])
            s_alpha = None if alpha is None else resize(alpha, sizes[stage])
            # The one network pass runs before rough exists, so rough carries its time.
            extra = network_seconds if stage == "rough" else 0.0
            yield StageImage(stage, s_rgb, s_alpha, extra + time.perf_counter() - t)
        yield StageStarted("final", sizes["final"])
        yield StageImage("final", rgb, alpha, 0.0)

    def restore_final_batch(self, rgb: np.ndarray, plans: list[Plan], *, scale: float = 4.0, seed: int = 0,
                            batch_size: int | None = None) -> list[np.ndarray]:
        """The final image for each plan. Real-ESRGAN ignores the text, so one pass serves all plans
        (a generation reward over this restorer cannot tell the completions apart)."""
        return self.restore_stage_batch(rgb, plans, stage="final", scale=scale)

    def restore_stage_batch(self, rgb: np.ndarray, plans: list[Plan], *, stage: str = "final", scale: float = 4.0,
                            seed: int = 0, batch_size: int | None = None) -> list[np.ndarray]:
        """A stage's image for each plan: the one ×4 pass resampled to the stage's size, shared."""
        h, w = rgb.shape[:2]
        out, _ = self.esrgan.restore(to_float(rgb), None, outscale=scale)
        out = resize(out, stage_sizes(w, h, scale)[stage])
        return [out] * len(plans)
