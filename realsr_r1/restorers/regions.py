"""Region by region, streamed: the experts' outputs flow through scoring and composition a band at a time.

A photo is cut into a grid of regions (blend.cells: about 128² input pixels each, over the whole
image). The experts run tiled (esrgan.py) and hand over their output rows from top to bottom
(`ESRGANRestorer.stream`); here, as soon as a row of regions is complete in every expert that is
needed:

1. each region's candidate positions on the ladder are composed and scored by the chooser's reward
   (parts measured once, combined under each plan's Q_LR);
2. each plan takes, per region, the position with the highest reward within the range its reading
   allows (ladder.ceiling); a region no metric can judge (flat, too small) takes its judged
   neighbour's position in the same row, else the one above, else the median of those judged so
   far, else 0 (in flat regions every gated rung is the first expert anyway);
3. the rows between the centres of the regions decided so far are composed: the region positions,
   interpolated bilinearly between region centres, give a smooth position per block, which the
   ladder turns into per-block expert weights, upsampled to pixels (blend.py); rungs that take the
   next expert's low frequencies low-pass the experts' difference over the rows with blend.HALO
   rows of context on each side, so a band is composed only once its context has arrived.

So the experts' outputs live only for about one row of regions (plus a band of the tiling) and the
output is the only full-size array, as with one expert; the decision is one function for
inference (one plan) and for GRPO's batched rewards (many plans over one image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..cot import Plan
from ..imageio import to_float
from . import blend
from .ladder import Ladder, local_noise

B = blend.GATE_BLOCK


@dataclass
class PlanChoice:
    """What one plan asks for: auto (candidate positions, an offset, a ceiling) or given positions."""

    plan: Plan | None
    candidates: list[float] = field(default_factory=list)  # auto: positions to score; [] = fixed
    offset: float = 0.0
    top: float = 1.0  # the highest position auto offers before any reading
    ceiling: float = 1.0
    fixed: float | np.ndarray | None = None  # a position, or a per-pixel map at the input size
    q_lr: float | None = None
    q_lr_source: str = "unused"


class _Rows:
    """Output rows of one stream kept from `start` on: appended in order, dropped from the top."""

    def __init__(self, stream):
        self.stream, self.chunks, self.start, self.end = stream, [], 0, 0

    def pull(self) -> bool:
        try:
            r, rows = next(self.stream)
        except StopIteration:
            return False
        assert r == self.end, (r, self.end)
        self.chunks.append(rows)
        self.end += rows.shape[0]
        return True

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows a..b (a ≥ start, b ≤ end)."""
        out, r = [], self.start
        for c in self.chunks:
            lo, hi = max(a, r), min(b, r + c.shape[0])
            if lo < hi:
                out.append(c[lo - r:hi - r])
            r += c.shape[0]
        return out[0] if len(out) == 1 else np.concatenate(out)

    def drop(self, below: int) -> None:
        while self.chunks and self.start + self.chunks[0].shape[0] <= below:
            self.start += self.chunks.pop(0).shape[0]


