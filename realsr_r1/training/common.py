"""What the trainers share: the `profile:`-based sections of a training config, the training
libraries' warnings shown once, and how a run speaks (one line per note, on stderr, by the process
that speaks for a multi-process run)."""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

from ..profiles import load_config

LOG_FILE = "log.jsonl"  # one JSON row per logged step, in each run's output_dir
RENDER_KEYS = ("profile", "scale", "batch_size", "seed")  # `restorer:` keys about rendering, not the restorer


def profile_section(cfg: dict, key: str = "restorer") -> tuple[dict, dict]:
    """(section, rendering keys): the `key` section (restorer or policy) of the profile
    `cfg[key].profile` with this config's keys over it, checked as a profile's is; the keys about
    rendering (RENDER_KEYS: scale, seed, batch_size) apart."""
    from ..profiles import check_section

    section = dict(cfg.get(key) or {})
    profile = section.pop("profile", None)
    # a `type:` other than the profile's takes the profile's section for that type (its alternatives)
    switch = [f"{key}.type={section['type']}"] if profile and isinstance(section.get("type"), str) else []
    merged = dict(load_config(profile, switch).get(key) or {}) if profile else {}
    merged.update({k: v for k, v in section.items() if k not in RENDER_KEYS})
    check_section(key, merged)
    return merged, {k: v for k, v in section.items() if k in RENDER_KEYS}


# The libraries training runs on: their FutureWarnings are shown once per message (see below).
TRAINING_LIBRARIES = ("transformers", "trl", "peft", "accelerate", "diffusers", "torch")
_LIBRARY_FILE = re.compile(rf"[\\/]({'|'.join(TRAINING_LIBRARIES)})[\\/]")


def show_library_warnings_once() -> None:
    """The first of each FutureWarning the training libraries emit, not one per step.

    transformers' Trainer enters warnings.catch_warnings() during each step, and that makes Python
    forget which warnings it has shown (the "once" action too: its memory is the same registry), so
    the deprecation notices of code run every step (TRL toggling gradient checkpointing around
    generation) repeat each step. What is shown is remembered here instead, in warnings.showwarning,
    which catch_warnings keeps. Warning options the user gave (-W, PYTHONWARNINGS) win."""
    previous = warnings.showwarning
    if sys.warnoptions or getattr(previous, "once_per_message", False):
        return
    shown: set[tuple[type, str]] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FutureWarning) and _LIBRARY_FILE.search(str(filename)):
            if (category, str(message)) in shown:
                return
            shown.add((category, str(message)))
        previous(message, category, filename, lineno, file, line)

    show.once_per_message = True
    warnings.showwarning = show


def say(note: str) -> None:
    """One line on stderr, outside any progress bar (tqdm's write)."""
    from tqdm.auto import tqdm

    tqdm.write(note, file=sys.stderr)


def clear_checkpoints(folder: Path, files=(LOG_FILE,), prefixes=("checkpoint",)) -> None:
    """`--overwrite`: an earlier run's PREFIX-N folders (checkpoints) and its logs in `folder` go
    (the main process removes them; every process then starts from step 0 without looking)."""
    import shutil

    if not main_process() or not folder.is_dir():
        return
    for prefix in prefixes:
        for p in folder.glob(f"{prefix}-*"):
            if p.is_dir() and p.name.rpartition("-")[2].isdigit():
                shutil.rmtree(p)
    for name in files:
        (folder / name).unlink(missing_ok=True)


def short_progress(trainer) -> None:
    """transformers' progress callback writes every logged dict under the bar (TRL's GRPO logs 30
    keys a step): keep the bar, and write one short line per logging step instead, unless verbose.
    The whole dict goes to log.jsonl either way."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .. import quiet

    if quiet.verbose():
        return

    def line(state, logs) -> str | None:
        keys = [k for k in ("reward", "loss", "kl", "learning_rate") if isinstance(logs.get(k), (int, float))]
        return f"step {state.global_step}: " + ", ".join(f"{k} {logs[k]:.4g}" for k in keys) if keys else None

    class Short(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            text = line(state, logs or {}) if state.is_world_process_zero else None
            if text and self.training_bar is not None:
                self.training_bar.write(text, file=sys.stderr)

    class ShortPrinter(PrinterCallback):  # disable_tqdm: no bar, the short line alone
        def on_log(self, args, state, control, logs=None, **kwargs):
            text = line(state, logs or {}) if state.is_world_process_zero else None
            if text:
                print(text, file=sys.stderr)

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(Short())
    if trainer.pop_callback(PrinterCallback) is not None:
        trainer.add_callback(ShortPrinter())


def main_process() -> bool:
    """Whether this is the process that speaks for a multi-process (torchrun / accelerate launch) run."""
    return int(os.environ.get("RANK", 0)) == 0


def inference_profile(cfg: dict) -> str:
    """The profile to restore with a training result: the one its `restorer:` section builds on
    (tiny for the tiny configs), else full."""
    return (cfg.get("restorer") or {}).get("profile") or "full"
