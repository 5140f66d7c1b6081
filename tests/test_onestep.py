"""The one-step restorer (OSEDiff's recipe) over a tiny random SD 2.1-base, offline on CPU."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from realsr_r1.cot import parse_cot  # noqa: E402
from realsr_r1.imageio import LoadedImage  # noqa: E402
from realsr_r1.pipeline import StageImage, StagePreview, StageStarted  # noqa: E402
from realsr_r1.restorers.onestep import OneStepStages, upscale  # noqa: E402
from realsr_r1.restorers.onestep_adapter import ADAPTER_FILE as ONESTEP_ADAPTER  # noqa: E402
from realsr_r1.restorers.onestep_adapter import (KEYS, adapter_state, load_adapter, new_adapter,  # noqa: E402
                                                 read_adapter, save_adapter, unet_targets, vae_targets)
from realsr_r1.tiny import build_tiny_sd21  # noqa: E402
from realsr_r1.weights import CorruptWeightsError  # noqa: E402

SIZES = {"rough": (16, 12), "middle": (32, 24), "final": (64, 48)}
COT = ("<degradation>blur: light; noise: heavy; jpeg: medium; downsample: x4</degradation>"
       "<rough_understand>a red house</rough_understand><rough_image></rough_image>"
       "<middle_understand>a red brick house, a tree</middle_understand><middle_image></middle_image>"
       "<final_understand>brick texture, leaves</final_understand><final_image></final_image>")
OPTS = dict(device="cpu", dtype="fp32", rough="input", tile=0, vae_tile=0, color_fix="none")


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
    return build_tiny_sd21(tmp_path_factory.mktemp("sd21") / "tiny-sd21")


@pytest.fixture(scope="module")
def restorer(sd21):
    return OneStepStages.from_pretrained(sd21, adapter=sd21 / ONESTEP_ADAPTER, **OPTS)


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    rgb = rng.random((12, 16, 3), dtype=np.float32)
    return LoadedImage(rgb=rgb, alpha=np.linspace(0, 1, 12 * 16, dtype=np.float32).reshape(12, 16))


def run(restorer, image, plan, seed=0):
    return list(restorer.stages(image, plan, sizes=SIZES, seed=seed))


def finals(events):
    return {e.stage: e for e in events if isinstance(e, StageImage)}


def final_of(restorer, image, plan=None, seed=0):
    return finals(run(restorer, image, plan or parse_cot(COT), seed))["final"].rgb


def test_the_adapter_file_has_osediffs_layout(sd21):
    """Keys, lists and tensor names as OSEDiff's save_model writes them: three UNet adapters named
    default_encoder/decoder/others, conv_in whole, the VAE encoder's LoRA alone."""
    data = read_adapter(sd21 / ONESTEP_ADAPTER)
    assert set(data) == set(KEYS) and data["rank_unet"] == data["rank_vae"] == 4
    assert all("down_blocks" in m or "conv_in" in m for m in data["unet_lora_encoder_modules"])
    assert all("up_blocks" in m or "conv_out" in m for m in data["unet_lora_decoder_modules"])
    assert any("mid_block" in m for m in data["unet_lora_others_modules"])
    assert "conv_in.base_layer.weight" in data["state_dict_unet"]  # the retrained conv_in, whole
    assert any(".lora_A.default_encoder." in k for k in data["state_dict_unet"])
    assert any(".lora_B.default_decoder." in k for k in data["state_dict_unet"])
    assert all("lora" in k and k.startswith(("encoder.", "quant_conv")) for k in data["state_dict_vae"])
    assert "quant_conv" in data["vae_lora_encoder_modules"]
    assert not any("decoder" in m or "post_quant" in m for m in data["vae_lora_encoder_modules"])


def _models(sd21):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return (UNet2DConditionModel.from_pretrained(sd21, subfolder="unet"),
            AutoencoderKL.from_pretrained(sd21, subfolder="vae"))


