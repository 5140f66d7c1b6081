"""NIQE (realsr_r1/niqe.py) to pyiqa's protocol: reference values, pyiqa's own values, invariants,
the `--metrics niqe` of evaluate and the `niqe` visual expert."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import EXAMPLES, REPO, SHARED
from realsr_r1 import evaluate
from realsr_r1.niqe import PARAMS_PATH, imresize, niqe, niqe_batch, pristine_params, to_luma
from realsr_r1.rewards import visual

REFERENCE = REPO.parent / "shared" / "reference" / "niqe.json"

# pyiqa 0.1.16's own niqe code (calculate_niqe of pyiqa/archs/niqe_arch.py and its matlab_utils, run
# from the wheel's source in torch) on the example photos, read with PIL .convert('RGB'), with the
# pristine model shipped here (BasicSR's niqe_pris_params.npz).
PYIQA_EXAMPLES = {"Lincoln.png": 7.96160, "building.png": 6.30524, "butterfly2.png": 13.21342, "chip.png": 13.36795,
                  "comic1.png": 5.61431, "dog.png": 12.09184, "frog.png": 10.64256, "oldphoto2.png": 10.26307}


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_reference_values_of_the_shared_images():
    if not SHARED.is_dir() or not REFERENCE.is_file():
        pytest.skip("../shared/realworld is not present")
    ref = json.loads(REFERENCE.read_text())["values"]
    ours = {name: niqe(_rgb(SHARED / name)) for name in ref}
    off = {name: round(ours[name] - v, 5) for name, v in ref.items() if abs(ours[name] - v) > 0.02}
    assert not off, off
    assert np.mean(list(ours.values())) == pytest.approx(np.mean(list(ref.values())), abs=0.005)


@pytest.mark.parametrize("name", sorted(PYIQA_EXAMPLES))
def test_pyiqa_values_of_the_example_photos(name):
    assert niqe(_rgb(EXAMPLES / name)) == pytest.approx(PYIQA_EXAMPLES[name], abs=1e-3)


def test_pristine_model_ships_in_the_package():
    assert PARAMS_PATH.is_file() and PARAMS_PATH.parent.name == "data" and PARAMS_PATH.stat().st_size < 20_000
    assert (PARAMS_PATH.parent / "NOTICE.md").read_text().count("Apache") >= 1
    mu, cov = pristine_params()
    assert mu.shape == (36,) and cov.shape == (36, 36) and np.allclose(cov, cov.T)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A clean example photo (NIQE 6.3; dog.png is itself degraded: blurring it lowers its NIQE)."""
    return Image.open(EXAMPLES / "building.png").convert("RGB")


def test_blur_and_noise_read_worse_than_the_clean_image(photo):
    clean = np.asarray(photo)
    blurred = np.asarray(photo.filter(ImageFilter.GaussianBlur(2.5)))
    noisy = np.clip(clean / 255 + np.random.default_rng(0).normal(0, 0.08, clean.shape), 0, 1)
    q_clean, q_blur, q_noise = niqe(clean), niqe(blurred), niqe(noisy)
    assert q_blur > q_clean + 1 and q_noise > q_clean + 1, (q_clean, q_blur, q_noise)


def test_deterministic_and_input_forms_agree(photo):
    rgb = np.asarray(photo)
    v = niqe(rgb)
    assert niqe(rgb) == v  # bit for bit
    assert niqe(rgb.astype(np.float32) / 255) == pytest.approx(v, abs=1e-9)  # uint8 or float in [0, 1]
    assert niqe(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])) == pytest.approx(v, abs=1e-9)  # alpha dropped
    grey = np.asarray(photo.convert("L"))
    g = niqe(grey)
    assert niqe(grey[..., None]) == g and niqe(np.repeat(grey[..., None], 3, axis=2)) == pytest.approx(g, abs=1e-9)
    assert np.array_equal(to_luma(np.repeat(grey[..., None], 3, axis=2)), grey.astype(np.float64))
    batch = torch.from_numpy(np.stack([rgb, rgb[::-1]]).astype(np.float32) / 255).permute(0, 3, 1, 2)
    vals = niqe_batch(batch)
    assert vals.shape == (2,) and vals[0] == pytest.approx(v, abs=1e-9)
    assert niqe_batch(torch.from_numpy(grey[None, None] / 255.0))[0] == pytest.approx(g, abs=1e-9)


def test_too_small_or_wrong_shape_is_a_one_line_value_error():
    with pytest.raises(ValueError, match=r"at least 96x96 pixels, got 120x95") as e:
        niqe(np.zeros((95, 120, 3), np.uint8))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="HxW or HxWx"):
        niqe(np.zeros((2, 100, 100, 3)))


def test_flat_image_is_a_value_error_not_a_nan():
    with pytest.raises(ValueError, match="flat"):
        niqe(np.full((100, 100), 128, np.uint8))


def test_matlab_bicubic_half_keeps_constants_and_ramps():
    const = imresize(np.full((96, 144), 0.25), 0.5)
    assert const.shape == (48, 72) and np.allclose(const, 0.25, atol=1e-6)
    ramp = np.tile(np.arange(96, dtype=np.float64), (96, 1))
    out = imresize(ramp, 0.5)
    # antialiased cubic at x0.5 samples the ramp at 2j + 0.5; exact away from the symmetric border
    assert np.allclose(out[:, 4:-4], (2 * np.arange(48) + 0.5)[4:-4], atol=1e-4)


