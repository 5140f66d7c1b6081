"""OARS group filtering on TRL's GRPOTrainer: a group whose rewards are high and flat has nothing
left to teach, so its completions leave the loss (the filter itself: group_filter.py).

Dropped rows get advantage 0 and an empty loss mask; the loss of the kept rows is then renormalised, so a
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

from .group_filter import DEFAULTS, group_drop, kept_scale

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
