"""Reflective VLCoT: the VLM sees each stage's image before it writes the next stage.

The tiny random VLM writes noise, so a logits processor makes it write a scripted chain (one script
per generation call); every forward pass still runs on the real inputs, images included."""

import json

import numpy as np
import pytest
import torch

from conftest import REPO, photo
from realsr_r1 import infer
from realsr_r1.cot import STAGES
from realsr_r1.decoding import Decoding
from realsr_r1.imageio import LoadedImage
from realsr_r1.pipeline import (Done, ImageInContext, PlanReady, RestorationPipeline, StageImage, StageStarted,
                                TextDelta)
from realsr_r1.policy import VLMPolicy
from realsr_r1.reflect import IMAGE_TAG
from realsr_r1.tiny import ScriptedChain, build_tiny_vlm

CHAIN = ["<degradation>noise: light; blur: none; jpeg: none; downsample: x4</degradation>"
         "<rough_understand>a chip</rough_understand><rough_image>",
         "<middle_understand>a metal chip</middle_understand><middle_image>",
         "<final_understand>pins and dust</final_understand><final_image>"]


class Stages:
    """A stage restorer that draws seeded noise at each stage's size and counts its stages."""

    name = "fake"

    def __init__(self):
        self.started = []
        self.plans = {}

    def describe(self):
        return {"restorer": self.name}

    def stages(self, image, plan, *, sizes, seed=0):
        for i, stage in enumerate(STAGES):
            self.started.append(stage)
            yield StageStarted(stage, sizes[stage])
            self.plans[stage] = plan.understanding.get(stage, "")  # what the stage was conditioned on
            w, h = sizes[stage]
            rgb = np.random.default_rng(seed * 10 + i).random((h, w, 3), dtype=np.float32)
            yield StageImage(stage, rgb, None, 0.0)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def policy(tiny_vlm):
    return VLMPolicy.from_pretrained(tiny_vlm, generation={"max_new_tokens": 160, "temperature": 1.0}, reflect=True)


def scripted(policy, monkeypatch, segments):
    tokenizer = policy.processor.tokenizer
    eos = policy.model.generation_config.eos_token_id
    script = ScriptedChain(tokenizer, segments, eos[0] if isinstance(eos, list) else eos)
    plain = Decoding.generate_kwargs

    def with_script(self, model=None):
        return {**plain(self, model), "logits_processor": [script.begin()]}  # once per generate() call

    monkeypatch.setattr(Decoding, "generate_kwargs", with_script)
    return script


def lq():
    rgb = np.asarray(photo((28, 28), name="chip.png"), dtype=np.float32) / 255
    return LoadedImage(rgb=rgb)


def spy_images(policy, monkeypatch):
    """Every image the processor turns into pixels, and the image grids of each generation's prefill."""
    seen, grids = [], []
    processor = policy.processor.image_processor
    real = type(processor).__call__

    def call(self, images=None, **kw):
        seen.extend(np.asarray(im).copy() for im in (images if isinstance(images, list) else [images]))
        return real(self, images=images, **kw)

    monkeypatch.setattr(type(processor), "__call__", call)
    model = policy.model
    plain_generate = model.generate
    pad = policy.processor.image_token_id

    def generate(**kw):
        runs = int(((kw["input_ids"][0] == pad).int().diff() == 1).sum()) + int(kw["input_ids"][0, 0] == pad)
        grids.append((kw["image_grid_thw"].clone(), runs))
        return plain_generate(**kw)

    monkeypatch.setattr(model, "generate", generate)
    return seen, grids


def run(policy, restorer=None, seed=0):
    restorer = restorer or Stages()
    events = list(RestorationPipeline(policy, restorer, profile="test").run(lq(), seed=seed))
    return events, restorer


