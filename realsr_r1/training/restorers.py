"""`python -m realsr_r1.train restorer`: online RL of the diffusion restorer a config names, the x4
upscaler's (restorer_rl.py) or the one-step restorer's (onestep_rl.py), by its restorer section's type.

Both share RestorerRL's loop, rewards, guard, checkpoints and logs; this module only picks the class,
so neither imports the other's choice (onestep_rl.py subclasses restorer_rl.py's RestorerRL).
"""

from __future__ import annotations

from pathlib import Path

from .restorer_rl import RestorerRL, _section, saved_message  # noqa: F401 - the CLI's saved_message


def trainer_for(cfg: dict):
    """RestorerRL, or OneStepRL for `restorer.type: onestep`."""
    try:
        kind = _section(cfg, "restorer")[0].get("type")
    except Exception:  # noqa: BLE001 - a broken section: RestorerRL says what is wrong in one line
        kind = None
    if kind == "onestep":
        from .onestep_rl import OneStepRL

        return OneStepRL
    return RestorerRL


def train(cfg: dict, *, resume: bool = False, overwrite: bool = False) -> Path:
    return trainer_for(cfg)(cfg, resume=resume, overwrite=overwrite).train()
