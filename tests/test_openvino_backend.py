"""The OpenVINO backend (restorer.backend: openvino, and what auto picks on CPU): the same images as
PyTorch through tiling, alpha, 16-bit and outscale; its cache under the weights folder (keyed by
weights hash, runtime version and precision, reused without converting, nothing half-written left);
INT8 with layers kept in float; auto's choice; one-line errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import photo
from realsr_r1.restorers import esrgan, esrgan_nets
from realsr_r1.restorers.esrgan import ESRGANRestorer

ov = pytest.importorskip("openvino")
from realsr_r1.restorers import openvino_backend  # noqa: E402


@pytest.fixture(scope="module")
def pair(weights_dir):
    torch_fp32 = ESRGANRestorer.from_pretrained(None, device="cpu", precision="fp32", tile=16, tile_pad=4, backend="torch")
    vino = ESRGANRestorer.from_pretrained(None, device="cpu", precision="fp32", tile=16, tile_pad=4, backend="openvino")
    assert (vino.backend, vino.precision, vino.scale) == ("openvino", "fp32", 4)
    return torch_fp32, vino


def rgb(h=28, w=40):
    return np.asarray(photo((w, h), "dog.png"), np.float32) / 255


@pytest.mark.parametrize("outscale", [4.0, 3.5])
def test_openvino_gives_pytorchs_image_through_tiles_alpha_and_outscale(pair, outscale):
    image = rgb()
    alpha = np.linspace(0, 1, image.shape[0] * image.shape[1], dtype=np.float32).reshape(image.shape[:2])
    (a, a_alpha), (b, b_alpha) = (r.restore(image, alpha, outscale=outscale) for r in pair)
    assert a.shape == b.shape == (round(28 * outscale), round(40 * outscale), 3)
    assert np.abs(a - b).max() < 1e-4 and np.abs(a_alpha - b_alpha).max() < 1e-4
    assert a.std() > 0.05  # a real image came out, not a flat one


def test_openvino_agrees_in_8_and_16_bit(pair):
    image = rgb()
    for dtype, levels in ((np.uint8, 1), (np.uint16, 16)):
        a, b = (r.restore(image, None, outscale=4.0, out_dtype=dtype)[0] for r in pair)
        assert a.dtype == b.dtype == dtype
        assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= levels


def cache_folders(root):
    return sorted(p.relative_to(root).as_posix() for p in (root / "compiled").glob("*/*") if p.is_dir())


def test_the_runtimes_buffers_are_given_back_after_each_image_and_it_runs_on(pair, monkeypatch):
    """OpenVINO keeps buffers sized by the largest tile until told (CompiledModel.release_memory):
    restore() gives them back after a large image and after its alpha (not after small ones), and
    the next image is the same."""
    vino = pair[1]
    image = rgb()
    monkeypatch.setattr(esrgan, "RELEASE_AREA", image.shape[0] * image.shape[1])
    before = vino.restore(image, None)[0]
    released = []
    real_release = vino.net.release
    monkeypatch.setattr(vino.net, "release", lambda: released.append(True) or real_release())
    vino.restore(image, np.ones(image.shape[:2], np.float32))
    assert len(released) == 2  # the colour pass and the alpha pass
    assert np.array_equal(vino.restore(image, None)[0], before)
    vino.restore(image[:-1], None)
    assert len(released) == 3  # a smaller image keeps them


def test_full_tiles_run_on_a_static_shape_and_others_on_the_dynamic_model(pair):
    """An image of at least STATIC_TILES windows runs them on one compiled static shape (24² here:
    tile + 2·pad, as 72 = 4 windows of 24 overlapping by 2·pad); a small image runs whole on the
    dynamic model. Both give PyTorch's image."""
    torch_fp32, vino = pair
    vino.net._compile(None)  # whatever earlier tests left compiled
    shapes = []
    real = vino.net._compile
    vino.net._compile = lambda shape: shapes.append(shape) or real(shape)
    try:
        big, small = rgb(72, 72), rgb(12, 12)
        assert esrgan.STATIC_TILES <= 16  # 4 x 4 windows
        for image, want in ((big, (24, 24)), (small, None), (big, (24, 24))):
            out = vino.upscale(image)
            assert vino.net.shape == want
            assert np.abs(out - torch_fp32.upscale(image)).max() < 1e-4
        assert shapes == [(24, 24), None, (24, 24)]  # one compile per switch, none per tile
        assert not vino.net.compiled.input(0).get_partial_shape().is_dynamic
    finally:
        del vino.net._compile