def test_the_vlm_sees_each_stage_image_before_it_writes_the_next_stage(policy, monkeypatch):
    script = scripted(policy, monkeypatch, CHAIN)
    seen, grids = spy_images(policy, monkeypatch)
    events, restorer = run(policy)
    done = events[-1]
    assert isinstance(done, Done), events[-1]
    stage_rgb = {e.stage: e.rgb for e in events if isinstance(e, StageImage)}
    # Processor inputs: the LQ, then the rough image, then the middle one (the final is never needed).
    assert len(seen) == 3
    for stage, img in zip(["rough", "middle"], seen[1:]):
        assert np.array_equal(img, (np.clip(stage_rgb[stage], 0, 1) * 255 + 0.5).astype(np.uint8)), stage
    # Generation 2 (middle text) runs with 2 images in its sequence, generation 3 (final) with 3, each
    # image's placeholder run in the ids matching a grid (that the cached forward equals a full
    # re-encode of these inputs is the next test).
    assert [(len(g), runs) for g, runs in grids] == [(1, 1), (2, 2), (3, 3)]
    grids = [g for g, _ in grids]
    assert torch.equal(grids[2][:2], grids[1]) and torch.equal(grids[1][:1], grids[0])
    record = done.result.info["reflect"]
    patch = policy.processor.image_processor.patch_size
    assert record["seen"]["rough"] == [int(grids[1][1, 2]) * patch, int(grids[1][1, 1]) * patch]
    assert record["cache"] == ["re-encode", "cache", "cache"] and record["problems"] == []
    # Each stage was conditioned on its own text, written before that stage started.
    assert restorer.plans == {"rough": "a chip", "middle": "a metal chip", "final": "pins and dust"}
    assert done.result.plan.problems == [] and done.result.plan.images["final"] == "112x112"
    assert done.result.info["reason_tokens"] == sum(len(s[0]) for s in script.scripts)  # every segment


def test_reflect_events_interleave_text_and_images(policy, monkeypatch):
    scripted(policy, monkeypatch, CHAIN)
    events, _ = run(policy)
    order = []
    text = ""
    for e in events:
        if isinstance(e, TextDelta):
            text += e.text
            for tag in ("middle_understand", "final_understand", "rough_image>28x28"):
                if f"<{tag}" in text and ("text", tag) not in order:
                    order.append(("text", tag))
        elif isinstance(e, (StageImage, ImageInContext)):
            order.append((type(e).__name__, e.stage))
    assert order == [("StageImage", "rough"), ("ImageInContext", "rough"), ("text", "rough_image>28x28"),
                     ("text", "middle_understand"), ("StageImage", "middle"), ("ImageInContext", "middle"),
                     ("text", "final_understand"), ("StageImage", "final")]
    assert sum(isinstance(e, PlanReady) for e in events) == 1
    assert text.endswith("<final_image>112x112</final_image>")


def test_a_cached_continuation_sees_what_a_full_re_encode_sees(policy, monkeypatch):
    """Prefix reuse must not change the model's view: the first-step logits of each continuation
    agree with re-encoding the whole sequence (fp32)."""
    script = scripted(policy, monkeypatch, CHAIN)
    events, _ = run(policy)
    assert events[-1].result.info["reflect"]["cache"] == ["re-encode", "cache", "cache"]
    cached_prefill = events[-1].result.info["reflect"]["prefill_tokens"]
    cached = script.first_logits
    script = scripted(policy, monkeypatch, CHAIN)
    from realsr_r1 import reflect

    monkeypatch.setattr(reflect.VLMReflection, "reuse_cache", False)
    events, _ = run(policy)
    assert events[-1].result.info["reflect"]["cache"] == ["re-encode"] * 3
    assert len(cached) == len(script.first_logits) == 3
    for a, b in zip(cached, script.first_logits):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    full_prefill = events[-1].result.info["reflect"]["prefill_tokens"]
    # The cache leaves only the new image's tokens and the text after it to prefill.
    assert cached_prefill["rough"] == full_prefill["rough"]
    for stage in ("middle", "final"):
        assert 0 < cached_prefill[stage] < full_prefill[stage] / 4, (cached_prefill, full_prefill)


