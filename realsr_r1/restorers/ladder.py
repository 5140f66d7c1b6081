"""The fidelity ladder: one ordered path from the most natural-looking expert to the most faithful.

Rungs, in order: the first expert alone (x4plus); the next expert's low frequencies under the first
one's detail (blend.lowpass: most of DF2K's fidelity, little of its grain); region blends that add
the next expert's detail where the first one's output has texture, from a high contrast threshold t
to a low one (blend.py), with its low frequencies elsewhere; then the next expert alone (DF2K); with
more experts the path goes on the same way. A position in [0, 1] is a point on that path: the rungs
sit evenly spaced, 0 and 1 are the ends, and between two neighbouring rungs the per-pixel weights
move linearly from one to the other. So every mix the tool makes, whether auto picks it,
`--fidelity` fixes it or `--fidelity-map` paints it, is a position on this one ladder, and a
position map (one position per pixel, smooth) is how positions vary over a photo.

Pixel blends, not weight blends: the experts were trained apart, so interpolating their weights
(DNI) is not clean, while a blend of outputs moves evenly between their looks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from . import blend

# Region blends' contrast thresholds: on DRealSR the three took DF2K's detail into 0.35, 0.6 and
# 0.8 of the pixels.
DEFAULT_GATES = (0.16, 0.08, 0.04)
# The highest position auto may choose, as a rung index from the top (1: below the last expert
# alone). DF2K alone adds to its t 0.04 region blend only the noise of flat regions, which the
# chooser's NIQE can take for texture: on DRealSR, offering it cost +1.6 PIQE points and 0.13 dB
# for −0.10 NIQE. `--fidelity 1` still gives it.
AUTO_BELOW_TOP = 1


@dataclass(frozen=True)
class Rung:
    """One rung: expert `expert` alone; with `low`, under the next one's low frequencies; with a
    `gate`, the next one's detail too where `expert` has contrast above it."""

    label: str
    expert: int
    gate: float | None = None
    low: bool = False


