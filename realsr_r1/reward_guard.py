"""A reward-hacking guard for RL of the restorer: held-out inputs, scored by metrics not in the reward.

OARS reports that rewarding perceptual gain alone let PSNR collapse (22.7 → 21.4) while the
no-reference score rose. Every `eval.steps`, the held-out inputs are restored by the current model
with fixed seeds (the same noise each time, so a change is the model's) and scored with the
reward and with metrics that are not in it: PSNR/SSIM against the HR when the reward is
no-reference, NIQE when it is full-reference. `guard: {metric: psnr, max_drop: 0.5}` stops the run
when that metric falls `max_drop` below its best (above, for NIQE, where lower is better); the
best model is kept (`best-N/`, N its step) and becomes the result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics as M
from .imageio import atomic_write_bytes, atomic_write_text

GUARD_METRICS = {"psnr": True, "ssim": True, "niqe": False}  # name → higher is better
FULL_REFERENCE_REWARDS = ("fidelity", "irpo_general")


def default_metrics(rewards: dict) -> list[str]:
    """Metrics outside the reward: NIQE for a full-reference reward, PSNR/SSIM for a no-reference one."""
    full_reference = any(name in FULL_REFERENCE_REWARDS or (isinstance(o, dict) and o.get("expert") == "fidelity")
                         or name == "compass" for name, o in rewards.items())
    return ["niqe"] if full_reference else ["psnr", "ssim"]


def score_image(sr: np.ndarray, hr: np.ndarray | None, names: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in names:
        if name in ("psnr", "ssim"):
            if hr is None:
                out[name] = None
                continue
            fn = M.psnr if name == "psnr" else M.ssim
            out[name] = float(fn(M.as_batch(sr), M.as_batch(hr))[0])
        elif name == "niqe":
            from .niqe import niqe

            try:
                out[name] = float(niqe(sr))
            except ValueError:  # under 96x96 or flat: NIQE cannot judge it
                out[name] = None
        else:
            raise ValueError(f"eval.metrics: unknown metric {name!r} (use {', '.join(GUARD_METRICS)})")
    return out


def mean_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


@dataclass
class Guard:
    """Tracks the held-out metric's best value; `check` says "best", "ok" or "tripped"."""

    metric: str
    max_drop: float
    best: float | None = None
    best_step: int | None = None
    tripped_at: int | None = None
    history: list = field(default_factory=list)

    def __post_init__(self):
        if self.metric not in GUARD_METRICS:
            raise ValueError(f"guard.metric: {self.metric!r} is not one of {', '.join(GUARD_METRICS)}")
        if not self.max_drop > 0:
            raise ValueError(f"guard.max_drop: must be > 0, got {self.max_drop}")

    def drop(self, value: float) -> float:
        """How far `value` is below the best (positive = worse), in the metric's units."""
        if self.best is None:
            return 0.0
        return (self.best - value) if GUARD_METRICS[self.metric] else (value - self.best)

    def check(self, step: int, value: float | None) -> str:
        if value is None:
            raise ValueError(f"guard: the held-out {self.metric} could not be computed (HR missing, or images "
                             "under 96x96 for NIQE); choose another guard.metric")
        self.history.append((step, value))
        if self.best is None or self.drop(value) < 0:
            self.best, self.best_step = value, step
            return "best"
        if self.drop(value) > self.max_drop:
            self.tripped_at = step
            return "tripped"
        return "ok"

    def state(self) -> dict:
        return {"metric": self.metric, "max_drop": self.max_drop, "best": self.best, "best_step": self.best_step,
                "tripped_at": self.tripped_at, "history": self.history}

    def load(self, state: dict) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.tripped_at = state.get("tripped_at")
        self.history = [tuple(h) for h in state.get("history", [])]


def write_report(rows: list[dict], folder: Path) -> None:
    """eval.md (a table, one row per evaluation) and eval.png (each column against the step)."""
    if not rows:
        return
    columns = [k for k in rows[0] if k != "step"]
    lines = ["| step | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = ["–" if row.get(c) is None else f"{row[c]:.4f}" for c in columns]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    atomic_write_text(Path(folder) / "eval.md", "\n".join(lines) + "\n")
    atomic_write_bytes(Path(folder) / "eval.png", curves_png(rows, columns))


def curves_png(rows: list[dict], columns: list[str]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns) + 0.6, 3.0), squeeze=False)
    for ax, name in zip(axes[0], columns):
        pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        better = GUARD_METRICS.get(name)
        ax.set_title(name + ("" if better is None else (" ↑" if better else " ↓")), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def read_rows(path: Path, up_to: int | None = None) -> list[dict]:
    """A JSONL log's rows (those of steps ≤ `up_to`: a resumed run drops what came after its checkpoint)."""
    if not Path(path).is_file():
        return []
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if up_to is None or r.get("step", 0) <= up_to]
