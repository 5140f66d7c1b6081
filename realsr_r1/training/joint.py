"""`python -m realsr_r1.train joint`: GRPO of the policy and DiffusionNFT of the restorer, alternating.

    python -m realsr_r1.train joint --config configs/joint-tiny.yaml [--resume] [--set key=value ...]

RealSR-R1's one model gets this for free: the text and the pixels learn from the same rewards. With
a separate policy and restorer, each GRPO step of the policy (grpo.py) is followed by
`restorer_steps` NFT steps of the restorer (restorer_rl.py), over the same data, and each side's
rollouts use the other's current weights:
- the policy's image rewards are rendered by the restorer being trained (the same UNet, its current
  adapter), instead of the GRPO config's `restorer`;
- the restorer's inputs are conditioned on chains of thought the current policy writes for them
  (`conditioning: policy`, not cached: the policy changes every step).

Config keys: `data` (both sides), `output_dir` (the policy's run in `policy/`, the restorer's in
`restorer/`), `policy` and `restorer` (a training config by name or path, or the config itself,
with `--set policy.trainer.max_steps=2`-style overrides), `restorer_steps`. The policy's
`trainer.max_steps` sets the length; GRPO's checkpoints save the restorer's too, so `--resume`
continues both. `joint.jsonl` (and `joint.md` at the end) is one table of both sides' rewards per step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..imageio import atomic_write_text
from ..profiles import ConfigError, load_config

JOINT_KEYS = {"data": None, "output_dir": "runs/joint", "policy": None, "restorer": None, "restorer_steps": 1}
JOINT_FILE = "joint.jsonl"


def _side(value, what: str) -> dict:
    if isinstance(value, str):
        return load_config(value)
    if isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"{what}: expected a training config (a name, a path, or its keys), got {value!r}")


def expand(cfg: dict) -> dict:
    """The joint config with its `policy` and `restorer` configs read in (names or paths → keys)."""
    out = dict(cfg)
    for side in ("policy", "restorer"):
        if out.get(side) is not None:
            out[side] = _side(out[side], side)
    return out


def resolve(cfg: dict) -> tuple[dict, dict, dict]:
    """(joint settings, GRPO config, restorer RL config), each checked before anything loads."""
    from . import grpo, restorer_rl
    from ..profiles import _hint

    for key in cfg:
        if key not in JOINT_KEYS:
            raise ConfigError(f"{key}: unknown joint training key{_hint(key, list(JOINT_KEYS))}")
    joint = {**JOINT_KEYS, **cfg}
    if not joint["data"]:
        raise ConfigError("data: not set (a folder from `python -m realsr_r1.data build`; --set data=DIR)")
    steps = joint["restorer_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"restorer_steps: expected a whole number ≥ 1, got {steps!r}")
    out = Path(joint["output_dir"])
    policy = _side(joint["policy"], "policy")
    restorer = _side(joint["restorer"], "restorer")
    policy.update(data=joint["data"], output_dir=str(out / "policy"))
    restorer.update(data=joint["data"], output_dir=str(out / "restorer"), conditioning="policy")
    restorer.pop("policy", None)
    # the policy's image rewards come from the restorer being trained, rendered at its scale
    render = {k: v for k, v in (restorer.get("restorer") or {}).items() if k in ("scale", "seed")}
    policy["restorer"] = {**{k: v for k, v in (policy.get("restorer") or {}).items() if k == "batch_size"}, **render}
    grpo.check_config(policy)
    restorer = restorer_rl.resolve_config(restorer)
    mixed = "bf16" if (policy.get("trainer") or {}).get("bf16") else "fp16" if (policy.get("trainer") or {}).get("fp16") else "no"
    if restorer["mixed_precision"] != mixed:  # both sides share accelerate's one process state
        raise ConfigError(f"restorer.mixed_precision: {restorer['mixed_precision']} differs from the policy trainer's "
                          f"({mixed}); set them alike")
    return joint, policy, restorer


class LivePolicyTexts:
    """The current policy's chain of thought for an input, written when the restorer needs it."""

    def __init__(self, decoding):
        self.decoding = decoding
        self.trainer = None
        self.texts: dict[str, str] = {}  # the latest text per input, for the record

    def text(self, name: str, rgb, seed: int) -> str:
        import torch

        from ..analyze import analyze
        from ..imageio import LoadedImage, to_float
        from ..policy import VLMPolicy

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                policy = VLMPolicy(model, self.trainer.processing_class, model_path="", dtype=None,
                                   generation=self.decoding)
                text = "".join(policy.stream(LoadedImage(rgb=rgb), analyze(to_float(rgb)), seed=seed))
        finally:
            model.train(was_training)
        self.texts[name] = text
        return text