class Ladder:
    """The rungs over `experts` (names, natural → faithful) with region blends at `gates`."""

    def __init__(self, experts: list[str], gates=DEFAULT_GATES):
        self.experts = list(experts)
        self.gates = sorted((float(t) for t in gates), reverse=True)
        if any(not 0 < t < 1 for t in self.gates):
            raise ValueError(f"restorer.gates: contrast thresholds strictly between 0 and 1, got {list(gates)}")
        rungs = []
        for i, name in enumerate(self.experts):
            rungs.append(Rung(name, i))
            if i + 1 < len(self.experts):
                nxt = self.experts[i + 1]
                rungs.append(Rung(f"{name}'s detail over {nxt}'s low frequencies", i, None, True))
                rungs += [Rung(f"{nxt} where {name} has texture (t {t:g}), its low frequencies elsewhere", i, t, True)
                          for t in self.gates]
        self.rungs = rungs

    def position(self, k: int) -> float:
        """Rung k's position on [0, 1]."""
        return k / (len(self.rungs) - 1) if len(self.rungs) > 1 else 0.0

    @property
    def auto_top(self) -> float:
        """The highest position auto offers (AUTO_BELOW_TOP)."""
        return self.position(max(0, len(self.rungs) - 1 - AUTO_BELOW_TOP))

    def rung_of(self, position: float) -> tuple[int, float]:
        """(rung below, fraction towards the next rung) of a position."""
        x = float(np.clip(position, 0, 1)) * (len(self.rungs) - 1)
        k = min(int(math.floor(x)), max(0, len(self.rungs) - 2))
        return k, x - k

    def label(self, position: float) -> str:
        k, f = self.rung_of(position)
        if f < 1e-6 or len(self.rungs) == 1:
            return self.rungs[k].label
        if f > 1 - 1e-6:
            return self.rungs[k + 1].label
        return f"{1 - f:.2f} × ({self.rungs[k].label}) + {f:.2f} × ({self.rungs[k + 1].label})"

    def experts_for(self, lo: float, hi: float) -> list[bool]:
        """Which experts any position in [lo, hi] gives a weight (the others need not run)."""
        need = [False] * len(self.experts)
        k0, f0 = self.rung_of(lo)
        k1, f1 = self.rung_of(hi)
        k0 += f0 > 1 - 1e-9
        k1, f1 = (k1 + 1, 0.0) if f1 > 1 - 1e-9 else (k1, f1)
        for k in range(k0, k1 + (2 if f1 > 1e-9 else 1)):
            r = self.rungs[min(k, len(self.rungs) - 1)]
            need[r.expert] = True
            if r.gate is not None or r.low:
                need[r.expert + 1] = True
        return need

    def weights(self, positions: np.ndarray, textures: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-block weights for a block map of positions: (every expert's, (n, *positions.shape);
        each pair's low frequencies', (n - 1, …): the weight of lowpass(expert i+1 − expert i)).
        `textures[i]`: blend.texture() of expert i's output over the same blocks, one block of margin
        on every side included (gate maps are smoothed over 3×3 blocks): so positions has two rows
        and columns fewer than the textures."""
        n = len(self.experts)
        out = np.zeros((n,) + positions.shape, np.float32)
        low = np.zeros((max(0, n - 1),) + positions.shape, np.float32)
        x = np.clip(positions, 0, 1) * (len(self.rungs) - 1)
        below = np.minimum(np.floor(x).astype(int), max(0, len(self.rungs) - 2))
        frac = (x - below).astype(np.float32)
        gates: dict[tuple[int, float], np.ndarray] = {}
        for k, r in enumerate(self.rungs):
            share = np.where(below == k, 1 - frac, 0) + np.where(below + 1 == k, frac, 0)
            if len(self.rungs) == 1:
                share = np.ones_like(frac)
            if not share.any():
                continue
            g = 0.0
            if r.gate is not None:
                key = (r.expert, r.gate)
                if key not in gates:
                    gates[key] = blend.gate_map(textures[r.expert], r.gate)[1:-1, 1:-1]
                g = gates[key]
                out[r.expert + 1] += share * g
            out[r.expert] += share * (1 - g)
            if r.low:  # the next expert's low frequencies where its own pixels are not taken
                low[r.expert] += share * (1 - g)
        return out, low


# --- What --fidelity means ----------------------------------------------------------------------
@dataclass(frozen=True)
class Fidelity:
    """`auto` (offset 0), `auto+0.2` (auto's positions moved 0.2 towards faithful), or a fixed position."""

    auto: bool
    value: float  # the position when fixed, the offset with auto

    def __str__(self) -> str:
        if not self.auto:
            return f"{self.value:g}"
        return "auto" if self.value == 0 else f"auto{self.value:+g}"


_AUTO = re.compile(r"^auto\s*(?:([+-])\s*(\d*\.?\d+))?$")


def parse_fidelity(value) -> Fidelity:
    """`auto`, `auto+X` / `auto-X` (X in [0, 1]) or a number in [0, 1]; ValueError otherwise."""
    if isinstance(value, Fidelity):
        return value
    message = f"fidelity must be auto, auto+X, auto-X or a number in [0, 1], got {value!r}"
    if isinstance(value, str):
        m = _AUTO.match(value.strip().lower())
        if m:
            offset = float(m.group(2) or 0) * (-1 if m.group(1) == "-" else 1)
            if abs(offset) > 1:
                raise ValueError(message)
            return Fidelity(True, offset)
    if isinstance(value, bool):
        raise ValueError(message)
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not 0 <= f <= 1:
        raise ValueError(message)
    return Fidelity(False, f)


# --- What the degradation reading allows ----------------------------------------------------------
# Degradations the faithful experts carry into their output: DF2K keeps the camera's noise and JPEG
# blocks, and both the input consistency and NIQE reward it for that (on RealSRSet's noisy photos
# they picked DF2K alone 7 times in 8). So a noise or JPEG reading lowers the highest position auto
# may choose, continuously: from NOISE_RAMP[0] (sigma, 0-255) it starts to, at NOISE_RAMP[1] only the
# first expert is left; likewise for JPEG quality. An item's confidence scales its effect: the
# analyser marks readings it is unsure of (fine texture can read as noise), and a JPEG file whose
# blocks do not show in the pixels (analyze.py).
# Both ramps were chosen by cross-validation on real camera pairs (benchmarks/cross_validate.py, two
# folds; docs/choosing.md has the held-out table). The noise ramp is wider than it was before the
# low-frequency rung: that rung's low-pass leaves most of DF2K's grain out, so both folds chose 16.
NOISE_RAMP = (6.0, 16.0)
JPEG_RAMP = (90.0, 70.0)
LEVEL_SEVERITY = {"none": 0.0, "light": 0.0, "medium": 0.6, "heavy": 1.0}  # a reading without numbers
UNCERTAIN = 0.25  # confidence of an item the analyser could not measure (its note says "uncertain")


def _ramp(value: float, lo: float, hi: float) -> float:
    return float(np.clip((value - lo) / (hi - lo), 0, 1))


def severity(item) -> float:
    """How strongly one noise or JPEG item lowers the ceiling, 0 … 1, before its confidence."""
    if item.type == "noise" and "sigma" in item.params:
        return _ramp(item.params["sigma"], *NOISE_RAMP)
    if item.type == "jpeg" and "quality" in item.params:
        return _ramp(item.params["quality"], *JPEG_RAMP)
    return LEVEL_SEVERITY.get(item.level, 0.0)


def confidence(item) -> float:
    """An item's `confidence` number (0 … 1), UNCERTAIN for an `uncertain` note, else 1."""
    if "confidence" in item.params:
        return float(np.clip(item.params["confidence"], 0, 1))
    return UNCERTAIN if "uncertain" in item.params else 1.0


def ceiling(plan, top: float) -> tuple[float, dict]:
    """(the highest position auto may choose under this reading, what each field moved). Blur and
    the other fields do not move the ceiling: blur enters the choice through Q_LR (COMPASS), and the
    downsampling factor is not used by the lite restorer (the output scale is --outscale)."""
    moved, worst = {}, 0.0
    for kind in ("noise", "jpeg"):
        item = plan.item(kind) if plan is not None else None
        if item is None:
            continue
        s, c = severity(item), confidence(item)
        if s > 0:
            moved[kind] = {"severity": round(s, 3), "confidence": round(c, 3),
                           "lowers ceiling by": round(top * s * c, 3)}
        worst = max(worst, s * c)
    blur = plan.item("blur") if plan is not None else None
    if blur is not None and blur.level not in ("none", ""):
        moved["blur"] = {"moves": "Q_LR (COMPASS's balance of fidelity and quality), not the ceiling"}
    return top * (1 - worst), moved


def local_noise(lq: np.ndarray) -> float:
    """How much a region's own noise lowers its ceiling (0 … 1, a share of the top): the analyser's
    noise estimate on the region alone, weighted by its confidence as a reading's is. A photo's noise
    is not even (dark areas, a sky, a collage of photos): a region that measures noisier than the
    reading lowers its own ceiling; it never raises it above the reading's."""
    from ..analyze import LOW_CONFIDENCE, estimate_noise_detail

    est = estimate_noise_detail(lq)
    return _ramp(est.sigma, *NOISE_RAMP) * {"high": 1.0, "low": LOW_CONFIDENCE}.get(est.confidence, UNCERTAIN)
