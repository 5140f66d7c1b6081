"""What the Gradio demo shows, derived from the pipeline's event stream (app.py only lays it out).

`DemoSession` owns the models (one pipeline per profile, built on first use and shared by every
request) and the folder the demo serves results from. `DemoSession.restore(...)` runs one image and
yields `View` snapshots as events arrive: the reasoning text grows token by token, the degradation
items appear as labels once `</degradation>` closes, the understanding texts as their tags close,
each stage's image (and its diffusion previews) as soon as it exists, a status line with the
current stage, and at the end a before/after pair and the result + sidecar files. When the restorer
chose among candidates (the lite profile's experts and their blends), the view also holds a look at
each candidate captioned with its scores, the winner starred, and one line saying why. Errors end
the run with a one-line message in the view; the session keeps serving.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from .cot import STAGES
from .imageio import DEFAULT_MAX_PIXELS, ImageReadError, atomic_write_text, read_image, write_image
from .pipeline import (AnalysisReady, Done, Failed, ImageInContext, PlanReady, PlanUpdate, StageImage, StagePreview,
                       StageStarted, TextDelta)
from .profiles import PROFILES, ConfigError, build_pipeline, check_profile, choose_profile, load_config
from .restorers.lite import parse_fidelity, resize
from .sidecar import build_sidecar

log = logging.getLogger(__name__)
LEVEL_COLOURS = {"none": "green", "light": "yellow", "medium": "orange", "heavy": "red"}
KEEP_RESULTS_S = 3600  # results older than this are deleted from the served folder


@dataclass
class View:
    status: str = ""
    reasoning: str = ""
    degradation: list[tuple[str, str | None]] = field(default_factory=list)  # (text, level) for HighlightedText
    understanding: str = ""
    stages: dict[str, np.ndarray | None] = field(default_factory=lambda: {s: None for s in STAGES})
    compare: tuple[np.ndarray, np.ndarray] | None = None
    files: list[str] = field(default_factory=list)
    # A tuple: app.py compares it by identity, never element-wise (it holds arrays).
    candidates: tuple[tuple[np.ndarray, str], ...] = ()  # (look, caption) per candidate, winner starred
    choice: str = ""  # how the restorer chose its mix, one line of Markdown
    error: str | None = None


def to_display(rgb: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB(A) for the browser, whatever the pipeline's dtype."""
    arr = np.asarray(rgb)
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    if alpha is not None:
        a = to_display(np.asarray(alpha)[..., None].repeat(3, axis=2))[..., :1]
        arr = np.concatenate([arr, a], axis=2)
    return arr


def degradation_labels(plan) -> list[tuple[str, str | None]]:
    out = []
    for item in plan.degradation:
        if item.type == "downsample":
            out.append((f"downsample {item.level}", None))
        else:
            out.append((f"{item.type}: {item.level}", item.level))
    return out


def full_profile_problem() -> str | None:
    """Why the full profile cannot run here (its weights are missing, no CUDA GPU), or None."""
    from .download import full_profile_present
    from .weights import default_dir

    if not full_profile_present():
        return f"its weights are not in {default_dir()} (python -m realsr_r1.download full)"
    import torch

    if not torch.cuda.is_available():
        return "there is no CUDA GPU (on the CPU it takes minutes per image)"
    return None


def start_profiles(requested: str) -> tuple[dict[str, str], str, str | None]:
    """(profiles offered, the one selected first, a warning for the log and the page) for `--profile`.

    An unknown name or a YAML file that is missing or invalid is a ConfigError (one line), said
    before the demo starts rather than in the first request. `full` where it cannot run starts with
    lite instead, and says why."""
    if requested.endswith((".yaml", ".yml")):
        check_profile(load_config(requested))
        return DemoSession.available([requested]), Path(requested).stem, None
    choose_profile(requested)  # unknown names: the same one-line error as infer's
    extra = [requested] if requested in PROFILES and requested not in ("lite", "full") else []  # tiny
    profiles = DemoSession.available(extra)
    problem = full_profile_problem() if requested == "full" else None
    if problem is None:
        return profiles, requested, None
    kept = " (full stays in the list)" if "full" in profiles else ""
    return profiles, "lite", f"--profile full cannot run here: {problem}; starting with lite instead{kept}"


