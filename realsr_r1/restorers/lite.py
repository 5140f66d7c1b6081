"""Stage images for the lite profile: one pass of each expert, a chosen mix, stages by resampling it.

The experts are ×4 regression networks (Real-ESRGAN x4plus, RealSR DF2K, or any converted file), so
rough (input size), middle (×2) and final (×scale) are the chosen mix resampled with Lanczos: one
pass per expert instead of three, and the stages agree with each other exactly as the contract's
coarse-to-fine reading expects.

Which mix: with `fidelity: auto` a chooser (chooser.py, given by profiles.py) scores every candidate
(restorers/blend.py) with a reward and the plan's degradation reading, so the chain of thought
changes the pixels; a number from 0 (the first expert: the most natural-looking) to 1 (the last: the
most faithful) is a fixed point on the dial, and runs only the experts it mixes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from ..cot import Plan
from ..imageio import LoadedImage, to_float
from ..pipeline import StageImage, StageStarted, stage_sizes
from . import blend
from .esrgan import ESRGANRestorer

DEFAULT_EXPERTS = ("realesrgan-x4plus", "realsr-df2k")  # natural → faithful: the dial's order
# Region blends' contrast thresholds (blend.py): on DRealSR the three took DF2K's look into 0.35,
# 0.6 and 0.8 of the pixels. Global pixel blends are off by default: they carry DF2K's noise
# into flat regions (a 50 % blend: +1.9 NIQE, +50 % PIQE against x4plus).
DEFAULT_GATES = (0.16, 0.08, 0.04)
DEFAULT_BLENDS = ()
# Which experts stand alone as auto's candidates (names; None: the first). DF2K alone adds to its
# t 0.04 region blend only the noise of flat regions, which the chooser's NIQE can take for texture:
# on DRealSR, offering it cost +1.6 PIQE points and 0.13 dB for −0.10 NIQE. `--fidelity 1` still
# gives it.
DEFAULT_ALONE = None
# Degradations the faithful experts carry into their output: DF2K keeps the camera's noise and JPEG
# blocks, and both the input consistency and NIQE reward it for that (on RealSRSet's noisy photos
# they picked DF2K alone 7 times in 8). A reading that names one at this level or worse leaves the
# first expert alone as the candidate; on DRealSR that touched 12 of 93 pairs, −0.16 dB.
KEPT_BY_FAITHFUL = ("noise", "jpeg")
KEPT_LEVEL = "medium"


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


def parse_fidelity(value) -> float | str:
    """`auto` or a number in [0, 1] (a string from the command line or YAML); ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"fidelity must be auto or a number in [0, 1], got {value!r}") from None
    if not 0 <= f <= 1:
        raise ValueError(f"fidelity must be auto or a number in [0, 1], got {value!r}")
    return f


@dataclass
class Outputs:
    """The experts' outputs for one image at the final size (None for an expert the mix leaves out)."""

    rgb: list[np.ndarray | None]
    alpha: list[np.ndarray | None]