class RegionComposer:
    """One pass over an image for several plans (module doc). `run()` returns, per plan, the ×scale
    image (and alpha) in `out_dtype` and its region record."""

    def __init__(self, experts, ladder: Ladder, chooser, rgb: np.ndarray, alpha: np.ndarray | None,
                 choices: list[PlanChoice], out_dtype):
        self.experts, self.ladder, self.chooser = experts, ladder, chooser
        self.rgb, self.alpha, self.choices, self.out_dtype = rgb, alpha, choices, np.dtype(out_dtype)
        self.s = experts[0].scale
        h, w = rgb.shape[:2]
        self.H, self.W = h * self.s, w * self.s
        self.ys, self.xs = blend.cells(h), blend.cells(w)
        self.ny, self.nx = len(self.ys) - 1, len(self.xs) - 1
        self.oys, self.oxs = [self.s * y for y in self.ys], [self.s * x for x in self.xs]
        self.cy = np.array([(a + b) / 2 for a, b in zip(self.oys, self.oys[1:])])
        self.cx = np.array([(a + b) / 2 for a, b in zip(self.oxs, self.oxs[1:])])
        self.BH, self.BW = -(-self.H // B), -(-self.W // B)
        self.auto = any(c.candidates for c in choices)
        self.cells: list[list[dict]] = [[] for _ in choices]  # per plan, per region: {position: (parts, reward)}
        self.thumbs: list[tuple[float, np.ndarray]] | None = None  # the first region's candidates, for the demo
        self.fixed_maps = [self._map_blocks(c.fixed) for c in choices]  # what a fixed choice composes

    # --- what runs -----------------------------------------------------------------------------
    def needed(self) -> list[bool]:
        need = [False] * len(self.experts)
        for c, fixed in zip(self.choices, self.fixed_maps):
            if c.candidates:  # scored as they are, composed after the offset
                lo = min(min(c.candidates), min(c.candidates) + c.offset)
                hi = max(max(c.candidates), max(c.candidates) + c.offset)
            elif isinstance(fixed, np.ndarray):
                lo, hi = float(fixed.min()), float(fixed.max())
            else:
                lo = hi = float(fixed)
            for i, n in enumerate(self.ladder.experts_for(float(np.clip(lo, 0, 1)), float(np.clip(hi, 0, 1)))):
                need[i] |= n
        return need

    # --- block maps ----------------------------------------------------------------------------
    def _fixed_blocks(self, fixed, b0: int, b1: int) -> np.ndarray:
        """A fixed position (or the per-pixel map's block averages) over block rows b0..b1."""
        if not isinstance(fixed, np.ndarray):
            return np.full((b1 - b0, self.BW), float(fixed), np.float32)
        return fixed[b0:b1]

    def _cell_blocks(self, pos: np.ndarray, upto: int, b0: int, b1: int) -> np.ndarray:
        """Region rows 0..upto's positions at the centres of block rows b0..b1: each region's own
        position inside it, ramping to its neighbour's over ±BORDER output pixels around their border."""
        yb = np.arange(b0, b1) * B + B / 2
        xb = np.arange(self.BW) * B + B / 2
        ia, ib, wy = _across(yb, self.oys[:upto + 1])
        ja, jb, wx = _across(xb, self.oxs)
        rows = pos[ia] * (1 - wy)[:, None] + pos[ib] * wy[:, None]
        return (rows[:, ja] * (1 - wx) + rows[:, jb] * wx).astype(np.float32)

    def _tex_window(self, tex: np.ndarray, b0: int, b1: int) -> np.ndarray:
        """Texture of block rows b0-1..b1+1 and every column ±1, edges repeated (as gate_map pads)."""
        rows = np.clip(np.arange(b0 - 1, b1 + 1), 0, self.BH - 1)
        return np.pad(tex[rows], ((0, 0), (1, 1)), mode="edge")

    def _pixel_weights(self, blocks: np.ndarray, b0: int, r0: int, r1: int, c0: int = 0, c1: int | None = None,
                       bc0: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Expert weights (n, r1-r0, c1-c0) and low-frequency weights (n-1, …) from positions over
        block rows b0.. (columns from bc0)."""
        c1 = self.W if c1 is None else c1
        bb1 = b0 + blocks.shape[0]
        tex = {i: self._tex_window(t, b0, bb1)[:, bc0:bc0 + blocks.shape[1] + 2] for i, t in self.textures.items()}
        wb, lb = self.ladder.weights(blocks, tex)
        px = blend.upsample(np.concatenate([wb, lb]), (r0, r1, b0), (c0, c1, bc0))
        return px[:len(self.experts)], px[len(self.experts):]

    def _low_diffs(self, rows: dict, r0: int, r1: int, c0: int, c1: int) -> dict[int, np.ndarray]:
        """lowpass(expert i+1 − expert i) over rows r0..r1 and columns c0..c1, from blend.HALO pixels of
        context on each side (edges repeated at the image's borders), for each pair that streams."""
        h0, h1 = max(0, r0 - blend.HALO), min(self.H, r1 + blend.HALO)
        x0, x1 = max(0, c0 - blend.HALO), min(self.W, c1 + blend.HALO)
        out = {}
        for i in range(len(self.experts) - 1):
            if i in rows and i + 1 in rows:
                d = to_float(rows[i + 1].rows(h0, h1)[:, x0:x1]) - to_float(rows[i].rows(h0, h1)[:, x0:x1])
                out[i] = blend.lowpass(d)[r0 - h0:r1 - h0, c0 - x0:c1 - x0]
        return out

    @staticmethod
    def _lows(a: np.ndarray, diffs) -> list[tuple[np.ndarray, np.ndarray]]:
        """compose()'s low-frequency terms: the pairs with weight somewhere (`diffs()`: their
        low-passed differences, asked for only then)."""
        used = [i for i in range(len(a)) if a[i].any()]
        return [(a[i], diffs()[i]) for i in used] if used else []

    @staticmethod
    def _block_span(a0: int, a1: int, n: int) -> tuple[int, int]:
        """Block indices whose centres pixels a0..a1 interpolate between."""
        lo = max(0, int(math.floor((a0 + 0.5) / B - 0.5)))
        hi = min(n, int(math.floor((a1 - 1 + 0.5) / B - 0.5)) + 2)
        return lo, max(hi, lo + 1)

    # --- the pass ------------------------------------------------------------------------------
    def run(self) -> list[tuple[np.ndarray, np.ndarray | None, dict]]:
        need = self.needed()
        idx = [i for i, n in enumerate(need) if n]
        self.pos = [np.full((self.ny, self.nx), np.nan) for _ in self.choices]
        self.judged = [np.zeros((self.ny, self.nx), bool) for _ in self.choices]
        self.ceilings = self._ceilings()
        bases = [i for i in idx if i + 1 < len(self.experts) and need[i + 1]]
        self.textures = {i: np.zeros((self.BH, self.BW), np.float32) for i in bases}
        self.tex_done = 0
        skip, self.skipped = self._skipper(need), [0, 0]
        last, turns = len(self.experts) - 1, len(idx) > 1
        self.rows = {i: _Rows(self.experts[i].stream(self.rgb, self.out_dtype, turns=turns,
                                                     skip=skip(True) if skip and i == last else None))
                     for i in idx}
        self.arows = {}
        if self.alpha is not None:
            a3 = np.broadcast_to(to_float(self.alpha)[..., None], self.alpha.shape + (3,))
            self.arows = {i: _Rows(self.experts[i].stream(a3, self.out_dtype, gray=True, turns=turns,
                                                          skip=skip(False) if skip and i == last else None))
                          for i in idx}
        fixed_maps = self.fixed_maps
        outs = [np.empty((self.H, self.W, 3), self.out_dtype) for _ in self.choices]
        aouts = [None if self.alpha is None else np.empty((self.H, self.W, 1), self.out_dtype) for _ in self.choices]
        received = composed = 0
        decided = 0 if self.auto else self.ny
        while composed < self.H:
            if received < self.H:
                streams = list(self.rows.values()) + list(self.arows.values())
                behind = min(streams, key=lambda st: st.end)  # keep the streams level: pull the last one on
                behind.pull()
                target = behind.end
                for st in streams:
                    while st.end < target and st.pull():
                        pass
                received = min(st.end for st in streams)
            self._texture_to(received)
            tex_done = self.tex_done
            # decide rows of regions (each with blend.HALO rows below it for the low-passes)
            while decided < self.ny:
                bottom = self.oys[decided + 1]
                if received < min(self.H, bottom + blend.HALO) or (tex_done < min(self.BH, -(-bottom // B) + 2)):
                    break
                self._decide(decided)
                decided += 1
            # compose what the decisions so far fix
            if decided == self.ny:
                limit = self.H if tex_done >= self.BH else max(composed, (tex_done - 3) * B)
            else:
                limit = max(composed, min((int(self.cy[decided - 1]) // B - 1) * B if decided else 0,
                                          (tex_done - 3) * B))
            limit = min(limit, received if received >= self.H else received - blend.HALO)
            for r0 in range(composed, limit, COMPOSE_ROWS):
                r1 = min(limit, r0 + COMPOSE_ROWS)
                self._compose(r0, r1, outs, aouts, fixed_maps, decided)
            composed = max(composed, limit)
            low = min(composed, self.oys[decided] if decided < self.ny else composed) - blend.HALO
            for st in list(self.rows.values()) + list(self.arows.values()):
                st.drop(low)
        for st in list(self.rows.values()) + list(self.arows.values()):
            while st.pull():  # to the streams' ends: the runtimes give their buffers back there
                pass
        return [(o, a, self._record(k)) for k, (o, a) in enumerate(zip(outs, aouts))]

    def _ceilings(self) -> list[np.ndarray]:
        """Per auto plan, each region's ceiling: the plan's, lowered by the region's own noise
        (ladder.local_noise, measured on the input, so known before any expert runs)."""
        out = [np.zeros((self.ny, self.nx)) for _ in self.choices]
        if not self.auto:
            return out
        noise = np.array([[local_noise(to_float(self.rgb[self.ys[r]:self.ys[r + 1], self.xs[c]:self.xs[c + 1]]))
                           for c in range(self.nx)] for r in range(self.ny)])
        for k, choice in enumerate(self.choices):
            if choice.candidates:
                out[k] = np.minimum(choice.top * (1 - noise), choice.ceiling)
        return out

    def _texture_to(self, rows: int) -> None:
        """Texture of the block rows complete in the base experts' output up to output row `rows`,
        or as far as they have come."""
        bases = [self.rows[i] for i in self.textures]
        have = min([st.end for st in bases] or [rows])
        to = self.BH if have >= self.H else have // B
        if to > self.tex_done:
            for i, t in self.textures.items():
                t[self.tex_done:to] = blend.texture(self.rows[i].rows(self.tex_done * B, min(self.H, to * B)))
            self.tex_done = to

    def _bound_blocks(self) -> np.ndarray:
        """The highest position any plan can give each block of the output: a fixed position or map
        as it is; under auto, the ceiling of every region whose positions ramp into the block."""
        bound = np.zeros((self.BH, self.BW), np.float32)
        for k, c in enumerate(self.choices):
            if not c.candidates:
                np.maximum(bound, self.fixed_maps[k], out=bound)
                continue
            top = np.clip(self.ceilings[k] + max(c.offset, 0.0), 0, 1)  # scored as they are, then offset
            for r in range(self.ny):
                b0, b1 = max(0, (self.oys[r] - BORDER) // B), min(self.BH, -(-(self.oys[r + 1] + BORDER) // B))
                for col in range(self.nx):
                    c0, c1 = max(0, (self.oxs[col] - BORDER) // B), min(self.BW, -(-(self.oxs[col + 1] + BORDER) // B))
                    np.maximum(bound[b0:b1, c0:c1], top[r, col], out=bound[b0:b1, c0:c1])
        return bound

    def _skipper(self, need: list[bool]):
        """For the last (most faithful) expert, when the expert before it runs too: a factory of
        `skip(rows, cols)` callbacks (esrgan.stream) that are true for a tile whose output no
        position reachable there uses: every block whose centre its pixels, or the blend.HALO around them
        that low-passes read, blend from is at or below the previous expert alone (a region held
        there by its ceiling, a fixed position or a map). Above it every rung takes the last
        expert's low frequencies everywhere, so a flat region runs it too."""
        j = len(self.experts) - 1
        if j < 1 or not (need[j] and need[j - 1]):
            return None
        alone = next(k for k, r in enumerate(self.ladder.rungs) if r.expert == j - 1 and r.gate is None and not r.low)
        p_none = self.ladder.position(alone)  # at or below: no weight
        bound = self._bound_blocks()
        m = 1 + -(-blend.HALO // B)  # blocks of margin: the interpolation's one, and the halo's

        def skip(rows, cols) -> bool:
            b0, b1 = max(0, rows[0] // B - m), min(self.BH, (rows[1] - 1) // B + 1 + m)
            c0, c1 = max(0, cols[0] // B - m), min(self.BW, (cols[1] - 1) // B + 1 + m)
            return bool((bound[b0:b1, c0:c1] <= p_none + 1e-6).all())

        def factory(count: bool):
            def counted(rows, cols) -> bool:
                out = skip(rows, cols)
                if count:
                    self.skipped[0] += out
                    self.skipped[1] += 1
                return out
            return counted
        return factory

    def _map_blocks(self, fixed):
        """A per-pixel position map (input size) as block averages of the output grid."""
        if not isinstance(fixed, np.ndarray):
            return fixed
        m = blend.resize(fixed.astype(np.float32), (self.BW, self.BH))
        return np.clip(m, 0, 1).astype(np.float32)

    def _compose(self, r0, r1, outs, aouts, fixed_maps, decided) -> None:
        b0, b1 = self._block_span(r0, r1, self.BH)
        images = {i: self.rows[i].rows(r0, r1) for i in self.rows}
        alphas = {i: self.arows[i].rows(r0, r1) for i in self.arows}
        # low-passed differences, computed once for the plans that use them
        diffs = _once(partial(self._low_diffs, self.rows, r0, r1, 0, self.W))
        adiffs = _once(partial(self._low_diffs, self.arows, r0, r1, 0, self.W))
        for k, c in enumerate(self.choices):
            if c.candidates:
                blocks = self._cell_blocks(self.pos[k], decided, b0, b1)
                blocks = np.clip(blocks + c.offset, 0, 1)
            else:
                blocks = self._fixed_blocks(fixed_maps[k], b0, b1)
            w, a = self._pixel_weights(blocks, b0, r0, r1)
            lows = self._lows(a, diffs)
            blend.compose([images.get(i) for i in range(len(self.experts))], w, outs[k][r0:r1], lows)
            if aouts[k] is not None:
                alows = self._lows(a, adiffs)
                blend.compose([alphas.get(i) for i in range(len(self.experts))], w, aouts[k][r0:r1], alows)

    def _decide(self, r: int) -> None:
        """Score region row r's candidates and fix each plan's positions there."""
        oy0, oy1 = self.oys[r], self.oys[r + 1]
        b0, b1 = self._block_span(oy0, oy1, self.BH)
        strip = {i: self.rows[i].rows(oy0, oy1) for i in self.rows}
        for c in range(self.nx):
            ox0, ox1 = self.oxs[c], self.oxs[c + 1]
            bc0, bc1 = self._block_span(ox0, ox1, self.BW)
            lq = to_float(self.rgb[self.ys[r]:self.ys[r + 1], self.xs[c]:self.xs[c + 1]])
            per_plan = []  # each plan's candidate positions in this region
            for k, choice in enumerate(self.choices):
                if not choice.candidates:  # a fixed position: nothing to score
                    per_plan.append([])
                    continue
                top = self.ceilings[k][r, c]
                cands = [p for p in choice.candidates if p <= top + 1e-9]
                if top - cands[-1] > 1e-6:
                    cands.append(round(top, 6))  # the region's own ceiling, between two rungs
                per_plan.append(cands)
            positions = sorted({p for cands in per_plan for p in cands})
            images, diffs = [], _once(partial(self._low_diffs, self.rows, oy0, oy1, ox0, ox1))
            for p in positions:
                blocks = np.full((b1 - b0, bc1 - bc0), p, np.float32)
                w, a = self._pixel_weights(blocks, b0, oy0, oy1, ox0, ox1, bc0)
                lows = self._lows(a, diffs)
                out = np.empty((oy1 - oy0, ox1 - ox0, 3), np.float32)
                images.append(blend.compose([strip[i][:, ox0:ox1] if i in strip else None
                                             for i in range(len(self.experts))], w, out, lows))
            parts = dict(zip(positions, self.chooser.measure(images, [lq] * len(images))))
            if self.thumbs is None:
                self.thumbs = list(zip(positions, images))
            for k, (choice, cands) in enumerate(zip(self.choices, per_plan)):
                if not cands:
                    continue
                q_lr = choice.q_lr
                if q_lr is None and choice.q_lr_source == "measured on the input":
                    q_lr = self.chooser.input_quality(None, lq)[0]
                rewards = self.chooser.rewards([parts[p] for p in cands], q_lr)
                self.cells[k].append({p: (parts[p], v) for p, v in zip(cands, rewards)})
                valid = [j for j, v in enumerate(rewards) if v is not None]
                if valid:
                    self.pos[k][r, c] = cands[max(valid, key=lambda j: (rewards[j], -j))]
                    self.judged[k][r, c] = True
        for k, choice in enumerate(self.choices):
            if choice.candidates:
                self._fill(k, r)

    def _fill(self, k: int, r: int) -> None:
        """Unjudged regions of row r: the nearest judged one in the row, else the one above, else the
        median of those judged so far, else 0; never above the region's own ceiling."""
        row, judged = self.pos[k][r], self.judged[k][r]
        cols = np.flatnonzero(judged)
        done = self.pos[k][:r + 1][self.judged[k][:r + 1]]
        for c in np.flatnonzero(~judged):
            if cols.size:
                row[c] = row[cols[np.argmin(np.abs(cols - c))]]
            elif r > 0:
                row[c] = self.pos[k][r - 1, c]
            else:
                row[c] = float(np.median(done)) if done.size else 0.0
            row[c] = min(row[c], self.ceilings[k][r, c])

    def _record(self, k: int) -> dict:
        """The plan's region map (positions after the offset), and per candidate position its parts
        and reward averaged over the regions that could be judged, and how many regions took it."""
        c = self.choices[k]
        if not c.candidates:
            return {}
        pos = np.clip(self.pos[k] + c.offset, 0, 1)
        rows = []
        for p in sorted({p for cell in self.cells[k] for p in cell}):
            scored = [cell[p] for cell in self.cells[k] if p in cell]
            keys = scored[0][0].keys() if scored else ()
            mean = {key: _mean([m[key] for m, _ in scored if m.get(key) is not None]) for key in keys}
            reward = _mean([v for _, v in scored if v is not None])
            rows.append({"label": self.ladder.label(p), "position": round(p, 4),
                         **{key: None if v is None else round(float(v), 4) for key, v in mean.items()},
                         "reward": None if reward is None else round(reward, 4),
                         "regions": int(np.sum(np.isclose(self.pos[k][self.judged[k]], p)))})
        return {"grid": [self.ny, self.nx], "positions": np.round(pos, 3).tolist(),
                "ceilings": np.round(self.ceilings[k], 3).tolist(),
                "judged": int(self.judged[k].sum()), "candidates": rows, "position": round(float(pos.mean()), 4)}


# Output rows composed at a time: each expert's rows, their low-passed difference and the sum live
# as float32 for that many rows (at 8192 pixels wide, about 12 MB an array per 128 rows).
COMPOSE_ROWS = 128
BORDER = 64  # output pixels on each side of a border between regions over which their positions ramp


def _across(coords: np.ndarray, bounds: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For coordinates along one axis and region boundaries: (region, neighbour, neighbour's weight),
    the weight ramping from 0 at BORDER before a boundary to 1/2 on it (to 1 at BORDER after)."""
    n = len(bounds) - 1
    inner = np.asarray(bounds[1:-1], np.float64)
    cell = np.clip(np.searchsorted(inner, coords, side="right"), 0, n - 1)
    if n == 1:
        return cell, cell, np.zeros(len(coords), np.float32)
    lo = np.asarray(bounds, np.float64)[cell]
    hi = np.asarray(bounds, np.float64)[cell + 1]
    upper = coords >= (lo + hi) / 2  # the nearer border: the one below or the one above
    other = np.clip(np.where(upper, cell + 1, cell - 1), 0, n - 1)
    edge = np.where(upper, hi, lo)
    w = np.clip(0.5 - np.abs(coords - edge) / (2 * BORDER), 0, 0.5)
    w = np.where(other == cell, 0, w)
    return cell, other, w.astype(np.float32)


def _once(fn):
    """fn(), computed on the first call only."""
    box = []

    def get():
        if not box:
            box.append(fn())
        return box[0]
    return get


def _mean(values):
    return float(np.mean(values)) if values else None