@pytest.mark.parametrize("case,segments,problem", [
    ("never opened", ["<degradation>noise: light</degradation><rough_understand>a chip</rough_understand>"],
     "expected <rough_image> but the chain ended"),
    ("opened twice", [CHAIN[0], "<middle_understand>x</middle_understand><rough_image>", "<final_understand>y"],
     "expected <middle_image> but it wrote <rough_image>"),
    ("out of order", ["<degradation>noise: light</degradation><middle_image>",
                      "</middle_image><rough_image></rough_image><final_understand>keep me</final_understand>"],
     "expected <rough_image> but it wrote <middle_image>"),
    ("truncated", [CHAIN[0], "<middle_understand>" + "long " * 200], "expected <middle_image> but the chain ended"),
])
def test_bad_tag_sequences_still_make_every_stage_once(policy, monkeypatch, case, segments, problem):
    script = scripted(policy, monkeypatch, segments)
    events, restorer = run(policy)
    done = events[-1]
    assert isinstance(done, Done), done
    assert restorer.started == list(STAGES)  # three stages, each once
    assert set(done.result.stages) == set(STAGES)
    record = done.result.info["reflect"]
    assert any(problem in p for p in record["problems"]), record["problems"]
    assert script.call + 1 <= 4  # at most three segments and one to finish the chain in one pass
    if case == "out of order":  # the rest of the chain, written in one pass, is kept whole
        assert done.result.plan.understanding["final"] == "keep me"


def test_one_pass_policy_has_no_reflection(tiny_vlm, monkeypatch):
    policy = VLMPolicy.from_pretrained(tiny_vlm, generation={"max_new_tokens": 160}, reflect=False)
    assert policy.reflect(lq()) is None and policy.describe()["mode"] == "one-pass"
    script = scripted(policy, monkeypatch, ["".join(CHAIN) + "</final_image>"])
    events, restorer = run(policy)
    assert script.call == 0 and not any(isinstance(e, ImageInContext) for e in events)
    assert restorer.plans["middle"] == "a metal chip"


def test_sidecar_records_the_mode_and_what_the_vlm_saw(tmp_path, capsys, monkeypatch):
    from realsr_r1.profiles import build_pipeline

    real_build = build_pipeline

    def build(cfg, **kw):
        pipe = real_build(cfg, **kw)
        scripted(pipe.policy, monkeypatch, CHAIN)
        return pipe

    monkeypatch.setattr("realsr_r1.profiles.build_pipeline", build)
    src = tmp_path / "in"
    src.mkdir()
    photo((28, 28), name="chip.png").save(src / "chip.png")
    rc = infer.main(["-i", str(src), "-o", str(tmp_path / "out"), "--profile", "tiny", "--set", "policy.reflect=true", "--set", "policy.generation.max_new_tokens=200",
                     "--quiet"])
    assert rc == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "out" / "chip.json").read_text())
    assert side["policy_info"]["mode"] == "reflect"
    assert set(side["reflect"]["seen"]) == {"rough", "middle"}
    assert all(len(v) == 2 and min(v) > 0 for v in side["reflect"]["seen"].values())
    assert side["plan"]["understanding"]["middle"] == "a metal chip"
    assert IMAGE_TAG.search(side["policy_output"])


def test_the_demo_shows_the_rough_image_before_the_middle_text(policy, monkeypatch, tmp_path):
    from realsr_r1.demo import DemoSession

    scripted(policy, monkeypatch, CHAIN)
    session = DemoSession({"tiny": "tiny"}, tmp_path / "out", device="cpu")
    session._pipelines["tiny"] = (RestorationPipeline(policy, Stages(), profile="tiny"), "tiny: test")
    photo((28, 28), name="chip.png").save(tmp_path / "chip.png")
    views = [(v.reasoning, v.stages["rough"] is not None, v.stages["middle"] is not None, v.status)
             for v in session.restore(str(tmp_path / "chip.png"), "tiny")]
    first_rough = next(i for i, v in enumerate(views) if v[1])
    assert "<middle_understand>" not in views[first_rough][0]
    assert not views[first_rough][2]
    final_text = views[-1][0]
    assert final_text.index("<rough_image>") < final_text.index("[looking at the rough image") \
        < final_text.index("<middle_understand>") < final_text.index("[looking at the middle image") \
        < final_text.index("<final_understand>")
    assert any("with the rough image in view" in v[3] for v in views)
    assert views[-1][3].startswith("Done")


