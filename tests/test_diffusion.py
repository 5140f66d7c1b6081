"""DiffusionStages over a tiny random StableDiffusionUpscalePipeline, offline on CPU."""

import re

import numpy as np
import pytest

pytest.importorskip("diffusers")

from realsr_r1.cot import Plan, parse_cot  # noqa: E402
from realsr_r1.imageio import LoadedImage  # noqa: E402
from realsr_r1.pipeline import StageImage, StagePreview, StageStarted  # noqa: E402
from realsr_r1.restorers.color import color_fix  # noqa: E402
from realsr_r1.restorers.conditioning import Condition, noise_level_for, stage_prompt  # noqa: E402
from realsr_r1.restorers.diffusion import DiffusionStages, drain  # noqa: E402
from realsr_r1.restorers.lite import resize  # noqa: E402

from realsr_r1.tiny import build_tiny_upscaler

SIZES = {"rough": (16, 12), "middle": (32, 24), "final": (64, 48)}
COT = ("<degradation>blur: light; noise: heavy; jpeg: medium; downsample: x4</degradation>"
       "<rough_understand>a red house</rough_understand><rough_image></rough_image>"
       "<middle_understand>a red brick house, a tree</middle_understand><middle_image></middle_image>"
       "<final_understand>brick texture, leaves</final_understand><final_image></final_image>")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_upscaler(tmp_path_factory.mktemp("sd") / "tiny-x4")


@pytest.fixture(scope="module")
def restorer(tiny_path):
    # rough by diffusion (4 steps), middle and final from the previous stage (strength 0.5: 2 steps)
    return DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=4,
                                           strength=0.5, preview_every=1)


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    rgb = rng.random((12, 16, 3), dtype=np.float32)
    alpha = np.linspace(0, 1, 12 * 16, dtype=np.float32).reshape(12, 16)
    return LoadedImage(rgb=rgb, alpha=alpha)


def run(restorer, image, plan, seed=0):
    return list(restorer.stages(image, plan, sizes=SIZES, seed=seed))


def finals(events):
    return {e.stage: e for e in events if isinstance(e, StageImage)}


def test_describe(restorer):
    assert restorer.describe() == {"restorer": "sd-x4-upscaler", "device": "cpu", "precision": "fp32", "steps": 4,
                                   "strength": 0.5, "tile": 128, "vae_tile": 512, "vae_slicing": False,
                                   "rough": "diffusion", "adapter": None}


def test_events_sizes_previews_and_range(restorer, image):
    events = run(restorer, image, parse_cot(COT))
    kinds = [(type(e).__name__, e.stage) for e in events]
    expected = []
    for s, previews in (("rough", 3), ("middle", 1), ("final", 1)):  # every step but the last
        expected += [("StageStarted", s)] + [("StagePreview", s)] * previews + [("StageImage", s)]
    assert kinds == expected
    for e in events:
        w, h = SIZES[e.stage]
        if isinstance(e, StageStarted):
            assert e.size == (w, h)
        elif isinstance(e, StagePreview):
            assert e.image.shape == (h, w, 3) and 1 <= e.step < e.total
            assert e.total == (4 if e.stage == "rough" else 2)
        else:
            assert e.rgb.shape == (h, w, 3) and e.rgb.dtype == np.float32
            assert np.isfinite(e.rgb).all() and e.rgb.min() >= 0 and e.rgb.max() <= 1
            assert e.alpha.shape == (h, w)


