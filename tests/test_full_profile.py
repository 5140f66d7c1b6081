"""The full profile (VLM policy + diffusion restorer) end to end, through the code users run:
tiny random models saved into a weights folder, loaded by `infer --profile` from configs/tiny.yaml."""

import json
import os
import sys

import pytest

from conftest import REPO, photo, weights_env
from realsr_r1 import infer
from realsr_r1.cot import parse_cot
from realsr_r1.imageio import read_image
from realsr_r1.pipeline import AnalysisReady, Done, PlanReady, StageImage, StagePreview, StageStarted, TextDelta
from realsr_r1.profiles import build_pipeline, load_config

sys.path.insert(0, os.path.dirname(__file__))
from realsr_r1.tiny import build_tiny_upscaler
from realsr_r1.tiny import build_tiny_vlm


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_weights")
    build_tiny_vlm(root / "tiny-vlm")
    build_tiny_upscaler(root / "tiny-upscaler")
    with weights_env(root):
        yield root


def test_events_from_a_real_vlm_and_diffusion_restorer(tiny_weights, tmp_path):
    pipe = build_pipeline(load_config("tiny"), device="cpu")
    photo((16, 12)).save(tmp_path / "p.png")
    events = list(pipe.run(read_image(tmp_path / "p.png"), seed=1))
    kinds = [type(e) for e in events]
    assert TextDelta in kinds and kinds.index(TextDelta) < kinds.index(PlanReady) < kinds.index(StageStarted)
    assert kinds.count(AnalysisReady) == 1 and kinds.index(AnalysisReady) < kinds.index(TextDelta)
    analysis = next(e.analysis for e in events if isinstance(e, AnalysisReady))
    assert events[-1].result.analysis is analysis and events[-1].result.timings["analyse"] > 0
    stages = [(e.stage, type(e).__name__) for e in events if isinstance(e, (StageStarted, StageImage))]
    assert stages == [("rough", "StageStarted"), ("rough", "StageImage"), ("middle", "StageStarted"),
                      ("middle", "StageImage"), ("final", "StageStarted"), ("final", "StageImage")]
    assert any(isinstance(e, StagePreview) for e in events)  # previews while denoising
    sizes = {e.stage: e.rgb.shape[:2] for e in events if isinstance(e, StageImage)}
    assert sizes == {"rough": (12, 16), "middle": (24, 32), "final": (48, 64)}
    assert isinstance(events[-1], Done)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    plan = events[-1].result.plan
    assert plan.problems == parse_cot(text).problems  # garbage from a random VLM: problems, no crash
    assert plan.problems


def test_infer_with_the_full_code_path(tiny_weights, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    photo((12, 10)).save(src / "a.png")
    photo((10, 10), mode="L").save(src / "g.png")
    rc = infer.main(["-i", str(src), "-o", str(tmp_path / "o"), "--profile", str(REPO / "configs" / "tiny.yaml"), "--quiet",
                     "--save-stages", "--seed", "5"])
    assert rc == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "o" / "a.json").read_text())
    assert side["profile"] == "tiny" and side["restorer"] == "sd-x4-upscaler" and side["seed"] == 5
    assert side["stages"]["final"]["size"] == [48, 40]
    assert 1 <= side["reason_tokens"] <= 24  # tiny.yaml's max_new_tokens
    assert side["rough"] == "diffusion" and side["strength"] == 0.5 and side["tile"] == 32
    assert side["policy_output"] and isinstance(side["plan"]["problems"], list)
    assert any("random weights" in n and "noise" in n for n in side["notes"])  # says what a tiny result is
    assert read_image(tmp_path / "o" / "a.png").size == (48, 40)
    assert read_image(tmp_path / "o" / "g.png").mode == "L"
    assert (tmp_path / "o" / "a_middle.png").exists()


def test_final_candidates_from_the_profile_reach_the_sidecar(tiny_weights, tmp_path, capsys):
    """`restorer.candidates` and `restorer.chooser` from the command line: the profile gives the
    upscaler a chooser, and the sidecar records each sample with its reward and the winner."""
    src = tmp_path / "in"
    src.mkdir()
    photo((12, 10)).save(src / "a.png")
    rc = infer.main(["-i", str(src), "-o", str(tmp_path / "o"), "--profile", "tiny", "--quiet", "--seed", "5",
                     "--set", "restorer.candidates=2", "--set", "restorer.chooser={tiny_rewards:darkness: {}}"])
    assert rc == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "o" / "a.json").read_text())
    assert side["candidates"] == 2 and side["chooser"] == {"reward": "tiny_rewards:darkness"}
    rows = side["choice"]["candidates"]
    assert [r["seed"] for r in rows] == [7, 1007]
    assert side["choice"]["winner"] == max(rows, key=lambda r: r["reward"])["label"]
    rc = infer.main(["-i", str(src), "-o", str(tmp_path / "o2"), "--profile", "tiny", "--quiet",
                     "--set", "restorer.candidates=0"])
    err = capsys.readouterr().err
    assert rc != 0 and "candidates must be a whole number" in err and "Traceback" not in err


