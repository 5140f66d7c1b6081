"""VLCoT-GRPO of the VLM policy on TRL's GRPOTrainer (`python -m realsr_r1.train --config …`).

The trainer is TRL's; this module is the glue (design.md §4): the dataset from `training/data.py`,
the VLM and processor through the same loader inference uses, LoRA (QLoRA with a 4-bit base) with
the vision tower frozen by default, rewards by name with weights (rewards/registry.py), OARS group
filtering (`group_filter`: a group whose weight-normalised reward mean is above `mean_above` and
std below `std_below`, both on the reward's range, 0 its lowest and 1 its highest, has nothing left
to teach; its completions leave the loss, counted as `group_filter/dropped`; filtered_grpo.py) and
reflective rollouts (`reflect_stages`; reflective_grpo.py).

Checkpoints (the LoRA adapter, optimizer, scheduler, RNG, step) go to `output_dir/checkpoint-N`
every `trainer.save_steps`; `--resume` continues from the last one. Per-reward means and stds are
appended each logging step to `output_dir/log.jsonl` and sent to `trainer.report_to`. The final
adapter is saved in `output_dir` and loads with `python -m realsr_r1.infer --adapter DIR`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..decoding import TRAINED_DECODING_FILE
from ..imageio import atomic_write_text
from ..profiles import ConfigError
from .common import LOG_FILE, inference_profile, profile_section, say, short_progress


class ZeroLossNotes:
    """One line, once, for a logged loss of 0.0, which looks like a broken run and usually is not.

    With one optimisation pass per generation (num_iterations 1, steps_per_generation ≤
    gradient_accumulation_steps), no KL term (beta 0) and no vLLM, TRL computes the importance
    ratio against the same logits, detached: it is exactly 1, so the loss's value is minus the
    (length-weighted) mean advantage, 0 when each group's advantages cancel; its gradient,
    Σ A ∇log π, is not. A zero grad_norm too is another story: no completion had an advantage."""

    def __init__(self):
        self.said: set[str] = set()

    @staticmethod
    def on_policy(args) -> bool:
        steps = getattr(args, "steps_per_generation", None) or args.gradient_accumulation_steps
        return (args.num_iterations == 1 and args.beta == 0 and not getattr(args, "use_vllm", False)
                and steps <= args.gradient_accumulation_steps)

    def check(self, args, step: int, logs: dict) -> list[str]:
        """The notes these logs call for that were not said before."""
        if logs.get("loss") != 0:
            return []
        grad = logs.get("grad_norm")
        if grad == 0:
            same = " (each group's rewards were all equal)" if logs.get("frac_reward_zero_std") == 1 else ""
            kind, note = "no-advantage", (
                f"loss 0.0 and grad_norm 0.0 at step {step}: no completion in the loss had a non-zero "
                f"advantage{same}, so the step learned nothing; expected of tiny random models, in a real "
                "run it means the rewards do not tell the completions apart")
        elif self.on_policy(args):
            kind, note = "on-policy", (
                "loss 0.0 is expected on purely on-policy steps (num_iterations 1, beta 0): the gradient is "
                f"not zero{f' (grad_norm {grad:.3g})' if isinstance(grad, (int, float)) else ''}; the importance "
                "ratio is exactly 1, so the loss's value is minus the mean advantage, which cancels within groups")
        else:
            return []
        if kind in self.said:
            return []
        self.said.add(kind)
        return [note]


# --- Config → parts ----------------------------------------------------------------------------
def model_path(cfg: dict) -> Path:
    """The VLM folder: `model` as a path, or a name under the weights folder (as profiles resolve it)."""
    from ..profiles import _model_path

    return _model_path(cfg, "policy")


# The keys a training config may have (configs/grpo*.yaml); `trainer` is GRPOConfig's, checked by it.
CONFIG_KEYS = ("model", "dtype", "load_in_4bit", "max_pixels", "data", "output_dir", "lora", "rewards", "restorer",
               "group_filter", "generation", "trainer", "reflect_stages", "script")
LORA_KEYS = ("r", "alpha", "dropout", "targets", "train_vision")
SECTIONS = ("lora", "rewards", "restorer", "group_filter", "generation", "trainer")


def check_config(cfg: dict) -> None:
    """Every key of a training config known, before anything loads: one line naming the first that is not."""
    from ..profiles import _hint

    for key in cfg:
        if key not in CONFIG_KEYS:
            raise ConfigError(f"{key}: unknown training config key{_hint(key, CONFIG_KEYS)}")
    for key in SECTIONS:
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ConfigError(f"{key}: expected a section (key: value lines), got {cfg[key]!r}")
    pixels = cfg.get("max_pixels")
    if pixels is not None and (not isinstance(pixels, int) or isinstance(pixels, bool) or pixels < 28 * 28):
        raise ConfigError(f"max_pixels: expected a pixel count ≥ 784 (one 28×28 patch), got {pixels!r}")
    for key, value in (cfg.get("group_filter") or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"group_filter.{key}: expected a number, got {value!r}")
    try:
        from ..device import weight_dtype

        weight_dtype(train_device(), cfg.get("dtype", "auto"))
    except ValueError as e:
        raise ConfigError(f"dtype: {e}") from None
    for key in (cfg.get("lora") or {}):
        if key not in LORA_KEYS:
            raise ConfigError(f"lora.{key}: unknown key{_hint(key, LORA_KEYS)}")
    if cfg.get("restorer"):
        restorer_section(cfg)  # checks the merged section's keys and types
    decoding(cfg)
    script = cfg.get("script")
    if script is not None:
        from ..tiny import BUILDERS

        if str(cfg.get("model")) not in BUILDERS or not cfg.get("reflect_stages"):
            raise ConfigError("script: only for a reflective smoke run of a tiny random VLM "
                              "(model: tiny-vlm and reflect_stages), which cannot write the tags itself")
        if not isinstance(script, list) or not all(isinstance(s, (str, list)) for s in script):
            raise ConfigError(f"script: expected a list of texts, one per rollout segment, got {script!r}")


def restorer_section(cfg: dict) -> dict:
    """The restorer that renders image rewards (profile_section)."""
    return profile_section(cfg, "restorer")[0]


def restorations_factory(cfg: dict, device: str, restorer=None):
    """A `Restorations` over the restorer the config names (`restorer.profile` + overrides), or over
    `restorer` itself (joint training: the restorer being trained renders the policy's rewards)."""
    section = dict(cfg.get("restorer") or {})
    merged = restorer_section(cfg) if restorer is None else None

    def make():
        from ..profiles import build_restorer
        from ..rewards.visual import Restorations

        options = {k: section[k] for k in ("scale", "seed", "batch_size") if k in section}  # else Restorations'
        return Restorations(restorer if restorer is not None else build_restorer(merged, device=device), **options)

    return make


def lora_config(cfg: dict):
    """LoRA from the config's `lora` section; `lora: null` trains the full model (as RealSR-R1 did)."""
    from peft import LoraConfig

    if "lora" in cfg and not cfg["lora"]:
        return None
    lora = cfg.get("lora") or {}
    targets = list(lora.get("targets") or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if lora.get("train_vision", False):
        target_modules = targets
    else:  # the same names exist in the vision tower's blocks: keep those frozen
        target_modules = rf"^(?!.*\b(visual|vision_tower|vision_model)\b).*\.({'|'.join(targets)})$"
    return LoraConfig(r=int(lora.get("r", 16)), lora_alpha=int(lora.get("alpha", 32)),
                      lora_dropout=float(lora.get("dropout", 0.05)), target_modules=target_modules,
                      task_type="CAUSAL_LM")


def full_finetune(cfg: dict) -> bool:
    return lora_config(cfg) is None and not cfg.get("load_in_4bit")


def load_policy_model(cfg: dict, device: str):
    """The VLM to train. Full fine-tuning loads fp32 weights whatever `dtype` says: AdamW steps of
    ~lr (2e-6) are below bf16's resolution (8 bits of mantissa) and would round away; `dtype` then
    only sets the autocast precision (GRPOConfig bf16/fp16). LoRA trains fp32 adapters (PEFT's
    `get_peft_model(autocast_adapter_dtype=True)`) over a base in `dtype`."""
    from ..vlm import load_vlm

    dtype = "fp32" if full_finetune(cfg) else cfg.get("dtype", "auto")
    model, processor, _, _ = load_vlm(model_path(cfg), device=device, dtype=dtype,
                                      load_in_4bit=bool(cfg.get("load_in_4bit")), max_pixels=cfg.get("max_pixels"))
    if cfg.get("load_in_4bit"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, processor


def keep_trainable_fp32(trainer, cfg: dict) -> None:
    """Trainable weights that take small updates (see load_policy_model), before the optimizer exists.

    TRL casts QLoRA adapters to bf16 (`GRPOTrainer.__init__`, after the QLoRA paper); at lr 1e-5
    most LoRA-A steps then round away, so they go back to fp32 (PEFT's LoRA layers cast their input
    to the adapter's dtype). Anything else that is not fp32 is refused. DeepSpeed keeps fp32 master
    weights itself and is left alone."""
    import torch

    if getattr(trainer, "is_deepspeed_enabled", False):
        return
    trainable = [p for p in trainer.model.parameters() if p.requires_grad and p.dtype != torch.float32]
    if cfg.get("load_in_4bit"):
        for p in trainable:
            p.data = p.data.float()
        return
    if trainable:
        low = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
        raise ConfigError(f"trainable weights are {', '.join(low)}: optimizer steps this small round away; "
                          "train fp32 weights (dtype: fp32) or under DeepSpeed")


def decoding(cfg: dict):
    """The rollouts' sampling settings: the config's `generation:` section over the project defaults."""
    from ..decoding import Decoding

    try:
        return Decoding.from_config(cfg.get("generation"))
    except (TypeError, ValueError) as e:
        raise ConfigError(" ".join(str(e).split())) from None


def train_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def grpo_args(cfg: dict, output_dir: Path, weights: list[float]):
    from trl import GRPOConfig

    import torch

    from ..decoding import GRPO_FIELDS

    t = dict(cfg.get("trainer") or {})
    for key in set(t) & set(GRPO_FIELDS.values()):
        setting = next(k for k, v in GRPO_FIELDS.items() if v == key)
        raise ConfigError(f"trainer.{key}: decoding is set in `generation:` ({setting}), shared by the rollouts, "
                          "the IRPO filter and inference")
    extra = t.get("generation_kwargs") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"trainer.generation_kwargs: expected a section, got {extra!r}")
    clash = sorted(set(extra) & (set(GRPO_FIELDS) | {"min_new_tokens", "min_tokens", "do_sample"}))
    if clash:  # TRL lays generation_kwargs over its own fields: a second, silent decoding
        raise ConfigError(f"trainer.generation_kwargs.{clash[0]}: decoding is set in `generation:`")
    try:
        fields = decoding(cfg).grpo_fields(vllm=bool(t.get("use_vllm")))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fields["generation_kwargs"] = {**extra, **fields.get("generation_kwargs", {})} or None
    t.update(fields)
    if not torch.cuda.is_available():  # CPU runs (tests, laptops): no mixed precision
        t.update(use_cpu=True, bf16=False, fp16=False)
    t.setdefault("report_to", "none")
    try:
        return GRPOConfig(output_dir=str(output_dir), reward_weights=weights, **t)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"trainer: {' '.join(str(e).split())}") from None


# --- Trainer parts --------------------------------------------------------------------------------
def _note(note: str) -> None:
    say(f"note: {note}")


def _callbacks(log_path: Path, decoding_path: Path, say=_note):
    import shutil

    from transformers import TrainerCallback

    notes = ZeroLossNotes()

    class JsonlLog(TrainerCallback):
        """Every logged dict (per-reward mean/std, loss, KL, dropped groups) as one JSON line."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
                for note in notes.check(args, state.global_step, logs):
                    say(note)

        def on_save(self, args, state, control, **kwargs):
            """Each checkpoint samples as the rollouts did too (`infer --adapter DIR/checkpoint-N`)."""
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                shutil.copyfile(decoding_path, folder / decoding_path.name)

    class ResumedSchedule(TrainerCallback):
        """A resumed run, often with a larger trainer.max_steps: transformers rebuilds the scheduler
        for the new length but restores the optimizer's learning rate as the first run left it (0 at
        the end of a linear schedule), so the first resumed step would learn nothing. The rate of
        the step about to run, from the rebuilt schedule (Trainer._prepare_for_training loads both
        before on_train_begin)."""

        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            lambdas = getattr(lr_scheduler, "lr_lambdas", None)
            if not state.global_step or optimizer is None or lambdas is None:
                return
            rates = [base * fn(lr_scheduler.last_epoch) for base, fn in zip(lr_scheduler.base_lrs, lambdas)]
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate
            lr_scheduler._last_lr = rates

    return [JsonlLog(), ResumedSchedule()]


def trainer_and_options(group_filter: dict | None):
    """TRL's GRPOTrainer, or the OARS group-filtering subclass with its thresholds."""
    if not group_filter:
        from trl import GRPOTrainer

        return GRPOTrainer, {}
    from .filtered_grpo import GroupFilteredGRPOTrainer, check_trl

    unknown = set(group_filter) - {"mean_above", "std_below"}
    if unknown:
        raise ConfigError(f"group_filter.{sorted(unknown)[0]}: unknown key (mean_above, std_below)")
    try:
        check_trl()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return GroupFilteredGRPOTrainer, {k: float(v) for k, v in group_filter.items()}


