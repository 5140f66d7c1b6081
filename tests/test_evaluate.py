"""`python -m realsr_r1.evaluate`: pairing, tables, files, errors, and lite against bicubic."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES
from realsr_r1 import evaluate, figures
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


# --- Comparison figures (--grid) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def near(paired):
    """A second method: the HR itself with a little noise."""
    d = paired / "near"
    if not d.exists():
        d.mkdir()
        for name in NAMES:
            hr = read_image(paired / "hr" / f"{name}.png").rgb
            noisy = np.clip(hr + np.random.default_rng(1).normal(0, 0.02, hr.shape), 0, 1)
            write_image(d / f"{name}.png", noisy.astype(np.float32))
    return d


def _panel(fig: np.ndarray, gt_size, i: int) -> np.ndarray:
    """Panel i (0 = first after the thumbnail) of a grid figure with square crops."""
    left = figures.MARGIN + figures._fit(gt_size)[0] + figures.GAP + i * (figures.GAP + figures.PANEL_H)
    return fig[figures.MARGIN:figures.MARGIN + figures.PANEL_H, left:left + figures.PANEL_H]


def test_grid_writes_a_figure_per_image_with_bicubic_from_the_lq(paired, near, tmp_path, capsys):
    grid = tmp_path / "grid"
    rc = evaluate.main(["--pred", str(near), "--gt", str(paired / "hr"), "--lq", str(paired / "lq"),
                        "--grid", str(grid), "--quiet"])
    assert rc == 0
    assert "wrote 3 comparison figure(s)" in capsys.readouterr().err
    assert sorted(p.name for p in grid.iterdir()) == sorted(f"{n}.png" for n in NAMES)
    for name in NAMES:
        size = Image.open(paired / "hr" / f"{name}.png").size
        fig = Image.open(grid / f"{name}.png")
        # thumbnail, then bicubic, near and GT: three crops of the same square
        assert fig.size[0] == 2 * figures.MARGIN + figures._fit(size)[0] + 3 * (figures.GAP + figures.PANEL_H)
        assert fig.size[1] > figures.PANEL_H + 2 * 17  # room for the name and the values


def test_grid_crop_and_subset(paired, near, tmp_path, capsys):
    grid = tmp_path / "grid"
    rc = evaluate.main(["--pred", str(near), "--gt", str(paired / "hr"), "--lq", str(paired / "lq"),
                        "--grid", str(grid), "--grid-images", "FROG,b*", "--crop", "4,8,24,24", "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in grid.iterdir()) == ["building.png", "frog.png"]
    fig = np.asarray(Image.open(grid / "frog.png"))
    size = Image.open(paired / "hr" / "frog.png").size
    for i, src in enumerate([paired / "bicubic", near, paired / "hr"]):  # bicubic first, GT last
        want = Image.open(src / "frog.png").convert("RGB").crop((4, 8, 28, 32))
        want = np.asarray(want.resize((figures.PANEL_H,) * 2, Image.NEAREST))
        assert np.array_equal(_panel(fig, size, i), want), src.name


def test_grid_labels_carry_the_evaluated_values(paired, near, tmp_path, monkeypatch):
    seen = []
    real = figures.comparison

    def spy(gt, panels, crop, **kw):
        seen.append({p.name: p.values for p in panels})
        return real(gt, panels, crop, **kw)

    monkeypatch.setattr(figures, "comparison", spy)
    out = tmp_path / "r.json"
    assert evaluate.main(["--pred", str(near), "--pred", str(paired / "bicubic"), "--gt", str(paired / "hr"),
                          "--grid", str(tmp_path / "grid"), "--grid-images", "frog", "--out", str(out),
                          "--quiet"]) == 0
    res = {r["method"]: r["per_image"]["frog.png"] for r in json.loads(out.read_text())["results"]}
    # a --pred folder named bicubic is the bicubic panel (no LQ needed), first; values as in the JSON
    assert list(seen[0]) == ["bicubic", "near"] and seen[0] == res


@pytest.mark.parametrize("extra, message", [
    (["--crop", "0,0,1000,10"], "outside the"),
    (["--crop", "0,0,10"], "expected x,y,w,h"),
    (["--grid-images", "nosuch"], "'nosuch' matches no image"),
    (["--grid", "PRED"], "is the --pred folder"),
    (["--lq", "LQ", "--bicubic", "--grid", "BICUBIC"], "is the --bicubic folder"),  # paired/bicubic, beside near
])
def test_grid_usage_errors_are_one_line_before_any_work(paired, near, tmp_path, capsys, extra, message):
    grid = tmp_path / "grid"
    args = ["--pred", str(near), "--gt", str(paired / "hr"), "--grid", str(grid), "--quiet"]
    subst = {"PRED": near, "LQ": paired / "lq", "BICUBIC": paired / "bicubic"}

    def files():
        return {p: p.read_bytes() for d in (near, paired / "bicubic") for p in d.iterdir()}

    before = files()
    rc = evaluate.main(args + [str(subst.get(a, a)) for a in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not grid.exists() and files() == before


@pytest.mark.parametrize("extra, message", [
    (["--gt", "HR", "--crop", "0,0,8,8"], "--crop needs --grid"),
    (["--gt", "HR", "--grid-images", "frog"], "--grid-images needs --grid"),
    (["--grid", "GRID"], "--grid needs --gt"),
])
def test_grid_flags_need_grid_and_gt(paired, tmp_path, capsys, extra, message):
    subst = {"HR": str(paired / "hr"), "GRID": str(tmp_path / "grid")}
    rc = evaluate.main(["--pred", str(paired / "bicubic"), "--quiet"] + [subst.get(a, a) for a in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]


def test_bicubic_row_from_lq_without_infer(paired, near, tmp_path, capsys):
    pred = tmp_path / "runs" / "near"
    pred.parent.mkdir()
    pred.symlink_to(near, target_is_directory=True)
    assert evaluate.main(["--pred", str(pred), "--lq", str(paired / "lq"), "--bicubic", "--gt", str(paired / "hr"),
                          "--quiet"]) == 0
    assert "| bicubic | 3 |" in capsys.readouterr().out
    for name in NAMES:
        assert np.array_equal(read_image(tmp_path / "runs" / "bicubic" / f"{name}.png").rgb,
                              read_image(paired / "bicubic" / f"{name}.png").rgb)
