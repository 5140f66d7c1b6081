"""Text rewards: hand-computed values, malformed completions, conversational input, COMPASS."""

import sys
import types

import numpy as np
import pytest

from realsr_r1.cot import TAGS, DegradationItem, render_cot
from realsr_r1.rewards import text as T

TRUTH = [DegradationItem("blur", "medium", {"sigma": 1.4}), DegradationItem("noise", "heavy"),
         DegradationItem("jpeg", "light", {"quality": 82}), DegradationItem("downsample", "x4")]
TRUTH_DICTS = [i.to_dict() for i in TRUTH]
UND = {"rough": "a dog lying on grass", "middle": "a brown dog on a green lawn, a fence behind",
       "final": "fur texture, individual grass blades"}
TAGS4 = ["dog", "grass", "fence", "sky"]  # the chain names three of them: 0.75
TRL_EXTRAS = dict(completion_ids=[[1, 2]], trainer_state=object(), log_extra=print, log_metric=print)


def chain(deg="blur: medium; noise: heavy; jpeg: light; downsample: x4", und=None):
    return render_cot(deg, UND if und is None else und)


def conv(text, parts=False):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}] if parts else text}]


GOOD = chain()
CANONICAL = "\n".join(f"<{t}></{t}>" for t in TAGS)
MALFORMED = {  # completion -> (format, degradation vs TRUTH, understanding vs TAGS4)
    "empty": ("", 0.0, 0.0, 0.0),
    "truncated": (GOOD[: GOOD.index("</middle_understand>")], 0.0, 1.0, 0.75),
    "missing_close": (GOOD.replace("</degradation>", ""), 0.0, 1.0, 0.75),  # next tag closes it
    "wrong_order": (GOOD.replace("<middle_image></middle_image>", "") + "<middle_image></middle_image>", 0.0, 1.0, 0.75),
    "repeated_tail": (GOOD + "\n<degradation>blur: none</degradation>", 0.0, 1.0, 0.75),
    "repeated_type": (chain("noise: light; noise: heavy; blur: medium"), 1.0, 0.25, 0.75),
    "garbage": ("dog grass fence </final_image> <<>> \x00 medium blur", 0.0, 0.0, 0.0),
    "none": (None, 0.0, 0.0, 0.0),
    "int": (42, 0.0, 0.0, 0.0),
    "bad_messages": ([{"role": "assistant", "content": 7}, "junk", None], 0.0, 0.0, 0.0),
}


def test_completion_text_forms():
    assert T.completion_text("abc") == "abc"
    assert T.completion_text(conv("abc")) == T.completion_text(conv("abc", parts=True)) == "abc"
    parts = [{"type": "text", "text": "a"}, {"type": "image"}, "b", {"type": "text", "text": None}]
    assert T.completion_text([{"role": "assistant", "content": parts}]) == "ab"
    sys_and_answer = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]
    assert T.completion_text(sys_and_answer) == "answer"
    assert T.completion_text({"content": "x"}) == "x"
    for junk in (None, 3.5, b"bytes", [None, 1], [{"role": "assistant"}]):
        assert T.completion_text(junk) == ""


def test_format_reward_whitespace_and_order():
    spaced = "\n\n  " + GOOD.replace("\n", " \n\t \n") + "  \n"
    assert T.format_reward(None, [GOOD, CANONICAL, spaced, GOOD.replace("\n", "")]) == [1.0] * 4
    swapped = GOOD.replace("<rough_understand>", "<X>").replace("<middle_understand>", "<rough_understand>")
    bad = ["preamble " + GOOD, GOOD + " trailing", GOOD.replace("<final_image></final_image>", ""),
           swapped.replace("<X>", "<middle_understand>"), GOOD.upper()]
    assert T.format_reward(None, bad) == [0.0] * len(bad)
    released = T.make_format_reward("released")
    assert released(None, [GOOD, CANONICAL, spaced, GOOD.replace("\n", "")]) == [1.0] * 4
    assert released(None, bad) == [0.0] * len(bad)


DOUBLED = GOOD.replace("</degradation>", "</degradation><degradation>noise: light</degradation>", 1)
NESTED = GOOD.replace("a dog lying", "a dog <middle_understand>on a lawn</middle_understand> lying")