def test_seeds(restorer, image):
    plan = parse_cot(COT)
    a, b, c = (finals(run(restorer, image, plan, seed=s))["final"].rgb for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_own_loop_matches_the_diffusers_pipeline(tiny_path, guidance):
    """One tile, no init image: our denoising loop is the pipeline's, draw for draw."""
    import torch

    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=3,
                                        guidance_scale=guidance, tile=0, vae_tile=0)
    cond = np.random.default_rng(3).random((8, 16, 3), dtype=np.float32)
    (ours,) = drain(r._sample(cond, None, [Condition("a cat", r.negative_prompt, 30)], seed=11, preview=None))
    ref = r.pipe(prompt="a cat", image=torch.from_numpy(cond).permute(2, 0, 1)[None], num_inference_steps=3,
                 guidance_scale=guidance, noise_level=30, negative_prompt=r.negative_prompt if guidance > 1 else None,
                 generator=torch.Generator("cpu").manual_seed(11), output_type="np").images[0]
    assert ours.shape == ref.shape == (32, 64, 3)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_middle_and_final_start_from_the_previous_stage(tiny_path, image, monkeypatch):
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=4,
                                        strength=0.75, preview_every=0)
    encoded = []
    real = r._encode
    monkeypatch.setattr(r, "_encode", lambda rgb, device: encoded.append(rgb.shape) or real(rgb, device))
    steps = []
    real_step = r.pipe.scheduler.step
    monkeypatch.setattr(r.pipe.scheduler, "step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    out = finals(run(r, image, Plan()))
    # rough starts from noise; middle (32x24 → padded latent 8x8 → 32x32) and final (64x48 → 16x16 → 64x64)
    # start from the VAE-encoded previous stage, with round(4 × 0.75) = 3 steps each
    assert encoded == [(32, 32, 3), (64, 64, 3)]
    assert len(steps) == 4 + 3 + 3
    assert out["final"].rgb.shape == (48, 64, 3)

    full = DiffusionStages(r.pipe, device=r.device, dtype=r.dtype, num_inference_steps=4, strength=1.0,
                           preview_every=0)
    encoded.clear()
    monkeypatch.setattr(full, "_encode", lambda rgb, device: encoded.append(rgb.shape) or real(rgb, device))
    run(full, image, Plan())
    assert encoded == []  # strength 1: the previous stage is only the reference, not the start


def test_latent_tiles_cover_the_image(tiny_path, image, monkeypatch):
    """final: 16x16 latent in 8x8 tiles overlapping by 4 → 3x3 tiles per step; middle 8x8 → 1 tile."""
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=2,
                                        strength=1.0, preview_every=0, tile=8, tile_overlap=4)
    shapes = []
    unet_forward = r.pipe.unet.forward
    monkeypatch.setattr(r.pipe.unet, "forward",
                        lambda x, *a, **k: shapes.append(tuple(x.shape[-2:])) or unet_forward(x, *a, **k))
    out = finals(run(r, image, Plan()))
    assert shapes == [(8, 8)] * 2 + [(8, 8)] * 2 + [(8, 8)] * 9 * 2  # rough (latent 4x4 padded to 8x8), middle, final
    assert np.isfinite(out["final"].rgb).all() and out["final"].rgb.shape == (48, 64, 3)


def test_vae_tiles_large_images_only(tiny_path, image, monkeypatch):
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=2,
                                        strength=0.5, preview_every=0, vae_tile=32)
    vae = r.pipe.vae
    tiled = []
    for name in ("tiled_decode", "_tiled_encode"):
        real = getattr(vae, name)
        monkeypatch.setattr(vae, name, lambda *a, _real=real, _n=name, **k: tiled.append(_n) or _real(*a, **k))
    out = finals(run(r, image, Plan()))
    # rough 16x12 and middle 32x24 (padded 32x32) fit one 32-pixel tile; final 64x48 (padded 64x64)
    # is encoded (its start image) and decoded in tiles
    assert tiled == ["_tiled_encode", "tiled_decode"]
    assert out["final"].rgb.shape == (48, 64, 3) and np.isfinite(out["final"].rgb).all()


