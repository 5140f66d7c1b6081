"""Shared test setup: offline always, real images from ../shared, bad inputs made on the fly."""

import contextlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SHARED = REPO.parent / "shared" / "realworld"


@contextlib.contextmanager
def weights_env(path: Path):
    """Point the project's weights folder ($REALSR_R1_WEIGHTS) at `path` for a while."""
    old = os.environ.get("REALSR_R1_WEIGHTS")
    os.environ["REALSR_R1_WEIGHTS"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("REALSR_R1_WEIGHTS", None)
        else:
            os.environ["REALSR_R1_WEIGHTS"] = old


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    """One converted copy of the real Real-ESRGAN weights for the whole session (not the repo's)."""
    with weights_env(tmp_path_factory.mktemp("weights")) as path:
        yield path


@pytest.fixture
def fresh_accelerator():
    """accelerate keeps one state per process: a test that asks for another mixed precision starts
    from a fresh one (as accelerate's own tests do) and leaves a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def photo(size=(24, 16), name="dog.png", mode="RGB") -> Image.Image:
    """A crop of a real example photo, resized small so the restorer runs in milliseconds."""
    im = Image.open(EXAMPLES / name).convert("RGB")
    return im.resize(size, Image.LANCZOS).convert(mode)


def png_with_size_header(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def exif_rotated_jpeg(path: Path) -> None:
    """A 24x16 JPEG stored landscape with EXIF orientation 6 (display rotated 90° CW → 16x24)."""
    im = photo((24, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, "JPEG", exif=exif.tobytes(), quality=95)


def write_png16(path: Path, arr: np.ndarray, alpha: bool) -> None:
    import png

    h, w, c = arr.shape
    png.Writer(w, h, greyscale=False, alpha=alpha, bitdepth=16).write(
        open(path, "wb"), arr.reshape(h, w * c).astype(np.uint16))


@pytest.fixture
def bad_inputs(tmp_path):
    """Every awkward input the issue lists. Returns (folder, {name: expected}) where expected is
    either ("ok", (w, h), mode-of-output) or ("error", words the one-line error must contain)."""
    d = tmp_path / "in"
    d.mkdir()
    expect = {}
    (d / "zero.png").write_bytes(b"")
    expect["zero.png"] = ("error", "empty file")
    good = io.BytesIO()
    photo((24, 16)).save(good, "PNG")
    (d / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    expect["truncated.png"] = ("error", "truncated")
    (d / "notes.png").write_text("this is not an image\n")
    expect["notes.png"] = ("error", "not a recognised image")
    (d / "bomb.png").write_bytes(png_with_size_header(60000, 60000))
    expect["bomb.png"] = ("error", "over the limit")
    photo((20, 12), mode="CMYK").save(d / "cmyk.jpg", "JPEG", quality=95)
    expect["cmyk.jpg"] = ("ok", (80, 48), "RGB")
    rng = np.random.default_rng(0)
    rgb16 = np.asarray(photo((12, 10)), dtype=np.uint16) * 257 + rng.integers(0, 200, (10, 12, 3)).astype(np.uint16)
    arr16 = np.dstack([rgb16, np.full((10, 12, 1), 40000, np.uint16)])
    write_png16(d / "deep16.png", arr16, alpha=True)
    expect["deep16.png"] = ("ok", (48, 40), "RGBA16")
    rgba = photo((16, 12)).convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:, :8, 3] = 0
    Image.fromarray(a, "RGBA").save(d / "rgba.png")
    expect["rgba.png"] = ("ok", (64, 48), "RGBA")
    photo((16, 12), mode="L").save(d / "gray.png")
    expect["gray.png"] = ("ok", (64, 48), "L")
    pal = photo((16, 12)).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(d / "palette.png")
    expect["palette.png"] = ("ok", (64, 48), "RGB")
    frames = [photo((14, 10)), photo((14, 10), name="frog.png")]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expect["anim.gif"] = ("ok", (56, 40), "RGB")
    exif_rotated_jpeg(d / "rotated.jpg")
    expect["rotated.jpg"] = ("ok", (64, 96), "RGB")
    photo((1, 1)).save(d / "one.png")
    expect["one.png"] = ("ok", (4, 4), "RGB")
    photo((12, 12)).save(d / "фото-照片.png")
    expect["фото-照片.png"] = ("ok", (48, 48), "RGB")
    return d, expect


def ncnn_extractor(name: str, rgb: np.ndarray):
    """(extractor, what to keep alive) for a shipped model's .param/.bin on pip ncnn's CPU path in fp32, fed `rgb`
    (HxWx3 in [0, 1]): the independent runtime tests compare against. ncnn.Mat borrows the input's
    buffer, so hold the second value until the last extract."""
    ncnn = pytest.importorskip("ncnn")
    from realsr_r1 import weights

    param, bin_, _ = weights.source_files(name)
    net = ncnn.Net()
    for opt in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, opt, False)
    net.load_param(str(param))
    net.load_model(str(bin_))
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(chw))
    return ex, (net, chw)  # the net and the input must outlive the extractor
