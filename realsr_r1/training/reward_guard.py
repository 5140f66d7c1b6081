"""A reward-hacking guard for RL of the restorer: held-out inputs, scored by metrics not in the reward.

OARS reports that rewarding perceptual gain alone let PSNR collapse (22.7 → 21.4) while the
no-reference score rose. Every `eval.steps`, the held-out inputs are restored by the current model
with fixed seeds (the same noise each time, so a change is the model's) and scored with the
reward and with the metrics that are not in it (`metrics_in`): PSNR/SSIM against the HR, NIQE and
PIQE, less those the reward contains (COMPASS with `quality: niqe` contains NIQE, with `fidelity:
hr` PSNR and SSIM). `guard: {metric: psnr, max_drop: 0.5}` stops the run when that metric falls
`max_drop` below its best (above, for NIQE and PIQE, where lower is better); the best model is kept
(`best-N/`, N its step) and becomes the result. A guard on a metric the reward contains would
watch the reward hack itself, so such a config is refused; without `metric` the guard takes the
first metric outside the reward.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import metrics as M
from ..imageio import atomic_write_bytes, atomic_write_text

GUARD_METRICS = {"psnr": True, "ssim": True, "niqe": False, "piqe": False}  # name → higher is better
# What each visual expert of the rewards registry measures, as guard metrics.
EXPERT_METRICS = {"fidelity": {"psnr", "ssim"}, "niqe": {"niqe"}}


def metrics_in(rewards: dict) -> set[str]:
    """The guard metrics a reward config contains (rewards/registry.py's names and options). A
    `module:function` reward is opaque: nothing is assumed of it."""
    found: set[str] = set()
    for name, value in rewards.items():
        o = value if isinstance(value, dict) else {}
        if name == "irpo_general":
            found |= EXPERT_METRICS["fidelity"]
        elif name == "niqe":
            found |= EXPERT_METRICS["niqe"]
        elif name == "generation":
            found |= EXPERT_METRICS.get(o.get("expert", "fidelity"), set())
        elif name == "compass":
            found |= EXPERT_METRICS.get(o.get("quality", "analyser"), set())
            if o.get("fidelity", "hr") == "hr":
                found |= EXPERT_METRICS["fidelity"]
    return found


def default_metrics(rewards: dict) -> list[str]:
    """The held-out metrics outside the reward, PSNR/SSIM first (they need the HR), PIQE last."""
    inside = metrics_in(rewards)
    return [m for m in GUARD_METRICS if m not in inside]


def check_guard_metric(metric: str | None, rewards: dict) -> str:
    """The guard's metric (`metric`, else the first outside the reward); ValueError (one line) for
    one the reward contains."""
    outside = default_metrics(rewards)
    if metric is None:
        return outside[0]
    if metric in GUARD_METRICS and metric not in outside:
        raise ValueError(f"guard.metric: {metric} is inside the reward, which would watch itself being gamed; "
                         f"choose one outside it ({', '.join(outside)})")
    return metric


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
            from ..niqe import niqe

            try:
                out[name] = float(niqe(sr))
            except ValueError:  # under 96x96 or flat: NIQE cannot judge it
                out[name] = None
        elif name == "piqe":
            from ..piqe import piqe

            try:
                out[name] = float(piqe(sr))
            except ValueError:  # too small for its blocks
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
