"""The lite profile's ncnn backend against PyTorch (OpenVINO: test_openvino_backend.py): the same images from each,
through the same tiling, alpha, 16-bit and outscale code; auto's choice per machine; the sidecar."""

import json

import numpy as np
import pytest

from conftest import photo
from realsr_r1.restorers import esrgan
from realsr_r1.restorers.esrgan import ESRGANRestorer

pytest.importorskip("ncnn")


@pytest.fixture(scope="module")
def pair(weights_dir):
    torch_fp32 = ESRGANRestorer.from_pretrained(None, device="cpu", precision="fp32", tile=16, tile_pad=4, backend="torch")
    ncnn = ESRGANRestorer.from_pretrained(None, device="cpu", tile=16, tile_pad=4, backend="ncnn")
    assert (torch_fp32.backend, ncnn.backend, ncnn.precision) == ("torch", "ncnn", "fp32")
    return torch_fp32, ncnn


def rgb(h=28, w=40):
    return np.asarray(photo((w, h), "dog.png"), np.float32) / 255


@pytest.mark.parametrize("outscale", [4.0, 3.5])
def test_backends_give_the_same_image_through_tiles_alpha_and_outscale(pair, outscale):
    image = rgb()
    alpha = np.linspace(0, 1, image.shape[0] * image.shape[1], dtype=np.float32).reshape(image.shape[:2])
    (a, a_alpha), (b, b_alpha) = (r.restore(image, alpha, outscale=outscale) for r in pair)
    assert a.shape == b.shape == (round(28 * outscale), round(40 * outscale), 3)
    assert np.abs(a - b).max() < 1e-4 and np.abs(a_alpha - b_alpha).max() < 1e-4
    assert np.abs(a - np.clip(a, 0, 1)).max() == 0  # in range on both


def test_backends_agree_in_8_and_16_bit(pair):
    image = rgb()
    for dtype, levels in ((np.uint8, 1), (np.uint16, 16)):  # rounding may flip by one 8-bit level
        a, b = (r.restore(image, None, outscale=4.0, out_dtype=dtype)[0] for r in pair)
        assert a.dtype == b.dtype == dtype
        assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= levels


def test_ncnn_is_opt_in_with_smaller_tiles(weights_dir):
    """ncnn's buffers grow with the tile (its trunk alone takes 1 GB for a 288² window): opt-in, smaller tiles."""
    torch_ = ESRGANRestorer.from_pretrained(None, device="cpu", precision="fp32", backend="torch")
    ncnn = ESRGANRestorer.from_pretrained(None, device="cpu", backend="ncnn")
    assert esrgan.choose_backend("cpu")[0] != "ncnn"
    assert torch_.backend == "torch" and torch_.tile == esrgan.DEFAULT_TILE["cpu"]
    assert ncnn.backend == "ncnn" and ncnn.tile == esrgan.BACKEND_TILE["ncnn"] < torch_.tile
    assert ncnn.weights()["file"].endswith(".bin")  # the file that runs, hashed for the sidecar


def test_ncnn_runs_x4plus_tail_on_row_strips_with_the_same_image(pair, monkeypatch):
    """ncnn's buffers grow with the tile's 4x output (1.4 GB for a 160² window at once): x4plus's
    tail runs from the trunk's features on strips, which give the image of one pass."""
    from realsr_r1 import weights
    from realsr_r1.restorers import ncnn_backend

    x4plus = weights.source_files("realesrgan-x4plus")[0].read_text()
    compact = weights.source_files("realesr-animevideov3")[0].read_text()
    blob = ncnn_backend.tail_input(x4plus)
    first_interp = next(line.split() for line in x4plus.splitlines() if line.startswith("Interp"))
    assert blob is not None and first_interp[4] == blob and ncnn_backend.tail_input(compact) is None

    net = pair[1].net
    calls = []
    extract = type(net)._extract

    def spy(self, name, chw, output):
        calls.append((name, chw.shape, output))
        return extract(self, name, chw, output)

    monkeypatch.setattr(type(net), "_extract", spy)
    monkeypatch.setattr(ncnn_backend, "TAIL_STRIP_AREA", 10 * 40)  # 10 rows of a 40-wide tile
    image = rgb(36, 40)
    strips = net(image)
    assert [c[0] for c in calls] == [ncnn_backend.INPUT] + [blob] * 4  # rows 0-10, 10-20, 20-30, 30-36
    assert [c[1][1] for c in calls[1:]] == [12, 14, 14, 8]  # each with up to 2 rows of context a side
    calls.clear()
    monkeypatch.setattr(ncnn_backend, "TAIL_STRIP_AREA", 36 * 40)
    whole = net(image)
    assert [c[0] for c in calls] == [ncnn_backend.INPUT]  # small enough: one pass
    assert strips.shape == whole.shape == (144, 160, 3) and np.abs(strips - whole).max() < 1e-5