def test_out_of_memory_halves_the_tile(tiny_path, image, monkeypatch, caplog):
    from realsr_r1.restorers import diffusion
    from realsr_r1.restorers.memory import OutOfMemoryError

    monkeypatch.setattr(diffusion, "MIN_TILE", 8)
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=2,
                                        strength=1.0, preview_every=0, tile=0, tile_overlap=4)
    unet_forward = r.pipe.unet.forward

    def small_only(x, *a, **k):  # a GPU that fits 8x8 latents only
        if x.shape[-1] > 8:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return unet_forward(x, *a, **k)

    monkeypatch.setattr(r.pipe.unet, "forward", small_only)
    with caplog.at_level("WARNING"):
        out = finals(run(r, image, Plan()))
    assert r.tile == 8 and "retrying with latent tile 8" in caplog.text
    assert out["final"].rgb.shape == (48, 64, 3) and np.isfinite(out["final"].rgb).all()

    r.tile = 8
    monkeypatch.setattr(r.pipe.unet, "forward", lambda *a, **k: (_ for _ in ()).throw(
        OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(OutOfMemoryError):  # nothing smaller to try: the error goes up
        run(r, image, Plan())


def test_regression_rough_stage(tiny_path, image, weights_dir):
    from realsr_r1.restorers.esrgan import ESRGANRestorer

    esrgan = ESRGANRestorer.from_pretrained(None, device="cpu", precision="auto")  # as the stage loads it
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="realesrgan", num_inference_steps=2,
                                        preview_every=1, strength=1.0)
    assert r.describe()["rough"] == "realesrgan"
    events = run(r, image, Plan())
    rough = finals(events)["rough"].rgb
    expected = color_fix(esrgan.restore(image.rgb, None, outscale=1.0)[0], image.rgb, "wavelet")
    np.testing.assert_allclose(rough, expected, atol=1e-5)
    assert not any(isinstance(e, StagePreview) and e.stage == "rough" for e in events)
    with pytest.raises(ValueError, match="rough method"):
        DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="bicubic")


def test_no_previews_when_every_is_not_below_steps(tiny_path, image):
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=2,
                                        preview_every=5, color_fix="adain", guidance_scale=1.0)
    events = run(r, image, Plan())
    assert not any(isinstance(e, StagePreview) for e in events)
    assert [e.stage for e in events if isinstance(e, StageImage)] == ["rough", "middle", "final"]


@pytest.mark.parametrize("text", [None, "", "garbage <degradation>noise: ???", "<final_understand>x" * 50])
def test_garbage_plan_still_works(restorer, image, text):
    image.alpha = None
    out = finals(run(restorer, image, parse_cot(text)))
    assert out["final"].rgb.shape == (48, 64, 3) and out["final"].alpha is None
    assert np.isfinite(out["final"].rgb).all()


def test_noise_level_mapping():
    levels = {lvl: noise_level_for(parse_cot(f"<degradation>noise: {lvl}</degradation>"))
              for lvl in ("none", "light", "medium", "heavy")}
    assert levels == {"none": 10, "light": 20, "medium": 40, "heavy": 80}
    assert noise_level_for(Plan()) == 10 and noise_level_for(None) == 10
    assert noise_level_for(parse_cot("<degradation>noise: heavy</degradation>"), max_noise_level=50) == 50