class LiteStages:
    """StageRestorer over one or more ESRGANRestorer experts (module doc)."""

    request_options = ("fidelity",)  # what the demo may change per request (demo.with_options)

    def __init__(self, experts: ESRGANRestorer | list[ESRGANRestorer], chooser=None, *,
                 gates: list | tuple = DEFAULT_GATES, blends: list | tuple = DEFAULT_BLENDS,
                 fidelity: str | float = "auto", alone: list | tuple | None = DEFAULT_ALONE):
        self.experts = [experts] if isinstance(experts, ESRGANRestorer) else list(experts)
        if not self.experts:
            raise ValueError("the lite restorer needs at least one expert")
        self.chooser = chooser if len(self.experts) > 1 else None
        self.blends = [float(b) for b in blends]
        if any(not 0 < b < 1 for b in self.blends):
            raise ValueError(f"restorer.blends: weights strictly between 0 and 1, got {list(blends)}")
        self.gates = [float(t) for t in gates]
        if any(not 0 < t < 1 for t in self.gates):
            raise ValueError(f"restorer.gates: contrast thresholds strictly between 0 and 1, got {list(gates)}")
        self.fidelity = parse_fidelity(fidelity)
        names = [e.name for e in self.experts]
        alone = [names[0]] if alone is None else list(alone)
        unknown = [a for a in alone if a not in names]
        if unknown or names[0] not in alone:
            raise ValueError(f"restorer.alone: names among the experts ({', '.join(names)}), the first "
                             f"included (a noise or JPEG reading falls back on it), got {alone}")
        self.candidates = blend.candidates(names, self.blends, self.gates, {names.index(a) for a in alone})

    @property
    def esrgan(self) -> ESRGANRestorer:
        """The first expert (the only one in a one-expert profile)."""
        return self.experts[0]

    @property
    def name(self) -> str:
        """The weights in use (`restorer.path`, or the experts joined by +), as the sidecar records them."""
        return "+".join(e.name for e in self.experts)

    def describe(self) -> dict:
        e = self.esrgan
        out = {"restorer": self.name, "weights": e.weights(), "device": str(e.device),
               "backend": e.backend, "precision": e.precision, "tile": e.tile}
        if len(self.experts) > 1:
            out["experts"] = [{"name": x.name, **(x.weights() or {})} for x in self.experts]
            out["fidelity"] = self.fidelity
            if self.chooser is not None:
                out["chooser"] = self.chooser.describe()
        return out

    def _mode(self) -> float | str:
        """auto, or the dial's number; auto without a chooser is the first expert alone."""
        return self.fidelity if self.fidelity != "auto" or self.chooser is not None else 0.0

    def _outputs(self, rgb: np.ndarray, alpha, size: tuple[int, int], out_dtype, needed: list[bool]) -> Outputs:
        w, h = size
        outscale = w / rgb.shape[1]
        outs, alphas = [], []
        for expert, need in zip(self.experts, needed):
            if not need:
                outs.append(None)
                alphas.append(None)
                continue
            o, a = expert.restore(rgb, alpha, outscale=outscale, out_dtype=out_dtype)
            if o.shape[1] != w or o.shape[0] != h:  # rounding of outscale
                o = resize(o, (w, h))
                a = None if a is None else resize(a, (w, h))
            outs.append(o)
            alphas.append(a)
        return Outputs(outs, alphas)

    def _textures(self, outs: Outputs) -> dict[int, np.ndarray]:
        """texture() of each expert a region blend is based on (blend.py)."""
        return {c.base: blend.texture(outs.rgb[c.base]) for c in self.candidates if c.gate is not None}

    def _measure(self, lq: np.ndarray, outs: Outputs, textures: dict):
        """(each candidate's plan-free scores, the LQ crops, each candidate's first crop) for the chooser."""
        fh, fw = outs.rgb[0].shape[:2]
        lq_crops, out_boxes = blend.scored_crops(lq, (fw, fh))
        crops = [[blend.compose(outs.rgb, cand, np.float32, textures, box) for box in out_boxes]
                 for cand in self.candidates]
        return self.chooser.measure(crops, lq_crops), lq_crops, [c[0] for c in crops]

    def _allowed(self, plan: Plan | None) -> tuple[list[int] | None, str]:
        """The candidates a degradation reading leaves (None: all) and why."""
        from ..cot import LEVELS

        kept = [f"{k}: {plan.level(k)}" for k in KEPT_BY_FAITHFUL
                if plan is not None and plan.level(k) in LEVELS and LEVELS.index(plan.level(k)) >= LEVELS.index(KEPT_LEVEL)]
        if not kept:
            return None, ""
        first = [i for i, c in enumerate(self.candidates) if c.gate is None and c.weights[0] == 1]
        return first, (f"the reading says {', '.join(kept)}, which the faithful experts keep: only "
                       f"{self.candidates[first[0]].label} was allowed; ")

    def _choose(self, plan: Plan | None, measured, lq_crops) -> tuple[blend.Candidate, dict]:
        allowed, because = self._allowed(plan)
        best, rewards, facts = self.chooser.choose(measured, plan, lq_crops, allowed)
        rows = [{"label": c.label, "weights": [round(x, 4) for x in c.weights], "gate": c.gate,
                 **{k: None if v is None else round(float(v), 4) for k, v in m.items()},
                 "reward": None if r is None else round(float(r), 4)} for c, m, r in zip(self.candidates, measured, rewards)]
        winner = self.candidates[best]
        if rows[best]["reward"] is None:  # e.g. NIQE cannot judge images under 96² pixels
            why = f"no candidate could be scored by {self.chooser.name} (image too small): kept {winner.label}"
        else:
            why = (f"{because}highest {self.chooser.name} reward ({rows[best]['reward']}) of "
                   f"{len(allowed) if allowed else len(rows)} candidates; input quality Q_LR {facts['q_lr']} "
                   f"from the {facts['q_lr_source']}")
        labels = [self.candidates[i].label for i in (allowed if allowed is not None else range(len(rows)))]
        return winner, {"mode": "auto", **facts, "candidates": rows, "allowed": labels, "winner": winner.label,
                        "why": why}

    def _fixed(self, fidelity: float) -> tuple[blend.Candidate, dict]:
        weights = blend.dial(len(self.experts), fidelity)
        return blend.Candidate(f"fidelity {fidelity:g}", weights), {
            "mode": "fidelity", "fidelity": fidelity, "weights": [round(x, 4) for x in weights],
            "why": f"--fidelity {fidelity:g}: a fixed mix, no chooser"}

    def stages(self, image: LoadedImage, plan: Plan, *, sizes, seed: int = 0) -> Iterator:
        t = time.perf_counter()
        yield StageStarted("rough", sizes["rough"])
        out_dtype = np.uint16 if image.bit_depth == 16 else np.uint8
        mode = self._mode()
        choice, thumbs, textures = None, None, {}
        allowed, because = self._allowed(plan) if mode == "auto" else (None, "")
        if len(self.experts) == 1:
            outs = self._outputs(image.rgb, image.alpha, sizes["final"], out_dtype, [True])
            cand = blend.Candidate(self.esrgan.name, (1.0,))
        elif allowed is not None:
            # The reading leaves the first expert alone: the others need not run, nor the chooser.
            cand = self.candidates[allowed[0]]
            outs = self._outputs(image.rgb, image.alpha, sizes["final"], out_dtype, [i == 0 for i in range(len(self.experts))])
            q_lr, source = self.chooser.input_quality(plan, [])
            choice = {"mode": "auto", "q_lr": None if q_lr is None else round(q_lr, 4), "q_lr_source": source,
                      "candidates": [], "allowed": [cand.label],
                      "winner": cand.label, "why": f"{because}the other experts did not run", "seconds": None}
        elif mode == "auto":
            outs = self._outputs(image.rgb, image.alpha, sizes["final"], out_dtype, [True] * len(self.experts))
            t_score = time.perf_counter()
            textures = self._textures(outs)
            measured, lq_crops, thumbs = self._measure(image.rgb, outs, textures)
            cand, choice = self._choose(plan, measured, lq_crops)
            choice["seconds"] = round(time.perf_counter() - t_score, 4)
        else:
            cand, choice = self._fixed(mode)
            outs = self._outputs(image.rgb, image.alpha, sizes["final"], out_dtype, [w != 0 for w in cand.weights])
        # Over the experts' outputs: a 2048² photo's three 8192² arrays would take 0.6 GB, two 0.4.
        rgb = blend.compose(outs.rgb, cand, out_dtype, textures, in_place=True)
        alpha = None if image.alpha is None else blend.compose(outs.alpha, cand, out_dtype, textures, in_place=True)
        del outs
        network_seconds = time.perf_counter() - t
        for stage in ("rough", "middle"):
            t = time.perf_counter()
            if stage != "rough":
                yield StageStarted(stage, sizes[stage])
            s_rgb = resize(rgb, sizes[stage])
            s_alpha = None if alpha is None else resize(alpha, sizes[stage])
            # The networks run before rough exists, so rough carries their time.
            extra = network_seconds if stage == "rough" else 0.0
            yield StageImage(stage, s_rgb, s_alpha, extra + time.perf_counter() - t)
        yield StageStarted("final", sizes["final"])
        yield StageImage("final", rgb, alpha, 0.0, choice=choice, candidates=thumbs)

    def restore_final_batch(self, rgb: np.ndarray, plans: list[Plan], *, scale: float = 4.0, seed: int = 0,
                            batch_size: int | None = None) -> list[np.ndarray]:
        """The final image for each plan. The experts run once; each plan's degradation reading then
        chooses its mix, so completions that read the degradation differently get different images."""
        return self.restore_stage_batch(rgb, plans, stage="final", scale=scale)

    def restore_stage_batch(self, rgb: np.ndarray, plans: list[Plan], *, stage: str = "final", scale: float = 4.0,
                            seed: int = 0, batch_size: int | None = None, previous=None) -> list[np.ndarray]:
        """A stage's image for each plan: the chosen mix of the experts' ×scale outputs, resampled,
        as stages() makes it (every stage is that mix, so `previous` stage images change nothing)."""
        return [img for img, _ in self.choose_batch(rgb, plans, stage=stage, scale=scale)]

    def choose_batch(self, rgb: np.ndarray, plans: list[Plan], *, stage: str = "final",
                     scale: float = 4.0) -> list[tuple[np.ndarray, dict | None]]:
        """(image, choice record) per plan: the experts run once at ×scale, each plan's reading picks
        its mix, resampled to `stage`'s size; plans that pick the same mix share one array (the full
        profile's rough stage groups them by it). The record is None with one expert."""
        h, w = rgb.shape[:2]
        sizes = stage_sizes(w, h, scale)
        rgb = to_float(rgb)
        mode = self._mode()
        if mode == "auto" and len(self.experts) > 1:
            outs = self._outputs(rgb, None, sizes["final"], np.float32, [True] * len(self.experts))
            textures = self._textures(outs)
            measured, lq_crops, _ = self._measure(rgb, outs, textures)
            chosen: dict[blend.Candidate, np.ndarray] = {}
            out = []
            for plan in plans:
                cand, record = self._choose(plan, measured, lq_crops)
                if cand not in chosen:
                    chosen[cand] = resize(blend.compose(outs.rgb, cand, np.float32, textures), sizes[stage])
                out.append((chosen[cand], record))
            return out
        if len(self.experts) == 1:
            weights, record = (1.0,), None
        else:
            cand, record = self._fixed(mode)
            weights = cand.weights
        outs = self._outputs(rgb, None, sizes["final"], np.float32, [x != 0 for x in weights])
        img = resize(blend.mix(outs.rgb, weights, np.float32), sizes[stage])
        return [(img, record)] * len(plans)
