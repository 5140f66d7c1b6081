"""Real-ESRGAN second-order degradation: determinism, recorded labels, the items mapping, the CLI."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realsr_r1.cot import parse_degradation, render_degradation
from realsr_r1.degrade import (
    KERNEL_TYPES,
    ROUND1,
    ROUND2,
    RoundConfig,
    add_gaussian_noise,
    add_poisson_noise,
    degrade,
    draw_params,
    equivalent_sigma,
    gaussian_blur,
    gaussian_kernel,
    image_seed,
    items_from_params,
    jpeg_compress,
    kernel_from_params,
    main,
    sinc_kernel,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _photo(name="dog.png", size=(96, 64)) -> np.ndarray:
    """A real photo, resized small so a degradation takes milliseconds."""
    with Image.open(EXAMPLES / name) as im:
        return np.asarray(im.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) / 255


@pytest.fixture(scope="module")
def hr():
    return _photo()


# --- determinism and output ---------------------------------------------------------------------------
def test_same_seed_gives_identical_bytes_and_labels(hr):
    a, b = degrade(hr, 4, seed=7), degrade(hr, 4, seed=7)
    assert a.lq.tobytes() == b.lq.tobytes()
    assert json.dumps(a.params, sort_keys=True) == json.dumps(b.params, sort_keys=True)
    assert a.degradation == b.degradation


def test_different_seeds_differ(hr):
    outs = [degrade(hr, 4, seed=s) for s in range(4)]
    assert len({o.lq.tobytes() for o in outs}) == 4
    assert len({json.dumps(o.params, sort_keys=True) for o in outs}) == 4


@pytest.mark.parametrize("scale", [2, 4])
def test_lq_size_is_hr_over_scale_on_the_8bit_grid(hr, scale):
    lq = degrade(hr, scale, seed=1).lq
    assert lq.shape == (64 // scale, 96 // scale, 3) and lq.dtype == np.float32
    assert lq.min() >= 0 and lq.max() <= 1
    assert np.abs(lq * 255 - np.round(lq * 255)).max() < 1e-4


def test_tiny_and_bad_inputs():
    tiny = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    for s in range(10):  # round 1 may shrink it to a single pixel
        assert degrade(tiny, 4, seed=s).lq.shape == (2, 2, 3)
    with pytest.raises(ValueError, match="smaller than the scale"):
        degrade(tiny[:3, :3], 4)
    with pytest.raises(ValueError, match="RGB"):
        degrade(tiny[..., 0], 4)


# --- every parameter recorded ---------------------------------------------------------------------------
def _check_kernel(k: dict):
    assert k["kernel_size"] in range(7, 22, 2)
    if k["type"] == "sinc":
        assert 0 < k["cutoff"] <= np.pi
    else:
        assert k["type"] in KERNEL_TYPES
        assert {"sigma_x", "sigma_y", "theta"} <= k.keys()
        assert ("beta" in k) == (k["type"] not in ("iso", "aniso"))
        if k["type"].endswith("iso") and not k["type"].endswith("aniso"):
            assert k["sigma_x"] == k["sigma_y"] and k["theta"] == 0
    assert kernel_from_params(k).shape == (k["kernel_size"],) * 2
    assert k["sigma_equiv"] >= 0 and len(k["at_size"]) == 2


def _check_noise(n: dict, cfg: RoundConfig):
    assert n["kind"] in ("gaussian", "poisson") and isinstance(n["gray"], bool)
    if n["kind"] == "gaussian":
        assert cfg.noise_sigma[0] <= n["sigma"] <= cfg.noise_sigma[1]
    else:
        assert cfg.poisson_scale[0] <= n["scale"] <= cfg.poisson_scale[1]
    assert n["sigma_equiv"] >= 0 and len(n["at_size"]) == 2


def test_every_drawn_parameter_is_recorded(hr):
    small = hr[:32, :32]
    for seed in range(12):
        d = degrade(small, 4, seed=seed)
        p = json.loads(json.dumps(d.params))  # JSON-serialisable as it is
        assert p["seed"] == seed and p["scale"] == 4 and p["lq_size"] == [8, 8] and p["hr_size"] == [32, 32]
        r1, r2, fin = p["round1"], p["round2"], p["final"]
        assert r1["blur"]["applied"] is True
        for blur in (r1["blur"], r2["blur"]):
            if blur["applied"]:
                _check_kernel(blur)
        for r, cfg in ((r1, ROUND1), (r2, ROUND2)):
            assert r["resize"]["direction"] in ("up", "down", "keep")
            assert r["resize"]["mode"] in ("area", "bilinear", "bicubic")
            lo, hi = cfg.resize_range
            assert lo <= r["resize"]["scale"] <= hi
            _check_noise(r["noise"], cfg)
        assert 30 <= r1["jpeg"]["quality"] <= 95 and 30 <= fin["jpeg"]["quality"] <= 95
        assert fin["order"] in ("resize_sinc_then_jpeg", "jpeg_then_resize_sinc")
        assert fin["resize"]["mode"] in ("area", "bilinear", "bicubic")
        if fin["sinc"]["applied"]:
            _check_kernel(fin["sinc"])
        assert p["measured"]["noise_sigma"] > 0
        assert [i.type for i in d.items] == ["blur", "noise", "jpeg", "downsample"]
        assert d.items[-1].level == "x4"
        parsed, problems = parse_degradation(d.degradation)
        assert not problems and parsed == d.items


def test_draws_follow_real_esrgan_probabilities():
    rng = np.random.default_rng(0)
    draws = [draw_params(rng) for _ in range(3000)]
    n = len(draws)

    def share(values, key):
        return Counter(values)[key] / n

    r1_kinds = [d["round1"]["blur"]["type"] for d in draws]
    assert share(r1_kinds, "sinc") == pytest.approx(0.1, abs=0.02)
    for kind, p in zip(KERNEL_TYPES, ROUND1.kernel_prob):
        assert share(r1_kinds, kind) == pytest.approx(0.9 * p, abs=0.025)
    for rnd, probs in (("round1", (0.2, 0.7, 0.1)), ("round2", (0.3, 0.4, 0.3))):
        dirs = [d[rnd]["resize"]["direction"] for d in draws]
        for key, p in zip(("up", "down", "keep"), probs):
            assert share(dirs, key) == pytest.approx(p, abs=0.03)
        assert share([d[rnd]["noise"]["kind"] for d in draws], "gaussian") == pytest.approx(0.5, abs=0.03)
        assert share([d[rnd]["noise"]["gray"] for d in draws], True) == pytest.approx(0.4, abs=0.03)
    assert share([d["round2"]["blur"]["applied"] for d in draws], True) == pytest.approx(0.8, abs=0.03)
    assert share([d["final"]["sinc"]["applied"] for d in draws], True) == pytest.approx(0.8, abs=0.03)
    orders = [d["final"]["order"] for d in draws]
    assert share(orders, "jpeg_then_resize_sinc") == pytest.approx(0.5, abs=0.03)
    sigmas = [d["round2"]["blur"]["sigma_x"] for d in draws if d["round2"]["blur"].get("sigma_x")]
    assert 0.2 <= min(sigmas) and max(sigmas) <= 1.5
    qualities = [d["final"]["jpeg"]["quality"] for d in draws]
    assert min(qualities) == 30 and max(qualities) == 95


# --- the items mapping -----------------------------------------------------------------------------
def _params(blur1=None, blur2=None, sinc=None, noise=0.0, jpeg1=(50, [256, 256]), jpeg2=(80, [64, 64])):
    off = {"applied": False}
    return {
        "scale": 4, "hr_size": [256, 256], "lq_size": [64, 64],
        "round1": {"blur": blur1 or off, "jpeg": {"quality": jpeg1[0], "at_size": jpeg1[1]}},
        "round2": {"blur": blur2 or off},
        "final": {"sinc": sinc or off, "jpeg": {"quality": jpeg2[0], "at_size": jpeg2[1]}},
        "measured": {"noise_sigma": noise},
    }


def _levels(params):
    return {i.type: (i.level, i.params) for i in items_from_params(params)}


def test_items_from_hand_picked_params():
    # sigma 4 HR px = 1 LQ px (light); a round-1 JPEG at HR size has 2-px blocks in the LQ: not counted.
    blur1 = {"applied": True, "sigma_equiv": 4.0, "at_size": [256, 256]}
    lv = _levels(_params(blur1=blur1, noise=10.0))
    assert lv["blur"] == ("light", {"sigma": 1.0})
    assert lv["noise"] == ("medium", {"sigma": 10.0})
    assert lv["jpeg"] == ("light", {"quality": 80.0})
    assert lv["downsample"] == ("x4", {})
    # Round 2 at 48 px (upscaled by 4/3 afterwards): 1.5 → 2 LQ px; in quadrature with 1 → 2.24 (heavy).
    blur2 = {"applied": True, "sigma_equiv": 1.5, "at_size": [48, 48]}
    assert _levels(_params(blur1=blur1, blur2=blur2))["blur"] == ("heavy", {"sigma": 2.24})
    sinc = {"applied": True, "sigma_equiv": 0.5, "at_size": [64, 64]}
    assert _levels(_params(sinc=sinc))["blur"] == ("none", {"sigma": 0.5})
    # A round-1 JPEG at 100 px (5-px blocks in the LQ) is visible: the worse quality wins.
    assert _levels(_params(jpeg1=(40, [100, 100])))["jpeg"] == ("heavy", {"quality": 40.0})
    assert _levels(_params(noise=1.0))["noise"][0] == "none"
    assert _levels(_params(noise=25.0))["noise"][0] == "heavy"


def test_forced_configs_map_to_the_expected_levels(hr):
    quiet = dict(blur_prob=0.0, resize_prob=(0, 0, 1), gaussian_noise_prob=1.0, gray_noise_prob=0.0,
                 jpeg_quality=(95, 95))
    for sigma, level in ((0.0, "none"), (25.0, "heavy")):
        cfg = RoundConfig(noise_sigma=(sigma, sigma), **quiet)
        d = degrade(hr, 2, seed=0, round1=cfg, round2=cfg, final_sinc_prob=0.0)
        lv = _levels(d.params)
        assert lv["blur"] == ("none", {"sigma": 0.0})
        assert lv["jpeg"] == ("none", {"quality": 95.0})
        assert lv["noise"][0] == level, d.degradation
    iso3 = {"blur_prob": 1.0, "kernel_prob": (1, 0, 0, 0, 0, 0), "sinc_prob": 0.0,
            "blur_sigma": (3.0, 3.0), "kernel_sizes": (21,)}
    cfg = RoundConfig(noise_sigma=(0, 0), **{**quiet, **iso3})
    # Both rounds blur with sigma 3 at HR size (round 2 blurs before it resizes): 1.5 LQ px each.
    d = degrade(hr, 2, seed=0, round1=cfg, round2=cfg, final_sinc_prob=0.0)
    assert items_from_params(d.params)[0].params["sigma"] == pytest.approx(np.hypot(1.5, 1.5), abs=0.05)


# --- kernels and single degradations ------------------------------------------------------------------
def test_equivalent_sigma():
    # Exact for Gaussians wider than a pixel (narrower ones are genuinely sharper once sampled).
    for s in (0.8, 1.0, 2.0, 3.0):
        assert equivalent_sigma(gaussian_kernel(21, s)) == pytest.approx(s, abs=0.02)
        assert equivalent_sigma(gaussian_kernel(21, s), band=0.25) == pytest.approx(s, abs=0.02)
    aniso = equivalent_sigma(gaussian_kernel(21, 1.0, 2.0, 0.3))
    assert 1.0 < aniso < 2.0
    cutoffs = [np.pi / 5, np.pi / 3, np.pi / 2, np.pi]
    sinc = [equivalent_sigma(sinc_kernel(21, c)) for c in cutoffs]
    assert sinc == sorted(sinc, reverse=True) and sinc[-1] < 0.2
    # A sinc at HR with cutoff above the LQ band leaves the LQ untouched.
    assert equivalent_sigma(sinc_kernel(21, np.pi / 3), band=0.25) == 0.0


def test_single_degradation_helpers(hr):
    grey = np.full((128, 128, 3), 0.5, np.float32)
    rng = np.random.default_rng(0)
    noisy = add_gaussian_noise(grey, 10.0, rng)
    assert (noisy - 0.5).std() * 255 == pytest.approx(10.0, rel=0.03)
    assert not np.allclose(noisy[..., 0], noisy[..., 1])
    gray_noisy = add_gaussian_noise(grey, 10.0, rng, gray=True)
    assert np.array_equal(gray_noisy[..., 0], gray_noisy[..., 2])
    ramp = np.broadcast_to(np.linspace(0.2, 0.8, 256, dtype=np.float32)[None, :, None], (64, 256, 3))
    pois, sigma = add_poisson_noise(ramp, 1.0, rng)
    assert sigma == pytest.approx(255 * np.sqrt(0.5 / 256), rel=0.02)  # 256 grey values → vals 256
    assert (pois - ramp).std() * 255 == pytest.approx(sigma, rel=0.05)
    blurred = [gaussian_blur(hr, s) for s in (0, 1, 2)]
    assert np.array_equal(blurred[0], hr)
    detail = [np.abs(np.diff(b, axis=1)).mean() for b in blurred]
    assert detail[0] > detail[1] > detail[2]
    errors = [np.abs(jpeg_compress(hr, q) - hr).mean() for q in (95, 60, 30)]
    assert 0 < errors[0] < errors[1] < errors[2]


# --- CLI -------------------------------------------------------------------------------------------
def _folder(tmp_path, names=("dog.png", "frog.png")):
    src = tmp_path / "hr"
    src.mkdir(exist_ok=True)
    for name in names:
        Image.fromarray((_photo(name, (64, 48)) * 255).round().astype(np.uint8)).save(src / name)
    return src


def test_cli_writes_images_and_labels(tmp_path, capsys):
    src = _folder(tmp_path)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "lq"
    assert main(["--input", str(src), "--output", str(out), "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and len([ln for ln in err.splitlines() if "broken.png" in ln]) == 1
    lines = [json.loads(ln) for ln in (out / "labels.jsonl").read_text().splitlines()]
    assert [ln["file"] for ln in lines] == ["dog.png", "frog.png"]
    assert sorted(p.name for p in out.iterdir()) == ["dog.png", "frog.png", "labels.jsonl"]
    for ln in lines:
        with Image.open(out / ln["file"]) as im:
            assert im.size == (16, 12)
        assert ln["degradation"] == render_degradation(parse_degradation(ln["degradation"])[0])
        assert [i["type"] for i in ln["items"]] == ["blur", "noise", "jpeg", "downsample"]
        assert ln["params"]["seed"] == image_seed(3, ln["source"])


def test_cli_seeds_are_stable_when_files_are_added(tmp_path):
    src = _folder(tmp_path, ("dog.png",))
    main(["-i", str(src), "-o", str(tmp_path / "a")])
    _folder(tmp_path, ("chip.png",))
    assert main(["-i", str(src), "-o", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "dog.png").read_bytes() == (tmp_path / "b" / "dog.png").read_bytes()
    main(["-i", str(src), "-o", str(tmp_path / "c"), "--seed", "1"])
    assert (tmp_path / "a" / "dog.png").read_bytes() != (tmp_path / "c" / "dog.png").read_bytes()