def candidate_caption(row: dict, winner: str | None) -> str:
    """e.g. `★ reward 4.84 — realsr-df2k (F 0.99, Q 4.86)`: F and Q where the reward has those parts.
    The score comes first: the strip cuts long captions (blends' labels) short."""
    parts = [f"{short} {row[key]:.2f}" for key, short in (("F", "F"), ("Q_SR", "Q")) if row.get(key) is not None]
    reward = "no score" if row.get("reward") is None else f"reward {row['reward']:.2f}"
    star = "★ " if row["label"] == winner else ""
    return f"{star}{reward} — {row['label']}" + (f" ({', '.join(parts)})" if parts else "")


MAP_SIDE = 384  # pixels a side, at most, of the position map shown over the result


def position_overlay(final: np.ndarray, positions) -> np.ndarray:
    """The result, small, tinted by the ladder position chosen per region (blue natural … orange
    faithful), the regions' positions interpolated as the restorer blends them."""
    img = to_display(final)[..., :3]
    h, w = img.shape[:2]
    k = min(1.0, MAP_SIDE / max(h, w))
    size = (max(1, round(w * k)), max(1, round(h * k)))
    small = resize(img, size).astype(np.float32) / 255
    pos = resize(np.asarray(positions, np.float32), size)[..., None]  # bilinear-ish between region centres
    tint = (1 - pos) * np.array([0.15, 0.35, 0.95], np.float32) + pos * np.array([0.95, 0.55, 0.1], np.float32)
    grey = small.mean(axis=2, keepdims=True)
    return (np.clip(0.5 * grey + 0.5 * tint, 0, 1) * 255 + 0.5).astype(np.uint8)


def candidate_strip(choice: dict | None, looks: list | None, final: np.ndarray | None = None
                    ) -> tuple[tuple[np.ndarray, str], ...]:
    """(image, caption) per candidate the chooser scored, after the map of the positions it chose
    per region over the result; empty for a fixed mix or a single restorer."""
    if not choice or choice.get("mode") != "auto" or not looks:
        return ()
    rows = {row["label"]: row for row in choice.get("candidates", [])}
    shown = choice.get("shown") or list(rows)
    strip = tuple((to_display(look), candidate_caption(rows[label], choice.get("winner")))
                  for label, look in zip(shown, looks) if label in rows)
    if final is not None and choice.get("positions"):
        grid = "×".join(str(n) for n in choice.get("grid", []))
        strip = ((position_overlay(final, choice["positions"]),
                  f"position per region ({grid}): blue natural … orange faithful"),) + strip
    return strip


def choice_text(choice: dict | None) -> str:
    """One line on how the final image's mix was chosen; empty when there was nothing to choose."""
    if not choice:
        return ""
    if choice.get("mode") == "auto":
        took = f"; scored in {choice['seconds']:.1f} s" if choice.get("seconds") is not None else ""
        return f"**Chosen: {choice.get('winner')}** — {choice.get('why', '')}{took}."
    if choice.get("mode") == "fidelity map":
        return (f"**Fidelity map** (painted, not chosen): mean position {choice.get('position')} on the ladder; "
                f"no candidates were scored.")
    return (f"**Fidelity {choice.get('fidelity')}** (set, not chosen): {choice.get('label')}, a fixed "
            f"position on the ladder; no candidates were scored.")


def understanding_text(plan) -> str:
    parts = [f"**{s}** — {plan.understanding.get(s) or '…'}" for s in STAGES if plan.understanding.get(s)]
    return "\n\n".join(parts)