def test_the_cache_is_keyed_by_weights_runtime_and_precision_and_reused(pair, weights_dir, monkeypatch):
    sha = pair[1].weights()["sha256"]
    version = openvino_backend.runtime_version()
    assert f"compiled/realesrgan-x4plus-{sha}/openvino-{version}-fp32" in cache_folders(weights_dir)
    folder = pair[1].net.folder
    assert (folder / "model.xml").is_file() and any((folder / "blobs").iterdir())  # IR + compiled blob
    assert json.loads((folder / "meta.json").read_text()) == {"format": openvino_backend.CACHE_FORMAT, "arch": "RRDBNet",
                                                              "scale": 4}

    def no_conversion(*a, **k):
        raise AssertionError("converted again although the IR is cached")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    monkeypatch.setattr(esrgan_nets, "load_model", no_conversion)  # not even the PyTorch weights are read
    again = ESRGANRestorer.from_pretrained(None, device="cpu", precision="fp32", tile=16, tile_pad=4, backend="openvino")
    assert again.net.folder == folder
    assert np.array_equal(again.upscale(rgb(12, 12)), pair[1].upscale(rgb(12, 12)))


def test_an_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model = esrgan_nets.SRVGGNetCompact(num_feat=4, num_conv=1)
    weights_file = tmp_path / "w.safetensors"
    weights_file.write_bytes(b"stand-in weights: only their hash names the folder")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ov, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        openvino_backend.OpenVINONet(lambda: model, weights_file, "fp32", cache_root=tmp_path / "c")
    assert list((tmp_path / "c").rglob("model.xml")) == [] and list((tmp_path / "c").glob("*/*")) == []
    monkeypatch.undo()
    net = openvino_backend.OpenVINONet(lambda: model, weights_file, "fp32", cache_root=tmp_path / "c")
    x = rgb(8, 8)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(2, 0, 1)[None])[0].permute(1, 2, 0).clamp(0, 1).numpy()
    assert net.scale == 4 and np.abs(net(x) - ref).max() < 1e-5


@pytest.fixture(scope="module")
def compact_int8(weights_dir, tmp_path_factory):
    """animevideov3 (the small net) quantised on a folder of two photos: seconds, not minutes."""
    cal = tmp_path_factory.mktemp("calibration")
    photo((120, 100), "dog.png").save(cal / "a.png")
    photo((100, 100), "frog.png").save(cal / "b.png")
    (cal / "notes.txt").write_text("not an image: skipped")
    fp32 = ESRGANRestorer.from_pretrained("realesr-animevideov3", device="cpu", precision="fp32", backend="openvino")
    int8 = ESRGANRestorer.from_pretrained("realesr-animevideov3", device="cpu", precision="int8", backend="openvino",
                                          calibration=cal)
    return fp32, int8, cal


def test_int8_keeps_first_and_last_convolutions_in_float_and_stays_close(compact_int8):
    fp32, int8, _ = compact_int8
    assert int8.precision == "int8" and "-int8-nncf" in int8.net.folder.name
    ir = ov.Core().read_model(str(int8.net.folder / "model.xml"))
    convs = [op for op in ir.get_ops() if op.get_type_name() == "Convolution"]
    fed_by_fq = {op.get_friendly_name(): op.input_value(0).get_node().get_type_name() == "FakeQuantize" for op in convs}
    assert len(convs) == 18 and sum(fed_by_fq.values()) == 16  # the 16 inner convs run in INT8
    floats = [name for name, q in fed_by_fq.items() if not q]
    assert any("body.0/" in n for n in floats) and any("body.34/" in n for n in floats)
    image = rgb(40, 40)
    a, b = fp32.upscale(image), int8.upscale(image)
    mse = float(np.mean((a - b) ** 2))
    assert 0 < mse and 10 * np.log10(1 / mse) > 30  # quantised, and still the same picture


