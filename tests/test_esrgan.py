"""Real-ESRGAN restorer: equal to an independent runtime (pip ncnn) on the same weights, tiling,
alpha, output scales and dtypes, precision choice. Real weights, CPU, offline."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ncnn_extractor
from realsr_r1 import device as devmod
from realsr_r1 import weights
from realsr_r1.restorers import esrgan
from realsr_r1.restorers.esrgan import ESRGANRestorer, _spans
from realsr_r1.restorers.esrgan_nets import RRDBNet, load_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = [SHARED / "realworld" / "RealSRSet" / "dog.png", Path(__file__).resolve().parents[1] / "examples" / "dog.png"]


def photo_crop(h: int, w: int, top: int = 100, left: int = 100) -> np.ndarray:
    """A crop of a real photo (RealSRSet's dog), float32 HxWx3 in [0, 1]."""
    path = next((p for p in PHOTOS if p.is_file()), None)
    if path is None:
        pytest.skip(f"real test photo absent: neither {PHOTOS[0]} nor {PHOTOS[1]}")
    rgb = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
    return np.ascontiguousarray(rgb[top:top + h, left:left + w])


def ncnn_reference(name: str, rgb: np.ndarray) -> np.ndarray:
    """The same .param/.bin through pip ncnn on CPU in fp32: the independent runtime."""
    ex, _keep = ncnn_extractor(name, rgb)
    ret, out = ex.extract("output")
    assert ret == 0
    return np.array(out).transpose(1, 2, 0)


@pytest.fixture(scope="module")
def x4plus(weights_dir):
    return weights.realesrgan_x4plus(weights_dir)


@pytest.fixture(scope="module")
def esr(x4plus):
    return ESRGANRestorer.from_pretrained(x4plus, device="cpu", precision="fp32", tile=0, backend="torch")


class NearestX4(torch.nn.Module):
    """Stand-in net without spatial context: tiled output must equal whole-image output exactly."""

    scale = 4

    def forward(self, x):
        return F.interpolate(x, scale_factor=4, mode="nearest")


def test_x4plus_matches_ncnn_runtime(esr):
    rgb = photo_crop(48, 48)
    ref = ncnn_reference("realesrgan-x4plus", rgb)
    with torch.inference_mode():
        raw = esr.model(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None])[0].permute(1, 2, 0).numpy()
    assert raw.shape == ref.shape == (192, 192, 3)
    assert np.abs(raw - ref).max() <= 1e-4
    assert np.abs(esr.upscale(rgb) - np.clip(ref, 0, 1)).max() <= 1e-4


def test_animevideov3_matches_ncnn_runtime(weights_dir):
    rgb = photo_crop(40, 56)
    compact = ESRGANRestorer.from_pretrained("realesr-animevideov3", device="cpu", precision="fp32", tile=0,
                                             backend="torch")
    assert compact.name == "realesr-animevideov3"
    ref = ncnn_reference("realesr-animevideov3", rgb)
    assert np.abs(compact.upscale(rgb) - np.clip(ref, 0, 1)).max() <= 1e-4