def test_a_hand_built_adapter_loads_and_changes_the_output(sd21, restorer, image, tmp_path):
    """An adapter made by hand (OSEDiff's module lists, random tensors, saved with torch.save) lands
    tensor for tensor, and the images differ from the base model's."""
    unet, vae = _models(sd21)
    lists = new_adapter(unet, vae, rank=2)
    assert lists["unet_lora_encoder_modules"] == unet_targets(_models(sd21)[0])["unet_lora_encoder_modules"]
    state = adapter_state(unet, vae, lists)
    gen = torch.Generator().manual_seed(1)
    for sd in (state["state_dict_unet"], state["state_dict_vae"]):
        for k in sd:
            sd[k] = torch.randn(sd[k].shape, generator=gen) * 0.05 + (sd[k] if "base_layer" in k else 0)
    path = torch_save(state, tmp_path / "hand.pkl")
    fresh_unet, fresh_vae = _models(sd21)
    info = load_adapter(fresh_unet, fresh_vae, path)
    assert info["rank_unet"] == 2 and len(info["sha256"]) == 12
    got = dict(fresh_unet.named_parameters())
    for k, v in state["state_dict_unet"].items():
        torch.testing.assert_close(got[k], v)
    got = dict(fresh_vae.named_parameters())
    for k, v in state["state_dict_vae"].items():
        torch.testing.assert_close(got[k], v)
    hand = OneStepStages.from_pretrained(sd21, adapter=path, **OPTS)
    base = OneStepStages.from_pretrained(sd21, **OPTS)
    a, b, c = final_of(hand, image), final_of(base, image), final_of(restorer, image)
    assert np.abs(a - b).mean() > 1e-3 and np.abs(a - c).mean() > 1e-3
    assert hand.describe()["adapter"]["path"] == str(path) and base.describe()["adapter"] is None


def torch_save(state, path):
    return save_adapter(state, path)


@pytest.mark.parametrize("change, key", [
    (lambda d: d.pop("rank_vae"), "rank_vae"),
    (lambda d: d.update(rank_unet=8), "rank_unet is 8"),
    (lambda d: d["state_dict_unet"].update({"down_blocks.9.attn.lora_A.default_encoder.weight": torch.zeros(1)}),
     "down_blocks.9.attn.lora_A.default_encoder.weight"),
    (lambda d: d["state_dict_unet"].pop("conv_in.base_layer.weight"), "conv_in.base_layer.weight"),
    (lambda d: d.update(unet_lora_others_modules=["mid_block.nowhere.to_q"]), "unet_lora_others_modules"),
    (lambda d: d.update(rank_unet="four"), "rank_unet"),
])
def test_a_wrong_key_or_rank_is_one_line_naming_it(sd21, tmp_path, change, key):
    data = copy.deepcopy(read_adapter(sd21 / ONESTEP_ADAPTER))
    change(data)
    path = save_adapter(data, tmp_path / "bad.pkl")
    with pytest.raises(CorruptWeightsError) as err:
        load_adapter(*_models(sd21), path)
    message = str(err.value)
    assert key in message and "\n" not in message and str(path) in message


def test_a_file_that_is_not_an_adapter_is_one_line(sd21, tmp_path):
    bad = tmp_path / "x.pkl"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CorruptWeightsError, match="not readable as an OSEDiff checkpoint"):
        read_adapter(bad)
    with pytest.raises(CorruptWeightsError, match="not found"):
        read_adapter(tmp_path / "missing.pkl")


def test_the_step_is_ddpms_at_999_from_the_unets_epsilon(restorer):
    """One UNet evaluation at t = 999; x_0 = (z − √(1−ᾱ)·ε)/√ᾱ by hand equals the scheduler's step,
    and ᾱ is 999's (the custom timestep makes the step land on x_0, not on t = 998)."""
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    embeds = restorer.encode_prompts(["a", "b"])
    calls = []
    real = restorer.unet.forward

    def spy(sample, t, **kw):
        out = real(sample, t, **kw)
        calls.append((int(t), out[0].detach().clone()))
        return out

    restorer.unet.forward = spy
    try:
        x0 = restorer.predict_x0(z, embeds)
    finally:
        del restorer.unet.forward
    assert [t for t, _ in calls] == [999]
    eps = calls[0][1]
    a = restorer.scheduler.alphas_cumprod[999]
    torch.testing.assert_close(x0, (z - (1 - a).sqrt() * eps) / a.sqrt(), atol=1e-5, rtol=1e-5)


