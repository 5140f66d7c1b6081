"""Quiet by default (realsr_r1/quiet.py): a run prints its own progress and one-line messages; the
libraries' logs and warnings (NNCF, bitsandbytes, transformers, deprecations) only with --verbose."""

import logging
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

OURS = re.compile(r"^(profile: |note: |restored \d|warning: |error: |built the tiny|calibrating INT8|\d+ made with |"
                  r"(eval )?step \d+: |(policy )?adapter saved in |model saved in |wrote \d+ examples |resumed from |"
                  r"policy: |restorer: )")
PROGRESS = re.compile(r"\d+%\|.*\||it/s\]|s/it\]|\d+/\d+ \[")
LIBRARY_BARS = re.compile(r"^(Loading |Fetching |Downloading |Map|Generating |Saving )")  # theirs, not ours


def _run(args, cwd, weights, extra_env=None):
    env = {**os.environ, "REALSR_R1_WEIGHTS": str(weights), "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(var, None)  # what quiet.configure sets: the child must set it itself
    r = subprocess.run([sys.executable, "-m", "realsr_r1.infer", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    lines = [line.strip() for line in re.split(r"[\r\n]", r.stdout + r.stderr) if line.strip()]
    return r.returncode, lines


def _foreign(lines):
    return [line for line in lines if LIBRARY_BARS.match(line) or (not OURS.match(line) and not PROGRESS.search(line))]


@pytest.mark.parametrize("profile", ["tiny"])
def test_the_restore_command_prints_only_our_lines(tmp_path, weights_dir, profile):
    """The restore command on the tiny profile, whose VLM and upscaler load transformers, diffusers
    and bitsandbytes: every line is ours or a progress bar. With --verbose the libraries speak
    again (transformers warns that torchvision is missing). The README's own restore commands
    (lite) are checked the same way where test_docs_commands.py runs them."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    args = ["--input", "examples", "--output", "restored"] if profile == "lite" else \
        ["--input", "examples/chip.png", "--output", "chip.png", "--profile", "tiny"]
    rc, lines = _run(args, tmp_path, weights_dir)
    assert rc == 0 and lines and not _foreign(lines), _foreign(lines)
    if profile == "tiny":
        rc, lines = _run([*args[:3], "chip-verbose.png", *args[4:], "--verbose"], tmp_path, weights_dir)
        assert rc == 0 and _foreign(lines), lines  # the libraries' own lines are back


def test_configure_quiets_the_libraries_and_verbose_leaves_them(monkeypatch):
    import warnings

    from realsr_r1 import quiet

    # what configure sets, undone after
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(quiet, "_bars", True)
    for name in ("nncf", "bitsandbytes", "transformers"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.INFO)
    monkeypatch.setattr(quiet, "_verbose", False)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    quiet.configure(verbose=True)
    assert logging.getLogger("nncf").level == logging.INFO
    quiet.configure(verbose=False)
    assert all(logging.getLogger(n).getEffectiveLevel() >= logging.ERROR
               for n in ("nncf", "bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils"))
    logging.getLogger("nncf").setLevel(logging.INFO)  # as NNCF does when it is imported
    quiet.settle("nncf")
    assert logging.getLogger("nncf").level == logging.ERROR
    with quiet.hushed():
        print("a library's progress bar")  # kept from stdout
