"""`python -m realsr_r1.train restorer`: online RL of the diffusion restorer (OARS), DiffusionNFT, LoRA.

    python -m realsr_r1.train restorer --config configs/restorer-fr.yaml [--resume] [--set key=value ...]

Each step, for each of `inputs_per_step` training inputs (per process):
1. its conditioning text (`conditioning`: policy | caption | analyser; restorer_rollouts.py);
2. K = `samples` samples of the trained `stage` with the old model, each from its own noise, in
   `sampling_steps` sampler steps (OARS: 24 samples, 6 steps), the stages before it as inference
   makes them;
3. rewards from the registry (image rewards only: generation, compass, irpo_general, niqe, or a
   `module:function`), their weighted total group-normalised into advantages; OARS groups whose
   mean is above `group_filter.mean_above` and std below `std_below` (both on the reward's range,
   0 = its lowest, 1 = its highest) are dropped (group_filter.py,
   shared with GRPO);
4. the DiffusionNFT loss (nft.py) on each kept sample's clean latent, noised to a random timestep
   the sampler visits, then one optimizer step and the old model's EMA step.

The engine is `accelerate` (DDP across GPUs under `accelerate launch`, `mixed_precision`), in the
manner of diffusers' training examples. Every `save_steps` a checkpoint-N folder holds the trained
and old weights, the optimizer, the RNG states and the guard; `--resume` continues from the last
one at the same step. Rollout noise and training noise come from generators seeded by (seed, step,
input, sample), so a resumed run makes the same samples as an uninterrupted one. Each step appends
one row to `output_dir/log.jsonl`: per reward its mean and std, the loss terms, groups dropped.
Every `eval.steps` the held-out inputs are scored (reward_guard.py: eval.jsonl, eval.md, eval.png)
and the optional `guard` may stop the run. The result goes to `output_dir/adapter` (the best model
when the guard stopped the run): `python -m realsr_r1.infer --profile full --restorer-adapter DIR`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..imageio import atomic_write_text, new_temp_dir
from ..profiles import ConfigError
from ..restorers.memory import OutOfMemoryError
from .common import LOG_FILE, inference_profile, say
from .group_filter import DEFAULTS as GROUP_FILTER

log = logging.getLogger(__name__)

EVAL_FILE = "eval.jsonl"
# Every key of a restorer RL config and its default (configs/restorer-*.yaml set what they choose).
DEFAULTS = {
    "data": None,                # a folder from `python -m realsr_r1.data build`
    "output_dir": "runs/restorer",
    "restorer": {"profile": "full"},  # a profile's restorer section + overrides (scale, seed: rendering)
    "conditioning": "analyser",  # policy | caption | analyser
    "policy": None,              # the frozen policy for `conditioning: policy` (a profile's policy section)
    "stage": "final",            # the stage trained: rough | middle | final
    "samples": 24,               # K per input (OARS)
    "rollout_batch": None,       # samples per denoising call (default: all K at once; halved on out-of-memory)
    "inputs_per_step": 1,        # per process
    "sampling_steps": 6,         # sampler steps of a rollout (OARS)
    "rewards": None,
    "group_filter": dict(GROUP_FILTER),  # OARS's thresholds, on the reward's range (group_filter.py)
    "nft": {"beta": 1.0, "adv_clip": 5.0, "kl_beta": 0.0, "timesteps_per_sample": 1,
            "ema": {"flat": 0, "rate": 0.001, "max_decay": 0.5}},
    "lora": {"r": 32, "alpha": 64},  # null: full fine-tuning
    "init_adapter": None,        # start from a trained adapter (restorer-nr continues restorer-fr)
    "optimizer": {"learning_rate": 3.0e-4, "weight_decay": 0.0, "max_grad_norm": 1.0},
    "max_steps": 100,
    "micro_batch": 8,            # samples per UNet forward in the loss (halved on out-of-memory)
    "save_steps": 50,
    "save_total_limit": 2,
    "eval": {"steps": 25, "count": 4, "data": None, "seed": 1234, "samples": 1, "metrics": None},
    "guard": None,               # {metric: psnr | ssim | niqe, max_drop: …}
    "mixed_precision": "no",     # no | fp16 | bf16 (accelerate)
    "gradient_checkpointing": False,
    "onestep": {"loss_space": "image", "train_vae": False},  # the one-step restorer's RL (onestep_rl.py)
    "seed": 0,
}
SECTIONS = ("nft", "optimizer", "eval", "group_filter", "onestep")


# --- Config --------------------------------------------------------------------------------------
def resolve_config(cfg: dict) -> dict:
    """The config over DEFAULTS (sections merged key by key), every key checked: one-line errors."""
    from ..profiles import _hint

    for key in cfg:
        if key not in DEFAULTS:
            raise ConfigError(f"{key}: unknown restorer training key{_hint(key, list(DEFAULTS))}")
    out = copy.deepcopy(DEFAULTS)
    for key, value in cfg.items():
        if key in SECTIONS and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (key: value lines), got {value!r}")
            for sub in value:
                if sub not in DEFAULTS[key] and not (key == "nft" and sub == "ema"):
                    raise ConfigError(f"{key}.{sub}: unknown key{_hint(sub, list(DEFAULTS[key]))}")
            merged = {**DEFAULTS[key], **value}
            if key == "nft":
                merged["ema"] = {**DEFAULTS["nft"]["ema"], **(value.get("ema") or {})}
            out[key] = merged
        else:
            out[key] = value
    if out["group_filter"] is None and "group_filter" in cfg:
        out["group_filter"] = None
    if not out.get("data"):
        raise ConfigError("data: not set (a folder from `python -m realsr_r1.data build`; --set data=DIR)")
    if not out.get("rewards"):
        raise ConfigError("rewards: not set (image rewards: generation, compass, irpo_general, niqe)")
    from ..cot import STAGES
    from .restorer_rollouts import CONDITIONING
    from ..rewards.registry import check_image_rewards

    try:
        check_image_rewards(out["rewards"])
    except ValueError as e:
        raise ConfigError(str(e)) from None

    if out["stage"] not in STAGES:
        raise ConfigError(f"stage: {out['stage']!r} is not one of {', '.join(STAGES)}")
    if out["conditioning"] not in CONDITIONING:
        raise ConfigError(f"conditioning: {out['conditioning']!r} is not one of {', '.join(CONDITIONING)}")
    for key in ("samples", "inputs_per_step", "sampling_steps", "max_steps", "micro_batch", "save_steps"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise ConfigError(f"{key}: expected a whole number ≥ 1, got {out[key]!r}")
    if out["samples"] < 2:
        raise ConfigError("samples: need ≥ 2 per input (advantages are relative to the group)")
    if out.get("init_adapter") and out["lora"] is None:
        raise ConfigError("init_adapter: continues a LoRA run (lora: …); full fine-tuning starts from a whole "
                          "model folder instead: --set restorer.model=DIR")
    if out["mixed_precision"] not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision: {out['mixed_precision']!r} is not one of no, fp16, bf16")
    if out["guard"] is not None:
        from .reward_guard import Guard, check_guard_metric

        g = out["guard"]
        if not isinstance(g, dict) or set(g) - {"metric", "max_drop"}:
            raise ConfigError(f"guard: expected {{metric: psnr | ssim | niqe | piqe, max_drop: …}}, got {g!r}")
        try:
            metric = check_guard_metric(g.get("metric"), out["rewards"])
            Guard(str(metric), float(g.get("max_drop", 0.5)))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        out["guard"] = {**g, "metric": metric}
    return out


def _section(cfg: dict, key: str) -> tuple[dict, dict]:
    """A `profile:`-based section (restorer, policy) and its rendering keys (common.profile_section)."""
    from .common import profile_section

    return profile_section(cfg, key)


def _policy_section(cfg: dict) -> dict:
    return _section(cfg, "policy")[0]


# --- Data ----------------------------------------------------------------------------------------
def _rows(data_dir) -> list[dict]:
    from .data import load_dataset

    ds = load_dataset(Path(data_dir))
    columns = [c for c in ds.column_names if c in ("image", "caption", "hr_path", "lq_path", "seed")]
    return [{c: ds[i][c] for c in columns} for i in range(len(ds))]


def split_rows(cfg: dict) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): `eval.data` when set, else the last `eval.count` rows."""
    rows = _rows(cfg["data"])
    ev = cfg["eval"]
    if ev.get("data"):
        return rows, _rows(ev["data"])[: int(ev["count"])]
    count = int(ev["count"])
    if count >= len(rows):
        raise ConfigError(f"eval.count: {count} held-out inputs leave none of the {len(rows)} to train on; "
                          "lower it or set eval.data")
    return rows[: len(rows) - count], rows[len(rows) - count:]