def test_format_strict_rejects_repeated_and_nested_tags():
    # the released regex's lazy .*? spans a repeat or a nested tag: a policy could learn to repeat
    assert T.format_reward(None, [DOUBLED, NESTED]) == [0.0, 0.0]
    assert T.make_format_reward()(None, [DOUBLED, NESTED]) == [0.0, 0.0]
    assert T.make_format_reward("released")(None, [DOUBLED, NESTED]) == [1.0, 1.0]
    repeated_section = GOOD.replace("</final_image>", "</final_image>\n<final_image></final_image>")
    assert T.format_reward(None, [repeated_section]) == [0.0]


def test_config_chooses_the_format_mode():
    from realsr_r1.rewards.registry import build_rewards

    (strict,), _ = build_rewards({"format": 1.0})
    (released,), _ = build_rewards({"format": {"weight": 1.0, "mode": "released"}})
    assert strict(None, [DOUBLED]) == [0.0] and released(None, [DOUBLED]) == [1.0]
    assert strict.__name__ == released.__name__ == "format"


def test_make_format_reward_modes():
    assert T.make_format_reward().__name__ == T.make_format_reward("released").__name__ == "format"
    assert T.FACTORIES["format"] is T.make_format_reward
    with pytest.raises(ValueError, match="released"):
        T.make_format_reward("lenient")


def test_normalised_parse_does_not_raise_format():
    # what the VLM writes inside the tags is the content rewards' business: bullets keep format 1
    bullets = chain("- **blur**: medium\n- gaussian noise: heavy\n- jpeg: light\n- downsample: x4")
    assert T.format_reward(None, [bullets]) == [1.0]
    assert T.degradation_reward(None, [bullets], degradation=[TRUTH_DICTS]) == [1.0]
    # broken tags stay 0 in both modes even though the parser recovers the whole plan from them
    unclosed_paren = chain("blur: medium (sigma 1.8; noise: heavy; jpeg: light; downsample: x4")
    broken = [bullets.replace("</degradation>", ""), bullets.replace("<rough_image></rough_image>", ""),
              "- blur: medium\n" + bullets, unclosed_paren.replace("</final_image>", "</final_image")]
    for mode in ("strict", "released"):
        assert T.make_format_reward(mode)(None, broken) == [0.0] * len(broken)
    assert T.degradation_reward(None, broken, degradation=[TRUTH_DICTS] * len(broken)) == [1.0] * len(broken)


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_completions(name):
    completion, fmt, deg, und = MALFORMED[name]
    assert T.format_reward(None, [completion]) == [fmt]
    d = T.degradation_reward(None, [completion], degradation=[TRUTH_DICTS])[0]
    dp = T.make_degradation_reward(0.5)(None, [completion], degradation=[TRUTH_DICTS])[0]
    u = T.understanding_reward(None, [completion], tags=[TAGS4])[0]
    assert d == pytest.approx(deg) and u == pytest.approx(und)
    assert 0.0 <= d <= dp <= 1.0  # partial credit only ever adds


def test_degradation_paper_fraction_and_truth_forms():
    # three of four items right (jpeg said heavy, truth light); the paper's 3 of 5 is the same rule
    said = chain("blur: medium; noise: heavy; jpeg: heavy; downsample: x4")
    rendered = render_cot(TRUTH).split("</degradation>")[0].removeprefix("<degradation>")
    truths = [TRUTH_DICTS, rendered, TRUTH, "medium blur, heavy noise, light compression, downsample x4"]
    assert T.degradation_reward(None, [said] * 4, degradation=truths, **TRL_EXTRAS) == [0.75] * 4
    five_of_five = chain("heavy noise, medium blur, downsampled x4, light jpeg")
    assert T.degradation_reward(None, [five_of_five, GOOD], degradation=[TRUTH_DICTS, rendered]) == [1.0, 1.0]
    # two of three when the completion omits a type: silence is not "none"
    truth3 = [{"type": "blur", "level": "none"}, {"type": "noise", "level": "heavy"}, {"type": "jpeg", "level": "none"}]
    assert T.degradation_reward(None, [chain("noise: heavy; jpeg: none")], degradation=[truth3]) == [pytest.approx(2 / 3)]
    assert T.degradation_reward(None, [GOOD] * 3, degradation=[[], "", None]) == [None, None, None]


