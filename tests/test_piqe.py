"""PIQE (realsr_r1/piqe.py) to pyiqa's protocol: a loop-by-loop re-derivation of the definition on small
hand-built images, pyiqa's own values, distortions reading worse, input forms, and `--metrics piqe`."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import EXAMPLES, SHARED
from realsr_r1 import evaluate
from realsr_r1.piqe import piqe, piqe_batch, to_luma

# pyiqa 0.1.16's own piqe code (pyiqa/archs/piqe_arch.py with its color_util, func_util and matlab_utils,
# run from the wheel's source in torch) on the example photos read with PIL .convert('RGB'); "_crop" is
# rgb[:-3, :-9], whose remainders (13 rows, 7 columns for 160x160) take both of pyiqa's padding paths.
# chip.png is left out: one of its blocks sits on the noise threshold, and pyiqa's float32 MSCN tips it
# (43.122 there, 43.486 here in float64); every other value agrees to a few thousandths.
PYIQA_EXAMPLES = {"Lincoln.png": 46.86405, "building.png": 26.56721, "butterfly2.png": 14.60268, "comic1.png": 53.89206,
                  "dog.png": 59.98672, "frog.png": 42.64333, "oldphoto2.png": 44.46100}
PYIQA_CROPS = {"Lincoln.png": 48.64736, "building.png": 24.52273, "frog.png": 41.85428}


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# --- The definition, step by step, in plain loops (MATLAB's piqe.m as pyiqa runs it) --------------------
def _sample_var(vals) -> float:
    m = sum(vals) / len(vals)
    return sum((v - m) ** 2 for v in vals) / (len(vals) - 1)


def _reference(grey: np.ndarray) -> tuple[float, list[dict]]:
    """PIQE of an 8-bit grey image, and each block's flags, from the definition."""
    h, w = grey.shape
    top = float(grey.max())
    y = [[float(round(255 * float(grey[i, j]) / top)) for j in range(w)] for i in range(h)]
    # pad by the remainder, symmetric (the edge pixel repeated), at the bottom and right
    ph, pw = h + h % 16, w + w % 16
    src = lambda i, n: i if i < n else 2 * n - 1 - i  # noqa: E731
    p = [[y[src(i, h)][src(j, w)] for j in range(pw)] for i in range(ph)]
    # 7x7 Gaussian, sigma 7/6, sum 1; replicate padding; MSCN with C = 1 (and float32's eps under the root)
    k = [[math.exp(-(a * a + b * b) / (2 * (7 / 6) ** 2)) for b in range(-3, 4)] for a in range(-3, 4)]
    ksum = sum(map(sum, k))
    clamp = lambda i, n: min(max(i, 0), n - 1)  # noqa: E731
    norm = [[0.0] * pw for _ in range(ph)]
    for i in range(ph):
        for j in range(pw):
            mu = s2 = 0.0
            for a in range(7):
                for b in range(7):
                    v = p[clamp(i + a - 3, ph)][clamp(j + b - 3, pw)]
                    mu += k[a][b] / ksum * v
                    s2 += k[a][b] / ksum * v * v
            sigma = math.sqrt(abs(s2 - mu * mu) + 2.0 ** -23)
            norm[i][j] = (p[i][j] - mu) / (sigma + 1)
    total, active_blocks, flags = 0.0, 0, []
    for bi in range(ph // 16):
        for bj in range(pw // 16):
            blk = [[norm[16 * bi + r][16 * bj + c] for c in range(16)] for r in range(16)]
            var = _sample_var([v for row in blk for v in row])
            f = {"active": var > 0.1, "distorted": False, "noisy": False}
            flags.append(f)
            if not f["active"]:
                continue
            active_blocks += 1
            edges = [blk[0], [row[15] for row in blk], blk[15], [row[0] for row in blk]]
            f["distorted"] = any(math.sqrt(_sample_var(e[s:s + 6])) < 0.1 for e in edges for s in range(11))
            # centre: columns 8 and 9 (1-based); surround: delete column 8, then column 9 of what is left
            cols = list(range(16))
            del cols[7]
            del cols[8]
            centre = [row[c] for row in blk for c in (7, 8)]
            surround = [row[c] for row in blk for c in cols]
            sc, ss = math.sqrt(_sample_var(centre)), math.sqrt(_sample_var(surround))
            ratio = sc / ss if ss > 0 else (0.0 if sc == 0 else math.inf)
            sigma = math.sqrt(var)
            beta = abs(sigma - ratio) / max(sigma, ratio) if ratio != math.inf else 1.0
            f["noisy"] = sigma > 2 * beta
            total += (1 - var if f["distorted"] else 0.0) + (var if f["noisy"] else 0.0)
    return (total + 1) / (active_blocks + 1) * 100, flags


def _four_blocks() -> np.ndarray:
    """32x32, one 16x16 block each: flat, uniform noise, a step edge, a patch of a photo."""
    rng = np.random.default_rng(3)
    img = np.full((32, 32), 100, np.uint8)
    img[:16, 16:] = rng.integers(0, 256, (16, 16))
    img[16:, :16] = np.where(np.arange(16) < 8, 40, 255)[None, :]
    with Image.open(EXAMPLES / "frog.png") as im:
        img[16:, 16:] = np.asarray(im.convert("L"))[8:24, 24:40]
    img[0, 0] = 255  # the maximum is 255, so the grey levels keep their values
    return img


def _padded() -> np.ndarray:
    """24 rows x 40 columns: both remainders are 8, so pyiqa's padding adds a half-mirrored block row and
    column (2 x 3 blocks)."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:24, :40]
    img = 120 + 50 * np.sin(xx / 3.0) + 30 * (yy > 11) + rng.normal(0, 12, (24, 40)) * (xx > 25)
    img[:8, :10] = 90
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


FLAT, NOISY, DISTORTED, CLEAN = ((False, False, False), (True, False, True), (True, True, False), (True, False, False))


@pytest.mark.parametrize("make, blocks", [
    (_four_blocks, [FLAT, NOISY, DISTORTED, CLEAN]),  # (active, distorted, noisy) of each block, row-major
    (_padded, [DISTORTED, DISTORTED, NOISY, DISTORTED, DISTORTED, NOISY]),
])
def test_matches_the_definition_step_by_step(make, blocks):
    grey = make()
    expected, flags = _reference(grey)
    assert [(f["active"], f["distorted"], f["noisy"]) for f in flags] == blocks  # every branch is taken
    assert piqe(grey) == pytest.approx(expected, abs=1e-6)
    assert 0 < expected < 100


def test_flat_images_score_100():
    # no block has variance above 0.1: (0 distortion + C) / (0 active blocks + C) * 100 with C = 1
    assert piqe(np.full((48, 64), 77, np.uint8)) == 100.0
    assert piqe(np.full((40, 40, 3), 0.3, np.float32)) == 100.0
    assert piqe(np.zeros((32, 32, 3), np.uint8)) == 100.0  # all black: flat, not 0/0


def test_luma_is_y_of_yiq_divided_by_its_maximum():
    rgb = np.random.default_rng(0).integers(0, 200, (20, 30, 3)).astype(np.uint8)
    y = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert np.array_equal(to_luma(rgb), np.round(255 * y / y.max()))
    assert to_luma(rgb).max() == 255  # stretched to the full range, whatever the brightest pixel


@pytest.mark.parametrize("name", sorted(PYIQA_EXAMPLES))
def test_pyiqa_values_of_the_example_photos(name):
    rgb = _rgb(EXAMPLES / name)
    assert piqe(rgb) == pytest.approx(PYIQA_EXAMPLES[name], abs=5e-3)
    if name in PYIQA_CROPS:
        assert piqe(rgb[:-3, :-9]) == pytest.approx(PYIQA_CROPS[name], abs=5e-3)


def test_shared_photos_score_within_0_to_100():
    folder = SHARED / "RealSRSet"
    if not folder.is_dir():
        pytest.skip("../shared/realworld/RealSRSet is not present")
    vals = {p.name: piqe(_rgb(p)) for p in sorted(folder.glob("*.png"))}
    assert vals and all(0 < v < 100 for v in vals.values()), vals


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(EXAMPLES / "building.png").convert("RGB")


def test_noise_reads_worse_and_more_noise_reads_worse_still(photo):
    # Mild noise (sigma 0.02) can read *better*: it breaks the flat edge segments the distortion criterion
    # counts. From sigma 0.08 the noise criterion dominates.
    clean = np.asarray(photo)
    q_clean = piqe(clean)
    noise = np.random.default_rng(0).normal(0, 1, clean.shape)
    q = [piqe(np.clip(clean / 255 + s * noise, 0, 1)) for s in (0.08, 0.12, 0.2)]
    assert q_clean + 5 < q[0] < q[1] < q[2], (q_clean, q)


def test_blur_reads_worse_and_more_blur_reads_worse_still(photo):
    q_clean = piqe(np.asarray(photo))
    q = [piqe(np.asarray(photo.filter(ImageFilter.GaussianBlur(r)))) for r in (1, 2, 3)]
    assert q_clean + 10 < q[0] < q[1] < q[2] <= 100, (q_clean, q)


def test_input_forms_agree(photo):
    rgb = np.asarray(photo)
    v = piqe(rgb)
    assert piqe(rgb) == v  # bit for bit
    assert piqe(rgb.astype(np.float32) / 255) == pytest.approx(v, abs=1e-9)  # uint8 or float in [0, 1]
    assert piqe(rgb.astype(np.uint16) * 257) == pytest.approx(v, abs=1e-9)  # 16-bit
    assert piqe(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])) == pytest.approx(v, abs=1e-9)  # alpha
    grey = np.asarray(photo.convert("L"))
    g = piqe(grey)
    assert g == pytest.approx(v, abs=0.05)  # a grey HxW image is its own Y; PIL's "L" is the same Y in 8 bits
    assert piqe(grey[..., None]) == g and piqe(np.repeat(grey[..., None], 3, axis=2)) == pytest.approx(g, abs=1e-9)
    batch = torch.from_numpy(np.stack([rgb, rgb[::-1]]).astype(np.float32) / 255).permute(0, 3, 1, 2)
    vals = piqe_batch(batch)
    assert vals.shape == (2,) and vals[0] == pytest.approx(v, abs=1e-9)
    assert piqe_batch(torch.from_numpy(grey[None, None] / 255.0))[0] == pytest.approx(g, abs=1e-9)


def test_too_small_or_wrong_shape_is_a_one_line_value_error():
    with pytest.raises(ValueError, match=r"at least 16x16 pixels, got 20x15") as e:
        piqe(np.zeros((15, 20, 3), np.uint8))
    assert "\n" not in str(e.value)
    assert piqe(np.full((16, 16), 9, np.uint8)) == 100.0  # one block is enough
    with pytest.raises(ValueError, match="HxW or HxWx"):
        piqe(np.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="N x C x H x W"):
        piqe_batch(torch.zeros(1, 2, 32, 32))


# --- evaluate --metrics piqe --------------------------------------------------------------------------------
def _no_pyiqa(monkeypatch):
    def unavailable(name, device):
        raise evaluate.MetricUnavailable(f"{name}: needs pyiqa")

    monkeypatch.setattr(evaluate, "PyiqaMetric", unavailable)  # PIQE must not need it


def test_evaluate_piqe_per_image_without_pyiqa(tmp_path, capsys, monkeypatch):
    _no_pyiqa(monkeypatch)
    pred = tmp_path / "pred"
    pred.mkdir()
    names = ["Lincoln.png", "comic1.png"]
    for name in names:
        Image.open(EXAMPLES / name).convert("RGB").save(pred / name)
    Image.open(EXAMPLES / "chip.png").convert("RGB").resize((12, 30)).save(pred / "tiny.png")
    out = tmp_path / "r.json"
    rc = evaluate.main(["--pred", str(pred), "--metrics", "piqe", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1  # the too-small image is a per-file error; the others still count
    assert "| method | images | PIQE ↓ |" in captured.out
    assert "tiny.png: piqe: PIQE needs an image of at least 16x16 pixels, got 12x30" in captured.err
    res = json.loads(out.read_text())["results"][0]
    for name in names:
        assert res["per_image"][name]["piqe"] == pytest.approx(PYIQA_EXAMPLES[name], abs=5e-3)
    assert "piqe" not in res["per_image"].get("tiny.png", {})
    assert res["mean"]["piqe"] == pytest.approx(np.mean([PYIQA_EXAMPLES[n] for n in names]), abs=5e-3)
    assert f"| {res['mean']['piqe']:.2f} |" in captured.out


def test_evaluate_default_no_reference_metrics_include_piqe(tmp_path, capsys, monkeypatch):
    _no_pyiqa(monkeypatch)
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.open(EXAMPLES / "comic1.png").convert("RGB").save(pred / "a.png")
    assert evaluate.main(["--pred", str(pred), "--quiet"]) == 0  # no --gt: the no-reference set
    captured = capsys.readouterr()
    assert "PIQE ↓" in captured.out and f"{piqe(_rgb(EXAMPLES / 'comic1.png')):.2f}" in captured.out
    assert "piqe" not in captured.err
    assert "piqe" in evaluate.NO_REFERENCE and "piqe" in evaluate.LOWER_IS_BETTER
