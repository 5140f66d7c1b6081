"""DiffusionStages over a tiny random StableDiffusionUpscalePipeline, offline on CPU."""

import numpy as np
import pytest

pytest.importorskip("diffusers")

from realsr_r1.cot import Plan, parse_cot  # noqa: E402
from realsr_r1.imageio import LoadedImage  # noqa: E402
from realsr_r1.pipeline import StageImage, StagePreview, StageStarted  # noqa: E402
from realsr_r1.restorers.diffusion import (DiffusionStages, color_fix, noise_level_for,  # noqa: E402
                                          stage_prompt)

from tiny_diffusion import build_tiny_upscaler  # noqa: E402

SIZES = {"rough": (16, 12), "middle": (32, 24), "final": (64, 48)}
COT = ("<degradation>blur: light; noise: heavy; jpeg: medium; downsample: x4</degradation>"
       "<rough_understand>a red house</rough_understand><rough_image></rough_image>"
       "<middle_understand>a red brick house, a tree</middle_understand><middle_image></middle_image>"
       "<final_understand>brick texture, leaves</final_understand><final_image></final_image>")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_upscaler(tmp_path_factory.mktemp("sd") / "tiny-x4")


@pytest.fixture(scope="module")
def restorer(tiny_path):
    return DiffusionStages.from_pretrained(tiny_path, device="cpu", num_inference_steps=3, preview_every=1)


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    rgb = rng.random((12, 16, 3), dtype=np.float32)
    alpha = np.linspace(0, 1, 12 * 16, dtype=np.float32).reshape(12, 16)
    return LoadedImage(rgb=rgb, alpha=alpha)


def run(restorer, image, plan, seed=0):
    return list(restorer.stages(image, plan, sizes=SIZES, seed=seed))


def finals(events):
    return {e.stage: e for e in events if isinstance(e, StageImage)}


def test_describe(restorer):
    assert restorer.describe() == {"restorer": "sd-x4-upscaler", "device": "cpu", "precision": "fp32", "steps": 3}


def test_events_sizes_previews_and_range(restorer, image):
    events = run(restorer, image, parse_cot(COT))
    kinds = [(type(e).__name__, e.stage) for e in events]
    expected = []
    for s in ("rough", "middle", "final"):
        expected += [("StageStarted", s), ("StagePreview", s), ("StagePreview", s), ("StageImage", s)]
    assert kinds == expected  # 3 steps, preview every step except the last (that one is the image)
    for e in events:
        w, h = SIZES[e.stage]
        if isinstance(e, StageStarted):
            assert e.size == (w, h)
        elif isinstance(e, StagePreview):
            assert e.image.shape == (h, w, 3) and e.total == 3 and 1 <= e.step < 3
        else:
            assert e.rgb.shape == (h, w, 3) and e.rgb.dtype == np.float32
            assert np.isfinite(e.rgb).all() and e.rgb.min() >= 0 and e.rgb.max() <= 1
            assert e.alpha.shape == (h, w)


def test_seeds(restorer, image):
    plan = parse_cot(COT)
    a, b, c = (finals(run(restorer, image, plan, seed=s))["final"].rgb for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_no_previews_when_every_is_not_below_steps(tiny_path, image):
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", num_inference_steps=2, preview_every=5,
                                        color_fix="adain", guidance_scale=1.0)
    events = run(r, image, Plan())
    assert not any(isinstance(e, StagePreview) for e in events)
    assert [e.stage for e in events if isinstance(e, StageImage)] == ["rough", "middle", "final"]


@pytest.mark.parametrize("text", [None, "", "garbage <degradation>noise: ???", "<final_understand>x" * 50])
def test_garbage_plan_still_works(restorer, image, text):
    image.alpha = None
    out = finals(run(restorer, image, parse_cot(text)))
    assert out["final"].rgb.shape == (48, 64, 3) and out["final"].alpha is None
    assert np.isfinite(out["final"].rgb).all()


def test_noise_level_mapping():
    levels = {lvl: noise_level_for(parse_cot(f"<degradation>noise: {lvl}</degradation>"))
              for lvl in ("none", "light", "medium", "heavy")}
    assert levels == {"none": 10, "light": 20, "medium": 40, "heavy": 80}
    assert noise_level_for(Plan()) == 10 and noise_level_for(None) == 10
    assert noise_level_for(parse_cot("<degradation>noise: heavy</degradation>"), max_noise_level=50) == 50


def test_prompt_words():
    plan = parse_cot(COT)
    p = stage_prompt(plan, "middle")
    assert p.startswith("a red brick house, a tree; clean, sharp, high quality; remove ")
    assert "heavy noise" in p and "light blur" in p and "medium jpeg artifacts" in p and "downsample" not in p
    assert stage_prompt(Plan(), "rough") == "clean, sharp, high quality"


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_color_fix_restores_mean_colour(method):
    rng = np.random.default_rng(1)
    src = np.clip(0.5 + 0.1 * rng.standard_normal((32, 32, 3)), 0, 1).astype(np.float32)
    shifted = np.clip(src + np.array([0.2, -0.15, 0.1], np.float32), 0, 1)
    fixed = color_fix(shifted, src, method)
    assert np.abs(fixed.mean((0, 1)) - src.mean((0, 1))).max() < 0.01
    assert np.abs(shifted.mean((0, 1)) - src.mean((0, 1))).max() > 0.1
    if method == "wavelet":  # detail kept: high frequencies of the output survive
        assert np.corrcoef((fixed - fixed.mean()).ravel(), (src - src.mean()).ravel())[0, 1] > 0.9
    assert color_fix(shifted, src, "none") is not None
    with pytest.raises(ValueError):
        color_fix(shifted, src, "nope")


def test_half_precision_nan_retries_in_fp32(tiny_path, image, monkeypatch, caplog):
    import torch

    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", dtype="bf16", num_inference_steps=2,
                                        preview_every=0)
    assert r.describe()["precision"] == "bf16"
    real = r._upscale
    seen = []

    def flaky(low, *args, **kwargs):  # NaNs whenever the pipeline runs in half precision
        seen.append(r.pipe.unet.dtype)
        out = real(low, *args, **kwargs)
        return out * np.nan if r.pipe.unet.dtype != torch.float32 else out

    monkeypatch.setattr(r, "_upscale", flaky)
    with caplog.at_level("WARNING"):
        out = finals(run(r, image, Plan()))
    assert seen == [torch.bfloat16, torch.float32] * 3
    assert all(np.isfinite(e.rgb).all() for e in out.values())
    assert len(r.fallbacks) == 3 and "retrying in fp32" in caplog.text
    assert r.pipe.unet.dtype == torch.bfloat16  # back to the chosen precision afterwards


def test_pipeline_error_reaches_the_consumer(restorer, image, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(restorer, "_upscale", boom)
    events = restorer.stages(image, Plan(), sizes=SIZES, seed=0)
    assert isinstance(next(events), StageStarted)
    with pytest.raises(RuntimeError, match="out of memory"):
        next(events)
