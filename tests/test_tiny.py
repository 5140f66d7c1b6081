"""The tiny profile and the smoke training config work from a fresh clone: their tiny random models
are built on first use, offline, into the weights folder, atomically."""

import json
import os

import pytest

from conftest import REPO, photo, weights_env
from realsr_r1 import infer, profiles, tiny


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_infer_tiny_profile_from_an_empty_weights_folder(tmp_path, capsys):
    weights = tmp_path / "weights"
    photo((12, 10)).save(tmp_path / "p.png")
    with weights_env(weights):
        rc = infer.main(["-i", str(tmp_path / "p.png"), "-o", str(tmp_path / "o"), "--profile", "tiny", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert (weights / "tiny-vlm" / "config.json").is_file()
    assert (weights / "tiny-upscaler" / "model_index.json").is_file()
    assert sorted(p.name for p in weights.iterdir() if not p.name.startswith(".")) == ["tiny-upscaler", "tiny-vlm"]
    assert not _leftovers(weights)
    side = json.loads((tmp_path / "o" / "p.json").read_text())
    assert side["profile"] == "tiny" and side["stages"]["final"]["size"] == [48, 40]


def test_smoke_training_config_resolves_its_models_from_an_empty_weights_folder(tmp_path):
    """What `python -m realsr_r1.train --config configs/grpo-tiny.yaml` resolves before training:
    the policy folder (grpo.model_path) and the reward restorer (grpo.restorations_factory)."""
    from realsr_r1.training import grpo

    cfg = profiles.load_config(str(REPO / "configs" / "grpo-tiny.yaml"), [f"data={tmp_path / 'data'}"])
    with weights_env(tmp_path / "weights") as weights:
        assert grpo.model_path(cfg) == weights / "tiny-vlm"
        assert (weights / "tiny-vlm" / "config.json").is_file()
        restorations = grpo.restorations_factory(cfg, "cpu")()
        assert (weights / "tiny-upscaler" / "model_index.json").is_file()
        assert restorations is not None


def test_interrupted_build_leaves_nothing_and_the_next_use_builds(tmp_path, monkeypatch):
    def broken(path, **kw):
        (path / "half-written.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setitem(tiny.BUILDERS, "tiny-vlm", broken)
    with pytest.raises(KeyboardInterrupt):
        tiny.ensure("tiny-vlm", tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert tiny.ensure("tiny-vlm", tmp_path) == tmp_path / "tiny-vlm"
    assert (tmp_path / "tiny-vlm" / "tokenizer_config.json").is_file() and not _leftovers(tmp_path)


def test_built_folders_get_the_usual_modes(tmp_path):
    old = os.umask(0o022)
    try:
        path = tiny.ensure("tiny-upscaler", tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert (path / "model_index.json").stat().st_mode & 0o777 == 0o644


def test_other_model_names_are_not_built(tmp_path):
    with weights_env(tmp_path), pytest.raises(FileNotFoundError, match="python -m realsr_r1.download full"):
        profiles._model_path({"model": "qwen2.5-vl-3b-instruct"}, "policy")
    assert list(tmp_path.iterdir()) == []


def test_readme_shows_the_smoke_run():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for command in ("python -m realsr_r1.data build --hr examples --out data/tiny",
                    "python -m realsr_r1.train --config configs/grpo-tiny.yaml --set data=data/tiny"):
        assert command in readme
