"""`python -m realsr_r1.evaluate`: pairing, tables, files, errors, and lite against bicubic."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES
from realsr_r1 import evaluate
from realsr_r1.degrade import degrade
from realsr_r1.imageio import read_image, write_image
from realsr_r1.metrics import psnr, ssim

NAMES = ["building", "frog", "Lincoln"]


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """HR = example photos area-downscaled ×2 (cleaner), LQ = the project's second-order degradation
    at ×4, and a bicubic baseline."""
    root = tmp_path_factory.mktemp("pairs")
    for sub in ("hr", "lq", "bicubic"):
        (root / sub).mkdir()
    for i, name in enumerate(NAMES):
        im = Image.open(EXAMPLES / f"{name}.png").convert("RGB")
        w, h = im.size[0] // 2 // 4 * 4, im.size[1] // 2 // 4 * 4
        hr = np.asarray(im.resize((im.size[0] // 2, im.size[1] // 2), Image.BOX).crop((0, 0, w, h)), np.float32) / 255
        lq = degrade(hr, scale=4, seed=i).lq
        write_image(root / "hr" / f"{name}.png", hr)
        write_image(root / "lq" / f"{name}.png", lq)
        bic = Image.fromarray((lq * 255 + 0.5).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        bic.save(root / "bicubic" / f"{name}.png")
    return root


def test_lite_against_bicubic_with_infer(paired, tmp_path, capsys, weights_dir):
    out_json = tmp_path / "r.json"
    rc = evaluate.main(["--infer", str(paired / "lq"), "--profile", "lite", "--pred", str(tmp_path / "lite"),
                        "--bicubic", "--gt", str(paired / "hr"), "--out", str(out_json), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| lite | 3 |" in table and "| bicubic | 3 |" in table
    res = {r["method"]: r["mean"] for r in json.loads(out_json.read_text())["results"]}
    for name in NAMES:  # the built-in baseline is plain bicubic upscaling of the LQ input
        ours = read_image(tmp_path / "bicubic" / f"{name}.png").rgb
        assert np.array_equal(ours, read_image(paired / "bicubic" / f"{name}.png").rgb)
    # Real-ESRGAN removes the synthetic noise and blocking: structure is closer to HR than bicubic's.
    assert res["lite"]["ssim"] > res["bicubic"]["ssim"]
    assert 10 < res["lite"]["psnr"] < 40 and 10 < res["bicubic"]["psnr"] < 40
    # resumable: a second run restores nothing again
    rc = evaluate.main(["--infer", str(paired / "lq"), "--profile", "lite", "--pred", str(tmp_path / "lite"),
                        "--gt", str(paired / "hr"), "--quiet"])
    assert rc == 0 and "restored 0, skipped 3" in capsys.readouterr().err


def test_values_files_and_plot(paired, tmp_path, capsys):
    args = ["--pred", str(paired / "bicubic"), "--pred", str(paired / "lq_up"), "--gt", str(paired / "hr"),
            "--metrics", "psnr,ssim", "--out", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"),
            "--plot", str(tmp_path / "p.png"), "--quiet"]
    (paired / "lq_up").mkdir(exist_ok=True)
    for name in NAMES:  # a second method: the HR itself with a little noise, to have two rows
        hr = read_image(paired / "hr" / f"{name}.png").rgb
        noisy = np.clip(hr + np.random.default_rng(0).normal(0, 0.01, hr.shape), 0, 1)
        write_image(paired / "lq_up" / f"{name}.png", noisy.astype(np.float32))
    assert evaluate.main(args) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    bic = data["results"][0]
    for name in NAMES:
        pred = read_image(paired / "bicubic" / f"{name}.png").rgb
        gt = read_image(paired / "hr" / f"{name}.png").rgb
        assert bic["per_image"][f"{name}.png"]["psnr"] == pytest.approx(psnr(pred, gt).item(), abs=1e-9)
        assert bic["per_image"][f"{name}.png"]["ssim"] == pytest.approx(ssim(pred, gt).item(), abs=1e-9)
    assert bic["mean"]["psnr"] == pytest.approx(np.mean([v["psnr"] for v in bic["per_image"].values()]))
    assert data["results"][1]["mean"]["psnr"] > bic["mean"]["psnr"]
    rows = list(csv.reader((tmp_path / "r.csv").open()))
    assert rows[0] == ["method", "image", "psnr", "ssim"] and len(rows) == 1 + 2 * len(NAMES)
    plot = Image.open(tmp_path / "p.png")
    assert plot.format == "PNG" and plot.size[0] > 300
    assert np.asarray(plot.convert("L")).std() > 10  # something was drawn


def test_unmatched_and_mismatched_sizes_are_reported(paired, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    for name in NAMES[:2]:
        Image.open(paired / "bicubic" / f"{name}.png").save(pred / f"{name}_out.png")
    Image.open(paired / "bicubic" / "Lincoln.png").resize((20, 20)).save(pred / "Lincoln_out.png")
    Image.new("RGB", (8, 8)).save(pred / "extra_out.png")
    rc = evaluate.main(["--pred", str(pred), "--gt", str(paired / "hr"), "--pred-suffix", "_out",
                        "--out", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Lincoln_out.png: size 20x20 differs from ground truth" in err
    assert "1 prediction(s) without ground truth ['extra_out.png']" in err
    r = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert sorted(r["per_image"]) == ["building_out.png", "frog_out.png"]


def test_identical_images_report_inf(paired, tmp_path, capsys):
    rc = evaluate.main(["--pred", str(paired / "hr"), "--gt", str(paired / "hr"), "--out", str(tmp_path / "r.json"),
                        "--quiet"])
    assert rc == 0
    assert "| hr | 3 | inf | 1.0000 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["mean"]["psnr"] == "inf"


def test_learned_metrics_skip_cleanly_and_the_rest_runs(paired, capsys, monkeypatch):
    def unavailable(name, device):
        raise evaluate.MetricUnavailable(f"{name}: needs pyiqa (pip install -e .[metrics])")

    monkeypatch.setattr(evaluate, "PyiqaMetric", unavailable)
    rc = evaluate.main(["--pred", str(paired / "bicubic"), "--gt", str(paired / "hr"), "--metrics", "psnr,lpips,musiq",
                        "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0
    skipped = [l for l in captured.err.splitlines() if l.startswith("skipped:")]
    assert len(skipped) == 2 and "lpips" in skipped[0] and "musiq" in skipped[1]
    assert "PSNR" in captured.out and "LPIPS" not in captured.out


def test_bicubic_needs_infer_and_gt(paired, capsys):
    assert evaluate.main(["--pred", str(paired / "bicubic"), "--bicubic", "--gt", str(paired / "hr")]) == 2
    assert "--bicubic needs --infer" in capsys.readouterr().err


def test_no_gt_and_no_runnable_metric_is_a_usage_error(paired, capsys):
    rc = evaluate.main(["--pred", str(paired / "bicubic"), "--metrics", "psnr", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "psnr: needs --gt" in err and "no metric can run" in err