class DemoSession:
    """Models loaded once per profile and shared; results written under `out_root`."""

    def __init__(self, profiles: dict[str, str], out_root: str | Path, *, device: str = "auto",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.profiles = profiles  # label → profile name or YAML path
        self.out_root = Path(out_root)
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.max_pixels = int(max_pixels)
        self._pipelines: dict[str, tuple] = {}
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.running = 0  # restorations in progress (the queue bounds this)

    @property
    def busy(self) -> bool:
        """Whether a restoration or a model build is under way (in a worker thread)."""
        return self.running > 0 or self._lock.locked()

    @staticmethod
    def available(extra: list[str] | None = None) -> dict[str, str]:
        """Profiles this machine can run: auto and lite always, full with its weights, plus `extra`."""
        from .download import full_profile_present

        found = {"auto": "auto", "lite": "lite"}
        if full_profile_present():
            found["full"] = "full"
        for path in extra or []:
            found[Path(path).stem] = str(path)
        return found

    def pipeline(self, label: str):
        """(pipeline, reason) for a profile label, built on first use (one build at a time)."""
        with self._lock:
            if label not in self._pipelines:
                target = self.profiles.get(label)
                if target is None:
                    raise ConfigError(f"profile {label!r} is not offered here ({', '.join(self.profiles)})")
                if target.endswith((".yaml", ".yml")):
                    name, reason = Path(target).stem, "config file"
                else:
                    name, reason = choose_profile(target)
                self._pipelines[label] = (build_pipeline(load_config(target if reason == "config file" else name),
                                                         device=self.device), f"{name}: {reason}")
            return self._pipelines[label]

    def preview(self, path: str | None) -> tuple[np.ndarray | None, str]:
        """(the upload as the browser shows it, status line): problems are said at upload time."""
        if not path:
            return None, "Ready."
        try:
            loaded = read_image(path, max_pixels=self.max_pixels)
        except (ImageReadError, OSError) as e:
            return None, f"**Error:** {Path(path).name}: {' '.join(str(e).split())}"
        return to_display(loaded.rgb, loaded.alpha), f"{Path(path).name}: {loaded.size[0]}×{loaded.size[1]}, ready."

    def cleanup(self, max_age_s: float = KEEP_RESULTS_S) -> None:
        now = time.time()
        for run in self.out_root.iterdir():
            if run.is_dir() and now - run.stat().st_mtime > max_age_s:
                shutil.rmtree(run, ignore_errors=True)

    def restore(self, path: str | None, profile: str = "auto", *, scale: float = 4.0, steps: int | None = None,
                seed: int = 0, color_fix: str | None = None, fidelity: float | str | None = None,
                fidelity_map: str | None = None) -> Iterator[View]:
        """Views of one restoration. `steps`, `color_fix`, `fidelity` (auto, auto±X or a ladder
        position, 0 natural … 1 faithful) and `fidelity_map` (a grey image painting the position)
        apply to restorers that declare them; None keeps the profile's own setting."""
        view = View(status="Loading…")
        if not path:
            yield replace(view, status="Upload an image or pick an example first.", error="no image")
            return
        name = Path(path).name
        try:
            try:
                loaded = read_image(path, max_pixels=self.max_pixels)
            except (ImageReadError, OSError) as e:
                raise ImageReadError(f"{name}: {' '.join(str(e).split())}") from None
            yield view
            pipe, reason = self.pipeline(profile)
            restorer = with_options(pipe.restorer, steps=steps, color_fix=color_fix, fidelity=fidelity,
                                    fidelity_map=fidelity_map)
        except (ImageReadError, ConfigError, OSError, ValueError, RuntimeError) as e:
            msg = " ".join(str(e).split())
            yield replace(view, status=f"**Error:** {msg}", error=msg)
            return
        self.cleanup()
        run = copy.copy(pipe)
        run.restorer = restorer
        t0 = time.perf_counter()
        view.status = "Reading the degradation…"
        yield view
        with self._count_lock:
            self.running += 1
            log.info("start %s with %s (%d running)", name, profile, self.running)
        try:
            yield from self._follow(run, loaded, view, name, reason, seed, scale, t0)
        finally:
            with self._count_lock:
                self.running -= 1
                log.info("end %s (%d running)", name, self.running)

    def _follow(self, run, loaded, view: View, name: str, reason: str, seed: int, scale: float, t0: float):
        """Turn one run's events into views."""
        for event in run.run(loaded, seed=int(seed), scale=float(scale)):
            if isinstance(event, TextDelta):
                view.reasoning += event.text
                view.status = f"Reasoning… ({len(view.reasoning)} characters)"
            elif isinstance(event, AnalysisReady):
                continue
            elif isinstance(event, (PlanUpdate, PlanReady)):
                view.degradation = degradation_labels(event.plan)
                view.understanding = understanding_text(event.plan)
                if isinstance(event, PlanReady):
                    view.status = "Plan ready; restoring…"
            elif isinstance(event, StageStarted):
                view.status = f"Stage {STAGES.index(event.stage) + 1}/3: {event.stage} ({event.size[0]}×{event.size[1]})"
            elif isinstance(event, StagePreview):
                view.stages = {**view.stages, event.stage: to_display(event.image)}
                view.status = f"Stage {STAGES.index(event.stage) + 1}/3: {event.stage}, step {event.step}/{event.total}"
            elif isinstance(event, StageImage):
                view.stages = {**view.stages, event.stage: to_display(event.rgb, event.alpha)}
                if event.choice is not None:
                    view.candidates = candidate_strip(event.choice, event.candidates, event.rgb)
                    view.choice = choice_text(event.choice)
            elif isinstance(event, ImageInContext):  # reflect mode: the text that follows is written seeing it
                view.reasoning += f"\n[looking at the {event.stage} image, {event.size[0]}×{event.size[1]}]\n"
                view.status = f"Reasoning with the {event.stage} image in view…"
            elif isinstance(event, Done):
                view.files = self._save(name, event.result, reason, loaded)
                final = to_display(event.result.rgb)
                before = to_display(resize(loaded.rgb, (final.shape[1], final.shape[0])))
                view.compare = (before, final)
                view.status = f"Done in {time.perf_counter() - t0:.1f} s ({reason})."
            elif isinstance(event, Failed):
                view.error = f"{name}: {event.message}"
                view.status = f"**Error:** {view.error}"
            yield view

    def _save(self, name: str, result, reason: str, loaded) -> list[str]:
        folder = self.out_root / uuid.uuid4().hex[:12]
        stem = Path(name).stem
        image_path = folder / f"{stem}.png"
        write_image(image_path, result.rgb, result.alpha)
        sidecar = build_sidecar(name, image_path.name, result, reason, {}, [], loaded)
        atomic_write_text(folder / f"{stem}.json", json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
        return [str(image_path), str(folder / f"{stem}.json")]


def with_options(restorer, *, steps: int | None = None, color_fix: str | None = None,
                 fidelity: float | str | None = None, fidelity_map: str | None = None):
    """A per-request view of a shared restorer (same models) with its own steps / colour fix /
    fidelity, for the options the restorer declares (`request_options`); others are left alone.
    A fidelity other than auto, auto±X or a number in [0, 1], or a map that cannot be read, is a
    ValueError."""
    allowed = getattr(restorer, "request_options", ())
    given = (("steps", steps), ("color_fix", color_fix), ("fidelity", fidelity), ("fidelity_map", fidelity_map))
    changes = {k: v for k, v in given if v is not None and k in allowed}
    if not changes:
        return restorer
    convert = {"steps": int, "fidelity": parse_fidelity}
    own = copy.copy(restorer)
    for key, value in changes.items():
        setattr(own, key, convert.get(key, lambda v: v)(value))
    return own