def source(op, i: int) -> str:
    """The type of the node that feeds input i of op."""
    return op.input_value(i).get_node().get_type_name()


def residual_adds(ir) -> list:
    """x4plus's residual adds (x + 0.2·block(x), the trunk's): the Adds of two computed tensors,
    not a bias."""
    return [op for op in ir.get_ops() if op.get_type_name() == "Add" and all(source(op, i) != "Constant" for i in range(2))]


def test_the_x4plus_int8_recipe_names_the_layers_it_means(pair):
    """INT8_KEEP_FLOAT matches IR node names as NNCF does (re.match): on x4plus's real IR they must
    pick the first conv and the last two (conv_up1/up2 run in INT8), all 93 residual adds (23
    blocks × (3 + 1) + the trunk) and the 2 upsamplings, and nothing else. A renaming by a new
    converter would otherwise quietly quantise the trunk again."""
    import re

    ir = ov.Core().read_model(str(pair[1].net.folder / "model.xml"))
    keep = openvino_backend.INT8_KEEP_FLOAT["RRDBNet"]

    def kept(op):
        return any(re.match(p, op.get_friendly_name()) for p in keep)

    ops = {t: [op for op in ir.get_ops() if op.get_type_name() == t] for t in ("Convolution", "Add", "Interpolate")}
    convs = sorted(re.search(r"m\.(\w+)/", op.get_friendly_name()).group(1) for op in ops["Convolution"] if kept(op))
    assert convs == ["conv_first", "conv_hr", "conv_last"] and len(ops["Convolution"]) == 351
    residual = residual_adds(ir)
    assert len(residual) == 93 and all(map(kept, residual))
    biases = [re.search(r"m\.(\w+)/", op.get_friendly_name()).group(1) for op in ops["Add"] if op not in residual and kept(op)]
    assert sorted(biases) == convs  # only the kept convs' biases: the others stay with their int8 convs
    assert len(ops["Interpolate"]) == 2 and all(map(kept, ops["Interpolate"]))


def test_x4plus_int8_keeps_its_residual_path_in_float(weights_dir):
    """On the calibrated x4plus model itself: no residual add reads a quantised tensor (NNCF may
    merge the quantisers of a block's consumers into one at the add's output, which then feeds the
    next add too: the trunk would pass through int8 at every block), and the layers the recipe
    quantises (conv_up1/up2) and keeps (conv_first, conv_hr, conv_last) are as it says."""
    import re

    int8 = ESRGANRestorer.from_pretrained(None, device="cpu", precision="int8", backend="openvino")
    ir = ov.Core().read_model(str(int8.net.folder / "model.xml"))

    residual = residual_adds(ir)
    assert len(residual) == 93
    assert not [op.get_friendly_name() for op in residual if "FakeQuantize" in (source(op, 0), source(op, 1))]
    fed_by_fq = {re.search(r"m\.(conv_\w+)/", op.get_friendly_name()).group(1): source(op, 0) == "FakeQuantize"
                 for op in ir.get_ops() if op.get_type_name() == "Convolution" and "m.conv_" in op.get_friendly_name()}
    assert fed_by_fq == {"conv_first": False, "conv_body": True, "conv_up1": True, "conv_up2": True,
                         "conv_hr": False, "conv_last": False}


def test_int8_cache_is_keyed_by_the_calibration_images(compact_int8, tmp_path):
    _, int8, cal = compact_int8
    tiles, digest = openvino_backend.calibration_tiles(cal)
    assert len(tiles) == 10 and tiles[0].shape == (1, 3, 96, 96)
    other = tmp_path / "other"
    other.mkdir()
    photo((96, 96), "chip.png").save(other / "c.png")
    again = ESRGANRestorer.from_pretrained("realesr-animevideov3", device="cpu", precision="int8", backend="openvino",
                                           calibration=other)
    assert again.net.folder.parent == int8.net.folder.parent and again.net.folder != int8.net.folder
    shipped, shipped_digest = openvino_backend.calibration_tiles()
    assert len(shipped) == 40 and shipped_digest != digest
    assert 0 <= min(t.min() for t in shipped) and max(t.max() for t in shipped) <= 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable image of at least 96x96") as e:
        openvino_backend.calibration_tiles(tmp_path / "empty")
    assert "\n" not in str(e.value) and str(tmp_path / "empty") in str(e.value)