def reflective_trainer(cfg: dict, options: dict, restorations):
    """The reflective-rollout trainer (reflective_grpo.py) for `reflect_stages: [rough, …]`."""
    from .filtered_grpo import check_trl
    from .reflective_grpo import ReflectiveGRPOTrainer

    stages = cfg["reflect_stages"]
    if stages not in (["rough"], ["rough", "middle"]):
        raise ConfigError(f"reflect_stages: expected [rough] or [rough, middle] (the stages fed back, in order), "
                          f"got {stages!r}")
    try:
        check_trl()
    except ValueError as e:
        raise ConfigError(str(e)) from None

    def stage_images(rgb, stage, plans, previous=None):
        made = restorations()
        made.calls += 1
        return made.restorer.restore_stage_batch(rgb, plans, stage=stage, scale=made.scale, seed=made.seed,
                                                 batch_size=made.batch_size, previous=previous)

    # Without a group_filter section nothing is dropped: no group mean exceeds infinity.
    return ReflectiveGRPOTrainer, {"mean_above": float("inf"), **options, "stage_images": stage_images,
                                   "reflect_stages": tuple(stages)}


def build_trainer(cfg: dict, output_dir: Path, *, restorer=None, callbacks=()):
    """The GRPO trainer; `restorer` (joint training) renders the image rewards instead of the
    config's, and `callbacks` are added to the trainer's."""
    from .data import load_dataset
    from ..rewards.registry import build_rewards

    device = train_device()
    dataset = load_dataset(data_dir(cfg))
    cls, options = trainer_and_options(cfg.get("group_filter"))
    # One restorer for the image rewards and the reflective rollouts' stage images, built on first use.
    restorations = functools.cache(restorations_factory(cfg, device, restorer))
    if cfg.get("reflect_stages"):
        cls, options = reflective_trainer(cfg, options, restorations)
    # Every reward model (restorer, judge, similarity encoder) is built here, before GRPOConfig: under
    # DeepSpeed ZeRO-3 the config turns on partitioned loading (HfDeepSpeedConfig → zero.Init) for
    # every model built after it, and a reward model built that way fails ("'weight' must be 2-D").
    funcs, weights = build_rewards(cfg.get("rewards") or {}, restorations=restorations, device=device)
    if cfg.get("group_filter"):  # its thresholds are on the reward's range: in reward units here
        from .group_filter import DEFAULTS, thresholds

        given = {**DEFAULTS, **options}
        try:
            options["mean_above"], options["std_below"] = thresholds(
                float(given["mean_above"]), float(given["std_below"]), funcs, weights)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    args = grpo_args(cfg, output_dir, weights)  # config mistakes show before minutes of model loading
    model, processor = load_policy_model(cfg, device)
    trainer = cls(model=model, reward_funcs=funcs, args=args, train_dataset=dataset, processing_class=processor,
                  peft_config=lora_config(cfg),
                  callbacks=_callbacks(output_dir / LOG_FILE, output_dir / TRAINED_DECODING_FILE) + list(callbacks), **options)
    keep_trainable_fp32(trainer, cfg)
    short_progress(trainer)
    _name_the_base_model(trainer, str(cfg.get("model") or model_path(cfg).name))
    if cfg.get("script"):  # the tiny random VLM writes the given segments, so the smoke run reflects
        from ..tiny import ScriptedChain

        trainer.logits_processors = [ScriptedChain(trainer._tokenizer, cfg["script"], trainer.eos_token_ids[0])]
    return trainer