def test_the_fused_adapter_is_the_three_adapters_and_the_retrained_conv_in(sd21, restorer):
    """from_pretrained fuses the adapter (diffusers' fuse_lora, then unload_lora): no LoRA layer is left,
    and the UNet and VAE encoder give what the unfused model with its three adapters active gives,
    conv_in's retrained base weight included (it differs from the base model's)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet, vae = _models(sd21)
    load_adapter(unet, vae, sd21 / ONESTEP_ADAPTER)
    assert not any("lora" in n for n, _ in restorer.unet.named_parameters())
    base = UNet2DConditionModel.from_pretrained(sd21, subfolder="unet")
    assert not torch.allclose(unet.conv_in.base_layer.weight, base.conv_in.weight)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    embeds = restorer.encode_prompts(["a house"])
    with torch.no_grad():
        fused = restorer.unet(z, 999, encoder_hidden_states=embeds).sample
        torch.testing.assert_close(fused, unet(z, 999, encoder_hidden_states=embeds).sample, atol=1e-4, rtol=1e-4)
        assert (fused - base(z, 999, encoder_hidden_states=embeds).sample).abs().mean() > 1e-3
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
        torch.testing.assert_close(restorer.vae.encode(x).latent_dist.mode(), vae.encode(x).latent_dist.mode(),
                                   atol=1e-4, rtol=1e-4)
        plain = AutoencoderKL.from_pretrained(sd21, subfolder="vae")
        assert (restorer.vae.encode(x).latent_dist.mode() - plain.encode(x).latent_dist.mode()).abs().mean() > 1e-4


def test_the_text_encoder_reads_the_final_understanding(restorer, image):
    """The prompt of the final stage is the plan's <final_understand>, alone (no quality words, no
    degradation words: OSEDiff runs no negative branch); the middle is resized, so no prompt of its own."""
    seen = []
    real = restorer.tokenizer.__class__.__call__

    class Spy(restorer.tokenizer.__class__):
        def __call__(self, text, *a, **kw):
            seen.append(list(text))
            return real(self, text, *a, **kw)

    cls = restorer.tokenizer.__class__
    restorer.tokenizer.__class__ = Spy
    try:
        run(restorer, image, parse_cot(COT))
    finally:
        restorer.tokenizer.__class__ = cls
    assert seen == [["brick texture, leaves"]]


def test_events_sizes_and_the_middle_option(sd21, restorer, image):
    events = run(restorer, image, parse_cot(COT))
    kinds = [(type(e).__name__, e.stage) for e in events]
    assert kinds == [("StageStarted", "rough"), ("StageImage", "rough"), ("StageStarted", "middle"),
                     ("StageImage", "middle"), ("StageStarted", "final"), ("StagePreview", "final"),
                     ("StageImage", "final")]
    for e in events:
        w, h = SIZES[e.stage]
        if isinstance(e, StageStarted):
            assert e.size == (w, h)
        elif isinstance(e, StagePreview):
            assert e.image.shape[2] == 3 and e.step == e.total == 1
        else:
            assert e.rgb.shape == (h, w, 3) and e.alpha.shape == (h, w) and np.isfinite(e.rgb).all()
    stepped = OneStepStages.from_pretrained(sd21, adapter=sd21 / ONESTEP_ADAPTER, middle=True, **OPTS)
    with_middle = finals(run(stepped, image, parse_cot(COT)))
    plain = finals(events)
    from realsr_r1.restorers.blend import resize

    np.testing.assert_allclose(plain["middle"].rgb, resize(plain["rough"].rgb, SIZES["middle"]), atol=1e-6)
    assert np.abs(with_middle["middle"].rgb - plain["middle"].rgb).mean() > 1e-3
    assert np.abs(with_middle["final"].rgb - plain["final"].rgb).mean() > 1e-3


def test_fidelity_scales_the_unets_correction(sd21, image):
    """fidelity f: x_0 + f·(z − x_0). f = 1 gives the start image through the VAE alone (no UNet
    change), f = 0.5 the latent halfway, and the image moves monotonically between the ends."""
    outs = {f: final_of(OneStepStages.from_pretrained(sd21, adapter=sd21 / ONESTEP_ADAPTER, fidelity=f, **OPTS), image)
            for f in (0.0, 0.5, 1.0)}
    r = OneStepStages.from_pretrained(sd21, adapter=sd21 / ONESTEP_ADAPTER, fidelity=1.0, **OPTS)
    start = upscale(np.asarray(image.rgb, np.float32), SIZES["final"])  # rough: input, bicubic ×4 as OSEDiff
    through_vae = r.codec.decode(r.codec.encode(start, r.device))[0][:48, :64]
    np.testing.assert_allclose(outs[1.0], through_vae, atol=1e-4)
    d = lambda a, b: float(np.sqrt(((a - b) ** 2).mean()))  # noqa: E731
    assert d(outs[0.5], outs[1.0]) < d(outs[0.0], outs[1.0]) and d(outs[0.5], outs[0.0]) < d(outs[1.0], outs[0.0])
    with pytest.raises(ValueError, match="number in"):
        OneStepStages.from_pretrained(sd21, fidelity="auto", **OPTS)


def test_candidates_are_noise_draws_on_the_start_latent_and_the_chooser_keeps_one(sd21, restorer, image):
    """candidates 3: the first is the noiseless one a single run makes; the others start from the
    latent plus noise; a reward that likes dark images keeps the darkest."""
    from realsr_r1.chooser import Chooser

    three = OneStepStages.from_pretrained(sd21, adapter=sd21 / ONESTEP_ADAPTER, candidates=3, noise=0.5,
                                          chooser=Chooser({"tiny_rewards:darkness": {}}), **OPTS)
    final = finals(run(three, image, parse_cot(COT), seed=7))["final"]
    rows = final.choice["candidates"]
    assert [row["seed"] for row in rows] == [None, 1009, 2009]
    assert len(final.candidates) == 3 and three.describe()["candidates"] == 3
    best = max(range(3), key=lambda k: rows[k]["reward"])
    assert final.choice["winner"] == rows[best]["label"]
    single = final_of(restorer, image, seed=7)
    if best == 0:
        np.testing.assert_allclose(final.rgb, single, atol=1e-5)
    else:
        assert np.abs(final.rgb - single).mean() > 1e-4
    with pytest.raises(ValueError, match="needs a chooser"):
        OneStepStages.from_pretrained(sd21, candidates=2, **OPTS)


def test_latent_tiles_match_the_whole_latent_away_from_nothing(sd21):
    """A latent larger than a tile, in Gaussian-blended tiles: close to the whole-latent step (the tiny
    UNet's attention is global, so not equal), and far closer than two unrelated latents."""
    whole = OneStepStages.from_pretrained(sd21, **OPTS)
    tiled = OneStepStages.from_pretrained(sd21, **{**OPTS, "tile": 16, "tile_overlap": 8})
    z = torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(5))
    embeds = whole.encode_prompts(["a house"])
    a, b = whole.predict_x0(z, embeds), tiled.predict_x0(z, embeds)
    other = whole.predict_x0(torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(6)), embeds)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    err = float((a - b)[inner].abs().mean())
    assert err < 0.1 * float((a - other)[inner].abs().mean())


