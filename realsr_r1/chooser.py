"""Choosing the restoration: candidates from several experts, picked by a no-reference reward.

The lite profile's experts sit at two ends of the perception–distortion trade-off on real photos:
Real-ESRGAN x4plus is clean but smooths texture, RealSR DF2K is faithful but keeps noise. Per image,
the candidates are each expert's output and blends of neighbouring experts at the `blends` weights
(pixel blends: the two networks were trained apart, so mixing their weights is not clean).

The reward is one from the rewards registry, the same code GRPO and the restorer's RL train with:
by default OARS's COMPASS with NIQE for quality and consistency with the input for fidelity,
R = F·Q_LR + F^(Q_LR/γ)·(Q_SR − Q_LR). Q_LR, the input's quality, is where the reasoning enters:
it is read from the chain of thought's <degradation> (rewards.visual.reading_quality). A clean
reading makes fidelity count (the faithful end); a heavy one leaves more freedom to look natural.
So two degradation readings can give two different images, and GRPO's generation reward sees it.

The candidates and the crops they are scored on are restorers/blend.py's; LiteStages makes them and
hands them here (profiles.py gives it this chooser), so the restorers never import the rewards.
"""

from __future__ import annotations

import numpy as np

from .cot import Plan

DEFAULT_REWARD = {"compass": {"quality": "niqe", "fidelity": "input", "gamma": 7.0}}


class Chooser:
    """Picks a candidate by a reward from the rewards registry (`reward`: `{name: options}`)."""

    def __init__(self, reward: dict | None = None, device: str = "cpu"):
        """`reward`: one image reward as a training config names it (rewards/registry.py), e.g.
        `{"compass": {"quality": "niqe", "fidelity": "input"}}` or `{"my_module:my_reward": {}}`."""
        from .rewards.registry import build_image_rewards

        spec = dict(DEFAULT_REWARD if reward is None else reward)
        if len(spec) != 1:
            raise ValueError(f"one reward (name: options), got {', '.join(spec) or 'none'}")
        self.name, options = next(iter(spec.items()))
        self.options = dict(options or {}) if isinstance(options, dict) else {"weight": options}
        self.options.pop("weight", None)  # one reward: its weight changes no choice
        (self.score,), _ = build_image_rewards({self.name: self.options or 1.0}, device=device)

    def describe(self) -> dict:
        return {"reward": self.name, **self.options}

    def measure(self, crops: list[list[np.ndarray]], lq_crops: list[np.ndarray]) -> list[dict]:
        """Plan-free scores of each candidate (a list of crops each), averaged over its crops."""
        n = len(crops)
        flat = [c for cand in crops for c in cand]
        lqs = lq_crops * n
        k = len(lq_crops)
        if hasattr(self.score, "parts"):
            parts = self.score.parts(flat, lqs, [None] * len(flat))
            return [_mean_dicts(parts[i * k:(i + 1) * k]) for i in range(n)]
        values = self.score(flat, lqs, [None] * len(flat))
        return [{"reward": _mean([v for v in values[i * k:(i + 1) * k] if v is not None])} for i in range(n)]

    def input_quality(self, plan: Plan | None, lq_crops: list[np.ndarray]) -> tuple[float | None, str]:
        """Q_LR and where it came from: the plan's degradation reading, else measured on the input."""
        from .rewards.visual import reading_quality

        if plan is not None and plan.degradation:
            return reading_quality(plan.degradation), "degradation reading"
        if hasattr(self.score, "input_quality"):
            return _mean([v for v in self.score.input_quality(lq_crops) if v is not None]), "measured on the input"
        return None, "unused"

    def choose(self, measured: list[dict], plan: Plan | None, lq_crops: list[np.ndarray],
               allowed: list[int] | None = None) -> tuple[int, list[float | None], dict]:
        """(winner's index among `allowed` (default all), each candidate's reward, facts for the record)."""
        q_lr, source = self.input_quality(plan, lq_crops)
        if hasattr(self.score, "combine"):
            rewards = self.score.combine(measured, [q_lr] * len(measured))
        else:
            rewards = [m.get("reward") for m in measured]
        allowed = range(len(measured)) if allowed is None else allowed
        valid = [i for i in allowed if rewards[i] is not None]
        best = max(valid, key=lambda i: rewards[i]) if valid else min(allowed)
        return best, rewards, {"q_lr": None if q_lr is None else round(q_lr, 4), "q_lr_source": source}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _mean_dicts(items: list[dict]) -> dict:
    keys = items[0].keys() if items else ()
    return {k: _mean([d[k] for d in items if d.get(k) is not None]) for k in keys}