def test_auto_picks_openvino_on_cpu_and_int8_only_for_experts_that_keep_their_quality(monkeypatch):
    """Where the CPU has bf16 units auto is bf16 for every expert. Without them it is INT8 for the
    shipped experts whose INT8 met the bar on real camera pairs (DF2K) and fp32 for the others
    (x4plus lost 0.23 dB there, and a user's own weights were never measured)."""
    import importlib.util

    cpu = "cpu"
    assert openvino_backend.INT8_BY_DEFAULT == {"realsr-df2k"}
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda core: True)
    assert esrgan.choose_backend(cpu) == ("openvino", "bf16")
    assert esrgan.choose_backend(cpu, model="realsr-df2k") == ("openvino", "bf16")
    assert esrgan.choose_backend(cpu, "auto", "fp32", "realsr-df2k") == ("openvino", "fp32")  # --fp32
    assert esrgan.choose_backend(cpu, "auto", "int8") == ("openvino", "int8")  # --precision int8
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda core: False)
    assert esrgan.choose_backend(cpu) == ("openvino", "fp32")
    assert esrgan.choose_backend(cpu, model="realesrgan-x4plus") == ("openvino", "fp32")
    assert esrgan.choose_backend(cpu, model="realsr-df2k") == ("openvino", "int8")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real_find_spec(name, *a))
    assert esrgan.choose_backend(cpu, model="realsr-df2k") == ("openvino", "fp32")  # nothing to calibrate with
    monkeypatch.undo()
    assert esrgan.choose_backend("cuda") == ("torch", "auto")
    assert esrgan.choose_backend(cpu, "torch") == ("torch", "auto")
    monkeypatch.setattr(openvino_backend, "available", lambda: False)
    assert esrgan.choose_backend(cpu) == ("torch", "auto")  # OpenVINO not installed


def test_from_pretrained_asks_auto_precision_for_the_shipped_model_by_name(weights_dir, monkeypatch):
    """The per-expert default reaches the loader: a shipped expert is named, another file is not."""
    asked = []

    def spy(model=None):
        asked.append(model)
        return "fp32"

    monkeypatch.setattr(openvino_backend, "auto_precision", spy)
    ESRGANRestorer.from_pretrained("realesrgan-x4plus", device="cpu", backend="openvino")
    ESRGANRestorer.from_pretrained(weights_dir / "realesrgan-x4plus.safetensors", device="cpu", backend="openvino")
    assert asked == ["realesrgan-x4plus", None]


def test_openvino_errors_are_one_line(weights_dir, monkeypatch):
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda core: False)
    for kwargs, message in (({"backend": "torch", "precision": "int8"}, "precision int8 runs on backend openvino"),
                            ({"backend": "openvino", "precision": "fp16"}, "unknown precision 'fp16'"),
                            ({"backend": "openvino", "precision": "bf16"}, "this CPU has no bf16 units")):
        with pytest.raises(ValueError) as e:
            ESRGANRestorer.from_pretrained(device="cpu", **kwargs)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_or_damaged_weights_are_one_line_errors_on_openvino(weights_dir, tmp_path):
    from realsr_r1.weights import CorruptWeightsError, WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="no such weights file") as e:
        ESRGANRestorer.from_pretrained(tmp_path / "absent.safetensors", device="cpu", backend="openvino")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(CorruptWeightsError, match="damaged or not a safetensors file") as e2:
        ESRGANRestorer.from_pretrained(junk, device="cpu", backend="openvino")
    assert "\n" not in str(e.value) + str(e2.value)
    assert not any(p.is_dir() for p in (weights_dir / "compiled").glob("junk-*/*"))  # nothing half-made


