"""The sidecar: the JSON record beside each restored image (CLI and demo write the same one)."""

from __future__ import annotations

import datetime as _dt
import platform

from . import __version__
from .cot import render_cot
from .pipeline import RestorationResult


def versions() -> dict:
    import importlib.metadata
    import sys

    import numpy
    import PIL

    # A lite run on OpenVINO never imports torch (1.1 s): then its installed version is what counts.
    torch = sys.modules.get("torch")
    return {"realsr_r1": __version__, "python": platform.python_version(),
            "torch": torch.__version__ if torch else importlib.metadata.version("torch"),
            "numpy": numpy.__version__, "pillow": PIL.__version__}



def build_sidecar(input_name: str, out_name: str, result: RestorationResult, profile_reason: str,
                  stage_files: dict[str, str], notes: list[str], loaded, settings: dict | None = None) -> dict:
    """The JSON record written beside a restored image: chain of thought, plan, analysis, timings.

    The `*_image` tags hold each stage's size whether or not stage images were saved (the chain of
    thought does not depend on --save-stages); the files are under `stages`. `settings` are what a
    resume compares (infer); the demo does not resume and leaves them out."""
    plan = result.plan
    images = dict(plan.images)
    record = {
        "input": input_name,
        "output": out_name,
        "profile": result.info.get("profile"),
        "profile_reason": profile_reason,
        "chain_of_thought": render_cot(plan.degradation, plan.understanding, images),
        "policy_output": result.cot,
        "plan": {**plan.to_dict(), "images": images},
        "analysis": result.analysis.to_dict(),
        "input_info": {"size": list(loaded.size), "mode": loaded.mode, "bit_depth": loaded.bit_depth,
                       "alpha": loaded.has_alpha, "format": loaded.format},
        "stages": {s: {"size": [im.rgb.shape[1], im.rgb.shape[0]], "seconds": round(im.seconds, 4),
                       "file": stage_files.get(s)} for s, im in result.stages.items()},
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "scale": result.scale,
        "seed": result.seed,
        **{k: v for k, v in result.info.items() if k != "profile"},
        "notes": notes,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if settings is not None:
        record["settings"] = settings
    return record