# --- evaluate --metrics niqe --------------------------------------------------------------------------------
def test_evaluate_niqe_per_image_without_pyiqa(tmp_path, capsys, monkeypatch):
    def unavailable(name, device):
        raise evaluate.MetricUnavailable(f"{name}: needs pyiqa")

    monkeypatch.setattr(evaluate, "PyiqaMetric", unavailable)  # NIQE must not need it
    pred = tmp_path / "pred"
    pred.mkdir()
    names = ["Lincoln.png", "comic1.png", "tiny.png"]
    for name in names[:2]:
        Image.open(EXAMPLES / name).convert("RGB").save(pred / name)
    Image.open(EXAMPLES / "chip.png").convert("RGB").resize((40, 30)).save(pred / "tiny.png")  # under 96x96
    out = tmp_path / "r.json"
    rc = evaluate.main(["--pred", str(pred), "--metrics", "niqe", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1  # the too-small image is a per-file error; the others still count
    assert "| method | images | NIQE ↓ |" in captured.out
    assert "tiny.png: niqe: NIQE needs an image of at least 96x96 pixels, got 40x30" in captured.err
    res = json.loads(out.read_text())["results"][0]
    for name in names[:2]:
        assert res["per_image"][name]["niqe"] == pytest.approx(PYIQA_EXAMPLES[name], abs=1e-3)
    assert "niqe" not in res["per_image"].get("tiny.png", {})
    assert res["mean"]["niqe"] == pytest.approx(np.mean([PYIQA_EXAMPLES[n] for n in names[:2]]), abs=1e-3)


def test_evaluate_default_no_reference_metrics_include_niqe(tmp_path, capsys, monkeypatch):
    def unavailable(name, device):
        raise evaluate.MetricUnavailable(f"{name}: needs pyiqa")

    monkeypatch.setattr(evaluate, "PyiqaMetric", unavailable)
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.open(EXAMPLES / "comic1.png").convert("RGB").save(pred / "a.png")
    assert evaluate.main(["--pred", str(pred), "--quiet"]) == 0  # no --gt: the no-reference set; NIQE runs
    captured = capsys.readouterr()
    assert "NIQE ↓" in captured.out and f"{PYIQA_EXAMPLES['comic1.png']:.4f}"[:-1] in captured.out
    assert "niqe" not in captured.err


# --- the niqe visual expert ---------------------------------------------------------------------------------
def test_niqe_expert_prefers_the_clean_image_in_one_to_five(photo):
    clean = np.asarray(photo, np.float32) / 255
    blurred = np.asarray(photo.filter(ImageFilter.GaussianBlur(3)), np.float32) / 255
    small = clean[:64, :64]
    expert = visual.build_scorer("niqe")
    q_clean, q_blur, q_small = expert([clean, blurred, small], [None] * 3, [None] * 3)
    assert 1 <= q_blur < q_clean <= 5 and q_small is None
    lo, hi = visual.NIQE_RANGE
    expected = 5 - 4 * np.clip((niqe(clean) - lo) / (hi - lo), 0, 1)
    assert q_clean == pytest.approx(expected)
    assert expert.scale == "mos"


def test_aggd_shape_search_is_the_grid_argmin():
    """The binary search over the shape grid picks what argmin |r − r̂| over the whole grid picks,
    ties and empty sides included (a block of one sign, a flat block)."""
    from realsr_r1 import niqe as N

    rng = np.random.default_rng(3)
    blocks = np.concatenate([rng.standard_normal((20, 12, 12)) * rng.uniform(0.1, 3, (20, 1, 1)),
                             rng.laplace(size=(5, 12, 12)), np.abs(rng.standard_normal((2, 12, 12))),
                             np.zeros((1, 12, 12))])
    alpha, bl, br, at = N._aggd(blocks)
    assert np.array_equal(N._GAM[at], alpha)
    flat = blocks.reshape(len(blocks), -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.sqrt(np.array([np.mean(f[f < 0] ** 2) if (f < 0).any() else np.nan for f in flat]))
        right = np.sqrt(np.array([np.mean(f[f > 0] ** 2) if (f > 0).any() else np.nan for f in flat]))
        g = left / right
        r = np.abs(flat).mean(1) ** 2 / (flat ** 2).mean(1) * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    idx = np.abs(N._R_GAM[None] - r[:, None]).argmin(1)
    idx[np.isnan(r)] = 0
    np.testing.assert_array_equal(alpha, N._GAM[idx])
    from scipy.special import gammaln

    k = np.sqrt(np.exp(gammaln(1 / alpha) - gammaln(3 / alpha)))
    np.testing.assert_allclose(bl, left * k, rtol=1e-12)
    np.testing.assert_allclose(br, right * k, rtol=1e-12)


def test_the_numpy_filter_and_gamma_table_match_scipy():
    """niqe.py runs without SciPy (its import was half a second of each lite run): its 7x7 filter with
    replicated edges and its log-gamma table give SciPy's numbers."""
    from scipy.ndimage import correlate
    from scipy.special import gammaln

    from realsr_r1 import niqe as N

    img = np.random.default_rng(0).uniform(0, 255, (37, 52))
    win = N._gauss_window()
    assert np.allclose(N.correlate_nearest(img, win), correlate(img, win, mode="nearest"), rtol=0, atol=1e-10)
    for k, table in N._LGAMMA.items():
        assert np.allclose(table, gammaln(k / N._GAM), rtol=0, atol=1e-13)
    assert np.all(np.diff(N._R_GAM) > 0)  # the binary search over it needs it increasing