def _seed(*parts: int) -> int:
    """A generator seed from (seed, step, input, sample): the same draw wherever a run resumes."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class RestorerRL:
    """One training run (module doc)."""

    def __init__(self, cfg: dict, *, resume: bool = False, overwrite: bool = False, policy_texts=None):
        """`policy_texts` (joint training) writes each input's conditioning with the live policy."""
        from accelerate import Accelerator

        from .restorer_rollouts import PolicyTexts
        from ..rewards.registry import build_image_rewards

        from accelerate.utils import set_seed

        self.cfg = cfg = resolve_config(cfg)
        if cfg["conditioning"] == "policy" and policy_texts is None and not cfg.get("policy"):
            raise ConfigError("policy: `conditioning: policy` needs a policy section (e.g. {profile: full})")
        self.out = Path(cfg["output_dir"])
        # cpu=True without CUDA: accelerate then runs a torchrun/accelerate-launch job as MULTI_CPU
        # over gloo (state.py `_prepare_backend`); without it each CPU process would train alone.
        self.accelerator = Accelerator(mixed_precision=cfg["mixed_precision"], cpu=not torch.cuda.is_available())
        set_seed(int(cfg["seed"]))  # the LoRA's random init: the same run from the same seed
        self.device = str(self.accelerator.device)
        restorer_cfg, render = _section(cfg, "restorer")
        self.scale = float(render.get("scale", 4.0))
        self._setup_model(restorer_cfg)
        self.funcs, weights = build_image_rewards(cfg["rewards"], device=self.device)
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.names = [f.__name__ for f in self.funcs]
        self.drop_at = None  # the group filter's thresholds in reward units
        if cfg["group_filter"] is not None:
            from .group_filter import thresholds

            gf = cfg["group_filter"]
            try:
                self.drop_at = thresholds(float(gf["mean_above"]), float(gf["std_below"]), self.funcs, weights)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        opt = cfg["optimizer"]
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=float(opt["learning_rate"]),
                                           weight_decay=float(opt["weight_decay"]))
        *modules, self.optimizer = self.accelerator.prepare(*self._modules(), self.optimizer)
        self.unet = modules[0]
        self.train_rows, self.eval_rows = split_rows(cfg)
        # What fits in memory: halved on out-of-memory (`_halve`) and kept for the rest of the run.
        self.rollout_batch = int(cfg["rollout_batch"] or cfg["samples"])
        self.micro_batch = int(cfg["micro_batch"])
        self.policy_texts = policy_texts
        if cfg["conditioning"] == "policy" and policy_texts is None:
            self.policy_texts = PolicyTexts(_policy_section(cfg), self.out / "conditioning.jsonl", self.device)
        self.step = 0
        self._said: set[str] = set()  # the out-of-memory notes already given
        self.guard = None
        if cfg["guard"] is not None:
            from .reward_guard import Guard

            self.guard = Guard(str(cfg["guard"]["metric"]), float(cfg["guard"].get("max_drop", 0.5)))
        self.metric_names = list(cfg["eval"].get("metrics") or [])
        if not self.metric_names:
            from .reward_guard import default_metrics

            self.metric_names = default_metrics(cfg["rewards"])
        if self.guard is not None and self.guard.metric not in self.metric_names:
            self.metric_names.append(self.guard.metric)
        self._checkpoint_start(resume, overwrite)

    def _setup_model(self, restorer_cfg: dict) -> None:
        """The restorer (`self.stages`) and its trainable views (`self.model`): the x4 upscaler's."""
        from ..profiles import build_restorer
        from .nft import PREDICTION_TYPES
        from .trainable import TrainableUpscaler

        cfg = self.cfg
        if restorer_cfg.get("type") != "diffusion":
            raise ConfigError("restorer: RL trains a diffusion restorer (`type: diffusion` or `onestep`, e.g. "
                              "profile: full)")
        if cfg["stage"] == "rough" and restorer_cfg.get("rough", "realesrgan") == "realesrgan":
            raise ConfigError("stage: rough is made by Real-ESRGAN in this restorer (rough: realesrgan), not by "
                              "diffusion; train middle or final, or set restorer.rough: diffusion")
        self.stages = build_restorer(restorer_cfg, device=self.device)
        self.prediction_type = self.stages.pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"restorer: the scheduler predicts {self.prediction_type!r}; DiffusionNFT here "
                              f"supports {', '.join(PREDICTION_TYPES)}")
        if cfg["lora"] is None and self.stages.dtype != torch.float32 and cfg["mixed_precision"] == "no":
            raise ConfigError(f"lora: null trains the UNet in fp32 over a {self.stages.precision} pipeline: set "
                              "mixed_precision: bf16 (or fp16), or restorer.dtype: fp32")
        nft = cfg["nft"]
        self.model = TrainableUpscaler(self.stages.pipe, lora=None if cfg["lora"] is None else dict(cfg["lora"]),
                                       kl=float(nft["kl_beta"]) > 0, init_adapter=cfg.get("init_adapter"),
                                       gradient_checkpointing=bool(cfg["gradient_checkpointing"]))

    def _modules(self) -> list:
        """The trained modules, for accelerate.prepare (DDP wraps each)."""
        return [self.model.unet]

    # checkpoints --------------------------------------------------------------------------------
    def _checkpoints(self) -> list[Path]:
        found = [p for p in self.out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
                 and (p / "state.pt").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def _checkpoint_start(self, resume: bool, overwrite: bool = False) -> None:
        from .common import clear_checkpoints

        if overwrite:
            clear_checkpoints(self.out, files=(LOG_FILE, EVAL_FILE), prefixes=("checkpoint", "best"))
        found = self._checkpoints() if self.out.is_dir() and not overwrite else []
        if resume and not found:
            raise ConfigError(f"--resume: no checkpoint-N folder in {self.out}")
        if found and not resume:
            raise ConfigError(f"{self.out} already has {found[-1].name}: pass --resume to continue it, "
                              "or choose another output_dir")
        if found:
            self.load_checkpoint(found[-1])

    def save_checkpoint(self) -> Path:
        dest = self.out / f"checkpoint-{self.step}"
        if self.accelerator.is_main_process:
            tmp = new_temp_dir(dest)
            state = {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "guard": None if self.guard is None else self.guard.state(),
                     "scaler": None if self.accelerator.scaler is None else self.accelerator.scaler.state_dict(),
                     "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
            torch.save(state, tmp / "state.pt")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
            for old in self._checkpoints()[:-int(self.cfg["save_total_limit"])]:
                shutil.rmtree(old, ignore_errors=True)
            self._prune_best()
        self.accelerator.wait_for_everyone()
        return dest

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if self.guard is not None and state.get("guard"):
            self.guard.load(state["guard"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.accelerator.is_main_process:
            self._prune_best(newer_than=self.step)
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        for name in (LOG_FILE, EVAL_FILE):  # what came after the checkpoint is made again
            if self.accelerator.is_main_process and (self.out / name).is_file():
                from .reward_guard import read_rows

                kept = read_rows(self.out / name, up_to=self.step)
                atomic_write_text(self.out / name, "".join(json.dumps(r) + "\n" for r in kept))
        log.warning("resumed from %s (step %d)", path, self.step)

    # one step -------------------------------------------------------------------------------------
    def _plan(self, row: dict, rgb: np.ndarray):
        from .restorer_rollouts import plan_for

        return plan_for(self.cfg["conditioning"], row, rgb, self.policy_texts)

    @staticmethod
    def _rgb(row: dict) -> np.ndarray:
        """The row's LQ image as HxWx3."""
        from ..rewards.visual import as_rgb

        return np.asarray(row["image"].convert("RGB")) if hasattr(row["image"], "convert") else as_rgb(row["image"])

    def _rollout(self, row: dict, seeds: list[int], index: int, which: str = "old"):
        from .restorer_rollouts import sample_stage

        rgb = self._rgb(row)
        plan = self._plan(row, rgb)
        retries = self.stages.fp32_retries
        # Under the run's autocast, as the loss forward: full fine-tuning keeps the UNet (and its old
        # copy) in fp32 over a bf16/fp16 pipeline, whose text embeddings and latents are half.
        while True:
            try:
                # A LoRA trains its stage alone: the stages before it are the base model's, as in inference
                base = (lambda: self.model.use("base")) if self.model.lora is not None else None
                with self.model.use(which), self.accelerator.autocast():
                    out = sample_stage(self.stages, rgb, plan, stage=self.cfg["stage"], scale=self.scale,
                                       seeds=seeds, steps=int(self.cfg["sampling_steps"]),
                                       previous_seed=_seed(self.cfg["seed"], index), batch=self.rollout_batch,
                                       previous_weights=base)
                break
            except OutOfMemoryError:
                self.rollout_batch = self._halve("rollout_batch", self.rollout_batch)
        if self.stages.fp32_retries != retries:  # inference's NaN retry recast the pipeline, trained weights too
            self.model.keep_fp32()
            log.warning("a stage before the trained one made NaNs in %s and was redone in fp32; the trained "
                        "weights are fp32 again (rounded once to %s)", self.stages.precision, self.stages.precision)
        return rgb, out

    def _score(self, images: list[np.ndarray], rgb: np.ndarray, row: dict) -> torch.Tensor:
        """Rewards (samples × funcs, NaN where a reward cannot judge). Q_LR comes from the row's
        recorded degradation where it has one, as the lite chooser takes it from the reading
        (rewards.visual.ImageReward)."""
        from ..rewards.visual import q_lr_for, reference_for, to_float

        lq = [to_float(rgb)] * len(images)
        hr = [reference_for(row.get("hr_path"), s) for s in images]
        q_lr = [q_lr_for(row.get("degradation"))] * len(images)
        cols = []
        for fn in self.funcs:
            values = fn(images, lq, hr, q_lr=q_lr)
            cols.append([math.nan if v is None else float(v) for v in values])
        return torch.tensor(cols, dtype=torch.float32).T

    def _inputs_for_step(self) -> list[tuple[int, dict]]:
        """This process's inputs for the current step: a fresh permutation per epoch (seeded)."""
        n = len(self.train_rows)
        per = int(self.cfg["inputs_per_step"]) * self.accelerator.num_processes
        out = []
        for j in range(int(self.cfg["inputs_per_step"])):
            k = self.step * per + self.accelerator.process_index * int(self.cfg["inputs_per_step"]) + j
            epoch, pos = divmod(k, n)
            order = np.random.default_rng(_seed(self.cfg["seed"], 7, epoch)).permutation(n)
            out.append((int(order[pos]), self.train_rows[int(order[pos])]))
        return out

    def train_step(self) -> dict:
        from .group_filter import group_drop, weighted_total
        from .nft import group_advantages, optimality

        cfg, k = self.cfg, int(self.cfg["samples"])
        t0 = time.perf_counter()
        rollouts, rewards, indices = [], [], []
        for index, row in self._inputs_for_step():
            seeds = [_seed(cfg["seed"], self.step, index, s) for s in range(k)]
            rgb, ro = self._rollout(row, seeds, index)
            rollouts.append(ro)
            indices.append(index)
            rewards.append(self._score(ro.images, rgb, row))
        t_rollout = time.perf_counter() - t0
        rewards = torch.cat(rewards)  # (inputs·K) × funcs
        total = weighted_total(rewards, self.weights)
        drop = (group_drop(rewards, self.weights, k, *self.drop_at)
                if self.drop_at is not None else torch.zeros(len(rollouts), dtype=torch.bool))
        finite = torch.cat([torch.isfinite(ro.latents).flatten(1).all(dim=1) for ro in rollouts])
        total = torch.where(finite, total, torch.nan)  # a sample that diverged is no evidence either way
        adv = group_advantages(total, k)  # NaN rewards are left out of their group's statistics
        r = optimality(adv, float(cfg["nft"]["adv_clip"]))
        keep = (~drop).repeat_interleave(k) & ~torch.isnan(total)
        acc = self.accelerator
        anything = bool(acc.gather(keep.any()[None].to(acc.device)).any())
        terms = self._update(rollouts, indices, r, keep) if anything else {}
        stats = self._stats(rewards, drop, terms, t_rollout, time.perf_counter() - t0)
        self.step += 1
        return stats

    def _halve(self, key: str, value: int) -> int:
        """Half of `value` after an out-of-memory error, said once per key; raises at 1."""
        from ..restorers.memory import free_cached

        if value <= 1:
            raise OutOfMemoryError(f"out of memory with {key} 1: nothing left to halve (try a smaller "
                                   "stage, gradient_checkpointing: true or lora)")
        free_cached()
        half = max(1, value // 2)
        if key not in self._said:
            self._said.add(key)
            log.warning("out of memory: %s %d → %d for the rest of the run (and halved again if need be)",
                        key, value, half)
        return half

    def _update(self, rollouts, indices: list[int], r: torch.Tensor, keep: torch.Tensor) -> dict:
        """_update_once, halving `micro_batch` while the loss forward runs out of memory (the whole
        step again: the gradients of the micro-batches before the failure are dropped)."""
        while True:
            try:
                return self._update_once(rollouts, indices, r, keep)
            except OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                self.micro_batch = self._halve("micro_batch", self.micro_batch)

    def _update_once(self, rollouts, indices: list[int], r: torch.Tensor, keep: torch.Tensor) -> dict:
        """One optimizer step of the NFT loss over the kept samples, then the old model's EMA step."""
        from .nft import alpha_bar, nft_loss

        cfg, nft, acc = self.cfg, self.cfg["nft"], self.accelerator
        sched = self.stages.pipe.scheduler
        weight, denom, batches = self._micro_batches(rollouts, indices, keep)
        dev = self.stages.pipe._execution_device
        dtype = self.stages.dtype
        sums = {"loss": 0.0, "loss_positive": 0.0, "loss_negative": 0.0, "kl": 0.0}
        for n, (ro, idx, offset, gen) in enumerate(batches):
            w = weight[offset + idx] / denom
            x0_b = torch.nan_to_num(ro.latents[idx]).to(dev)  # a dropped NaN sample weighs 0; 0·NaN would not
            t = (torch.rand(len(idx), generator=gen) * (ro.t_max + 1)).long().clamp(max=sched.config.num_train_timesteps - 1)
            noise = torch.randn(x0_b.shape, generator=gen).to(dev)
            x_t = sched.add_noise(x0_b, noise, t.to(dev))
            a = alpha_bar(sched.alphas_cumprod, t, x0_b)
            cond = dict(encoder_hidden_states=ro.embeds[idx].to(dev, dtype), class_labels=ro.level[idx].to(dev))
            inp = torch.cat([x_t, ro.image[idx].to(dev, x_t.dtype)], dim=1).to(dtype)
            with torch.no_grad(), acc.autocast():
                with self.model.use("old") as old_unet:
                    p_old = old_unet(inp, t.to(dev), **cond, return_dict=False)[0]
                p_ref = None
                if float(nft["kl_beta"]) > 0:
                    with self.model.use("reference") as ref_unet:
                        p_ref = ref_unet(inp, t.to(dev), **cond, return_dict=False)[0]
            last = n == len(batches) - 1
            sync = acc.no_sync(self.unet) if (acc.num_processes > 1 and not last) else contextlib.nullcontext()
            with sync, acc.autocast():
                self.unet.train()  # LoRA dropout, if any, acts in the trained forward only
                try:
                    p_cur = self.unet(inp, t.to(dev), **cond, return_dict=False)[0]
                finally:
                    self.unet.eval()
                out = nft_loss(p_cur, p_old, x_t, x0_b, a, r[offset + idx], prediction_type=self.prediction_type,
                               beta=float(nft["beta"]), adv_clip=float(nft["adv_clip"]), reference=p_ref,
                               kl_beta=float(nft["kl_beta"]), weights=w)
                acc.backward(out.total)
            share = float(w.sum())
            for key, value in out.terms().items():
                sums[key] += value if key == "loss" else value * share
        return self._optimizer_step(sums)

    def _micro_batches(self, rollouts, indices: list[int], keep: torch.Tensor):
        """(per-sample weights, their normaliser, [(rollout, sample rows, offset, generator)]): the
        step's micro-batches, each input's `timesteps_per_sample` times over."""
        cfg, acc, k = self.cfg, self.accelerator, int(self.cfg["samples"])
        # Micro-batches never mix inputs (their latents may differ in size). Under DDP every process
        # runs the same number of forwards (a dropped sample weighs 0); alone, dropped ones are skipped.
        weight = keep.float()
        reps = int(cfg["nft"]["timesteps_per_sample"])
        denom = max(float(acc.gather(weight.sum()[None].to(acc.device)).sum()) / acc.num_processes, 1.0) * reps
        # the training noise of an input's samples from a generator of its own: the same draws
        # whichever process trains it (one process with 2 inputs per step = 2 processes with 1 each)
        gens = [torch.Generator().manual_seed(_seed(cfg["seed"], self.step, 10_000, i)) for i in indices]
        mb = self.micro_batch
        batches = []
        for j, ro in enumerate(rollouts):
            rows = torch.arange(len(ro)) if acc.num_processes > 1 else torch.nonzero(keep[j * k:(j + 1) * k]).view(-1)
            batches += [(ro, rows[i:i + mb], j * k, gens[j]) for i in range(0, len(rows), mb)]
        return weight, denom, batches * reps

    def _optimizer_step(self, sums: dict) -> dict:
        """Clip, step (or skip a step whose gradients overflowed), the old model's EMA step; the log's terms."""
        from .nft import ema_decay

        cfg, nft, acc = self.cfg, self.cfg["nft"], self.accelerator
        grad_norm = acc.clip_grad_norm_(self.model.trainable_parameters(), float(cfg["optimizer"]["max_grad_norm"]))
        finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if acc.scaler is not None:
            # fp16: the GradScaler skips a step whose gradients overflowed and halves its scale
            # (accelerate's AcceleratedOptimizer.step runs scaler.step and scaler.update), so the
            # next step's unscale_ starts afresh. Overflow at the first scales is routine.
            self.optimizer.step()
            skipped = bool(self.optimizer.step_was_skipped)
            if skipped:
                log.info("step %d: fp16 gradients overflowed; the step is skipped and the loss scale is now %g",
                         self.step + 1, acc.scaler.get_scale())
        else:
            skipped = not finite  # one bad batch must not poison the weights
            if finite:
                self.optimizer.step()
            else:
                log.warning("step %d: the gradient is not finite; the step is skipped", self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            return {**sums, "grad_norm": float(grad_norm), "skipped": True}
        decay = ema_decay(self.step, flat=int(nft["ema"]["flat"]), rate=float(nft["ema"]["rate"]),
                          max_decay=float(nft["ema"]["max_decay"]))
        self.model.ema_step(decay)
        if acc.num_processes > 1:  # each process holds its share of the step's mean: the run's is their mean
            local = torch.tensor([sums[key] for key in sums], device=acc.device)
            sums = dict(zip(sums, acc.reduce(local, reduction="mean").tolist()))
        return {**sums, "grad_norm": float(grad_norm), "ema_decay": decay}

    def _stats(self, rewards: torch.Tensor, drop: torch.Tensor, terms: dict, t_rollout: float, t_step: float) -> dict:
        acc = self.accelerator
        all_rewards = acc.gather(rewards.to(acc.device)).cpu()
        row = {"step": self.step + 1}
        for i, name in enumerate(self.names):
            col = all_rewards[:, i]
            col = col[~torch.isnan(col)]
            row[f"rewards/{name}/mean"] = float(col.mean()) if len(col) else None
            row[f"rewards/{name}/std"] = float(col.std()) if len(col) > 1 else None
        from .group_filter import weighted_total

        total = weighted_total(all_rewards, self.weights)
        total = total[~torch.isnan(total)]
        row["reward"] = float(total.mean()) if len(total) else None
        row["group_filter/dropped"] = int(acc.gather(drop.to(acc.device).sum()[None]).sum())
        row["groups"] = int(acc.gather(torch.tensor([len(drop)], device=acc.device)).sum())
        row.update(terms or {"loss": None, "skipped": True})
        row["s_rollout"] = round(t_rollout, 3)
        row["s_step"] = round(t_step, 3)
        return row

    # evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """The held-out inputs with fixed seeds, the current model: mean reward and guard metrics."""
        from .group_filter import weighted_total
        from .reward_guard import mean_of, score_image
        from ..rewards.visual import reference_for

        ev = self.cfg["eval"]
        totals, metrics = [], {m: [] for m in self.metric_names}
        for j, row in enumerate(self.eval_rows):
            seeds = [_seed(ev["seed"], j, s) for s in range(int(ev["samples"]))]
            rgb, ro = self._rollout(row, seeds, 1_000_000 + j, which="current")
            totals += weighted_total(self._score(ro.images, rgb, row), self.weights).tolist()
            for img in ro.images:
                for name, value in score_image(img, reference_for(row.get("hr_path"), img), self.metric_names).items():
                    metrics[name].append(value)
        return {"step": self.step, "reward": mean_of(totals), **{m: mean_of(v) for m, v in metrics.items()}}

    def _evaluate_and_guard(self) -> bool:
        """Evaluate, log, keep the best model; True when the guard stops the run."""
        from .reward_guard import read_rows, write_report

        from accelerate.utils import broadcast_object_list

        # The main process evaluates and every process takes its numbers, so all reach the same
        # verdict (processes that each judged their own floats could disagree and part ways).
        (row,) = broadcast_object_list([self.evaluate() if self.accelerator.is_main_process else None])
        verdict = None
        if self.guard is not None:
            verdict = self.guard.check(self.step, row.get(self.guard.metric))
            row["guard"] = verdict
        if self.accelerator.is_main_process:
            with open(self.out / EVAL_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            rows = [{k: v for k, v in r.items() if k != "guard"} for r in read_rows(self.out / EVAL_FILE)]
            write_report(rows, self.out)
            if verdict == "best":
                self.model.save(self._best_dir(self.step), self._info(best=True))
        self.accelerator.wait_for_everyone()
        self._say(f"eval step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                     if isinstance(v, float)) + (f" ({verdict})" if verdict else ""))
        return verdict == "tripped"

    def _best_dir(self, step: int) -> Path:
        return self.out / f"best-{step}"

    def _prune_best(self, newer_than: int | None = None) -> None:
        """Keep the best model the guard refers to; drop the others (at a checkpoint), or those of
        steps after `newer_than` (a resumed run abandons what came after its checkpoint)."""
        keep = None if self.guard is None else self.guard.best_step
        for folder in self.out.glob("best-*"):
            step = folder.name.rpartition("-")[2]
            if not step.isdigit() or int(step) == keep:
                continue
            if newer_than is None or int(step) > newer_than:
                shutil.rmtree(folder, ignore_errors=True)

    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            say(message)

    def _info(self, best: bool = False) -> dict:
        info = {"step": self.step, "base": str(self.cfg["restorer"]), "config": self.cfg, "prediction_type": self.prediction_type}
        if self.guard is not None:
            info["guard"] = self.guard.state()
            if best:
                info["best"] = True
        return info

    # the run -----------------------------------------------------------------------------------
    def train(self) -> Path:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            atomic_write_text(self.out / "config.json", json.dumps(cfg, indent=2, default=str) + "\n")
        every = int(cfg["eval"]["steps"] or 0)
        tripped = False
        if every and self.eval_rows and self.step == 0:
            tripped = self._evaluate_and_guard()  # step 0: the baseline every later evaluation compares with
        while not tripped and self.step < int(cfg["max_steps"]):
            row = self.train_step()
            if self.accelerator.is_main_process:
                with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                self._say(f"step {row['step']}: reward {_fmt(row['reward'])}, loss {_fmt(row.get('loss'))}, "
                     f"dropped {row['group_filter/dropped']}/{row['groups']} groups, {row['s_step']:.1f} s")
            if every and self.eval_rows and self.step % every == 0:
                tripped = self._evaluate_and_guard()
            if self.step % int(cfg["save_steps"]) == 0 or tripped or self.step == int(cfg["max_steps"]):
                self.save_checkpoint()
        return self.finish(tripped)

    @property
    def result(self) -> Path:
        return self.out / "adapter" if self.cfg["lora"] is not None else self.out / "model"

    def finish(self, tripped: bool) -> Path:
        """Save the result: the best model when the guard stopped the run, else the last one."""
        result = self.result
        if self.accelerator.is_main_process:
            best = None if self.guard is None or self.guard.best_step is None else self._best_dir(self.guard.best_step)
            if tripped and best is not None and best.is_dir():
                if result.exists():
                    shutil.rmtree(result)
                shutil.copytree(best, result)
                self._say(f"guard: held-out {self.guard.metric} fell more than {self.guard.max_drop} below its best "
                     f"(step {self.guard.best_step}); stopped at step {self.step}, the best model is the result")
            else:
                self.model.save(result, self._info())
            atomic_write_text(self.out / "result.json", json.dumps(
                {"result": result.name, "step": self.step, "best": None if best is None else best.name,
                 "guard": None if self.guard is None else self.guard.state()},
                indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        return result


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def train(cfg: dict, *, resume: bool = False, overwrite: bool = False) -> Path:
    return RestorerRL(cfg, resume=resume, overwrite=overwrite).train()


def saved_message(cfg: dict, out: Path) -> str:
    profile = inference_profile(cfg)
    if out.name == "model":
        return f"model saved in {out} (use: python -m realsr_r1.infer --profile {profile} --set restorer.model={out} …)"
    kind = (cfg.get("restorer") or {}).get("type")
    switch = f" --set restorer.type={kind}" if kind and kind != "diffusion" else ""
    return (f"adapter saved in {out} (use: python -m realsr_r1.infer --profile {profile}{switch} "
            f"--restorer-adapter {out} …)")
