"""Quiet by default: a run prints its own progress and one-line messages, not the libraries' logs.

The libraries this project runs on log at INFO or WARNING about themselves (NNCF prints a line per
operation it leaves unquantised, bitsandbytes that an optional CPU kernel is missing, transformers
that torchvision is absent) and warn of their own deprecations. None of it is for the user of a
restoration, so their loggers are set to ERROR and those warnings hidden; `--verbose` (and
`--debug`) leave everything as the libraries set it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

# Loggers of the libraries a run imports (each library logs under its package name)
LIBRARIES = ("nncf", "bitsandbytes", "transformers", "diffusers", "accelerate", "peft", "trl", "openvino",
             "datasets", "huggingface_hub", "gradio", "httpx", "urllib3", "matplotlib", "PIL", "torch")
_verbose = False
_bars = True  # the libraries' own progress bars (loading weights, pipeline components)


def configure(verbose: bool = False, library_bars: bool = False) -> None:
    """Quiet the libraries for this process, unless `verbose`. Call it first in a command's main.
    `library_bars`: keep the libraries' progress bars (the download command's hub transfers)."""
    global _verbose, _bars
    _verbose = bool(verbose)
    _bars = _verbose or library_bars
    if _verbose:
        return
    # transformers and diffusers set their level from these when they configure their loggers
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if not _bars:
        # transformers reads huggingface_hub's switch when imported ("Loading weights" bars,
        # core_model_loading.py); diffusers has its own, turned off by settle() after its import.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
    for name in LIBRARIES:
        settle(name)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!realsr_r1|app)")


def settle(name: str) -> None:
    """Quiet one library's logger (again): for a library that sets its own level when imported, as
    NNCF does, call it right after the import."""
    if _verbose:
        return
    logging.getLogger(name).setLevel(logging.ERROR)
    module = sys.modules.get(f"{name}.utils.logging")  # transformers, diffusers: their own verbosity
    if module is not None and hasattr(module, "set_verbosity_error"):
        module.set_verbosity_error()
    if module is not None and not _bars and hasattr(module, "disable_progress_bar"):
        module.disable_progress_bar()  # "Loading pipeline components..." (diffusers' own switch)


def verbose() -> bool:
    """Whether the libraries speak as they like in this process (--verbose, --debug)."""
    return _verbose


def hushed():
    """A context that keeps a library's prints to stdout (NNCF's progress bars) from the run's
    output, unless verbose."""
    return contextlib.nullcontext() if _verbose else contextlib.redirect_stdout(io.StringIO())