def test_tiles_blend_to_whole_image_without_seams(esr):
    """RRDBNet's receptive field spans hundreds of pixels, so a tile that sees only `tile_pad` (8)
    pixels of context cannot equal the whole-image result (mean difference ~0.004 here; Real-ESRGAN's
    own tiling behaves alike; the worst pixel, ~0.06). What tiling must not do is make a seam: across each seam, the
    tiled−whole difference may change no more than between neighbouring columns around it. The
    same windows cut hard, without the cross-fade, fail that check."""
    rgb = photo_crop(48, 144)
    esr.tile_pad = 8
    try:
        whole = esr.upscale(rgb)
        esr.tile = 48
        tiled = esr.upscale(rgb)
        esr.tile = 0
        spans = _spans(144, 48, 8, 4)
        parts = [esr.upscale(np.ascontiguousarray(rgb[:, s.ctx0:s.ctx1])) for s in spans]
    finally:
        esr.tile, esr.tile_pad = 0, 16
    seams = [(a.out1 + b.out0) // 2 for a, b in zip(spans, spans[1:])]  # mid-ramp
    assert len(seams) == 2
    hard = np.concatenate([p[:, a - 4 * s.ctx0:b - 4 * s.ctx0] for p, s, a, b in zip(parts, spans, [0] + seams, seams + [4 * 144])],
                          axis=1)

    def seam_ratios(img):
        jumps = np.abs(np.diff(img - whole, axis=1)).mean(axis=(0, 2))  # jumps[k]: column k → k+1
        return [jumps[c - 1] / np.median(np.delete(jumps[c - 33:c + 32], 32)) for c in seams]

    diff = tiled - whole
    assert np.abs(diff).mean() < 0.006 and np.abs(diff).max() < 0.1
    assert max(seam_ratios(tiled)) < 1.1
    assert max(seam_ratios(hard)) > 1.1  # the check sees a seam where there is one


@pytest.mark.parametrize("length,tile,pad", [(1, 4, 16), (7, 3, 2), (100, 32, 16), (257, 256, 16),
                                             (50, 16, 40), (33, 10, 0)])
def test_tile_weights_partition_unity(length, tile, pad):
    cover = np.zeros(4 * length)
    for s in _spans(length, tile, pad, 4):
        assert 0 <= s.ctx0 and s.ctx1 <= length
        assert 4 * s.ctx0 <= s.out0 < s.out1 <= 4 * s.ctx1  # contributes only where it has computed
        cover[s.out0:s.out1] += s.weight
    np.testing.assert_allclose(cover, 1, atol=1e-6)


@pytest.mark.parametrize("tile,pad", [(256, 16), (512, 16), (48, 8), (32, 16), (10, 0), (3, 2), (16, 40)])
def test_tile_windows_are_bounded_of_one_size_and_add_least_padding(tile, pad):
    """For every length: the fewest windows of at most tile + 2·pad (the memory bound), all of one
    size (one static shape), covering the axis with weights summing to 1; each still has ≥ pad/2
    pixels of context beyond what it contributes (the cross-fade ramps included; its core gets
    `pad`) wherever the image has them; and the pixels computed are the length plus 2·pad per cut,
    give or take rounding, so time grows with the image, not in whole windows per tile."""
    for length in range(1, 1201):
        spans = _spans(length, tile, pad, 4)
        n = len(spans)
        assert n == (1 if length <= tile + 2 * pad else -(-(length - 2 * pad) // tile))
        sizes = {s.ctx1 - s.ctx0 for s in spans}
        assert len(sizes) == 1 and max(sizes) <= tile + 2 * pad
        if n == 1:
            assert sizes == {length}  # computed whole, as without tiles
        assert sum(s.ctx1 - s.ctx0 for s in spans) <= length + 2 * pad * (n - 1) + n - 1, length
        cover = np.zeros(4 * length)
        for s in spans:
            assert 0 <= s.ctx0 and s.ctx1 <= length
            assert s.ctx0 <= max(0, s.out0 // 4 - pad // 2) and s.ctx1 >= min(length, -(-s.out1 // 4) + pad // 2)
            cover[s.out0:s.out1] += s.weight
        np.testing.assert_allclose(cover, 1, atol=1e-6, err_msg=f"length {length}")
        for a, b in zip(spans, spans[1:]):  # the cut, mid-ramp, has `pad` of context on both sides
            cut = (a.out1 + b.out0) // 8
            assert a.ctx1 - cut >= pad and cut - b.ctx0 >= pad


def test_a_little_over_a_tile_costs_a_little_more():
    """280 px with tile 256, pad 16 is one 280 window (it fits in 288), not two of 280; 300 px is two
    windows of 166, 332 px in all rather than 576."""
    assert [(s.ctx0, s.ctx1) for s in _spans(280, 256, 16, 4)] == [(0, 280)]
    assert [(s.ctx0, s.ctx1) for s in _spans(300, 256, 16, 4)] == [(0, 166), (134, 300)]
    assert [(s.ctx0, s.ctx1) for s in _spans(256, 256, 16, 4)] == [(0, 256)]


def tiny_rrdbnet() -> torch.nn.Module:
    """A random RRDBNet small enough to run on a CPU at once, centred so its output is not clamped."""
    torch.manual_seed(0)
    net = RRDBNet(num_feat=8, num_block=1, grow=4).eval()
    with torch.no_grad():
        net.conv_last.bias.fill_(0.5)
    return net


@pytest.mark.parametrize("tile,pad", [(32, 16), (16, 8)])
def test_tiles_of_an_awkward_size_agree_with_the_whole_image(tile, pad):
    """70x45 in tiles of windows of minimal size (one axis or both tiled) against the whole image, on
    a network with real spatial context: the same image to float rounding, as the tiny net's
    receptive field fades within `pad`. Without context (pad 0) the same tiles differ visibly."""
    r = ESRGANRestorer(tiny_rrdbnet(), torch.device("cpu"), "fp32", tile=0)
    rgb = np.random.default_rng(0).random((70, 45, 3), dtype=np.float32)
    whole = r.upscale(rgb)
    assert whole.std() > 0.005 and 0 < whole.min() and whole.max() < 1
    r.tile, r.tile_pad = tile, pad
    tiled = r.upscale(rgb)
    assert len(_spans(70, tile, pad, 4)) > 1
    assert np.abs(tiled - whole).max() < 1e-4
    r.tile_pad = 0
    assert np.abs(r.upscale(rgb) - whole).max() > 1e-2


class ShapeNet:
    """A runtime's net on the CPU (ESRGANRestorer's `net`) that records fix_shape and tile shapes."""

    scale, precision = 4, "fp32"

    def __init__(self):
        self.fixed, self.tiles = [], []

    def fix_shape(self, shape):
        self.fixed.append(shape)

    def __call__(self, tile):
        self.tiles.append(tile.shape[:2])
        return tile.repeat(4, 0).repeat(4, 1)


def test_only_images_of_many_tiles_fix_their_one_window_shape():
    """An image of STATIC_TILES windows or more fixes its window shape (compiled statically); fewer
    windows run on the dynamic model (None), so a folder of mixed small sizes compiles nothing."""
    r = ESRGANRestorer(None, "cpu", "fp32", tile=32, tile_pad=8, net=ShapeNet(), backend="openvino")
    rng = np.random.default_rng(2)
    for (h, w), n in [((40, 40), 1), ((70, 45), 2), ((150, 90), 15), ((150, 140), 20)]:
        r.net.tiles.clear()
        rgb = rng.random((h, w, 3), dtype=np.float32)
        np.testing.assert_allclose(r.upscale(rgb), rgb.repeat(4, 0).repeat(4, 1), atol=1e-6)
        assert len(r.net.tiles) == n and len(set(r.net.tiles)) == 1
        assert r.net.fixed[-1] == (r.net.tiles[0] if n >= esrgan.STATIC_TILES else None)


def test_tiling_is_exact_for_a_context_free_net_and_any_size():
    r = ESRGANRestorer(NearestX4(), torch.device("cpu"), "fp32", tile=0)
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (1, 9), (13, 7), (37, 50)]:
        rgb = rng.random((h, w, 3), dtype=np.float32)
        r.tile, r.tile_pad = 0, 6
        whole = r.upscale(rgb)
        r.tile = 8
        tiled = r.upscale(rgb)
        assert tiled.shape == (4 * h, 4 * w, 3)
        np.testing.assert_allclose(tiled, whole, atol=1e-6)
        np.testing.assert_array_equal(r.upscale(rgb, np.uint8), np.round(whole * 255).astype(np.uint8))


def test_memory_stays_flat_in_image_size():
    """Band-wise accumulation: beyond the output itself, memory does not grow with image height (a
    band's rows are bounded by the window, whatever the height: a few rows more or less from 512 to
    2048), and a 512² input (2048² output) never holds a full-size float buffer (50 MB)."""
    import tracemalloc

    r = ESRGANRestorer(NearestX4(), torch.device("cpu"), "fp32", tile=64, tile_pad=16)
    extra = []
    for h in (512, 2048):
        rgb = np.random.default_rng(0).random((h, 512, 3), dtype=np.float32)
        tracemalloc.start()
        out = r.upscale(rgb, np.uint8)
        extra.append(tracemalloc.get_traced_memory()[1] - out.nbytes)
        tracemalloc.stop()
    assert extra[1] < extra[0] + 1e6, extra
    assert extra[0] < 2048 * 2048 * 3 * 4 / 2, extra


def test_real_net_on_odd_and_tiny_sizes(esr):
    esr.tile, esr.tile_pad = 6, 4
    try:
        for h, w in [(1, 1), (1, 5), (7, 3), (11, 13)]:
            out = esr.upscale(photo_crop(h, w))
            assert out.shape == (4 * h, 4 * w, 3) and out.dtype == np.float32
            assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    finally:
        esr.tile, esr.tile_pad = 0, 16


def test_alpha_goes_through_the_net(esr):
    rgb = photo_crop(16, 20)
    opaque = np.ones((16, 20), np.float32)
    out, a = esr.restore(rgb, opaque)
    assert out.shape == (64, 80, 3) and a.shape == (64, 80) and a.dtype == np.float32
    assert a.min() > 0.97  # opaque stays opaque
    half = opaque.copy()
    half[:, :10] = 0
    _, a = esr.restore(rgb, half)
    assert a[:, :32].max() < 0.05 and a[:, 48:].min() > 0.95
    with pytest.raises(ValueError, match="alpha must be 16x20"):
        esr.restore(rgb, opaque[:8])


@pytest.mark.parametrize("outscale", [2.5, 1.0, 3.3, 4.0, 0.5])
def test_outscale_gives_exact_sizes(esr, outscale):
    rgb = photo_crop(9, 14)
    alpha = np.full((9, 14), 0.5, np.float32)
    for dtype in (np.float32, np.uint8, np.uint16):
        out, a = esr.restore(rgb, alpha, outscale=outscale, out_dtype=dtype)
        size = (round(9 * outscale), round(14 * outscale))
        assert out.shape == (*size, 3) and a.shape == size
        assert out.dtype == a.dtype == dtype


def test_integer_outputs_are_the_rounded_float_output(esr):
    rgb = photo_crop(12, 10)
    f = esr.upscale(rgb)
    np.testing.assert_array_equal(esr.upscale(rgb, np.uint8), np.round(f * 255).astype(np.uint8))
    u16 = esr.upscale(rgb, np.uint16).astype(np.int64)
    assert np.abs(u16 - np.round(f.astype(np.float64) * 65535)).max() <= 1


def test_bf16_autocast_is_close_to_fp32(esr, x4plus):
    rgb = photo_crop(32, 32)
    bf16 = ESRGANRestorer(load_model(x4plus), torch.device("cpu"), "bf16", tile=0)
    assert bf16.precision == "bf16"
    a, b = esr.upscale(rgb), bf16.upscale(rgb)
    psnr = 10 * np.log10(1 / np.mean((a - b) ** 2))
    assert psnr > 38, psnr


def test_cuda_oom_halves_the_tile(monkeypatch):
    r = ESRGANRestorer(NearestX4(), torch.device("cpu"), "fp32", tile=0, tile_pad=6)
    r.device = torch.device("cuda")  # only the OOM policy looks at it; _forward is faked below

    def forward(self, tile, gray):
        if max(tile.shape[:2]) > 44:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return tile.repeat(4, 0).repeat(4, 1)

    monkeypatch.setattr(ESRGANRestorer, "_forward", forward)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rgb = np.random.default_rng(1).random((60, 100, 3), dtype=np.float32)
    out = r.upscale(rgb)
    assert r.tile == 32  # 100 → 50 → 32 (the floor): windows of 32 + 2·6 px fit
    np.testing.assert_allclose(out, rgb.repeat(4, 0).repeat(4, 1), atol=1e-6)
    r.device = torch.device("cpu")
    with pytest.raises(torch.OutOfMemoryError):  # CPU: no retry loop
        r.tile = 0
        r.upscale(rgb)


FLAGS = {
    "amx": "processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n",
    "zen4": "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n",
    "old": "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n",
    "arm": "processor\t: 0\nFeatures\t: fp asimd bf16\n",
}


@pytest.mark.parametrize("cpu,want", [("amx", "bf16"), ("zen4", "bf16"), ("old", "fp32"), ("arm", "fp32")])
def test_precision_follows_cpu_flags(monkeypatch, cpu, want):
    real = devmod.cpu_flags
    monkeypatch.setattr(devmod, "cpu_flags", lambda cpuinfo=None: real(FLAGS[cpu]))
    assert devmod.choose_precision("cpu") == want
    assert devmod.choose_precision("cpu", force_fp32=True) == "fp32"


def test_precision_on_cuda_and_checks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devmod.choose_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert devmod.choose_precision(torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        devmod.check_precision(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        devmod.check_precision(torch.device("cpu"), "int4")


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devmod.resolve_device("auto") == torch.device("cpu")
    assert devmod.resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        devmod.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="unknown device"):
        devmod.resolve_device("gpu")


def test_restorer_reports_precision_and_rejects_bad_input(esr):
    assert esr.precision == "fp32" and esr.device == torch.device("cpu") and esr.scale == 4
    with pytest.raises(ValueError, match="HxWx3"):
        esr.upscale(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="outscale"):
        esr.restore(np.zeros((4, 4, 3), np.float32), outscale=0)


def test_weight_dtype_is_one_table(monkeypatch):
    """'auto' weights: bf16 on a bf16 GPU, fp16 on one without (not bf16 as the VLM loader took), fp32 on CPU."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert devmod.weight_dtype("cuda", "auto") == torch.float16
    with pytest.raises(ValueError, match="does not support bf16"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
        devmod.weight_dtype("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devmod.weight_dtype("cuda:0", "auto") == torch.bfloat16
    assert devmod.weight_dtype("cpu", "auto") == torch.float32
    assert devmod.weight_dtype("cpu", "bfloat16") == torch.bfloat16
    assert devmod.weight_dtype("cpu", torch.float16) == torch.float16
    with pytest.raises(ValueError, match="unknown precision"):
        devmod.weight_dtype("cpu", "int4")
