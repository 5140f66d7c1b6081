"""OARS group filtering on TRL's GRPOTrainer: a group whose rewards are high and flat has nothing
left to teach, so its completions leave the loss.

A group's score is the weighted mean of the rewards each row has: a reward that is None for a row
(TRL stores NaN: `understanding` without tags, `fidelity` without an HR image) is left out and the
other weights renormalised, so missing rewards neither count as 0 nor block the filter. Dropped
rows get advantage 0 and an empty loss mask; the loss of the kept rows is then renormalised, so a
partial drop leaves the kept groups' loss what it would be without the dropped ones. The factor is
global (all rows of the generation batch, on every process): TRL shuffles that batch and splits
it into `steps_per_generation` micro-batches, so a per-micro-batch count would weigh kept rows
by where the shuffle put them.

The subclass overrides two private methods of TRL 1.16's GRPOTrainer (`_calculate_rewards`,
`_generate_and_score_completions`) and wraps `_compute_loss`. Private methods change between
releases without notice, so `check_trl` refuses versions and signatures it was not written for.
"""

from __future__ import annotations

import inspect

import torch
from trl import GRPOTrainer

# Written against TRL 1.16 (trl/trainer/grpo_trainer.py); the signatures are checked at start.
TESTED_TRL = ((1, 16), (1, 17))  # [from, to)
OVERRIDDEN = {
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_generate_and_score_completions": ("self", "inputs"),
    "_compute_loss": ("self", "model", "inputs"),
}
# TRL loss types that average per row (sequence means, or a fixed per-row denominator): rows that
# were dropped still count in it. "dapo", "cispo", "vespo" divide by `num_items_in_batch` (recounted
# after masking) and renormalise by themselves; "bnpo" divides each micro-batch by its own token
# count, so only a micro-batch holding dropped rows alone still counts (as 0) in its average.
PER_ROW_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")
# OARS's thresholds, on the reward's range (`thresholds`): a group above 90 % of it with a spread
# under 5 % of it has nothing left to teach.
DEFAULTS = {"mean_above": 0.9, "std_below": 0.05}
SCALE = "group_filter_scale"  # a 0-dim tensor: TRL's split_tensor_dict/shuffle_sequence_dict pass it on as is


def check_trl(version: str | None = None, cls=GRPOTrainer) -> None:
    """Raise ValueError (one line) unless TRL is a version whose private methods we override."""
    import trl

    version = version or trl.__version__
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    (lo, hi) = TESTED_TRL
    if not lo <= parts < hi:
        raise ValueError(f"group_filter overrides private methods of TRL {lo[0]}.{lo[1]}; "
                         f"TRL {version} is installed: install trl>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} "
                         "or set group_filter: null")
    for name, params in OVERRIDDEN.items():
        found = tuple(inspect.signature(getattr(cls, name)).parameters)
        if found != params:
            raise ValueError(f"group_filter: TRL {version} changed GRPOTrainer.{name}{found}; "
                             "set group_filter: null")


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


class GroupFilteredGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with OARS group filtering (`mean_above`, `std_below` on the weighted group mean)."""

    def __init__(self, *args, mean_above: float = DEFAULTS["mean_above"], std_below: float = DEFAULTS["std_below"],
                 **kwargs):
        """`mean_above`, `std_below` in reward units (`thresholds` converts a config's)."""
        check_trl()
        self.mean_above = float(mean_above)
        self.std_below = float(std_below)
        super().__init__(*args, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._group_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._group_rewards  # every process's rows (TRL gathers them)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        g = self.num_generations if mode == "train" else self.num_generations_eval
        drop = group_drop(self._group_rewards, self.reward_weights, g, self.mean_above, self.std_below)
        rows = drop.repeat_interleave(g)
        n_local = out["advantages"].shape[0]
        start = self.accelerator.process_index * n_local
        local = rows[start:start + n_local].to(out["advantages"].device)
        out["advantages"] = torch.where(local, torch.zeros_like(out["advantages"]), out["advantages"])
        out["completion_mask"] = out["completion_mask"] * (~local).to(out["completion_mask"].dtype)[:, None]
        out[SCALE] = kept_scale(rows.cpu()).to(out["advantages"].device)
        if "num_items_in_batch" in out:  # the token-normalised losses divide by the tokens still counted
            counted = out["completion_mask"] if out.get("tool_mask") is None else out["completion_mask"] * out["tool_mask"]
            out["num_items_in_batch"] = self.accelerator.gather(counted.sum()).sum()
        self._metrics[mode]["group_filter/dropped"].append(float(drop.sum().item()))
        self._metrics[mode]["group_filter/frac_dropped"].append(float(drop.float().mean().item()))
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self.loss_type not in PER_ROW_LOSSES or SCALE not in inputs:
            return loss
        return loss * inputs[SCALE].to(loss.dtype)