def test_degradation_partial_credit():
    said = chain("blur: light; noise: medium; jpeg: none; downsample: x2")  # 1, 1, 1 level off; x2 ≠ x4
    assert T.degradation_reward(None, [said], degradation=[TRUTH_DICTS]) == [0.0]
    half = T.make_degradation_reward(0.5)
    assert half.__name__ == "degradation"
    assert half(None, [said], degradation=[TRUTH_DICTS]) == [pytest.approx(1.5 / 4)]
    two_off = chain("blur: none; noise: light; jpeg: heavy; downsample: x4")  # 2, 2, 2 off; x4 right
    assert half(None, [two_off], degradation=[TRUTH_DICTS]) == [0.25]
    assert T.make_degradation_reward(1.0)(None, [said], degradation=[TRUTH_DICTS]) == [0.75]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            T.make_degradation_reward(bad)


def test_understanding_paper_fraction_and_sections():
    assert T.understanding_reward(None, [GOOD], tags=[TAGS4], **TRL_EXTRAS) == [0.75]
    # tags count only inside the three understanding sections
    elsewhere = "sky " + render_cot("noise: heavy sky", {"rough": "a dog"}, {"final": "sky"})
    assert T.understanding_reward(None, [elsewhere], tags=[TAGS4]) == [0.25]
    assert T.understanding_reward(None, [GOOD] * 3, tags=[[], None, ["", "  "]]) == [None] * 3
    dup = ["Dog", "dog", " DOG ", "sky"]  # one tag listed three ways counts once
    assert T.understanding_reward(None, [GOOD], tags=[dup]) == [0.5]


@pytest.mark.parametrize("tag, said, hit", [
    ("cat", "a category of things", False), ("cat", "a cat's toy", True), ("cat", "two cats", True),
    ("dog", "DOGS", True), ("dogs", "one dog", True), ("box", "boxes", True), ("boxes", "a box", True),
    ("berry", "red berries", True), ("berries", "a berry", True), ("glass", "glasses", True),
    ("red car", "two red\n cars", True), ("red car", "a red sports car", False), ("car", "carpet", False),
    ("car", "scar", False), ("t-shirt", "a t-shirt.", True), ("c++", "c++ code", True), ("sky", "skyline", False),
])
def test_tag_matching(tag, said, hit):
    completion = render_cot("", {"middle": said})
    assert T.understanding_reward(None, [completion], tags=[[tag]]) == [1.0 if hit else 0.0]


def test_conversational_and_string_give_same_rewards():
    texts = [GOOD, CANONICAL, MALFORMED["truncated"][0], ""]
    n = len(texts)
    for as_conv in (lambda t: conv(t), lambda t: conv(t, parts=True)):
        convs = [as_conv(t) for t in texts]
        assert T.format_reward(None, convs) == T.format_reward(None, texts) == [1.0, 1.0, 0.0, 0.0]
        for fn, col in ((T.degradation_reward, {"degradation": [TRUTH_DICTS] * n}),
                        (T.understanding_reward, {"tags": [TAGS4] * n})):
            assert fn(None, convs, **col) == fn(None, texts, **col)


def test_columns_checked_and_registry_names():
    with pytest.raises(ValueError, match="degradation"):
        T.degradation_reward(None, [GOOD])
    with pytest.raises(ValueError, match="tags"):
        T.understanding_reward(None, [GOOD, GOOD], tags=[TAGS4])
    assert set(T.TEXT_REWARDS) == {"format", "degradation", "understanding"}
    assert T.make_understanding_reward().__name__ == "understanding"


class FakeEncoder:
    """Bag of keywords → vector; counts encode calls."""

    WORDS = ("dog", "grass", "cat", "sofa")

    def __init__(self):
        self.calls = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return np.array([[t.count(w) for w in self.WORDS] + [0.0 if "dark" in t else 0.1] for t in texts])


