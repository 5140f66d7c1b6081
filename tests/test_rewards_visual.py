"""Image rewards: batched, cached rendering; scorers; generation, COMPASS and IRPO general; the registry."""

import numpy as np
import pytest
from PIL import Image

from conftest import photo
from realsr_r1.cot import Plan, parse_cot
from realsr_r1.rewards import registry, visual
from realsr_r1.rewards.text import compass_reward_value

COT = ("<degradation>noise: heavy</degradation><rough_understand>a dog</rough_understand><rough_image></rough_image>"
       "<middle_understand>a dog</middle_understand><middle_image></middle_image>"
       "<final_understand>{}</final_understand><final_image></final_image>")


class FakeRestorer:
    """Final image = the LQ upscaled ×4, brightened by the number of words in the final text."""

    def __init__(self):
        self.batches = []

    def restore_final_batch(self, rgb, plans, *, scale, seed, batch_size=None):
        self.batches.append(len(plans))
        up = np.kron(rgb, np.ones((int(scale), int(scale), 1), np.float32))
        return [np.clip(up + 0.05 * len(p.understanding["final"].split()), 0, 1) for p in plans]


@pytest.fixture
def lq_hr(tmp_path):
    hr = np.asarray(photo((64, 48)), np.float32) / 255
    lq = hr.reshape(12, 4, 16, 4, 3).mean(axis=(1, 3))  # box-downscaled ×4
    path = tmp_path / "hr.png"
    Image.fromarray((hr * 255).round().astype(np.uint8)).save(path)
    return Image.fromarray((lq * 255).round().astype(np.uint8)), str(path)


def test_restorations_batch_per_image_and_cache(lq_hr):
    lq, _ = lq_hr
    other = lq.transpose(Image.FLIP_LEFT_RIGHT)
    fake = FakeRestorer()
    r = visual.Restorations(fake)
    texts = [COT.format("fur"), COT.format("fur and grass"), COT.format("fur"), COT.format("x")]
    out = r.final([lq, lq, lq, other], texts)
    assert fake.batches == [2, 1]  # one call per image; the repeated text renders once
    assert r.calls == 2 and out[0] is out[2] and out[0].shape == (48, 64, 3)
    assert out[1].mean() > out[0].mean()
    again = r.final([lq, other], [COT.format("fur and grass"), COT.format("x")])
    assert fake.batches == [2, 1] and again[0] is out[1]  # all cached: no new call
    r.final([other], [COT.format("a new batch")])
    assert fake.batches == [2, 1, 1] and len(r.cache) == 1  # earlier batches' images are dropped


def test_fidelity_scorer(lq_hr):
    _, hr_path = lq_hr
    hr = visual.reference_for(hr_path, np.zeros((48, 64, 3)))
    f = visual.FidelityScorer(use_pyiqa=False)
    noisy = np.clip(hr + np.random.default_rng(0).normal(0, 0.1, hr.shape), 0, 1).astype(np.float32)
    same, worse, none = f([hr, noisy, hr], [None] * 3, [hr, hr, None])
    assert same == pytest.approx(1.0) and 0 < worse < 0.8 and none is None
    parts = f.parts(noisy, hr)
    assert set(parts) == {"psnr", "ssim"} and all(0 <= v <= 1 for v in parts.values())
    assert visual.reference_for(str(hr_path) + ".missing", hr) is None  # unreadable: None, not a crash


def test_analyser_quality_prefers_the_clean_image(lq_hr):
    _, hr_path = lq_hr
    clean = visual.reference_for(hr_path, np.zeros((48, 64, 3)))
    noisy = np.clip(clean + np.random.default_rng(1).normal(0, 0.12, clean.shape), 0, 1).astype(np.float32)
    q_clean, q_noisy = visual.AnalyserQuality()([clean, noisy], [None, None], [None, None])
    assert 1 <= q_noisy < q_clean <= 5


@pytest.mark.parametrize("text,score", [("4", 4.0), ("Score: 5/5", 5.0), ("I'd say 3.", 3.0), ("10", None),
                                        ("2.5", None), ("", None), ("no idea", None), ("6 then 2", 2.0)])
def test_judge_answer_parsing(text, score):
    assert visual.parse_score(text) == score