def test_half_precision_runs_and_matches_fp32(sd21, image):
    """bf16 (the GPU users' dtype; fp16 takes the same code with the VAE kept in fp32): a finite image
    close to fp32's."""
    fp32 = final_of(OneStepStages.from_pretrained(sd21, adapter=sd21 / ONESTEP_ADAPTER, **OPTS), image)
    half = OneStepStages.from_pretrained(sd21, adapter=sd21 / ONESTEP_ADAPTER, **{**OPTS, "dtype": "bf16"})
    assert half.unet.dtype == torch.bfloat16 and half.describe()["precision"] == "bf16"
    out = final_of(half, image)
    assert np.isfinite(out).all() and np.abs(out - fp32).mean() < 0.05


def test_batched_final_equals_the_stages_final(restorer, image):
    """GRPO's batched call makes, for each plan, the image stages() makes (no noise: texts alone differ)."""
    other = parse_cot(COT.replace("brick texture, leaves", "glass windows"))
    batch = restorer.restore_final_batch(image.rgb, [parse_cot(COT), other], scale=4.0)
    np.testing.assert_allclose(batch[0], final_of(restorer, image), atol=1e-5)
    np.testing.assert_allclose(batch[1], final_of(restorer, image, other), atol=1e-5)
    assert np.abs(batch[0] - batch[1]).mean() > 1e-4


