"""PSNR/SSIM to the published protocol: hand-computed cases, an independent implementation, properties."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import EXAMPLES
from realsr_r1.imageio import read_image
from realsr_r1.metrics import as_batch, psnr, rgb_to_y, ssim


def y_of(rgb):
    return 16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def test_luma_is_bt601_on_0_255():
    x = torch.tensor([[[[0.0]], [[0.0]], [[0.0]]], [[[1.0]], [[1.0]], [[1.0]]]], dtype=torch.float64)
    assert rgb_to_y(x).flatten().tolist() == pytest.approx([16.0, 235.0])
    red = torch.tensor([1.0, 0, 0], dtype=torch.float64).view(1, 3, 1, 1)
    assert rgb_to_y(red).item() == pytest.approx(16 + 65.481)


def test_psnr_by_hand():
    gt = np.zeros((4, 4, 3), np.float32)
    pred = gt.copy()
    pred[0, 0] = 1.0  # one pixel white: Y differs by 219 there
    mse = 219.0**2 / 16
    assert psnr(pred, gt).item() == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)


def test_identical_images_give_inf_and_one():
    img = read_image(EXAMPLES / "chip.png").rgb
    assert math.isinf(psnr(img, img).item())
    assert ssim(img, img).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_by_hand_constant_images():
    # Constant images: variances and covariance are 0, so SSIM = luminance term only.
    a = np.full((16, 16, 3), 0.5, np.float32)
    b = np.full((16, 16, 3), 0.25, np.float32)
    ya, yb = round(float(y_of(a[0, 0]))), round(float(y_of(b[0, 0])))
    c1 = (0.01 * 255) ** 2
    expected = (2 * ya * yb + c1) / (ya**2 + yb**2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-12)


def real_pair(sigma=8.0, seed=0):
    gt = read_image(EXAMPLES / "butterfly2.png").rgb
    rng = np.random.default_rng(seed)
    pred = np.clip(gt + rng.normal(0, sigma / 255, gt.shape), 0, 1).astype(np.float32)
    return pred, gt


def test_against_scikit_image():
    pred, gt = real_pair()
    yp, yg = y_of(pred.astype(np.float64)), y_of(gt.astype(np.float64))
    ref_psnr = peak_signal_noise_ratio(yg, yp, data_range=255)
    assert psnr(pred, gt).item() == pytest.approx(ref_psnr, abs=1e-6)
    # skimage with a Gaussian window (11 taps at sigma 1.5), population covariance, and the 5-pixel
    # border cropped from the mean is exactly 'valid' filtering; rounding Y is the protocol's.
    ref_ssim = structural_similarity(np.round(yg), np.round(yp), data_range=255, gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False)
    assert ssim(pred, gt).item() == pytest.approx(ref_ssim, abs=1e-6)


def test_symmetric_and_monotone_in_noise():
    pred, gt = real_pair(4.0)
    assert psnr(pred, gt).item() == pytest.approx(psnr(gt, pred).item())
    assert ssim(pred, gt).item() == pytest.approx(ssim(gt, pred).item())
    values = [(psnr(p, gt).item(), ssim(p, gt).item()) for p, _ in (real_pair(s) for s in (2, 6, 15, 30))]
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(values, values[1:]))


def test_batched_equals_one_by_one():
    pairs = [real_pair(s, seed=s) for s in (3, 9, 20)]
    preds = torch.cat([as_batch(p) for p, _ in pairs])
    gts = torch.cat([as_batch(g) for _, g in pairs])
    batched_psnr, batched_ssim = psnr(preds, gts), ssim(preds, gts)
    assert batched_psnr.shape == (3,)
    for i, (p, g) in enumerate(pairs):
        assert batched_psnr[i].item() == pytest.approx(psnr(p, g).item(), abs=1e-9)
        assert batched_ssim[i].item() == pytest.approx(ssim(p, g).item(), abs=1e-9)


def test_uint8_input_equals_float_input():
    pred, gt = real_pair()
    p8, g8 = (np.round(pred * 255)).astype(np.uint8), (np.round(gt * 255)).astype(np.uint8)
    assert psnr(p8, g8).item() == pytest.approx(psnr(p8 / 255.0, g8 / 255.0).item(), abs=1e-9)


def test_size_mismatch_and_tiny_images_are_errors():
    with pytest.raises(ValueError, match="size mismatch"):
        psnr(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_crop_border():
    pred, gt = real_pair()
    pred2 = pred.copy()
    pred2[:4] = 0  # damage only the top 4 rows
    assert psnr(pred2, gt, crop_border=4).item() == pytest.approx(
        psnr(pred[4:-4, 4:-4], gt[4:-4, 4:-4]).item())


def test_the_numpy_versions_give_the_same_numbers():
    from realsr_r1 import metrics as M
    """fullref.py (what the lite chooser uses, without torch) against the torch metrics."""
    from realsr_r1 import fullref

    rng = np.random.default_rng(3)
    a = rng.random((3, 40, 33, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    np.testing.assert_allclose(fullref.psnr_y(a, b), M.psnr(M.as_batch(torch.from_numpy(a).permute(0, 3, 1, 2)),
                                                           M.as_batch(torch.from_numpy(b).permute(0, 3, 1, 2))).numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(fullref.ssim_y(a, b), M.ssim(M.as_batch(torch.from_numpy(a).permute(0, 3, 1, 2)),
                                                           M.as_batch(torch.from_numpy(b).permute(0, 3, 1, 2))).numpy(),
                               rtol=1e-10)
    assert fullref.psnr_y(a, a)[0] == np.inf
    with pytest.raises(ValueError, match="at least 11x11"):
        fullref.ssim_y(a[:, :10], b[:, :10])
