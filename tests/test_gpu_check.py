"""benchmarks/gpu_check.py runs end to end on CPU with --tiny (on a GPU it runs at real sizes)."""

import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_script_runs_on_cpu_with_tiny_models(tmp_path, weights_dir):
    # The session's weights: Real-ESRGAN (the rough stage) converted and calibrated once for all tests.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "REALSR_R1_WEIGHTS": str(weights_dir)}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--workdir",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| check")}
    assert set(rows) == {"bf16", "fp16-nan-fallback", "vlm-4bit", "oom-tile-halving", "cpu-offload", "vae-slicing",
                         "full-profile", "restorer-rl", "onestep", "onestep-full-profile", "onestep-pairs"}
    # what CPU can check passes; what needs CUDA (or real pairs) says so
    assert all(rows[c] == "ok" for c in ("bf16", "fp16-nan-fallback", "vae-slicing", "full-profile", "restorer-rl",
                                         "onestep", "onestep-full-profile")), rows
    assert rows["onestep-pairs"] == "skipped"
    assert rows["oom-tile-halving"] == rows["cpu-offload"] == "skipped"
    assert rows["vlm-4bit"] in ("ok", "skipped")
