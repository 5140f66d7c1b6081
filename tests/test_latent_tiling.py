"""Latent tiling: coverage, overlaps, Gaussian weights and blending that is exact for local denoisers."""

import pytest
import torch

from realsr_r1.restorers.latent_tiling import gaussian_weight, tile_starts, tiled_predict, tiles


@pytest.mark.parametrize("length,tile,overlap", [(16, 8, 4), (100, 32, 8), (33, 32, 8), (128, 64, 0), (64, 8, 7)])
def test_tiles_cover_everything_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap never below the asked one


def test_one_tile_when_it_fits_or_tiling_is_off():
    assert tile_starts(8, 8, 4) == [0] and tile_starts(5, 8, 4) == [0] and tile_starts(100, 0, 0) == [0]
    assert tiles(6, 20, 8, 4) == [(slice(0, 6), slice(x, x + 8)) for x in (0, 4, 8, 12)]  # 3 would overlap by 2
    with pytest.raises(ValueError):
        tile_starts(20, 8, 8)


def test_gaussian_weight_peaks_in_the_centre_and_stays_positive():
    w = gaussian_weight(9, 15)[0, 0]
    assert w.shape == (9, 15) and w[4, 7] == pytest.approx(1.0)
    assert w.min() > 0 and w[0, 0] < 0.1 * w[4, 7]
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1))


def test_blending_is_exact_for_a_pixel_local_denoiser():
    """If the prediction at a pixel depends on that pixel only, tiles must reproduce the untiled result."""
    gen = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(1, 4, 20, 28, generator=gen), torch.randn(2, 3, 20, 28, generator=gen)

    def local(lat, c):
        return torch.tanh(lat * 2 + c.mean(0, keepdim=True).sum(1, keepdim=True))

    calls = []
    whole = local(latents, cond)
    tiled = tiled_predict(lambda a, b: calls.append(a.shape[-2:]) or local(a, b), latents, cond, tile=8, overlap=4)
    assert len(calls) == len(tiles(20, 28, 8, 4)) == 4 * 6 and all(tuple(c) == (8, 8) for c in calls)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)


def test_blending_mixes_neighbouring_tiles_smoothly():
    """A denoiser that returns its tile's index: the blend rises monotonically across an overlap."""
    latents = torch.zeros(1, 1, 8, 24)
    index = iter(range(100))
    out = tiled_predict(lambda a, c: torch.full_like(a, float(next(index))), latents, latents, tile=8, overlap=4)
    row = out[0, 0, 4]
    assert row[0] == pytest.approx(0.0) and row[-1] == pytest.approx(len(tiles(8, 24, 8, 4)) - 1)
    assert torch.all(row[1:] >= row[:-1] - 1e-6)
