"""A UNet LoRA adapter of the diffusion upscaler: saved as training will, fused in by inference.

Offline on CPU with the tiny random upscaler. The adapters have alpha ≠ rank (LoRA scale 2), so an
alpha lost on the way (diffusers then assumes alpha = rank) changes the outputs these tests compare."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import StableDiffusionUpscalePipeline, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import REPO, photo, weights_env  # noqa: E402
from realsr_r1 import infer, tiny  # noqa: E402
from realsr_r1.profiles import check_profile, load_config  # noqa: E402
from realsr_r1.restorers.adapter import (  # noqa: E402
    INFO_NAME, WEIGHTS_NAME, load_restorer_adapter, read_info, save_restorer_adapter)
from realsr_r1.restorers.diffusion import DiffusionStages  # noqa: E402
from realsr_r1.weights import CorruptWeightsError, file_hash  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights folder with the tiny upscaler (the tiny profile builds its VLM there on first use)."""
    with weights_env(tmp_path_factory.mktemp("weights")) as path:
        tiny.ensure("tiny-upscaler", path)
        yield path


@pytest.fixture(scope="module")
def upscaler(weights):
    return weights / "tiny-upscaler"


def lora_unet(upscaler, seed=0, adapter_name="default", dtype=torch.float32):
    """The tiny UNet with a random (non-zero) LoRA adapter, as training leaves it; rank 4, alpha 8."""
    unet = UNet2DConditionModel.from_pretrained(upscaler / "unet", torch_dtype=dtype)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                     adapter_name=adapter_name)
    return unet


def make_adapter(upscaler, folder, seed=0, adapter_name="default"):
    unet = lora_unet(upscaler, seed, adapter_name)
    return save_restorer_adapter(unet, folder, adapter_name=adapter_name,
                                 info={"step": 7, "base_model": "tiny-upscaler", "seed": seed})


@torch.no_grad()
def unet_out(unet):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 7, 8, 8, generator=g)
    text = torch.randn(1, 77, 16, generator=g)
    return unet(x.to(unet.dtype), 10, encoder_hidden_states=text.to(unet.dtype),
                class_labels=torch.tensor([20])).sample.float()


def pipe_of(upscaler, dtype=torch.float32):
    return StableDiffusionUpscalePipeline.from_pretrained(str(upscaler), dtype=dtype)


def has_lora(unet):
    return any(isinstance(m, BaseTunerLayer) for m in unet.modules()) or hasattr(unet, "peft_config")


# --- the file format ---------------------------------------------------------------------------------
def test_fused_adapter_equals_the_peft_unet(upscaler, tmp_path):
    folder = make_adapter(upscaler, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_NAME, INFO_NAME]  # no temp files left
    assert read_info(folder) == {"step": 7, "base_model": "tiny-upscaler", "seed": 0}
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8

    active = unet_out(lora_unet(upscaler))  # PEFT's unfused LoRA forward, adapter active
    base = unet_out(UNet2DConditionModel.from_pretrained(upscaler / "unet"))
    pipe = pipe_of(upscaler)
    info = load_restorer_adapter(pipe, folder)
    assert info == {"path": str(folder), "sha256": file_hash(folder / WEIGHTS_NAME)[:12], "stage": None}
    assert not has_lora(pipe.unet)  # fused, then the LoRA layers removed: the plain UNet runs
    fused = unet_out(pipe.unet)
    assert torch.allclose(fused, active, atol=1e-5)
    assert not torch.allclose(fused, base, atol=1e-3)
    # The same adapter at alpha = rank (what a lost alpha loads as) is another output:
    halved = lora_unet(upscaler)
    for m in halved.modules():
        if isinstance(m, BaseTunerLayer):
            m.scaling["default"] = 1.0
    assert not torch.allclose(fused, unet_out(halved), atol=1e-3)


def test_an_adapter_trained_on_one_stage_is_on_for_that_stage_only(upscaler, tmp_path):
    """Training records the stage (its config's `stage`); inference keeps the LoRA layers unfused and
    turns them on for that stage alone: the other stages are the base model's, as in training."""
    from realsr_r1.cot import parse_cot
    from realsr_r1.imageio import LoadedImage
    from realsr_r1.pipeline import StageImage

    unet = lora_unet(upscaler)
    folder = save_restorer_adapter(unet, tmp_path / "middle", info={"config": {"stage": "middle"}})
    image = LoadedImage(rgb=np.random.default_rng(0).random((12, 16, 3), dtype=np.float32))
    sizes = {"rough": (16, 12), "middle": (32, 24), "final": (64, 48)}
    made = {}
    for name, adapter in (("plain", None), ("middle", str(folder))):
        r = DiffusionStages.from_pretrained(upscaler, device="cpu", dtype="fp32", rough="diffusion", adapter=adapter,
                                            num_inference_steps=2, strength=1.0, preview_every=0)
        made[name] = {e.stage: e.rgb for e in r.stages(image, parse_cot(""), sizes=sizes, seed=0)
                      if isinstance(e, StageImage)}
        if adapter:
            assert r.describe()["adapter"]["stage"] == "middle" and has_lora(r.pipe.unet)
    assert np.abs(made["plain"]["middle"] - made["middle"]["middle"]).max() > 1e-3
    for stage in ("rough", "final"):  # strength 1: final starts from noise, not from middle
        assert np.array_equal(made["plain"][stage], made["middle"][stage]), stage