def test_degradations_go_to_the_negative_prompt():
    """CLIP text encoders ignore "remove": degradation words belong in the negative prompt (SUPIR, SeeSR)."""
    from realsr_r1.restorers.conditioning import DEFAULT_NEGATIVE, negative_prompt_for

    plan = parse_cot(COT)  # blur light, noise heavy, jpeg medium
    positive = stage_prompt(plan, "middle")
    assert positive == "clean, sharp, high quality; a red brick house, a tree"
    assert not any(word in positive for word in ("noise", "blur", "jpeg", "artifacts", "remove"))
    negative = negative_prompt_for(plan, DEFAULT_NEGATIVE)
    assert negative == DEFAULT_NEGATIVE + ", light blur, heavy noise, medium jpeg artifacts"
    assert negative_prompt_for(plan, None) == "light blur, heavy noise, medium jpeg artifacts"
    assert negative_prompt_for(Plan(), DEFAULT_NEGATIVE) == DEFAULT_NEGATIVE
    assert negative_prompt_for(None, None) == ""
    assert stage_prompt(Plan(), "rough") == "clean, sharp, high quality"
    # the pipeline truncates prompts to 77 CLIP tokens: a long understanding must not cut the quality words
    long = parse_cot("<final_understand>" + "weathered planks, " * 60 + "</final_understand>")
    assert stage_prompt(long, "final").startswith("clean, sharp, high quality; weathered planks")


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_each_sample_gets_its_own_negative_prompt(tiny_path, image, monkeypatch, guidance):
    """GRPO: G texts about one image in one batch; each sample's detected degradations go into its own
    negative prompt, none into the positive one; without CFG there is no negative prompt at all."""
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=2,
                                        guidance_scale=guidance, negative_prompt="low quality")
    seen = []
    real = r.pipe.encode_prompt
    monkeypatch.setattr(r.pipe, "encode_prompt", lambda prompt, device, n, cfg, negative=None, **k:
                        seen.append((list(prompt), negative)) or real(prompt, device, n, cfg, negative, **k))
    plans = [parse_cot(COT), parse_cot("<degradation>noise: light</degradation>"), Plan()]
    r.restore_final_batch(image.rgb, plans, seed=0)
    assert seen == [(["clean, sharp, high quality; brick texture, leaves"] + ["clean, sharp, high quality"] * 2,
                     None if guidance <= 1 else
                     ["low quality, light blur, heavy noise, medium jpeg artifacts", "low quality, light noise",
                      "low quality"])]


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_color_fix_restores_mean_colour(method):
    rng = np.random.default_rng(1)
    src = np.clip(0.5 + 0.1 * rng.standard_normal((32, 32, 3)), 0, 1).astype(np.float32)
    shifted = np.clip(src + np.array([0.2, -0.15, 0.1], np.float32), 0, 1)
    fixed = color_fix(shifted, src, method)
    assert np.abs(fixed.mean((0, 1)) - src.mean((0, 1))).max() < 0.01
    assert np.abs(shifted.mean((0, 1)) - src.mean((0, 1))).max() > 0.1
    if method == "wavelet":  # detail kept: high frequencies of the output survive
        assert np.corrcoef((fixed - fixed.mean()).ravel(), (src - src.mean()).ravel())[0, 1] > 0.9
    assert color_fix(shifted, src, "none") is not None
    with pytest.raises(ValueError):
        color_fix(shifted, src, "nope")


def test_half_precision_nan_retries_in_fp32(tiny_path, image, monkeypatch, caplog):
    import torch

    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", dtype="bf16", rough="diffusion",
                                        num_inference_steps=2, preview_every=0)
    assert r.describe()["precision"] == "bf16"
    real = r._decode
    seen = []

    def flaky(latents):  # NaNs whenever the pipeline runs in half precision
        seen.append(r.pipe.unet.dtype)
        out = real(latents)
        return out * np.nan if r.pipe.unet.dtype != torch.float32 else out

    monkeypatch.setattr(r, "_decode", flaky)
    with caplog.at_level("WARNING"):
        out = finals(run(r, image, Plan()))
    assert seen == [torch.bfloat16, torch.float32] * 3
    assert all(np.isfinite(e.rgb).all() for e in out.values())
    assert r.fp32_retries == 3 and "retrying in fp32" in caplog.text
    assert r.pipe.unet.dtype == torch.bfloat16  # back to the chosen precision afterwards


def test_pipeline_error_reaches_the_consumer(restorer, image, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(restorer.pipe.unet, "forward", boom)
    events = restorer.stages(image, Plan(), sizes=SIZES, seed=0)
    assert isinstance(next(events), StageStarted)
    with pytest.raises(RuntimeError, match="out of memory"):
        next(events)


@pytest.mark.parametrize("radius", [1, 4, 16])
def test_wavelet_blur_is_the_dilated_3x3_kernel(radius):
    import torch
    import torch.nn.functional as F

    from realsr_r1.restorers.color import _wavelet_blur

    x = torch.rand(1, 3, 20, 37, generator=torch.Generator().manual_seed(radius))
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16)[None, None].repeat(3, 1, 1, 1)
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    ref = F.conv2d(F.pad(x, (radius,) * 4, mode=mode), k, groups=3, dilation=radius)
    torch.testing.assert_close(_wavelet_blur(x, radius), ref, atol=1e-6, rtol=0)