def test_vae_targets_take_the_encoder_and_quant_conv_only(sd21):
    _, vae = _models(sd21)
    names = vae_targets(vae)
    assert names[-1] == "quant_conv" and all(n.startswith("encoder.") for n in names[:-1])


def test_the_final_starts_from_osediffs_bicubic_x4_of_the_input(sd21, restorer):
    """rough: input, middle resized (for show): the final stage encodes the input bicubic-upsampled
    ×4 as OSEDiff's test script does with PIL, not the middle image resized again."""
    from PIL import Image

    rgb = (np.random.default_rng(4).random((12, 16, 3)) * 255).astype(np.uint8)
    seen = []
    real = restorer.codec.encode
    restorer.codec.encode = lambda x, device: seen.append(x) or real(x, device)
    try:
        run(restorer, LoadedImage(rgb=rgb), parse_cot(COT))
    finally:
        del restorer.codec.encode
    pil = np.asarray(Image.fromarray(rgb).resize((64, 48), Image.BICUBIC), np.float32) / 255
    x = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]
    torch_bicubic = torch.nn.functional.interpolate(x, size=(48, 64), mode="bicubic")[0].permute(1, 2, 0).numpy()
    assert len(seen) == 1 and seen[0].shape == (48, 64, 3)
    # PIL's kernel in float: within PIL's own 8-bit rounding of it (measured 0.39 levels on average),
    # ten times closer than torch's bicubic (a = −0.75: 3.8 levels)
    assert np.abs(seen[0] - pil).mean() < 0.6 / 255
    assert np.abs(seen[0] - pil).mean() < 0.2 * np.abs(torch_bicubic.clip(0, 1) - pil).mean()


def test_the_experts_rough_stage_is_the_start_and_each_plan_gets_its_own(sd21, image, monkeypatch):
    """rough: realesrgan (the default), with two toy experts: each plan's reading picks its rough mix,
    colour-fixed; the final starts from that image (a spy on the encoder), and GRPO's batched call
    gives each plan what stages() gives it."""
    from test_chooser import CLEAN, HEAVY, toy_experts

    from realsr_r1.chooser import Chooser
    from realsr_r1.restorers.color import color_fix
    from realsr_r1.restorers.lite import LiteStages

    lite = LiteStages(toy_experts(), Chooser())
    monkeypatch.setattr(lite.chooser, "measure", lambda images, lqs: [
        {"F": 0.80 + 0.05 * i, "Q_SR": 4.6 - 0.15 * i} for i in range(len(images))])
    r = OneStepStages.from_pretrained(sd21, adapter=sd21 / ONESTEP_ADAPTER, regression=lite,
                                      **{**OPTS, "rough": "realesrgan", "color_fix": "adain"})
    assert r.describe()["rough"] == "realesrgan" and r.describe()["rough_restorer"]["experts"][1]["name"] == "dark"
    starts, finals_, roughs = [], {}, {}
    real = r.codec.encode
    r.codec.encode = lambda x, device: starts.append(x) or real(x, device)
    try:
        for text in (CLEAN, HEAVY):
            got = finals(run(r, image, parse_cot(text)))
            roughs[text], finals_[text] = got["rough"], got["final"].rgb
    finally:
        del r.codec.encode
    assert roughs[CLEAN].choice["position"] > 0 and roughs[HEAVY].choice["position"] == 0
    assert np.abs(roughs[CLEAN].rgb - roughs[HEAVY].rgb).mean() > 1e-3
    ((raw, _),) = lite.choose_batch(np.asarray(image.rgb), [parse_cot(CLEAN)], stage="rough", scale=4.0)
    np.testing.assert_allclose(roughs[CLEAN].rgb, color_fix(raw, image.rgb, "adain"), atol=1e-5)
    np.testing.assert_allclose(starts[0], upscale(roughs[CLEAN].rgb, SIZES["final"]), atol=1e-6)
    batch = r.restore_final_batch(image.rgb, [parse_cot(CLEAN), parse_cot(HEAVY)], scale=4.0)
    np.testing.assert_allclose(batch[0], finals_[CLEAN], atol=1e-5)
    np.testing.assert_allclose(batch[1], finals_[HEAVY], atol=1e-5)