def test_ncnn_backend_errors_are_one_line(weights_dir, tmp_path):
    for kwargs, message in (({"backend": "ncnn", "path": str(tmp_path / "mine.safetensors")}, "runs the shipped models"),
                            ({"backend": "ncnn", "precision": "bf16"}, "runs on CPU in fp32"),
                            ({"backend": "vulkan"}, "unknown backend 'vulkan'")):
        with pytest.raises(ValueError) as e:
            ESRGANRestorer.from_pretrained(device="cpu", **kwargs)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_the_sidecar_records_the_backend_and_the_cli_images_agree(weights_dir, tmp_path):
    from PIL import Image

    from realsr_r1 import infer

    src = tmp_path / "in"
    src.mkdir()
    photo((40, 28), "dog.png").save(src / "a.png")
    out = {}
    for name, sets in (("ncnn", ["--set", "restorer.backend=ncnn"]), ("torch", ["--set", "restorer.backend=torch", "--fp32"])):
        assert infer.main(["--input", str(src), "--output", str(tmp_path / name), "--quiet", *sets]) == 0
        sidecar = json.loads((tmp_path / name / "a.json").read_text())
        assert f'"backend": "{name}"' in json.dumps(sidecar)
        out[name] = np.asarray(Image.open(tmp_path / name / "a.png"), np.int64)
    assert out["ncnn"].shape == out["torch"].shape and np.abs(out["ncnn"] - out["torch"]).max() <= 1


def test_benchmarks_name_the_cpu_with_the_flags_that_decide_its_speed():
    from realsr_r1.device import cpu_description

    info = "model name\t: Some CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16\n"
    assert cpu_description(info).startswith("Some CPU 9000 (")
    assert cpu_description(info).endswith("; amx_bf16 avx2 avx512_bf16 avx512f)")
    assert cpu_description("model name : Old\nflags : fpu sse2\n").endswith("; no AVX2)")


def test_an_isa_cap_below_bf16_takes_bf16_away_and_is_named(monkeypatch):
    from realsr_r1 import device
    from realsr_r1.restorers import openvino_backend

    info = "model name\t: Some CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"

    class Core:  # what OpenVINO's CPU plugin reports on such a CPU, whatever the cap
        def get_property(self, device_name, key):
            return ["BF16", "FP32", "INT8"]

    monkeypatch.delenv(device.ISA_CAP_ENV, raising=False)
    assert device.cpu_has_bf16(info) and openvino_backend.cpu_has_bf16(Core())
    assert device.cpu_description(info).endswith("avx512f)")
    for cap, bf16 in (("avx2", False), ("AVX512_CORE_VNNI", False), ("AVX512_CORE_BF16", True), ("ALL", True)):
        monkeypatch.setenv(device.ISA_CAP_ENV, cap)
        assert device.cpu_has_bf16(info) is bf16 and openvino_backend.cpu_has_bf16(Core()) is bf16, cap
        assert device.choose_precision("cpu") in (("bf16", "fp32") if bf16 else ("fp32",))
    monkeypatch.setenv(device.ISA_CAP_ENV, "avx2")
    assert device.cpu_description(info).endswith("; kernels capped at AVX2 by ONEDNN_MAX_CPU_ISA)")