def test_final_stage_batch_equals_one_by_one(tiny_path, image):
    """GRPO's generation reward: G chains of thought about one image in one call, each conditioned on
    its own final text and noise level; sample i of the batch equals a batch of one for that plan."""
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=2,
                                        guidance_scale=3.0, vae_tile=0)
    plans = [parse_cot(COT), parse_cot("<final_understand>a cat</final_understand>"), Plan()]
    batch = r.restore_final_batch(image.rgb, plans, scale=4.0, seed=3)
    assert [b.shape for b in batch] == [(48, 64, 3)] * 3
    assert np.abs(batch[0] - batch[1]).max() > 1e-4  # the text conditions the result
    for i, plan in enumerate(plans):  # every sample meets the same noise: batching changes nothing
        (alone,) = r.restore_final_batch(image.rgb, [plan], scale=4.0, seed=3)
        np.testing.assert_allclose(batch[i], alone, atol=1e-4)
    split = r.restore_final_batch(image.rgb, plans, scale=4.0, seed=3, batch_size=2)
    np.testing.assert_allclose(np.stack(split), np.stack(batch), atol=1e-4)


def test_one_denoising_at_a_time_across_threads_and_copies(restorer, image, monkeypatch):
    """The scheduler's state is shared: concurrent requests (and the demo's per-request copies) take turns."""
    import copy
    import threading
    import time

    active, peak = [0], [0]
    real = restorer._denoise

    def counted(*a, **k):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return (yield from real(*a, **k))
        finally:
            active[0] -= 1

    monkeypatch.setattr(restorer, "_denoise", counted)
    other = copy.copy(restorer)
    other.steps = 2
    threads = [threading.Thread(target=r.restore_final_batch, args=(image.rgb, [Plan()])) for r in (restorer, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1


# --- previews: the predicted clean image, decoded small -------------------------------------------------
def _step_spy(sched, monkeypatch, hide_x0=False):
    """Record each step's x_t-1 and the scheduler's own x0 prediction; `hide_x0`: a scheduler that
    returns prev_sample only (e.g. DPMSolverMultistepScheduler)."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    seen = {"x0": [], "xt": []}
    real = sched.step

    def step(*a, **k):
        out = real(*a, **{**k, "return_dict": True})
        seen["x0"].append(out.pred_original_sample.clone())
        seen["xt"].append(out.prev_sample.clone())
        if hide_x0:
            return SchedulerOutput(prev_sample=out.prev_sample) if k.get("return_dict", True) else (out.prev_sample,)
        return out if k.get("return_dict", True) else (out.prev_sample, out.pred_original_sample)

    monkeypatch.setattr(sched, "step", step)
    return seen


@pytest.mark.parametrize("hide_x0", [False, True])
def test_previews_show_the_predicted_clean_image_not_the_noisy_latent(tiny_path, image, monkeypatch, hide_x0):
    """At t≈500 x_t is mostly noise: the preview decodes the step's x0 prediction (DDIMScheduler.step's
    pred_original_sample, or the same from the model output and alphas_cumprod when a scheduler gives none)."""
    import torch
    from diffusers import DDIMScheduler

    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=4,
                                        strength=1.0, preview_every=1)
    # no x0 clipping, so the fallback's x0 is DDIM's exactly
    r.pipe.scheduler = DDIMScheduler.from_config(r.pipe.scheduler.config, clip_sample=False)
    seen = _step_spy(r.pipe.scheduler, monkeypatch, hide_x0)
    decoded = []
    real = r.codec.preview
    monkeypatch.setattr(r.codec, "preview", lambda x0, side: decoded.append((x0, real(x0, side))) or decoded[-1][1])
    events = run(r, image, Plan())
    previews = [e for e in events if isinstance(e, StagePreview)]
    assert [(e.stage, e.step) for e in previews] == [(s, i) for s in ("rough", "middle", "final") for i in (1, 2, 3)]
    latent = {"rough": (3, 4), "middle": (6, 8), "final": (12, 16)}  # 1/4 of each stage's size, unpadded
    for e, (shown, img) in zip(previews, decoded):
        h, w = latent[e.stage]
        step = 4 * ("rough", "middle", "final").index(e.stage) + e.step - 1
        torch.testing.assert_close(shown, seen["x0"][step][:1, :, :h, :w], atol=1e-5, rtol=0)
        if e.step == 1:  # x_t after the first step (t≈500) is mostly noise; late x_t ≈ x0
            assert (shown - seen["xt"][step][:1, :, :h, :w]).abs().max() > 0.1
        np.testing.assert_allclose(e.image, resize(img, SIZES[e.stage]), atol=1e-6)


def test_previews_are_decoded_small(tiny_path, image, monkeypatch):
    """A preview decodes the x0 latent averaged down to ≤ half its side and ≤ preview_size pixels."""
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=2,
                                        strength=1.0, preview_every=1, preview_size=16)
    vae = r.pipe.vae
    shapes = []
    real = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z, *a, **k: shapes.append(tuple(z.shape)) or real(z, *a, **k))
    events = run(r, image, Plan())
    assert [e.image.shape for e in events if isinstance(e, StagePreview)] == [(12, 16, 3)] * 3
    # rough 16x12 (latent 4x3) previews at half the latent side, middle 32x24 (8x6) and final 64x48
    # (16x12) at 16 pixels wide; the stage images decode their whole padded latents
    assert shapes == [(1, 4, 2, 2), (1, 4, 8, 8), (1, 4, 3, 4), (1, 4, 8, 8), (1, 4, 3, 4), (1, 4, 16, 16)]
    assert finals(events)["final"].rgb.shape == (48, 64, 3)


# --- out of memory: each part shrinks its own work -----------------------------------------------------
def _count_unet(unet, monkeypatch):
    calls = []
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


def test_decode_out_of_memory_slices_without_rerunning_the_unet(tiny_path, image, monkeypatch, caplog):
    """GRPO decodes G samples at once: on OOM the decode goes one sample at a time; denoising is not redone."""
    from realsr_r1.restorers.memory import OutOfMemoryError

    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=2,
                                        guidance_scale=3.0, vae_tile=0)
    plans = [parse_cot(COT), parse_cot("<final_understand>a cat</final_understand>"), Plan()]
    expected = r.restore_final_batch(image.rgb, plans, seed=3)
    vae = r.pipe.vae
    real = vae.decode

    def one_at_a_time(z, *a, **k):  # a GPU that decodes one sample at a time
        if z.shape[0] > 1:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(z, *a, **k)

    monkeypatch.setattr(vae, "decode", one_at_a_time)
    calls = _count_unet(r.pipe.unet, monkeypatch)
    with caplog.at_level("WARNING"):
        out = r.restore_final_batch(image.rgb, plans, seed=3)
    assert len(calls) == 2  # one pass: 2 steps, one tile, the CFG pair batched
    assert r.tile == 128 and r.describe()["vae_slicing"] is True and "one sample at a time" in caplog.text
    np.testing.assert_allclose(np.stack(out), np.stack(expected), atol=1e-5)


def test_decode_out_of_memory_halves_the_vae_tile_not_the_latent_tile(tiny_path, image, monkeypatch, caplog):
    from realsr_r1.restorers import vae as vae_module
    from realsr_r1.restorers.memory import OutOfMemoryError

    monkeypatch.setattr(vae_module, "MIN_VAE_TILE", 32)
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=2,
                                        strength=1.0, preview_every=0, vae_tile=0)
    decoder = r.pipe.vae.decoder
    real = decoder.forward

    def small_tiles(z, *a, **k):  # a GPU that decodes 8x8 latents (32x32 pixels) only
        if max(z.shape[-2:]) > 8:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(z, *a, **k)

    monkeypatch.setattr(decoder, "forward", small_tiles)
    calls = _count_unet(r.pipe.unet, monkeypatch)
    with caplog.at_level("WARNING"):
        out = finals(run(r, image, Plan()))
    assert len(calls) == 2 * 3  # 2 steps per stage, nothing redone
    # rough and middle (8x8 latents) fit; final (16x16) is decoded in 32-pixel tiles
    assert r.vae_tile == 32 and r.tile == 128 and "retrying with VAE tile 32" in caplog.text
    assert out["final"].rgb.shape == (48, 64, 3) and np.isfinite(out["final"].rgb).all()

    monkeypatch.setattr(decoder, "forward",
                        lambda *a, **k: (_ for _ in ()).throw(OutOfMemoryError("CUDA out of memory")))
    calls.clear()
    with pytest.raises(OutOfMemoryError):  # nothing smaller to try: the error goes up, after one pass
        run(r, image, Plan())
    assert len(calls) == 2


def test_out_of_memory_alias_is_portable(monkeypatch):
    """torch < 2.5 has no torch.OutOfMemoryError; the CUDA one (torch ≥ 1.13) is the same class."""
    import importlib

    import torch

    from realsr_r1.restorers import memory

    assert memory.OutOfMemoryError is torch.cuda.OutOfMemoryError
    monkeypatch.delattr(torch, "OutOfMemoryError")
    try:
        assert importlib.reload(memory).OutOfMemoryError is torch.cuda.OutOfMemoryError
    finally:
        monkeypatch.undo()
        importlib.reload(memory)


@pytest.mark.parametrize("options,words", [({"num_inference_steps": 0}, "steps must be ≥ 1"),
                                           ({"vae_tile": 3}, "vae_tile must be 0 (no tiling) or ≥ ")])
def test_impossible_settings_are_refused_when_built(tiny_path, options, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", **options)


# --- the chooser in the full profile: the rough stage's experts, the final stage's samples ------------------
def test_rough_stage_experts_follow_the_degradation_reading(tiny_path, image, monkeypatch):
    """With several regression experts, the plan's reading picks the rough mix (as in lite): a clean
    reading the faithful (dark) expert, a heavy one the natural (bright) one. The record goes into
    the rough stage's `choice`, and GRPO's batched call conditions each plan on its own mix."""
    from test_chooser import CLEAN, HEAVY, toy_experts

    from realsr_r1.chooser import Chooser
    from realsr_r1.restorers.lite import LiteStages

    lite = LiteStages(toy_experts(), Chooser())
    # natural-looking = bright (high Q_SR), faithful = dark (high F), as test_chooser's stand-in:
    # positions in ladder order, each more faithful and less natural than the last
    monkeypatch.setattr(lite.chooser, "measure", lambda images, lqs: [
        {"F": 0.80 + 0.05 * i, "Q_SR": 4.6 - 0.15 * i} for i in range(len(images))])
    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", regression=lite, num_inference_steps=2,
                                        strength=1.0, color_fix="none")
    assert r.describe()["rough_restorer"]["experts"][1]["name"] == "dark"
    rough = {}
    for text in (CLEAN, HEAVY):
        stage = finals(run(r, image, parse_cot(text)))["rough"]
        rough[text] = stage
    assert rough[CLEAN].choice["position"] > 0 and rough[HEAVY].choice["position"] == 0
    assert rough[HEAVY].choice["winner"] == "bright"
    up = image.rgb.repeat(4, axis=0).repeat(4, axis=1)  # the toy experts: nearest ×4, times their gain
    np.testing.assert_allclose(rough[HEAVY].rgb, resize(up, (16, 12)), atol=1e-5)
    assert rough[CLEAN].rgb.mean() < rough[HEAVY].rgb.mean()  # the dark expert came in

    refs = []
    real = r._diffuse
    monkeypatch.setattr(r, "_diffuse", lambda ref, *a, **k: refs.append((ref, len(a[2]))) or real(ref, *a, **k))
    out = r.restore_stage_batch(image.rgb, [parse_cot(t) for t in (CLEAN, HEAVY, CLEAN)], stage="final")
    assert [n for _, n in refs] == [2, 1]  # the two clean plans share one batched call
    assert refs[0][0].mean() < refs[1][0].mean()
    np.testing.assert_allclose(out[0], out[2], atol=1e-5)
    assert not np.allclose(out[0], out[1], atol=1e-3)
    rough_batch = r.restore_stage_batch(image.rgb, [parse_cot(CLEAN), parse_cot(HEAVY)], stage="rough")
    np.testing.assert_allclose(rough_batch[0], rough[CLEAN].rgb, atol=1e-6)


def test_final_candidates_keep_the_sample_the_chooser_prefers(tiny_path, image, monkeypatch):
    """`candidates: 3`: three final samples on three seeds, scored by the chooser's reward (a fake that
    likes dark images); the darkest is kept and recorded with every sample's score. Sample 1 is the
    one a single-candidate run makes (same seed), so the choice only adds samples."""
    from realsr_r1.chooser import Chooser

    opts = dict(device="cpu", rough="diffusion", num_inference_steps=4, strength=0.5, preview_every=0)
    one = DiffusionStages.from_pretrained(tiny_path, **opts)
    three = DiffusionStages.from_pretrained(tiny_path, candidates=3, chooser=Chooser({"tiny_rewards:darkness": {}}), **opts)
    assert three.describe()["candidates"] == 3 and three.describe()["chooser"]["reward"] == "tiny_rewards:darkness"
    seen = {}
    import realsr_r1.restorers.diffusion as module

    real = module.choose_sample
    monkeypatch.setattr(module, "choose_sample",
                        lambda chooser, images, *a: seen.setdefault("images", images) and real(chooser, images, *a))
    final = finals(run(three, image, parse_cot(COT), seed=7))["final"]
    images = seen["images"]
    assert len(images) == 3 and not np.allclose(images[0], images[1], atol=1e-3)
    rows = final.choice["candidates"]
    assert [row["seed"] for row in rows] == [9, 1009, 2009]  # seed + stage index + k·stride
    best = max(range(3), key=lambda k: rows[k]["reward"])
    assert best == int(np.argmin([im.mean() for im in images]))
    assert final.choice["winner"] == rows[best]["label"] and "darkness" in final.choice["why"]
    np.testing.assert_array_equal(final.rgb, images[best])
    assert len(final.candidates) == 3  # looks for the demo's strip
    single = finals(run(one, image, parse_cot(COT), seed=7))["final"].rgb
    np.testing.assert_allclose(images[0], single, atol=1e-4)
    with pytest.raises(ValueError, match="needs a chooser"):
        DiffusionStages.from_pretrained(tiny_path, candidates=2, **opts)
    with pytest.raises(ValueError, match="candidates must be a whole number"):
        DiffusionStages.from_pretrained(tiny_path, candidates=0, **opts)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_a_stage_batch_from_the_previous_stage_is_the_inference_stage(tiny_path, image, guidance):
    """Reflective GRPO makes each stage for its rollouts with restore_stage_batch; given each plan's
    image of the stage before, a plan and seed give exactly the stage images inference makes
    (stages(): rough from noise, middle img2img from rough, on seed + the stage's index), batched
    with other plans or not. The trainer's stage_images passes the previous images on."""
    from types import SimpleNamespace

    from realsr_r1.training import grpo

    r = DiffusionStages.from_pretrained(tiny_path, device="cpu", rough="diffusion", num_inference_steps=4,
                                        strength=0.5, guidance_scale=guidance, preview_every=0)
    plan = parse_cot(COT)
    made = finals(run(r, image, plan, seed=3))
    other = parse_cot("<middle_understand>a cat</middle_understand>")
    (rough, _) = r.restore_stage_batch(image.rgb, [plan, other], stage="rough", seed=3)
    np.testing.assert_allclose(rough, made["rough"].rgb, atol=1e-5)
    restorations = SimpleNamespace(restorer=r, scale=4.0, seed=3, batch_size=None, calls=0)
    _, options = grpo.reflective_trainer({"reflect_stages": ["rough", "middle"]}, {}, lambda: restorations)
    middle, other_middle = options["stage_images"](image.rgb, "middle", [plan, other], [rough, rough])
    np.testing.assert_allclose(middle, made["middle"].rgb, atol=1e-5)
    assert np.abs(other_middle - middle).max() > 1e-4  # its own text
    from_noise = r.restore_stage_batch(image.rgb, [plan], stage="middle", seed=3)[0]
    assert np.abs(from_noise - made["middle"].rgb).max() > 1e-3  # what rollouts made before: not inference's