def test_a_cache_folder_of_another_format_is_converted_again(tmp_path):
    """A folder left by an older realsr-r1 on the same runtime (here: another network's IR and a
    meta.json with no format) is replaced, not run: it would give another network's output."""
    model = esrgan_nets.SRVGGNetCompact(num_feat=4, num_conv=1)
    weights_file = tmp_path / "w.safetensors"
    weights_file.write_bytes(b"x")
    net = openvino_backend.OpenVINONet(lambda: model, weights_file, "fp32", cache_root=tmp_path / "c")
    folder = net.folder
    other = esrgan_nets.SRVGGNetCompact(num_feat=8, num_conv=2, scale=2)
    shutil.rmtree(folder)
    openvino_backend.OpenVINONet(lambda: other, weights_file, "fp32", cache_root=tmp_path / "c")
    (folder / "meta.json").write_text(json.dumps({"arch": "SRVGGNetCompact", "scale": 2}))  # format-less
    (folder / "stale-extra").write_text("left by the old layout")

    again = openvino_backend.OpenVINONet(lambda: model, weights_file, "fp32", cache_root=tmp_path / "c")
    x = rgb(8, 8)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(2, 0, 1)[None])[0].permute(1, 2, 0).clamp(0, 1).numpy()
    assert again.folder == folder and again.scale == 4 and np.abs(again(x) - ref).max() < 1e-5
    assert not (folder / "stale-extra").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary left


def test_a_damaged_cache_is_a_one_line_error_naming_the_folder(tmp_path):
    from realsr_r1.weights import CorruptWeightsError

    model = esrgan_nets.SRVGGNetCompact(num_feat=4, num_conv=1)
    weights_file = tmp_path / "w.safetensors"
    weights_file.write_bytes(b"x")
    net = openvino_backend.OpenVINONet(lambda: model, weights_file, "fp32", cache_root=tmp_path / "c")
    (net.folder / "model.xml").write_text("<net broken")
    with pytest.raises(CorruptWeightsError) as e:
        openvino_backend.OpenVINONet(lambda: model, weights_file, "fp32", cache_root=tmp_path / "c")
    assert str(net.folder) in str(e.value) and "delete the folder" in str(e.value) and "\n" not in str(e.value)


def test_the_cli_sidecar_records_openvino_and_its_images_match_pytorch(weights_dir, tmp_path):
    from PIL import Image

    from realsr_r1 import infer

    src = tmp_path / "in"
    src.mkdir()
    photo((40, 28), "dog.png").save(src / "a.png")
    out = {}
    for name in ("openvino", "torch"):
        sets = ["--set", f"restorer.backend={name}", "--fp32"]
        assert infer.main(["--input", str(src), "--output", str(tmp_path / name), "--quiet", *sets]) == 0
        sidecar = json.loads((tmp_path / name / "a.json").read_text())
        text = json.dumps(sidecar)
        assert f'"backend": "{name}"' in text and '"precision": "fp32"' in text
        out[name] = np.asarray(Image.open(tmp_path / name / "a.png"), np.int64)
    assert out["openvino"].shape == out["torch"].shape and np.abs(out["openvino"] - out["torch"]).max() <= 1