def _callback(rl, texts: LivePolicyTexts, steps: int, out: Path):
    from transformers import TrainerCallback

    class Alternate(TrainerCallback):
        """After each GRPO step, `steps` NFT steps of the restorer; one joint row per logged step."""

        def __init__(self):
            self.last: dict = {}

        def attach(self, trainer):
            texts.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            every = int(rl.cfg["eval"]["steps"] or 0)
            if every and rl.eval_rows and rl.step == 0:  # the guard's baseline, as a restorer run makes it
                rl._evaluate_and_guard()

        def on_step_end(self, args, state, control, **kwargs):
            rows = []
            for _ in range(steps):
                rows.append(rl.train_step())
                every = int(rl.cfg["eval"]["steps"] or 0)
                if every and rl.eval_rows and rl.step % every == 0 and rl._evaluate_and_guard():
                    control.should_training_stop = True  # the guard stops both sides
                    break
            if rl.accelerator.is_main_process:
                with open(Path(rl.out) / "log.jsonl", "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
            self.last = rows[-1]

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not (state.is_world_process_zero and logs and "reward" in logs):  # not the end-of-run summary
                return
            row = {"step": state.global_step,
                   **{f"policy/{k}": v for k, v in logs.items() if k.startswith("rewards/") or k == "reward"},
                   **{f"restorer/{k}": v for k, v in self.last.items() if k.startswith("rewards/") or k == "reward"}}
            with open(out / JOINT_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

        def on_save(self, args, state, control, **kwargs):
            rl.save_checkpoint()

        def on_train_end(self, args, state, control, **kwargs):
            rl.finish(tripped=bool(rl.guard and rl.guard.tripped_at is not None))
            write_table(out)

    return Alternate()


def write_table(out: Path) -> None:
    """joint.md: joint.jsonl as one table, a column per reward of each side."""
    path = out / JOINT_FILE
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    columns = sorted({k for r in rows for k in r if k != "step" and not k.endswith("/std")},
                     key=lambda k: (not k.startswith("policy/"), k))
    lines = ["| step | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['step']} | " + " | ".join("–" if r.get(c) is None else f"{r[c]:.4f}" for c in columns) + " |")
    atomic_write_text(out / "joint.md", "\n".join(lines) + "\n")


def train(cfg: dict, *, resume: bool = False, overwrite: bool = False) -> tuple[Path, Path]:
    from . import grpo
    from .common import main_process
    from .restorers import trainer_for

    joint, policy_cfg, restorer_cfg = resolve(cfg)
    out = Path(joint["output_dir"])
    if overwrite and (out / JOINT_FILE).is_file() and main_process():
        (out / JOINT_FILE).unlink()  # its rows are made again, with both sides' checkpoints
    if not resume and not overwrite and (out / JOINT_FILE).is_file():
        raise ConfigError(f"{out} already has a joint run: pass --resume to continue it, or choose another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    texts = LivePolicyTexts(grpo.decoding(policy_cfg))
    rl = trainer_for(restorer_cfg)(restorer_cfg, resume=resume, overwrite=overwrite, policy_texts=texts)
    rl.out.mkdir(parents=True, exist_ok=True)
    if resume and (out / JOINT_FILE).is_file():  # rows after the policy's checkpoint are made again
        step = rl.step // int(joint["restorer_steps"])
        kept = [line for line in (out / JOINT_FILE).read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(out / JOINT_FILE, "".join(line + "\n" for line in kept))
    policy_out = grpo.train(policy_cfg, resume=resume, overwrite=overwrite, restorer=rl.stages,
                            callbacks=[_callback(rl, texts, int(joint["restorer_steps"]), out)])
    return policy_out, rl.result


def main_message(cfg: dict, policy_out: Path, restorer_out: Path) -> str:
    """Where the two results went and how inference uses them, on the restorer config's profile."""
    from .common import inference_profile

    profile = inference_profile(cfg.get("restorer") or {})
    return (f"policy adapter saved in {policy_out}, restorer adapter in {restorer_out} (use: python -m realsr_r1.infer "
            f"--profile {profile} --adapter {policy_out} --restorer-adapter {restorer_out} …)")


if __name__ == "__main__":  # pragma: no cover - `python -m realsr_r1.train joint` is the entry point
    sys.exit("use: python -m realsr_r1.train joint --config …")