def test_a_policy_trained_on_the_rough_image_sees_only_that(policy, monkeypatch):
    scripted(policy, monkeypatch, [CHAIN[0], CHAIN[1] + "</middle_image>" + CHAIN[2] + "</final_image>"])
    monkeypatch.setattr(policy, "reflect_stages", ("rough",))
    seen, grids = spy_images(policy, monkeypatch)
    events, restorer = run(policy)
    done = events[-1]
    assert [e.stage for e in events if isinstance(e, ImageInContext)] == ["rough"]
    assert [len(g) for g, _ in grids] == [1, 2]  # the rest of the chain with the LQ and rough images only
    assert done.result.info["reflect"]["problems"] == [] and restorer.started == list(STAGES)
    assert restorer.plans == {"rough": "a chip", "middle": "a metal chip", "final": "pins and dust"}


def test_stage_timings_are_recorded_in_both_modes(policy, tiny_vlm, monkeypatch):
    scripted(policy, monkeypatch, CHAIN)
    events, _ = run(policy)
    one_pass = VLMPolicy.from_pretrained(tiny_vlm, generation={"max_new_tokens": 8}, reflect=False)
    for result in (events[-1].result, run(one_pass)[0][-1].result):
        assert set(STAGES) <= set(result.timings) and "reason" in result.timings


@pytest.mark.parametrize("recorded,set_in_profile,expected", [
    (None, None, ("reflect", ["rough", "middle"])),  # a model this project did not train: the default
    ({"max_new_tokens": 8}, None, ("one-pass", [])),  # trained before the mode was recorded: one pass
    ({"max_new_tokens": 8, "reflect_stages": []}, None, ("one-pass", [])),  # GRPO trained it one-pass
    ({"max_new_tokens": 8, "reflect_stages": ["rough"]}, None, ("reflect", ["rough"])),  # reflective rollouts
    ({"max_new_tokens": 8, "reflect_stages": []}, True, ("reflect", ["rough", "middle"])),  # the profile wins
])
def test_the_mode_follows_how_the_policy_was_trained(tiny_vlm, tmp_path, recorded, set_in_profile, expected):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_vlm, model)
    if recorded is not None:
        (model / "realsr_decoding.json").write_text(json.dumps(recorded))
    policy = VLMPolicy.from_pretrained(model, reflect=set_in_profile)
    assert (policy.describe()["mode"], policy.describe()["reflect_stages"]) == expected
    if recorded is not None:
        assert policy.decoding.max_new_tokens == 8


def test_in_a_real_browser_the_rough_image_shows_before_the_middle_text(policy, monkeypatch, tmp_path):
    """The demo page in reflect mode: while the VLM looks at the rough image, the page already shows
    it, and the middle text has not started."""
    playwright = pytest.importorskip("playwright.sync_api")
    import importlib
    import time

    from test_app import CHROMIUM_FLAGS, chromium, free_port

    from realsr_r1 import reflect
    from realsr_r1.demo import DemoSession

    exe = chromium()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.syspath_prepend(str(REPO))
    app = importlib.import_module("app")
    scripted(policy, monkeypatch, CHAIN)
    plain_see = reflect.VLMReflection.see

    def slow_see(self, *a, **k):  # the VLM takes its time over the rough image
        time.sleep(3 if a[0] == "rough" else 0)
        return plain_see(self, *a, **k)

    monkeypatch.setattr(reflect.VLMReflection, "see", slow_see)
    session = DemoSession({"tiny": "tiny"}, tmp_path / "out", device="cpu")
    session._pipelines["tiny"] = (RestorationPipeline(policy, Stages(), profile="tiny"), "tiny: test")
    demo = app.build_app(session, "tiny")
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(session.out_root)])
    photo((28, 28), name="chip.png").save(tmp_path / "chip.png")
    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#input-file input[type=file]").set_input_files(str(tmp_path / "chip.png"))
            page.locator("#run").click()
            rough = page.locator("#stage-rough img").first
            rough.wait_for(state="visible", timeout=60_000)
            assert rough.evaluate("i => i.complete || new Promise(r => i.onload = () => r(true))")
            text_then = page.locator("#reasoning textarea").input_value()
            assert "<rough_image>" in text_then and "<middle_understand>" not in text_then
            assert not page.locator("#stage-middle img").first.is_visible()
            page.wait_for_function("document.querySelector('#status').innerText.startsWith('Done')", timeout=60_000)
            text = page.locator("#reasoning textarea").input_value()
            assert text.index("[looking at the rough image") < text.index("<middle_understand>")
            browser.close()
    finally:
        demo.close()
