"""The VLCoT contract: rendering, tolerant parsing, levels, prompts."""

import random

import pytest

from realsr_r1.cot import (
    LEVELS,
    STAGES,
    TAGS,
    DegradationItem,
    Plan,
    build_messages,
    level_distance,
    level_for,
    matches_format,
    parse_cot,
    parse_degradation,
    render_cot,
)

FULL = Plan(
    degradation=[
        DegradationItem("blur", "medium", {"sigma": 1.8}),
        DegradationItem("noise", "heavy"),
        DegradationItem("jpeg", "light", {"quality": 80}),
        DegradationItem("downsample", "x4"),
    ],
    understanding={"rough": "a dog lying on grass", "middle": "a brown dog on a lawn, a fence behind",
                   "final": "fur texture, grass blades"},
)


def test_render_is_the_contract_text():
    text = FULL.render()
    assert text.splitlines() == [
        "<degradation>blur: medium (sigma 1.8); noise: heavy; jpeg: light (quality 80); downsample: x4</degradation>",
        "<rough_understand>a dog lying on grass</rough_understand>",
        "<rough_image></rough_image>",
        "<middle_understand>a brown dog on a lawn, a fence behind</middle_understand>",
        "<middle_image></middle_image>",
        "<final_understand>fur texture, grass blades</final_understand>",
        "<final_image></final_image>",
    ]
    assert matches_format(text)


def test_round_trip_random_plans():
    rng = random.Random(0)
    for _ in range(200):
        items = []
        for kind in rng.sample(["blur", "noise", "jpeg", "downsample"], rng.randint(0, 4)):
            level = f"x{rng.choice([2, 3, 4, 8])}" if kind == "downsample" else rng.choice(LEVELS)
            params = {"sigma": round(rng.uniform(0, 30), 2)} if rng.random() < 0.5 else {}
            items.append(DegradationItem(kind, level, params))
        plan = Plan(items, {s: rng.choice(["", "a cat", "red roof, blue sky"]) for s in STAGES},
                    {s: rng.choice(["", "64x64"]) for s in STAGES})
        parsed = parse_cot(plan.render())
        assert parsed.degradation == plan.degradation
        assert parsed.understanding == plan.understanding
        assert parsed.images == plan.images
        assert parsed.render() == plan.render()
        expected_problems = [] if items else ["no degradation item recognised"]
        assert parsed.problems == expected_problems


def test_plan_dict_round_trip():
    assert Plan.from_dict(FULL.to_dict()) == FULL


@pytest.mark.parametrize(
    "text",
    ["", None, "   ", "<degradation>", "<degradation>blur: med", "</final_image>", "<<<>>>", "\x00\xff",
     "<degradation>blur: heavy</degradation><rough_understand>cat", "<final_image><degradation></final_image>",
     "<degradation>" * 50, "<rough_understand><rough_understand>x</rough_understand></rough_understand>",
     "<DEGRADATION>BLUR: HEAVY</degradation>", "random words with no tags at all", 12345],
)
def test_parse_never_raises_and_reports(text):
    plan = parse_cot(text)
    assert isinstance(plan, Plan)
    assert set(plan.understanding) == set(STAGES)
    assert plan.problems, "a broken chain must say what was wrong"


def test_truncated_mid_tag_keeps_what_was_said():
    text = FULL.render()[:-len("</final_understand>\n<final_image></final_image>") - 3]
    plan = parse_cot(text)
    assert plan.level("blur") == "medium"
    assert plan.understanding["middle"] == "a brown dog on a lawn, a fence behind"
    assert plan.understanding["final"] == "fur texture, grass bla"
    assert any("not closed" in p for p in plan.problems)
    assert any("<final_image>" in p and "missing" in p for p in plan.problems)


def test_truncated_inside_a_tag_name_is_not_content():
    plan = parse_cot("<degradation>noise: light</degradation><rough_understand>a cat</rough_und")
    assert plan.understanding["rough"] == "a cat"


def test_out_of_order_repeated_nested_and_stray_text():
    text = ("thinking... <rough_understand>sky</rough_understand><degradation>noise: light</degradation>"
            "<degradation>noise: heavy</degradation><middle_understand>a <b>bold</b> tree"
            "</rough_understand> more</middle_understand>")
    plan = parse_cot(text)
    assert plan.level("noise") == "light"  # first one kept
    assert plan.understanding["rough"] == "sky"
    assert plan.understanding["middle"] == "a <b>bold</b> tree more"  # unknown tags are content
    joined = " | ".join(plan.problems)
    for fragment in ("out of order", "repeated <degradation>", "inside <middle_understand>", "outside the tags"):
        assert fragment in joined
    assert not matches_format(text)


def test_case_and_whitespace_tolerance():
    plan = parse_cot("  < Degradation >  Noise :  Heavy ;BLUR: light </DEGRADATION >\n\n"
                     + "\n".join(f"<{t}></{t}>" for t in TAGS[1:]))
    assert plan.level("noise") == "heavy" and plan.level("blur") == "light"
    assert plan.problems == []


def test_degradation_free_form_and_unknown_items():
    items, problems = parse_degradation("medium blur, downsample x4, heavy noise, light compression, rain: heavy")
    assert [(i.type, i.level) for i in items] == [("blur", "medium"), ("downsample", "x4"), ("noise", "heavy"),
                                                  ("jpeg", "light")]
    assert problems == ["unknown degradation item 'rain: heavy'"]
    items, problems = parse_degradation("blur: medium (sigma=1.8, size 7); downsample: 2x; noise: extreme")
    assert items[0].params == {"sigma": 1.8, "size": 7.0}
    assert items[1].factor == 2.0
    assert problems == ["unknown level in degradation item 'noise: extreme'"]


def test_plan_defaults():
    plan = parse_cot("")
    assert plan.level("noise") == "none"
    assert plan.downsample_factor() == 4.0
    assert parse_cot("<degradation>downsample: x2</degradation>").downsample_factor() == 2.0


@pytest.mark.parametrize("kind,value,level", [
    ("noise", 0.0, "none"), ("noise", 1.99, "none"), ("noise", 2.0, "light"), ("noise", 10, "medium"),
    ("noise", 18, "heavy"), ("blur", 0.5, "none"), ("blur", 0.69, "none"), ("blur", 1.0, "light"), ("blur", 1.5, "medium"),
    ("blur", 3, "heavy"), ("jpeg", None, "none"), ("jpeg", 95, "none"), ("jpeg", 80, "light"),
    ("jpeg", 60, "medium"), ("jpeg", 30, "heavy"), ("downsample", 4, "x4"), ("downsample", 1, "none"),
])
def test_level_for(kind, value, level):
    assert level_for(kind, value) == level


def test_level_for_rejects_unknown_type_and_distance():
    with pytest.raises(ValueError):
        level_for("rain", 3)
    assert level_distance("none", "heavy") == 3
    assert level_distance("x4", "light") is None


def test_format_pattern_needs_every_tag_in_order():
    good = FULL.render()
    assert matches_format(good.replace("\n", "  "))
    assert not matches_format(good.replace("<middle_image></middle_image>", ""))
    assert not matches_format("preamble " + good)


def test_messages_carry_image_and_prompt():
    msgs = build_messages("IMG")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1]["content"][0] == {"type": "image", "image": "IMG"}
    assert all(f"<{t}>" in msgs[1]["content"][1]["text"] for t in TAGS)