@pytest.mark.parametrize("int8,fidelity", [(False, "0"), (False, "auto"), (True, "0")])
def test_a_lite_run_on_the_cached_openvino_model_never_imports_torch(pair, compact_int8, weights_dir, tmp_path,
                                                                     int8, fidelity):
    """PyTorch is half of a lite run's start-up (1.1 s) and OpenVINO needs it only to convert; NNCF
    (which imports it) only to calibrate. Neither one expert (`--fidelity 0`) nor the default auto,
    whose chooser scores with fullref.py's numpy PSNR/SSIM, imports it, nor any of the full
    profile's and training's libraries, nor SciPy (NIQE and the analyser are NumPy)."""
    import os
    import subprocess
    import sys

    src = tmp_path / "in"
    src.mkdir()
    photo((40, 28), "dog.png").save(src / "a.png")
    flags = (["--precision", "int8", "--set", "restorer.path=realesr-animevideov3", "--set",
              f"restorer.calibration={compact_int8[2]}"] if int8 else ["--fp32"])
    code = ("import sys\nfrom realsr_r1 import infer\n"
            f"rc = infer.main(['--input', {str(src)!r}, '--output', {str(tmp_path / 'out')!r}, '--quiet', "
            f"'--device', 'cpu', '--fidelity', {fidelity!r}, '--set', 'restorer.backend=openvino', *{flags!r}])\n"
            "heavy = ('torch', 'nncf', 'transformers', 'diffusers', 'trl', 'peft', 'accelerate', 'gradio', 'scipy')\n"
            "print('rc', rc, sorted(m for m in heavy if m in sys.modules))")
    env = {**os.environ, "REALSR_R1_WEIGHTS": str(weights_dir), "HF_HUB_OFFLINE": "1"}
    for _ in range(2):  # the first run converts what is not cached yet (DF2K for auto), with torch
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "rc 0 []", proc.stdout + proc.stderr
    sidecar = json.loads((tmp_path / "out" / "a.json").read_text())
    assert sidecar["versions"]["torch"] == torch.__version__  # still recorded, from the package metadata


def test_auto_device_asks_torch_only_where_a_gpu_driver_exists(monkeypatch):
    from realsr_r1 import device

    asked = []
    monkeypatch.setattr(device, "resolve_device", lambda name: asked.append(name) or torch.device("cpu"))
    monkeypatch.setattr(device.sys, "platform", "linux")
    monkeypatch.setattr(device.os.path, "exists", lambda p: False)
    assert device.device_type("auto") == "cpu" and device.device_type("cpu") == "cpu" and asked == []
    monkeypatch.setattr(device.os.path, "exists", lambda p: p == "/dev/nvidiactl")
    assert device.device_type("auto") == "cpu" and asked == ["auto"]  # a driver: torch decides


def test_x4plus_int8_gives_the_same_image_on_avx2_kernels(weights_dir, tmp_path):
    """An AVX2-only CPU runs INT8 convolutions without VNNI (oneDNN's AVX2 kernels); capped at AVX2
    (ONEDNN_MAX_CPU_ISA, as benchmarks/esrgan_speed.py --max-isa does) x4plus's shipped INT8 model
    gives this CPU's image to within rounding, so the INT8 quality measured on one CPU holds on the
    other. (Measured: bit for bit at 64² and 96²; at 40² under 1 % of values move, by ≤ 0.4/255.)
    (The session's one x4plus calibration: the app and GPU-check tests share it.)"""
    import os
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", rgb(40, 40))
    code = ("import sys, numpy as np\nfrom realsr_r1.restorers.esrgan import ESRGANRestorer\n"
            "r = ESRGANRestorer.from_pretrained(None, device='cpu', precision='int8', backend='openvino')\n"
            f"np.save(sys.argv[1], r.net(np.load({str(tmp_path / 'x.npy')!r})))\n"
            "info = [op.get_rt_info() for op in r.net.compiled.get_runtime_model().get_ops()]\n"
            "print('kernels', *sorted({i['primitiveType'].astype(str) for i in info\n"
            "                          if i['layerType'].astype(str) == 'Convolution'}))")
    env = {**os.environ, "REALSR_R1_WEIGHTS": str(weights_dir), "HF_HUB_OFFLINE": "1"}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    kinds = {}
    for name, cap in (("native", {}), ("avx2", {"ONEDNN_MAX_CPU_ISA": "AVX2"})):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{name}.npy")], capture_output=True,
                              text=True, env={**env, **cap}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        kinds[name] = proc.stdout.splitlines()[-1].split()[1:]
    assert any("I8" in k for k in kinds["avx2"]), kinds  # the INT8 model ran, on INT8 kernels
    assert all("avx512" not in k for k in kinds["avx2"]) and any("avx2" in k for k in kinds["avx2"]), kinds
    native, avx2 = np.load(tmp_path / "native.npy"), np.load(tmp_path / "avx2.npy")
    diff = np.abs(native - avx2)
    assert diff.max() <= 0.5 / 255 and (diff > 0).mean() < 0.02  # at most one 8-bit level, on few values
