"""Stage images for the lite profile: one pass of each expert, a mix chosen region by region, stages by resampling it.

The experts are ×4 regression networks (Real-ESRGAN x4plus, RealSR DF2K, or any converted file), so
rough (input size), middle (×2) and final (×scale) are the chosen mix resampled with Lanczos: one
pass per expert instead of three, and the stages agree with each other exactly as the contract's
coarse-to-fine reading expects.

Which mix: every mix is a position on the fidelity ladder (ladder.py: x4plus, DF2K's low
frequencies, region blends, DF2K). With `fidelity: auto` a chooser (chooser.py, given by
profiles.py) scores the positions the degradation reading allows in every region of the photo and
keeps the best per region (regions.py), so the chain of thought changes the pixels; `auto+0.2`
moves those positions towards faithful. A number from 0 (the first expert) to 1 (the last) is one
fixed position, and `fidelity_map` a painted one per pixel (a grey image, white = 1); a fixed
position runs only the experts it mixes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ..cot import Plan
from ..imageio import LoadedImage, to_float
from ..pipeline import StageImage, StageStarted, stage_sizes
from .blend import resize
from .esrgan import ESRGANRestorer
from .ladder import DEFAULT_GATES, Fidelity, Ladder, ceiling, parse_fidelity
from .regions import PlanChoice, RegionComposer

DEFAULT_EXPERTS = ("realesrgan-x4plus", "realsr-df2k")  # natural → faithful: the ladder's order

__all__ = ["DEFAULT_EXPERTS", "DEFAULT_GATES", "LiteStages", "parse_fidelity", "read_fidelity_map", "resize"]


def read_fidelity_map(path) -> np.ndarray:
    """A grey image as positions in [0, 1] (white = faithful), any size (it is resized to each
    photo); ValueError naming the file when it cannot be read."""
    from ..imageio import read_image

    try:
        image = read_image(Path(path))
    except Exception as e:  # noqa: BLE001 - one line that names the file, whatever went wrong
        raise ValueError(f"fidelity map {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
    return np.asarray(to_float(image.rgb)[..., :3].mean(axis=2), np.float32)


class LiteStages:
    """StageRestorer over one or more ESRGANRestorer experts (module doc)."""

    request_options = ("fidelity", "fidelity_map")  # what the demo may change per request (demo.with_options)

    def __init__(self, experts: ESRGANRestorer | list[ESRGANRestorer], chooser=None, *,
                 gates: list | tuple = DEFAULT_GATES, fidelity: str | float = "auto",
                 fidelity_map: str | Path | np.ndarray | None = None):
        self.experts = [experts] if isinstance(experts, ESRGANRestorer) else list(experts)
        if not self.experts:
            raise ValueError("the lite restorer needs at least one expert")
        self.chooser = chooser if len(self.experts) > 1 else None
        self.ladder = Ladder([e.name for e in self.experts], gates)
        self.fidelity = parse_fidelity(fidelity)
        self.fidelity_map = fidelity_map

    @property
    def fidelity_map(self) -> np.ndarray | None:
        return self._map

    @fidelity_map.setter
    def fidelity_map(self, value) -> None:
        self._map_name = None if value is None or isinstance(value, np.ndarray) else Path(value).name
        self._map = read_fidelity_map(value) if isinstance(value, (str, Path)) else value

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
        precisions = [x.precision for x in self.experts]
        # one word when the experts agree, else each one's as the restorer's name joins them ("fp32+int8"):
        # a run's resume settings and the sidecar then change when any expert's precision does
        precision = precisions[0] if len(set(precisions)) == 1 else "+".join(precisions)
        out = {"restorer": self.name, "weights": e.weights(), "device": str(e.device),
               "backend": e.backend, "precision": precision, "tile": e.tile}
        if len(self.experts) > 1:
            out["experts"] = [{"name": x.name, "precision": x.precision, **(x.weights() or {})} for x in self.experts]
            out["fidelity"] = str(self.fidelity)
            out["ladder"] = [r.label for r in self.ladder.rungs]
            if self.chooser is not None:
                out["chooser"] = self.chooser.describe()
        return out

    # --- the choice ----------------------------------------------------------------------------
    def _plan_choice(self, plan: Plan | None) -> tuple[PlanChoice, dict]:
        """What this plan asks of the experts, and the record's fixed part."""
        f: Fidelity = self.fidelity
        if len(self.experts) == 1:
            return PlanChoice(plan, fixed=0.0), {
                "mode": "one expert", "position": 0.0, "label": self.experts[0].name,
                "why": "one expert loaded: nothing to choose"}
        if self._map is not None:
            return PlanChoice(plan, fixed=self._map), {
                "mode": "fidelity map", "map": self._map_name, "position": round(float(self._map.mean()), 4),
                "why": "a painted position per pixel (white = faithful), no chooser"}
        if not f.auto or self.chooser is None:
            pos = f.value if not f.auto else float(np.clip(f.value, 0, 1))
            return PlanChoice(plan, fixed=pos), {
                "mode": "fidelity", "fidelity": str(f), "position": pos, "label": self.ladder.label(pos),
                "why": f"--fidelity {f}: a fixed position on the ladder, no chooser"}
        top, moved = ceiling(plan, self.ladder.auto_top)
        cands = [self.ladder.position(k) for k in range(len(self.ladder.rungs))
                 if self.ladder.position(k) <= top + 1e-9]
        if top - cands[-1] > 1e-6:
            cands.append(round(top, 6))  # the ceiling itself, between two rungs
        if plan is not None and plan.degradation:
            q_lr, source = self.chooser.input_quality(plan, None)
        else:
            q_lr, source = None, "measured on the input" if self.chooser.reward.uses_q_lr else "unused"
        record = {"mode": "auto", "fidelity": str(f), "q_lr": None if q_lr is None else round(q_lr, 4),
                  "q_lr_source": source, "reading": {"ceiling": round(top, 4), "moved": moved},
                  "allowed": [self.ladder.label(p) for p in cands]}
        if cands == [0.0]:  # the reading leaves the first expert alone: nothing to score
            pos = float(np.clip(f.value, 0, 1))
            moved_by = f", moved by {f.value:+g} ({f})" if pos > 0 else ": no other expert ran"
            return PlanChoice(plan, fixed=pos), {
                **record, "candidates": [], "position": pos, "winner": self.ladder.label(pos),
                "why": f"the reading ({', '.join(moved)}) leaves only {self.ladder.rungs[0].label}{moved_by}"}
        return PlanChoice(plan, cands, offset=f.value, top=self.ladder.auto_top, ceiling=top,
                          q_lr=q_lr, q_lr_source=source), record

    def _summary(self, positions: np.ndarray) -> str:
        """Plain words for the final understanding: which position each part of the image took."""
        from ..analyze import part_name

        flat = np.round(positions, 3)
        parts = []
        for p in sorted(set(flat.ravel().tolist())):
            hit = flat == p
            rows = np.array_split(np.arange(hit.shape[0]), 3)
            cols = np.array_split(np.arange(hit.shape[1]), 3)
            shares = [[hit[np.ix_(r, c)].mean() if r.size and c.size else 0.0 for c in cols] for r in rows]
            r, c = np.unravel_index(int(np.argmax(shares)), (3, 3))
            where = "" if hit.all() else f", most in the {part_name(r, c)}"
            parts.append(f"{self.ladder.label(p)} in {100 * hit.mean():.0f} % of the regions{where}")
        return "; ".join(parts)

    def _finish(self, record: dict, regions: dict, seconds: float | None) -> dict | None:
        if not record:
            return None
        if not regions:
            if record["mode"] == "auto":
                summary = f"{record['winner']} everywhere: {record['why']}"
            elif record["mode"] == "fidelity map":
                summary = f"a painted position map, mean position {record['position']:g}"
            elif record["mode"] == "one expert":
                summary = f"{record['label']} alone (the only expert loaded)"
            else:
                summary = f"{record['label']} everywhere (a fixed position, {record['position']:g})"
            return {**record, "summary": summary, "seconds": seconds}
        positions = np.asarray(regions["positions"], np.float64)
        winner = self.ladder.label(float(np.median(positions)))
        n = positions.size
        if regions["judged"] == 0:
            why = (f"no region could be scored by {self.chooser.name} (flat or too small): kept "
                   f"{self.ladder.label(float(positions.flat[0]))}")
        else:
            why = (f"per region, the highest {self.chooser.name} reward among the positions up to "
                   f"{record['reading']['ceiling']:g} ({regions['judged']} of {n} regions judged, the rest took a "
                   f"neighbour's); input quality Q_LR {record['q_lr']} from the {record['q_lr_source']}")
            if record["fidelity"] != "auto":
                why += f"; moved by {record['fidelity'][4:]} ({record['fidelity']})"
        summary = (f"{self._summary(positions)}; per region the highest {self.chooser.name} reward up to "
                   f"position {record['reading']['ceiling']:g}")
        return {**record, **regions, "winner": winner, "why": why, "summary": summary, "seconds": seconds}

    def _render(self, rgb: np.ndarray, alpha, plans: list[Plan | None], size: tuple[int, int], out_dtype):
        """(rgb, alpha, record, candidates' look) per plan at `size` (w, h): the experts run once."""
        t = time.perf_counter()
        made = [self._plan_choice(p) for p in plans]
        choices = [c for c, _ in made]
        w, h = size
        exact = (h, w) == (rgb.shape[0] * self.esrgan.scale, rgb.shape[1] * self.esrgan.scale)
        composer = RegionComposer(self.experts, self.ladder, self.chooser, rgb, alpha, choices,
                                  out_dtype if exact or np.dtype(out_dtype).kind == "f" else np.uint16)
        need = composer.needed()
        if sum(need) == 1:  # one expert alone: its own output, no composition
            alone = need.index(True)
            expert = self.experts[alone]
            pos = next(self.ladder.position(k) for k, r in enumerate(self.ladder.rungs)
                       if r.expert == alone and r.gate is None)
            made = [(c, rec if rec.get("mode") != "auto" or "winner" in rec else  # auto±X beyond one expert
                     {**rec, "candidates": [], "position": pos, "winner": self.ladder.label(pos),
                      "why": f"{rec['fidelity']} leaves only {self.ladder.label(pos)}: no other expert ran"})
                    for c, rec in made]
            o, a = expert.restore(rgb, alpha, outscale=w / rgb.shape[1], out_dtype=out_dtype)
            if o.shape[:2] != (h, w):  # rounding of outscale
                o, a = resize(o, (w, h)), None if a is None else resize(a, (w, h))
            results = [(o, a, {})] * len(plans)
            thumbs = None
        else:
            results = []
            for o, a, regions in composer.run():
                a = None if a is None else a[..., 0]
                if not exact:
                    o = _convert(resize(o, (w, h)), out_dtype)
                    a = None if a is None else _convert(resize(a, (w, h)), out_dtype)
                results.append((o, a, regions))
            thumbs = composer.thumbs
        if thumbs is not None:  # the demo's strip: each look with its position's row of the record
            labels = [self.ladder.label(p) for p, _ in thumbs]
            thumbs = [img for _, img in thumbs]
        seconds = round(time.perf_counter() - t, 4)
        out = []
        for (o, a, regions), (_, rec) in zip(results, made):
            record = self._finish(rec, regions, seconds)
            skipped, asked = getattr(composer, "skipped", (0, 0))
            if record is not None and asked:  # tiles of the faithful expert that nothing would have used
                record["skipped"] = {"expert": self.experts[-1].name, "tiles": int(skipped), "of": int(asked)}
            if record is not None:  # the experts that ran for this image (the sidecar's `restorer`)
                record["restorer"] = "+".join(e.name for e, n in zip(self.experts, need) if n)
            if thumbs is not None and record is not None:
                record["shown"] = labels  # which candidates the looks are, in order
            out.append((o, a, record, thumbs))
        return out

    # --- the StageRestorer protocol ------------------------------------------------------------
    def stages(self, image: LoadedImage, plan: Plan, *, sizes, seed: int = 0) -> Iterator:
        t = time.perf_counter()
        yield StageStarted("rough", sizes["rough"])
        out_dtype = np.uint16 if image.bit_depth == 16 else np.uint8
        ((rgb, alpha, choice, thumbs),) = self._render(image.rgb, image.alpha, [plan], sizes["final"], out_dtype)
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
        chooses its positions, so completions that read the degradation differently get different images."""
        return self.restore_stage_batch(rgb, plans, stage="final", scale=scale)

    def restore_stage_batch(self, rgb: np.ndarray, plans: list[Plan], *, stage: str = "final", scale: float = 4.0,
                            seed: int = 0, batch_size: int | None = None, previous=None) -> list[np.ndarray]:
        """A stage's image for each plan: the chosen mix of the experts' ×scale outputs, resampled,
        as stages() makes it (every stage is that mix, so `previous` stage images change nothing)."""
        return [img for img, _ in self.choose_batch(rgb, plans, stage=stage, scale=scale)]

    def choose_batch(self, rgb: np.ndarray, plans: list[Plan], *, stage: str = "final",
                     scale: float = 4.0) -> list[tuple[np.ndarray, dict | None]]:
        """(image, choice record) per plan, by the same pass as stages(): the experts run once at
        ×scale, each plan's reading picks its positions, resampled to `stage`'s size; plans that
        make the same choice share one array (the full profile's rough stage groups them by it)."""
        h, w = rgb.shape[:2]
        sizes = stage_sizes(w, h, scale)
        rendered = self._render(to_float(rgb), None, plans, sizes["final"], np.float32)
        out, seen = [], {}
        for o, _, record, _ in rendered:
            key = repr(None if record is None else record.get("positions", record.get("position")))
            if key not in seen:
                seen[key] = resize(o, sizes[stage])
            out.append((seen[key], record))
        return out


def _convert(arr: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if arr.dtype == dtype:
        return arr
    f = to_float(arr)
    if dtype.kind == "f":
        return f.astype(dtype)
    return (np.clip(f, 0, 1) * np.iinfo(dtype).max + 0.5).astype(dtype)
