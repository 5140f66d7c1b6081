"""figures.py: the crop is where the methods differ, the grid's panels are the crops, the chart's axis."""

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES
from realsr_r1 import figures
from realsr_r1.figures import GAP, MARGIN, PANEL_H, Panel


def _photo(size):
    return np.asarray(Image.open(EXAMPLES / "dog.png").convert("RGB").resize(size, Image.BICUBIC), np.float32) / 255


def _methods(gt, defect):
    """A: the GT with a little noise everywhere; B: A with a flat grey block over `defect` (x, y, w, h)."""
    a = np.clip(gt + np.random.default_rng(0).normal(0, 0.02, gt.shape), 0, 1).astype(np.float32)
    b = a.copy()
    x, y, w, h = defect
    b[y:y + h, x:x + w] = 0.5
    return a, b


@pytest.mark.parametrize("size, defect", [((128, 96), (90, 10, 16, 16)),  # searched at full resolution
                                          ((1024, 768), (700, 520, 40, 40))])  # on a map 4x coarser
def test_auto_crop_covers_the_region_where_one_method_differs(size, defect):
    gt = _photo(size)
    a, b = _methods(gt, defect)
    x, y, w, h = figures.auto_crop([a, b], gt)
    assert (w, h) == (figures.default_crop_side(size),) * 2
    assert 0 <= x and x + w <= size[0] and 0 <= y and y + h <= size[1]
    dx, dy, dw, dh = defect
    assert x <= dx and dx + dw <= x + w and y <= dy and dy + dh <= y + h
    # one method alone: the crop goes where it is worst against the ground truth
    x, y, w, h = figures.auto_crop([b], gt)
    assert x <= dx and dx + dw <= x + w and y <= dy and dy + dh <= y + h


def test_auto_crop_of_identical_images_is_the_centre():
    gt = _photo((100, 60))
    assert figures.auto_crop([gt, gt.copy()], gt) == (42, 22, 16, 16)


def test_crop_parsing_and_bounds():
    assert figures.parse_crop("10, 20,30,40") == (10, 20, 30, 40)
    for bad in ("10,20,30", "a,b,c,d", "1.5,2,3,4"):
        with pytest.raises(ValueError, match="expected x,y,w,h"):
            figures.parse_crop(bad)
    with pytest.raises(ValueError, match="w and h >= 1"):
        figures.parse_crop("0,0,0,10")
    figures.check_crop((0, 0, 64, 48), (64, 48))  # touching the edges is inside
    with pytest.raises(ValueError, match=r"reaches \(65, 48\), outside the 64x48 image"):
        figures.check_crop((1, 0, 64, 48), (64, 48))


def test_comparison_has_thumbnail_then_one_panel_per_method_and_gt():
    gt = _photo((120, 80))
    a, b = _methods(gt, (10, 10, 20, 20))
    panels = [Panel("bicubic", a, {"psnr": 20.0, "ssim": 0.5}), Panel("lite", b, {"psnr": 21.0, "ssim": 0.4})]
    crop = (8, 4, 40, 40)
    fig = figures.comparison(gt, panels, crop, title="dog")
    thumb_w = round(120 * PANEL_H / 80)
    assert fig.size[0] == 2 * MARGIN + thumb_w + 3 * (GAP + PANEL_H)  # thumbnail + 2 methods + GT
    arr = np.asarray(fig)
    for i, im in enumerate([a, b, gt]):  # each panel is that image's crop, enlarged pixel for pixel
        left = MARGIN + thumb_w + GAP + i * (GAP + PANEL_H)
        panel = arr[MARGIN:MARGIN + PANEL_H, left:left + PANEL_H]
        want = np.asarray(Image.fromarray((im * 255 + 0.5).astype(np.uint8)).crop((8, 4, 48, 44))
                          .resize((PANEL_H, PANEL_H), Image.NEAREST))
        assert np.array_equal(panel, want)
    # the crop rectangle is drawn in red on the thumbnail, at the scaled position (x 8 → 19 px)
    s = PANEL_H / 80
    edge = arr[MARGIN + int(20 * s), MARGIN + int(8 * s)]
    assert edge[0] > 200 and edge[1] < 80 and edge[2] < 80


def test_chart_axis_starts_at_zero_unless_the_means_are_close():
    assert figures.chart_scale([0.4354, 0.3806]) == ("bar", (0.0, pytest.approx(0.4354 * 1.15)))
    kind, (lo, hi) = figures.chart_scale([18.15, 18.28])  # 0.7 % apart: bars from 0 would hide it
    assert kind == "dot" and 17 < lo < 18.15 and 18.28 < hi < 19
    assert figures.chart_scale([25.0])[0] == "bar"  # one method: nothing to compare, a plain bar
    assert figures.chart_scale([20.0, float("inf")])[0] == "bar"

    fig = figures.chart_figure(["a", "b"], {"ssim": [0.44, 0.38], "psnr": [18.15, 18.28]},
                               {"ssim": "SSIM", "psnr": "PSNR"}, lambda m, v: f"{v:.2f}")
    bars, dots = fig.axes
    assert bars.get_ylim()[0] == 0 and len(bars.patches) == 2
    assert dots.get_ylim()[0] > 17 and not dots.patches and len(dots.collections[0].get_offsets()) == 2


def test_more_metrics_wrap_to_more_label_lines_not_wider_panels():
    gt = _photo((64, 64))
    two = {"psnr": 20.0, "ssim": 0.5}
    four = {**two, "lpips": 0.3, "niqe": 5.1}  # the slot NIQE and learned metrics fill
    small = figures.comparison(gt, [Panel("a", gt, two)], (0, 0, 32, 32), title="x")
    big = figures.comparison(gt, [Panel("a", gt, four)], (0, 0, 32, 32), title="x")
    assert big.size[0] == small.size[0] and big.size[1] > small.size[1]