def test_adapter_name_does_not_matter(upscaler, tmp_path):
    a = make_adapter(upscaler, tmp_path / "default", seed=3, adapter_name="default")
    b = make_adapter(upscaler, tmp_path / "old", seed=3, adapter_name="old")
    assert load_file(a / WEIGHTS_NAME).keys() == load_file(b / WEIGHTS_NAME).keys()
    outs = []
    for folder in (a, b):
        pipe = pipe_of(upscaler)
        load_restorer_adapter(pipe, folder)
        outs.append(unet_out(pipe.unet))
    assert torch.equal(*outs)
    assert torch.allclose(outs[1], unet_out(lora_unet(upscaler, seed=3, adapter_name="old")), atol=1e-5)


def test_half_precision_fuses_in_the_pipelines_dtype(upscaler, tmp_path):
    folder = make_adapter(upscaler, tmp_path / "adapter")
    pipe = pipe_of(upscaler, torch.bfloat16)
    load_restorer_adapter(pipe, folder)
    assert pipe.unet.dtype == torch.bfloat16 and not has_lora(pipe.unet)
    fused, active = unet_out(pipe.unet), unet_out(lora_unet(upscaler))
    base = unet_out(UNet2DConditionModel.from_pretrained(upscaler / "unet"))
    assert (fused - active).abs().max() < 0.2 * (base - active).abs().max()