def test_the_one_step_restorer_from_the_tiny_profile(tiny_weights, tmp_path, capsys):
    """`--set restorer.type=onestep` swaps in the profile's onestep section (tiny SD 2.1-base and its
    adapter, built on first use), whatever the order of the other overrides; the sidecar names the
    restorer, its adapter and the one UNet evaluation; `--fidelity` dials it; a broken adapter is one line."""
    from realsr_r1.restorers.onestep_adapter import read_adapter, save_adapter

    src = tmp_path / "in"
    src.mkdir()
    photo((12, 10)).save(src / "a.png")
    rc = infer.main(["-i", str(src), "-o", str(tmp_path / "o"), "--profile", "tiny", "--quiet", "--seed", "3",
                     "--set", "restorer.tile=16", "--set", "restorer.type=onestep", "--fidelity", "0.25"])
    assert rc == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "o" / "a.json").read_text())
    assert side["restorer"] == "onestep" and side["unet_evaluations_per_stage"] == 1 and side["tile"] == 16
    assert side["fidelity"] == 0.25 and side["rough"] == "input"
    assert side["adapter"]["path"].endswith("tiny-sd21/osediff.pkl") and side["base"].endswith("tiny-sd21")
    assert side["settings"]["config"]["restorer"]["model"] == "tiny-sd21"
    assert "steps" not in side["settings"]["config"]["restorer"]  # the upscaler's keys did not leak
    assert read_image(tmp_path / "o" / "a.png").size == (48, 40)
    data = read_adapter(tiny_weights / "tiny-sd21" / "osediff.pkl")
    data["state_dict_unet"].pop(next(iter(data["state_dict_unet"])))
    bad = save_adapter(data, tmp_path / "bad.pkl")
    rc = infer.main(["-i", str(src), "-o", str(tmp_path / "o3"), "--profile", "tiny", "--quiet",
                     "--set", "restorer.type=onestep", "--restorer-adapter", str(bad)])
    err = capsys.readouterr().err
    assert rc != 0 and "state_dict_unet has no" in err and "Traceback" not in err
    rc = infer.main(["-i", str(src), "-o", str(tmp_path / "o4"), "--profile", "tiny", "--quiet",
                     "--set", "restorer.type=onestep", "--restorer-adapter", str(tmp_path / "none.pkl")])
    err = capsys.readouterr().err
    assert rc != 0 and "restorer adapter not found" in err and "--restorer-adapter" in err


def test_the_full_profiles_alternatives_are_checked_and_fetchable(monkeypatch, tmp_path):
    """full.yaml's onestep alternative passes the key check; a misspelt key inside an alternative is
    named; `download full --restorer onestep` asks for SD 2.1-base and OSEDiff's adapter, offline in
    one line naming both."""
    from realsr_r1 import download
    from realsr_r1.profiles import ConfigError, check_profile

    cfg = load_config("full", ["restorer.type=onestep"])
    check_profile(cfg)
    assert cfg["restorer"]["type"] == "onestep" and cfg["restorer"]["model"] == "sd-2-1-base"
    broken = load_config("full")
    broken["alternatives"]["restorer"]["onestep"]["tiles"] = 3
    with pytest.raises(ConfigError, match=r"alternatives\.restorer\.onestep\.tiles: unknown key .*tile"):
        check_profile(broken)
    models = download.full_models(restorer="onestep")
    assert [m.folder for m in models] == ["qwen2.5-vl-3b-instruct", "sd-2-1-base"]
    assert download.full_adapter("onestep")[0] == "osediff.pkl" and download.full_adapter() is None
    monkeypatch.setattr(download.weights, "realesrgan_x4plus", lambda d=None: tmp_path / "x4plus")
    with pytest.raises(download.DownloadError) as err:
        download.download("full", tmp_path, log=lambda m: None, restorer="onestep")
    assert "stable-diffusion-2-1-base" in str(err.value) and "osediff.pkl" in str(err.value)
    with pytest.raises(download.DownloadError, match="restorers are diffusion, onestep"):
        download.download("full", tmp_path, log=lambda m: None, restorer="sdxl")