def test_generation_compass_and_irpo_rewards(lq_hr):
    lq, hr_path = lq_hr
    r = visual.Restorations(FakeRestorer())
    completions = [[{"role": "assistant", "content": COT.format("")}], COT.format("a b c d e f g h")]
    cols = dict(image=[lq, lq], hr_path=[hr_path, hr_path])
    gen = visual.make_generation_reward(r, visual.FidelityScorer(use_pyiqa=False))
    g = gen(prompts=[None] * 2, completions=completions, **cols)
    assert gen.__name__ == "generation" and all(0 <= v <= 1 for v in g)
    assert g[0] > g[1]  # the brightened image is further from the reference

    class Q:  # a fixed quality scorer on [1, 5]: 2 for the LQ input, 4 for any restoration
        scale = "mos"

        def __call__(self, sr, lq_, hr):
            return [2.0 if s.shape[0] == 12 else 4.0 for s in sr]

    compass = visual.make_compass_reward(r, Q(), fidelity=visual.FidelityScorer(use_pyiqa=False), gamma=7.0)
    c = compass(prompts=[None] * 2, completions=completions, **cols)
    fid = visual.FidelityScorer(use_pyiqa=False)(r.final(cols["image"], [COT.format(""), COT.format("a b c d e f g h")]),
                                                  [None] * 2, [visual.reference_for(hr_path, np.zeros((48, 64, 3)))] * 2)
    assert c == pytest.approx([compass_reward_value(f, 2.0, 4.0, 7.0) for f in fid])
    assert c[0] == pytest.approx(fid[0] * 2 + fid[0] ** (2 / 7) * 2)

    irpo = visual.make_irpo_general_reward(r)
    i = irpo(prompts=[None] * 2, completions=completions, **cols)
    assert all(0 <= v <= 1 for v in i) and i[0] > i[1]
    assert irpo(prompts=[None], completions=completions[:1], image=[lq], hr_path=[None]) == [None]
    with pytest.raises(ValueError):
        visual.make_compass_reward(r, Q(), gamma=0)


def test_vlm_judge_runs_a_real_chat_vlm(tmp_path, lq_hr):
    from realsr_r1.tiny import build_tiny_vlm

    judge = visual.build_scorer("vlm-judge", model=str(build_tiny_vlm(tmp_path / "judge")), device="cpu")
    lq, hr_path = lq_hr
    lq = np.asarray(lq, np.float32) / 255
    answer = judge.answer([lq, lq])
    assert isinstance(answer, str)
    scores = judge([lq, lq], [lq, lq], [None, visual.reference_for(hr_path, lq)])
    assert len(scores) == 2 and all(s is None or 1 <= s <= 5 for s in scores)  # random weights: often None
    with pytest.raises(ValueError, match="needs `model`"):
        visual.build_scorer("vlm-judge")


def test_registry_builds_named_weighted_rewards(lq_hr):
    made = []

    def factory():
        made.append(1)
        return visual.Restorations(FakeRestorer())

    funcs, weights = registry.build_rewards(
        {"format": 1.0, "degradation": {"weight": 2.0, "partial_credit": 0.5}, "understanding": 0,
         "generation": {"weight": 0.5, "expert": "fidelity"}, "compass": {"quality": "analyser"},
         "irpo_general": 1.0, "conftest:photo": 0.0},
        restorations=factory)
    assert [f.__name__ for f in funcs] == ["format", "degradation", "generation", "compass", "irpo_general"]
    assert weights == [1.0, 2.0, 0.5, 1.0, 1.0]
    assert made == [1]  # the image rewards share one renderer
    with pytest.raises(ValueError, match="unknown reward"):
        registry.build_rewards({"beauty": 1.0})
    with pytest.raises(ValueError, match="need a restorer"):
        registry.build_rewards({"generation": 1.0})
    with pytest.raises(ValueError, match="cannot import"):
        registry.build_rewards({"no_such_module:fn": 1.0})


def test_custom_reward_by_import_path():
    funcs, weights = registry.build_rewards({"tiny_rewards:letter_fraction": 2.0})
    assert funcs[0].__name__ == "letter_fraction" and weights == [2.0]
    assert funcs[0](prompts=[None, None], completions=["abc", "a1!?"]) == [1.0, 0.25]


def test_real_diffusion_restorer_renders_each_text(tmp_path, lq_hr):
    """The generation reward over the tiny diffusion upscaler: G texts for one image in one call."""
    from realsr_r1.tiny import build_tiny_upscaler

    from realsr_r1.restorers.diffusion import DiffusionStages

    lq, hr_path = lq_hr
    stages = DiffusionStages.from_pretrained(build_tiny_upscaler(tmp_path / "sd"), device="cpu", rough="diffusion",
                                             num_inference_steps=2, guidance_scale=1.0)
    calls = []
    real = stages.restore_final_batch
    stages.restore_final_batch = lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
    r = visual.Restorations(stages, seed=0)
    texts = [COT.format("a red house"), COT.format("a green field"), COT.format("a red house")]
    gen = visual.make_generation_reward(r, visual.FidelityScorer(use_pyiqa=False))
    values = gen(prompts=[None] * 3, completions=texts, image=[lq] * 3, hr_path=[hr_path] * 3)
    assert calls == [2]  # one batched call for the two distinct texts
    assert values[0] == values[2] and values[0] != values[1]
    assert parse_cot(texts[0]).understanding["final"] == "a red house" and Plan() is not None