def test_resave_replaces_the_files(upscaler, tmp_path):
    folder = make_adapter(upscaler, tmp_path / "adapter", seed=0)
    first = file_hash(folder / WEIGHTS_NAME)
    make_adapter(upscaler, folder, seed=1)
    assert file_hash(folder / WEIGHTS_NAME) != first and read_info(folder)["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the temp folder is gone


def test_interrupted_save_leaves_no_adapter(upscaler, tmp_path, monkeypatch):
    unet = lora_unet(upscaler)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("realsr_r1.restorers.adapter.atomic_write_text", killed)  # after the weights
    with pytest.raises(KeyboardInterrupt):
        save_restorer_adapter(unet, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_save_needs_the_named_adapter(upscaler, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        save_restorer_adapter(lora_unet(upscaler), tmp_path / "a", adapter_name="other")


def test_describe_records_the_adapter(upscaler, tmp_path):
    folder = make_adapter(upscaler, tmp_path / "adapter")
    stages = DiffusionStages.from_pretrained(upscaler, device="cpu", dtype="fp32", rough="diffusion",
                                             adapter=str(folder))
    assert stages.describe()["adapter"] == {"path": str(folder), "sha256": file_hash(folder / WEIGHTS_NAME)[:12],
                                            "stage": None}
    assert not has_lora(stages.pipe.unet)
    plain = DiffusionStages.from_pretrained(upscaler, device="cpu", dtype="fp32", rough="diffusion")
    assert plain.describe()["adapter"] is None


def _renamed_keys(src, dest):
    dest.mkdir()
    with safe_open(str(src / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    tensors = {k.replace("attn1", "attn9"): v for k, v in load_file(src / WEIGHTS_NAME).items()}
    save_file(tensors, dest / WEIGHTS_NAME, metadata=meta)
    return dest


def _wrong_shapes(src, dest):
    dest.mkdir()
    with safe_open(str(src / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    tensors = {k: torch.zeros(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v
               for k, v in load_file(src / WEIGHTS_NAME).items()}
    save_file(tensors, dest / WEIGHTS_NAME, metadata=meta)
    return dest


@pytest.mark.parametrize("broken", [_renamed_keys, _wrong_shapes])
def test_adapter_of_another_unet_is_one_line(upscaler, tmp_path, broken):
    folder = broken(make_adapter(upscaler, tmp_path / "good"), tmp_path / "bad")
    pipe = pipe_of(upscaler)
    with pytest.raises(CorruptWeightsError) as e:
        load_restorer_adapter(pipe, folder)
    assert "\n" not in str(e.value) and f"restorer adapter {folder}: does not fit" in str(e.value)


# --- inference ---------------------------------------------------------------------------------------
def run_cli(capsys, *args):
    rc = infer.main([*map(str, args), "--quiet"])
    return rc, capsys.readouterr().err


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    photo((16, 12)).save(folder / "p.png")
    return folder


def pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path)).tolist()


def messages(err):
    """stderr without the libraries' model-loading progress bars (tqdm lines ending in it/s])."""
    lines = err.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not line.endswith(("it/s]", "\x1b[A"))]


def test_infer_fuses_the_adapter_and_the_sidecar_records_it(weights, upscaler, src, tmp_path, capsys):
    a = make_adapter(upscaler, tmp_path / "a", seed=0)
    b = make_adapter(upscaler, tmp_path / "b", seed=1)
    rc, err = run_cli(capsys, "-i", src, "-o", tmp_path / "plain", "--profile", "tiny")
    assert rc == 0, err
    rc, err = run_cli(capsys, "-i", src, "-o", tmp_path / "o", "--profile", "tiny", "--restorer-adapter", a)
    assert rc == 0, err
    assert pixels(tmp_path / "o" / "p.png") != pixels(tmp_path / "plain" / "p.png")
    side = json.loads((tmp_path / "o" / "p.json").read_text(encoding="utf-8"))
    sha = file_hash(a / WEIGHTS_NAME)[:12]
    assert side["adapter"] == {"path": str(a), "sha256": sha, "stage": None}
    assert side["settings"]["restorer_adapter"] == f"{a} ({sha})"
    assert json.loads((tmp_path / "plain" / "p.json").read_text())["settings"]["restorer_adapter"] is None

    # The same adapter through the profile key is the same settings: done, skipped.
    rc, err = run_cli(capsys, "-i", src, "-o", tmp_path / "o", "--profile", "tiny", "--set", f"restorer.adapter={a}")
    assert rc == 0 and "skipped 1" in err, err
    # Another adapter: the result is not counted as done (kept, reported).
    before = (tmp_path / "o" / "p.png").read_bytes()
    rc, err = run_cli(capsys, "-i", src, "-o", tmp_path / "o", "--profile", "tiny", "--restorer-adapter", b)
    assert rc == 1 and "1 made with other settings" in err and "restored 0, skipped 0" in err, err
    # The adapter retrained in place (same folder, other weights) is other settings too.
    make_adapter(upscaler, a, seed=2)
    rc, err = run_cli(capsys, "-i", src, "-o", tmp_path / "o", "--profile", "tiny", "--restorer-adapter", a)
    assert rc == 1 and "restorer_adapter" in err, err
    assert (tmp_path / "o" / "p.png").read_bytes() == before


def test_profile_key_restorer_adapter(upscaler, tmp_path):
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [f"restorer.adapter={tmp_path}"])
    check_profile(cfg)  # a valid key of the diffusion restorer, from its keyword parameter
    assert cfg["restorer"]["adapter"] == str(tmp_path)


def _full_pipeline(upscaler, tmp_path):
    return upscaler


def _missing(upscaler, tmp_path):
    return tmp_path / "nowhere"


def _wrong_keys(upscaler, tmp_path):
    return _renamed_keys(make_adapter(upscaler, tmp_path / "good"), tmp_path / "bad")


@pytest.mark.parametrize("folder,words", [
    (_missing, "restorer adapter not found: {}"),
    (_full_pipeline, "it holds a full pipeline (model_index.json): use --set restorer.model={}"),
    (_wrong_keys, "restorer adapter {}: does not fit this upscaler's UNet"),
])
def test_infer_errors_are_one_line(weights, upscaler, src, tmp_path, capsys, folder, words):
    path = folder(upscaler, tmp_path)
    rc, err = run_cli(capsys, "-i", src, "-o", tmp_path / "o", "--profile", "tiny", "--restorer-adapter", path)
    assert rc == 2 and len(messages(err)) == 1 and "Traceback" not in err, err
    assert messages(err)[0].startswith("error: ") and words.format(path) in err, err
    if folder is not _wrong_keys:  # said before any model loads: stderr is that line alone
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "p.png").exists()


def test_restorer_adapter_needs_the_diffusion_restorer(src, tmp_path, capsys):
    rc, err = run_cli(capsys, "-i", src, "-o", tmp_path / "o", "--profile", "lite", "--restorer-adapter", tmp_path)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--restorer-adapter does not apply to the lite profile" in err and "realesrgan" in err
