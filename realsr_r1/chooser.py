"""Choosing the restoration: a reward from the rewards registry scores candidate images.

The lite profile's experts sit at two ends of the perception–distortion trade-off on real photos:
Real-ESRGAN x4plus is clean but smooths texture, RealSR DF2K is faithful but keeps noise. Per region
of a photo, restorers/lite.py offers positions on the fidelity ladder (restorers/ladder.py) and this
chooser scores them; the full profile's final stage offers its samples the same way.

The reward is one from the rewards registry, the same ImageReward GRPO and the restorer's RL train
with: by default OARS's COMPASS with NIQE for quality and consistency with the input for fidelity,
R = F·Q_LR + F^(Q_LR/γ)·(Q_SR − Q_LR). Q_LR, the input's quality, is where the reasoning enters:
it is read from the chain of thought's <degradation> (rewards.visual.reading_quality), as training
reads it from the dataset's recorded degradation. A clean reading makes fidelity count (the
faithful end); a heavy one leaves more freedom to look natural. Without a reading, Q_LR is
measured on the input, in training as here.
"""

from __future__ import annotations

import numpy as np

from .cot import Plan

DEFAULT_REWARD = {"compass": {}}  # the registry's COMPASS_DEFAULTS: NIQE for Q, the input for F


class Chooser:
    """Picks among candidate images by one image reward (`reward`: `{name: options}`)."""

    def __init__(self, reward: dict | None = None, device: str = "cpu"):
        """`reward`: one image reward as a training config names it (rewards/registry.py), e.g.
        `{"compass": {"quality": "niqe", "fidelity": "input"}}` or `{"my_module:my_reward": {}}`."""
        from .rewards.registry import COMPASS_DEFAULTS, check_image_rewards, image_score

        spec = dict(DEFAULT_REWARD if reward is None else reward)
        if len(spec) != 1:
            raise ValueError(f"one reward (name: options), got {', '.join(spec) or 'none'}")
        check_image_rewards(spec)
        self.name, options = next(iter(spec.items()))
        self.options = dict(options or {}) if isinstance(options, dict) else {"weight": options}
        self.options.pop("weight", None)  # one reward: its weight changes no choice
        if self.name == "compass":
            self.options = {**COMPASS_DEFAULTS, **self.options}
        self.reward = image_score(self.name, dict(self.options), device)
        if self.reward.needs_hr:
            raise ValueError(f"{self.name} with these options scores against the HR image, which a restoration "
                             f"does not have (compass: use fidelity: input)")

    def describe(self) -> dict:
        return {"reward": self.name, **self.options}

    def measure(self, images: list[np.ndarray], lqs: list[np.ndarray]) -> list[dict]:
        """The reward's parts that do not depend on Q_LR, per image (its LQ beside it)."""
        return self.reward.parts(images, lqs, [None] * len(images))

    def input_quality(self, plan: Plan | None, lq: np.ndarray | None) -> tuple[float | None, str]:
        """Q_LR and where it came from: the plan's degradation reading, else measured on `lq`."""
        from .rewards.visual import q_lr_for

        if not self.reward.uses_q_lr:
            return None, "unused"
        if plan is not None and plan.degradation:
            return q_lr_for(plan.degradation), "degradation reading"
        if lq is None:
            return None, "unused"
        return self.reward.input_quality([lq])[0], "measured on the input"

    def rewards(self, measured: list[dict], q_lr: float | None) -> list[float | None]:
        return self.reward.combine(measured, [q_lr] * len(measured))

    def choose(self, measured: list[dict], plan: Plan | None, lq: np.ndarray | None,
               allowed: list[int] | None = None) -> tuple[int, list[float | None], dict]:
        """(winner's index among `allowed` (default all), each candidate's reward, facts for the record)."""
        q_lr, source = self.input_quality(plan, lq)
        rewards = self.rewards(measured, q_lr)
        allowed = range(len(measured)) if allowed is None else allowed
        valid = [i for i in allowed if rewards[i] is not None]
        best = max(valid, key=lambda i: rewards[i]) if valid else min(allowed)
        return best, rewards, {"q_lr": None if q_lr is None else round(q_lr, 4), "q_lr_source": source}