def _name_the_base_model(trainer, name: str) -> None:
    """TRL's model card links the base model by its hub id, which a model loaded from a local folder
    does not have: it wrote "fine-tuned version of [None](https://huggingface.co/None)". The card
    names the config's model instead."""
    make = trainer.create_model_card

    def create(*args, **kwargs):
        make(*args, **kwargs)
        card = Path(trainer.args.output_dir) / "README.md"
        unnamed = "[None](https://huggingface.co/None)"
        if card.is_file() and unnamed in (text := card.read_text(encoding="utf-8")):
            atomic_write_text(card, text.replace(unnamed, f"`{name}`"))

    trainer.create_model_card = create


def data_dir(cfg: dict) -> Path:
    if not cfg.get("data"):
        raise ConfigError("the training config needs `data` (a folder from `python -m realsr_r1.data build`)")
    return Path(cfg["data"])


def last_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def train(cfg: dict, *, resume: bool = False, overwrite: bool = False, restorer=None, callbacks=()) -> Path:
    """GRPO of the policy; `restorer` and `callbacks` as build_trainer's (joint training);
    `overwrite` starts again over an earlier run's checkpoints."""
    from .common import clear_checkpoints

    check_config(cfg)
    output_dir = Path(cfg.get("output_dir") or "runs/grpo")
    if overwrite:
        clear_checkpoints(output_dir)
    checkpoint = last_checkpoint(output_dir) if output_dir.is_dir() and not overwrite else None
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint-N folder in {output_dir}")
    if checkpoint is not None and not resume:
        raise ConfigError(f"{output_dir} already has {checkpoint.name}: pass --resume to continue it, "
                          "or choose another output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, output_dir, restorer=restorer, callbacks=callbacks)
    for cb in callbacks:  # a callback that needs the trainer (joint training: the live policy)
        if hasattr(cb, "attach"):
            cb.attach(trainer)
    if trainer.is_world_process_zero():  # inference samples as the rollouts did (policy.py reads it)
        record = {**decoding(cfg).to_dict(), "reflect_stages": list(cfg.get("reflect_stages") or [])}  # their mode
        atomic_write_text(output_dir / TRAINED_DECODING_FILE, json.dumps(record, indent=2) + "\n")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.save_model(str(output_dir))  # the LoRA adapter (`infer --adapter`), or the whole model
    return output_dir


def saved_message(cfg: dict, out: Path) -> str:
    profile = inference_profile(cfg)
    if full_finetune(cfg):
        return f"model saved in {out} (use: python -m realsr_r1.infer --profile {profile} --set policy.model={out} …)"
    return f"adapter saved in {out} (use: python -m realsr_r1.infer --profile {profile} --adapter {out} …)"


