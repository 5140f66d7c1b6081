"""An installed wheel works outside a source checkout: the profiles ship inside the package.

The wheel is built from a copy of the sources, installed with pip into a fresh venv, and run from a
folder outside the checkout. The fresh venv sees this environment's dependencies through a .pth
file (no second 2 GB of torch), but not the checkout: realsr_r1 must come from the wheel."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, photo


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin folder) with only the realsr-r1 wheel installed in it."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "realsr_r1", src / "realsr_r1", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", root / "dist", src])
    (wheel,) = (root / "dist").glob("realsr_r1-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    # The dependencies, from this environment's site folders as plain paths: their .pth files (among
    # them the editable install of the checkout) are not run.
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return python, venv / "bin"


def test_installed_wheel_restores_an_image_outside_the_checkout(installed, tmp_path, weights_dir):
    python, bin_dir = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    photo((12, 10)).save(work / "p.png")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(REALSR_R1_WEIGHTS=str(weights_dir), HF_HUB_OFFLINE="1")
    code = ("import realsr_r1.profiles as p; print(p.__file__); print(p.CONFIG_DIR); "
            "assert p.load_config('grpo-tiny')['model'] == 'tiny-vlm'")  # training presets ship too
    where = _run([python, "-c", code], cwd=work, env=env).stdout.split()
    assert len(where) == 2 and all(Path(w).is_relative_to(python.parent.parent) for w in where), where
    for cmd in ([bin_dir / "realsr-r1"], [python, "-m", "realsr_r1.infer"]):
        out = work / f"out-{len(cmd)}"
        proc = _run([*cmd, "--input", "p.png", "--output", out, "--profile", "lite", "--quiet"], cwd=work, env=env)
        assert (out / "p.png").is_file() and (out / "p.json").is_file(), proc.stderr
