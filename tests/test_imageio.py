"""Reading every awkward input correctly, and writing atomically."""

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, png_with_size_header
from realsr_r1 import imageio
from realsr_r1.imageio import ImageReadError, encode_image, list_images, read_image, write_image


def test_reads_the_listed_awkward_inputs(bad_inputs):
    folder, expect = bad_inputs
    for name, (kind, *rest) in expect.items():
        if kind == "error":
            with pytest.raises(ImageReadError) as e:
                read_image(folder / name, max_pixels=10_000_000)
            msg = str(e.value)
            assert rest[0] in msg and "\n" not in msg, (name, msg)
        else:
            im = read_image(folder / name)
            assert im.rgb.dtype == np.float32 and im.rgb.ndim == 3 and im.rgb.shape[2] == 3
            assert 0.0 <= im.rgb.min() and im.rgb.max() <= 1.0
            w, h = rest[0]
            assert im.size == (w // 4, h // 4), name


def test_exif_orientation_is_applied(bad_inputs):
    folder, _ = bad_inputs
    raw = Image.open(folder / "rotated.jpg")
    assert raw.size == (24, 16)
    assert read_image(folder / "rotated.jpg").size == (16, 24)


def test_sixteen_bit_png_keeps_all_bits_and_alpha(bad_inputs):
    folder, _ = bad_inputs
    im = read_image(folder / "deep16.png")
    assert im.bit_depth == 16 and im.alpha is not None
    assert np.allclose(im.alpha, 40000 / 65535)
    # values that are not multiples of 257 prove we did not go through 8 bits
    assert np.any(np.abs(im.rgb * 65535 - np.round(im.rgb * 255) * 257) > 1)


def test_modes(bad_inputs):
    folder, _ = bad_inputs
    assert read_image(folder / "gray.png").mode == "L"
    rgba = read_image(folder / "rgba.png")
    assert rgba.alpha is not None and rgba.alpha[:, :8].max() == 0 and rgba.alpha[:, 8:].min() == 1
    anim = read_image(folder / "anim.gif")
    assert any("first of 2 frames" in n for n in anim.notes)
    cmyk = read_image(folder / "cmyk.jpg")
    assert cmyk.mode == "RGB" and cmyk.rgb.std() > 0.02


def test_real_edge_cases_from_real_esrgan_inputs():
    if not SHARED.is_dir():
        pytest.skip("../shared/realworld is not present")
    tree = read_image(SHARED / "edge-cases" / "tree_alpha_16bit.png")
    assert tree.bit_depth == 16 and tree.alpha is not None and tree.size == (342, 256)
    assert read_image(SHARED / "edge-cases" / "wolf_gray.jpg").mode == "L"
    assert read_image(SHARED / "edge-cases" / "children-alpha.png").alpha is not None


def test_pixel_limit_checked_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_with_size_header(100000, 100000))
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(p)
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(p, max_pixels=None)  # header passes, the missing data does not


@pytest.mark.parametrize("mode,bits,alpha", [("RGB", 8, False), ("RGB", 8, True), ("L", 8, False),
                                             ("L", 8, True), ("RGB", 16, True), ("L", 16, False)])
def test_write_read_round_trip(tmp_path, mode, bits, alpha):
    rng = np.random.default_rng(1)
    rgb = rng.random((9, 7, 3), dtype=np.float32)
    if mode == "L":
        rgb = np.repeat(rgb[..., :1], 3, axis=2)
    a = rng.random((9, 7), dtype=np.float32) if alpha else None
    path = tmp_path / "x.png"
    write_image(path, rgb, a, mode=mode, bit_depth=bits)
    back = read_image(path)
    tol = 0.5 / (65535 if bits == 16 else 255) + 1e-6
    assert back.mode == mode and back.bit_depth == bits
    assert np.abs(back.rgb - rgb).max() <= tol
    if alpha:
        assert np.abs(back.alpha - a).max() <= tol


def test_uint_arrays_are_written_unchanged(tmp_path):
    arr = np.arange(5 * 4 * 3, dtype=np.uint16).reshape(5, 4, 3) * 1000
    write_image(tmp_path / "u.png", arr, None, mode="RGB", bit_depth=16)
    back = read_image(tmp_path / "u.png")
    assert np.array_equal(np.round(back.rgb * 65535).astype(np.uint16), arr)


def test_jpeg_cannot_hold_alpha():
    with pytest.raises(ValueError, match="alpha"):
        encode_image(np.zeros((2, 2, 3), np.float32), np.ones((2, 2), np.float32), ext="jpg")


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    write_image(path, np.zeros((4, 4, 3), np.float32))
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(imageio.os, "fsync", boom)
    with pytest.raises(OSError):
        write_image(path, np.ones((4, 4, 3), np.float32))
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temp file left


def test_an_encoder_failure_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    """PNGs are encoded straight into the temporary file: a failure there must not reach `path`."""
    path = tmp_path / "out.png"
    write_image(path, np.zeros((4, 4, 3), np.float32))
    before = path.read_bytes()

    def half_written(buf, *a, **k):
        buf.write(b"\x89PNG half")
        raise OSError("encoder failed")

    monkeypatch.setattr(imageio, "encode_image_to", half_written)
    with pytest.raises(OSError, match="encoder failed"):
        write_image(path, np.ones((4, 4, 3), np.float32))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.png"]


@pytest.mark.parametrize("bits", [8, 16])
def test_pngs_are_written_at_zlibs_fastest_level(tmp_path, bits):
    """As OpenCV (Real-ESRGAN's writer) does by default: the zlib header of the image data says
    FLEVEL 0 (levels 0-1), where Pillow's default 6 would say 2."""
    rgb = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    write_image(tmp_path / "a.png", rgb, bit_depth=bits)
    data = (tmp_path / "a.png").read_bytes()
    idat = data.index(b"IDAT") + 4
    assert imageio.PNG_COMPRESS_LEVEL == 1 and data[idat] & 0x0F == 8 and data[idat + 1] >> 6 == 0
    back = np.asarray(Image.open(tmp_path / "a.png")) if bits == 8 else None
    if back is not None:
        assert np.array_equal(back, np.round(rgb * 255).astype(np.uint8))  # still lossless


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ["b.png", "a.JPG", ".hidden.png", "notes.txt", "c.webp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.webp"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_mode_of_the_users_umask(tmp_path, umask):
    """As `cp` or Real-ESRGAN would give them: 0666 & ~umask, not the temp file's owner-only 0600."""
    import os

    old = os.umask(umask)
    try:
        write_image(tmp_path / "a.png", np.zeros((4, 4, 3), np.float32))
        imageio.atomic_write_text(tmp_path / "a.json", "{}")
        imageio.atomic_write_bytes(tmp_path / "a.png", b"again")  # replacing keeps the usual mode too
    finally:
        os.umask(old)
    for name in ("a.png", "a.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
