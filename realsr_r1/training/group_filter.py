"""OARS group filtering: a group whose rewards are high and flat has nothing left to teach, so its
samples leave the loss (GRPO of the policy: filtered_grpo.py; RL of the restorer: restorer_rl.py).

A group's score is the weighted mean of the rewards each row has: a reward that is None for a row
(TRL stores NaN: `understanding` without tags, `fidelity` without an HR image) is left out and the
other weights renormalised, so missing rewards neither count as 0 nor block the filter. The
thresholds are given on the reward's own range (`thresholds`), so one config means the same on
COMPASS (about −0.45 … 5) as on a [0, 1] reward.
"""

from __future__ import annotations

import torch

# OARS's thresholds, on the reward's range (`thresholds`): a group above 90 % of it with a spread
# under 5 % of it has nothing left to teach.
DEFAULTS = {"mean_above": 0.9, "std_below": 0.05}

def weighted_total(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each row's weight-normalised reward: rewards (rows × funcs, NaN = missing) → one value per
    row, the missing rewards left out and the weights renormalised; NaN for a row with none."""
    present = ~torch.isnan(rewards)
    w = weights.to(rewards.device, rewards.dtype).expand_as(rewards)
    weight_sum = (w.abs() * present).sum(dim=1)
    total = (torch.nan_to_num(rewards) * w).sum(dim=1) / weight_sum.clamp(min=1e-8)
    return torch.where(weight_sum > 0, total, torch.nan)  # a row with no reward at all: no verdict


def thresholds(mean_above: float, std_below: float, funcs: list, weights: list[float]) -> tuple[float, float]:
    """OARS's thresholds as a config gives them, on the reward's own range (0 = the lowest weighted
    total the rewards can give, 1 = the highest), in reward units: COMPASS spans about −0.45 … 5,
    the other rewards 0 … 1, so one `mean_above: 0.9` means "90 % of the way to the best" on every
    reward. Each function's `reward_range` (rewards/registry.py) gives its range; ValueError (one
    line) for a threshold outside [0, 1] or a reward without a range."""
    for key, value in (("mean_above", mean_above), ("std_below", std_below)):
        if not 0 <= value <= 1:
            raise ValueError(f"group_filter.{key}: {value:g} is outside the reward's range, given from 0 "
                             "(its lowest) to 1 (its highest)")
    ranges = [getattr(f, "reward_range", None) for f in funcs]
    missing = [getattr(f, "__name__", "?") for f, r in zip(funcs, ranges) if r is None]
    if missing:
        raise ValueError(f"group_filter: reward {missing[0]} has no known range (give its function a "
                         "`reward_range = (lowest, highest)` attribute), or set group_filter: null")
    total = sum(abs(w) for w in weights)
    lo = sum(min(w * a, w * b) for w, (a, b) in zip(weights, ranges)) / total
    hi = sum(max(w * a, w * b) for w, (a, b) in zip(weights, ranges)) / total
    return lo + float(mean_above) * (hi - lo), float(std_below) * (hi - lo)


def group_drop(rewards: torch.Tensor, weights: torch.Tensor, group_size: int, mean_above: float,
               std_below: float) -> torch.Tensor:
    """Which groups to drop: rewards (rows × funcs, NaN = missing) → one bool per group; thresholds
    in reward units (`thresholds`)."""
    groups = weighted_total(rewards, weights).view(-1, group_size)
    # std of a group of one is NaN, and a group with a row of no rewards is never judged flat
    return (groups.mean(dim=1) > mean_above) & (groups.std(dim=1) < std_below)


def kept_scale(drop_rows: torch.Tensor) -> torch.Tensor:
    """rows / kept rows of the whole generation batch (0 when every row was dropped: nothing to learn)."""
    kept = (~drop_rows).sum()
    return torch.where(kept > 0, drop_rows.numel() / kept.clamp(min=1), torch.zeros(()))