def test_similarity_blend_with_fake_encoder():
    enc = FakeEncoder()
    fn = T.make_understanding_reward(None, weight=0.25, encoder=enc)
    und = render_cot("", {"rough": "dog", "middle": "grass"})  # understanding text "dog grass" → (1,1,0,0,.1)
    caps = ["dog", "cat", "dog", "anything"]
    out = fn(None, [und, und, und, ""], tags=[["dog", "cat"], ["dog", "cat"], None, ["dog"]], caption=caps)
    cos_dog = 1.01 / np.sqrt(2.01 * 1.01)  # (1,1,0,0,.1)·(1,0,0,0,.1)
    cos_cat = 0.01 / np.sqrt(2.01 * 1.01)
    assert out == pytest.approx([0.75 * 0.5 + 0.25 * cos_dog, 0.75 * 0.5 + 0.25 * cos_cat, cos_dog, 0.0])
    assert len(enc.calls) == 1 and len(enc.calls[0]) == 6  # three asked rows, one batched call
    # no caption column: the tag fraction alone; no tags column but captions: similarity alone
    assert fn(None, [und], tags=[["dog", "cat"]]) == [0.5]
    assert fn(None, [und], caption=["dog"]) == [pytest.approx(cos_dog)]


def test_similarity_clipped_to_unit_range():
    class Opposite:
        def encode(self, texts):
            return np.array([[1.0, 0.0] if i < len(texts) // 2 else [-1.0, 0.0] for i in range(len(texts))])

    fn = T.make_understanding_reward("unused", weight=1.0, encoder=Opposite())
    assert fn(None, [GOOD], tags=[["dog"]], caption=["dog"]) == [0.0]
    with pytest.raises(ValueError):
        T.make_understanding_reward(None, weight=1.5)


def test_similarity_model_loads_when_built_and_is_cached(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    with pytest.raises(ImportError, match="sentence-transformers"):
        T.make_understanding_reward("some/model")
    loaded = []

    class FakeST(FakeEncoder):
        def __init__(self, path):
            super().__init__()
            loaded.append(path)

    monkeypatch.setitem(sys.modules, "sentence_transformers", types.SimpleNamespace(SentenceTransformer=FakeST))
    T._load_encoder.cache_clear()
    try:
        fn = T.make_understanding_reward("some/model")
        assert loaded == ["some/model"]  # built with the reward, before any trainer config (ZeRO-3)
        T.make_understanding_reward("some/model")
        for _ in range(2):
            assert fn(None, [GOOD], tags=[["dog"]], caption=["dog"])[0] > 0.5
        assert loaded == ["some/model"]  # once
    finally:
        T._load_encoder.cache_clear()


@pytest.mark.parametrize("f, q_lr, q_sr, expected", [
    (1.0, 2.0, 4.0, 4.0),                        # 2 + 1·2
    (0.5, 3.5, 4.5, 1.75 + 0.5 ** 0.5),          # 1.75 + 0.5^0.5·1 ≈ 2.4571
    (0.25, 1.0, 5.0, 0.25 + 4 * 0.25 ** (1 / 7)),  # ≈ 3.5313: poor input, quality gain kept
    (0.0, 3.0, 5.0, 0.0),                        # 0^positive = 0
    (1.0, 5.0, 1.0, 1.0),                        # 5 − 4
    (1.7, 0.0, 9.0, 5.0),                        # clipped to F=1, Q_LR=1, Q_SR=5: 1 + 4
    (-0.3, 6.0, -2.0, 0.0),                      # clipped to F=0
    (0.5, 6.0, 5.0, 2.5),                        # clipped to Q_LR=5: 2.5 + 0
])
def test_compass_known_values(f, q_lr, q_sr, expected):
    assert T.compass_reward_value(f, q_lr, q_sr) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_compass_gamma_and_range():
    assert T.compass_reward_value(0.5, 3.5, 4.5) == pytest.approx(2.4571, abs=1e-4)
    assert T.compass_reward_value(0.5, 3.5, 4.5, gamma=3.5) == pytest.approx(1.75 + 0.5)  # exponent 1
    for g in (0.0, -7.0, float("nan")):
        with pytest.raises(ValueError):
            T.compass_reward_value(0.5, 3.0, 4.0, gamma=g)
    with pytest.raises(ValueError):
        T.compass_reward_value(float("nan"), 3.0, 4.0)
    grid = np.linspace(-0.2, 1.2, 29), np.linspace(0.5, 5.5, 21), np.linspace(0.5, 5.5, 21)
    values = [T.compass_reward_value(f, a, b) for f in grid[0] for a in grid[1] for b in grid[2]]
    assert -0.46 < min(values) < -0.4 and max(values) == pytest.approx(5.0)  # inside [−4, 9]
