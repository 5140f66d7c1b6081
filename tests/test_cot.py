"""The VLCoT contract: rendering, tolerant parsing, levels, prompts."""

import random

import pytest

from realsr_r1.cot import (
    FORMAT_MODES,
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


# --- What VLMs really write -------------------------------------------------------------------------
def md(raw):
    return f"markdown removed from degradation item {raw!r}"


def typ(phrase, kind):
    return f"degradation type {phrase!r} read as {kind!r}"


def lvl(words, level):
    return f"level {words!r} read as {level!r}"


def rng(words, level):
    return f"level range {words!r} read as {level!r} (the heavier)"


def unclosed(raw):
    return f"unclosed '(' in degradation item {raw!r}"


# body of <degradation> -> (items as (type, level) or (type, level, params), problems, in order)
VLM_WRITES = [
    ("- blur: medium\n- noise: light", [("blur", "medium"), ("noise", "light")],
     [md("- blur: medium"), md("- noise: light")]),
    ("* blur: medium\n* noise: heavy", [("blur", "medium"), ("noise", "heavy")],
     [md("* blur: medium"), md("* noise: heavy")]),
    ("• jpeg: light", [("jpeg", "light")], [md("• jpeg: light")]),
    ("+ downsample: x2", [("downsample", "x2")], [md("+ downsample: x2")]),
    ("1. noise: light\n2. blur: heavy", [("noise", "light"), ("blur", "heavy")],
     [md("1. noise: light"), md("2. blur: heavy")]),
    ("1) noise: light; 2) downsample: x4", [("noise", "light"), ("downsample", "x4")],
     [md("1) noise: light"), md("2) downsample: x4")]),
    ("**blur**: medium; **noise**: light", [("blur", "medium"), ("noise", "light")],
     [md("**blur**: medium"), md("**noise**: light")]),
    ("**Blur:** Medium", [("blur", "medium")], [md("**Blur:** Medium")]),
    ("blur: **heavy**", [("blur", "heavy")], [md("blur: **heavy**")]),
    ("*blur*: light", [("blur", "light")], [md("*blur*: light")]),
    ("_noise_: medium", [("noise", "medium")], [md("_noise_: medium")]),
    ("`jpeg`: light", [("jpeg", "light")], [md("`jpeg`: light")]),
    ("jpeg artifacts: heavy", [("jpeg", "heavy")], [typ("jpeg artifacts", "jpeg")]),
    ("jpeg compression: light", [("jpeg", "light")], [typ("jpeg compression", "jpeg")]),
    ("gaussian noise: light", [("noise", "light")], [typ("gaussian noise", "noise")]),
    ("Gaussian Blur: medium", [("blur", "medium")], [typ("gaussian blur", "blur")]),
    ("motion blur: heavy", [("blur", "heavy")], [typ("motion blur", "blur")]),
    ("compression artifacts: medium", [("jpeg", "medium")], [typ("compression artifacts", "jpeg")]),
    ("sensor noise: light", [("noise", "light")], [typ("sensor noise", "noise")]),
    ("blur level: light", [("blur", "light")], [typ("blur level", "blur")]),
    ("out of focus: light", [("blur", "light")], []),  # a fixed phrase is a synonym
    ("low resolution: x2", [("downsample", "x2")], []),
    ("downsampling: x4; downscale: 4x", [("downsample", "x4")],
     ["repeated degradation type 'downsample' (kept the first)"]),
    ("blur: medium-heavy", [("blur", "heavy")], [rng("medium-heavy", "heavy")]),
    ("noise: heavy-medium", [("noise", "heavy")], [rng("heavy-medium", "heavy")]),  # order-free
    ("noise: light to medium", [("noise", "medium")], [rng("light to medium", "medium")]),
    ("jpeg: light/moderate", [("jpeg", "medium")], [rng("light/moderate", "medium")]),
    ("blur: none–light", [("blur", "light")], [rng("none–light", "light")]),
    ("blur: very heavy", [("blur", "heavy")], [lvl("very heavy", "heavy")]),
    ("noise: medium level", [("noise", "medium")], [lvl("medium level", "medium")]),
    ("blur: medium (sigma 1.8; noise: heavy; jpeg: light",
     [("blur", "medium", {"sigma": 1.8}), ("noise", "heavy"), ("jpeg", "light")],
     [unclosed("blur: medium (sigma 1.8")]),
    ("blur: medium (sigma 1.8\nnoise: heavy", [("blur", "medium", {"sigma": 1.8}), ("noise", "heavy")],
     [unclosed("blur: medium (sigma 1.8")]),
    ("blur: medium (sigma 1.8, noise: heavy, jpeg: light",
     [("blur", "medium", {"sigma": 1.8}), ("noise", "heavy"), ("jpeg", "light")],
     [unclosed("blur: medium (sigma 1.8")]),
    ("blur: medium (sigma 1.8, size 7, noise: heavy",
     [("blur", "medium", {"sigma": 1.8, "size": 7.0}), ("noise", "heavy")],
     [unclosed("blur: medium (sigma 1.8, size 7")]),
    ("noise: light; blur: heavy (sigma 2.5", [("noise", "light"), ("blur", "heavy", {"sigma": 2.5})],
     [unclosed("blur: heavy (sigma 2.5")]),  # truncated inside the numbers
    ("noise: light.\nBlur: None", [("noise", "light"), ("blur", "none")], []),
    ("- **JPEG artifacts**: medium-heavy", [("jpeg", "heavy")],
     [md("- **JPEG artifacts**: medium-heavy"), typ("jpeg artifacts", "jpeg"), rng("medium-heavy", "heavy")]),
    ("- heavy gaussian noise", [("noise", "heavy")], [md("- heavy gaussian noise"), typ("gaussian noise", "noise")]),
    ("- rain: heavy\n- blur: light", [("blur", "light")],
     ["unknown degradation item '- rain: heavy'", md("- blur: light")]),
    ("-\n---\n- blur: light\n**", [("blur", "light")], [md("- blur: light")]),  # markdown-only lines
    ("blur: extreme-heavy", [], ["unknown level in degradation item 'blur: extreme-heavy'"]),
    ("blur noise: medium", [], ["unknown degradation item 'blur noise: medium'"]),  # two types
    ("gaussian: medium", [], ["unknown degradation item 'gaussian: medium'"]),  # no type
    ("1.5x downsample", [("downsample", "x1.5")], []),  # a factor is not numbering
    ("Blur - Medium; noise – light", [("blur", "medium"), ("noise", "light")], []),
    ("1. **Blur**: Medium (sigma 1.6)\n2. **Noise**: light-medium\n3. **JPEG compression**: none\n"
     "4. **Downsampling**: 4x",
     [("blur", "medium", {"sigma": 1.6}), ("noise", "medium"), ("jpeg", "none"), ("downsample", "x4")],
     [md("1. **Blur**: Medium (sigma 1.6)"), md("2. **Noise**: light-medium"), rng("light-medium", "medium"),
      md("3. **JPEG compression**: none"), typ("jpeg compression", "jpeg"), md("4. **Downsampling**: 4x")]),
]


def _items(plan):
    return [(i.type, i.level, i.params) if i.params else (i.type, i.level) for i in plan.degradation]


@pytest.mark.parametrize("body, items, problems", VLM_WRITES, ids=[repr(b[:40]) for b, _, _ in VLM_WRITES])
def test_parse_what_vlms_write(body, items, problems):
    plan = parse_cot(render_cot(body))
    assert _items(plan) == items
    expected = problems if items else problems + ["no degradation item recognised"]
    assert plan.problems == expected
    assert parse_degradation(body) == (plan.degradation, problems)


def test_vlm_table_is_large_enough():
    assert len(VLM_WRITES) >= 30


def test_normalised_noise_reaches_the_plan():
    # what the restorer's noise_level reads: the stated level, not the default
    plan = parse_cot(render_cot("- **Gaussian noise**: medium-heavy\n- blur: light"))
    assert plan.level("noise") == "heavy" and plan.level("blur") == "light"


def test_parse_never_raises_on_random_fragments():
    rng_ = random.Random(1)
    pieces = ["<degradation>", "</degradation>", "<rough_understand>", "</final_image>", "(", ")", ";", ",",
              "\n", "- ", "1. ", "**", "_", "`", "blur", "noise", ": ", "medium", "-heavy", " to ", "x4", "4x",
              "sigma 1.8", "gaussian", "jpeg artifacts", "<", ">", "/", "×", "–", ".", "  "]
    for _ in range(500):
        text = "".join(rng_.choice(pieces) for _ in range(rng_.randint(0, 40)))
        plan = parse_cot(text)
        assert isinstance(plan, Plan) and all(isinstance(p, str) for p in plan.problems)
        assert all(i.type in ("blur", "noise", "jpeg", "downsample") for i in plan.degradation)


def test_matches_format_modes():
    good = FULL.render()
    repeated = good.replace("</degradation>", "</degradation>\n<degradation>noise: light</degradation>", 1)
    nested = good.replace("a dog lying on grass", "a dog <middle_understand>x</middle_understand> on grass")
    lookalike = good.replace("a dog lying on grass", "a dog < / rough_image > on grass")
    for mode in FORMAT_MODES:
        assert matches_format(good, mode) and matches_format(good.replace("\n", " \n "), mode)
        assert not matches_format(good.replace("<middle_image></middle_image>", ""), mode)
    assert matches_format(good)  # strict is the default
    for text in (repeated, nested, lookalike):
        assert not matches_format(text) and not matches_format(text, "strict")
        assert matches_format(text, "released")  # the released regex's lazy .*? spans them
    with pytest.raises(ValueError, match="strict"):
        matches_format(good, "lenient")


# Degradation items written as sentences: full stops between items, one item per line without
# bullets, any letter case. The parser reads them; the format reward stays strict.
SENTENCES = [
    ("Noise: HEAVY. Blur: None.", [("noise", "heavy"), ("blur", "none")], []),
    ("noise: light. blur: medium. jpeg: none. downsample: x4.",
     [("noise", "light"), ("blur", "medium"), ("jpeg", "none"), ("downsample", "x4")], []),
    ("NOISE: MEDIUM\nBLUR: LIGHT\nJPEG: NONE", [("noise", "medium"), ("blur", "light"), ("jpeg", "none")], []),
    ("Blur: Light.\nNoise: Medium.\n", [("blur", "light"), ("noise", "medium")], []),
    ("Noise: heavy (sigma 25.3). Blur: light (sigma 0.8).",
     [("noise", "heavy", {"sigma": 25.3}), ("blur", "light", {"sigma": 0.8})], []),
    ("Downsample: X4. Noise: None.", [("downsample", "x4"), ("noise", "none")], []),
    ("downsample: x2.5. noise: none", [("downsample", "x2.5"), ("noise", "none")], []),  # a decimal is no stop
    ("JPEG: Medium. JPEG: Light.", [("jpeg", "medium")], ["repeated degradation type 'jpeg' (kept the first)"]),
    ("Noise: Heavy.Blur: none", [("noise", "heavy"), ("blur", "none")], []),
    ("noise:heavy.blur:none", [("noise", "heavy"), ("blur", "none")], []),
    ("Noise: Heavy; Blur: None.", [("noise", "heavy"), ("blur", "none")], []),
    ("Noise - Heavy. Blur - Light.", [("noise", "heavy"), ("blur", "light")], []),
    ("Noise: heavy.\n\nBlur: light.", [("noise", "heavy"), ("blur", "light")], []),
    ("Noise: Moderate. Blur: Slight.", [("noise", "medium"), ("blur", "light")], []),
    ("Blur: None. Noise: None. JPEG: None. Downsample: x2.",
     [("blur", "none"), ("noise", "none"), ("jpeg", "none"), ("downsample", "x2")], []),
    ("Noise: Light To Medium.", [("noise", "medium")], [rng("light to medium", "medium")]),
    ("Noise: Heavy! Blur: None", [("noise", "heavy"), ("blur", "none")], []),
    ("Noise: Heavy? Blur: None", [("noise", "heavy"), ("blur", "none")], []),
    ("JPEG Compression: High. Gaussian Noise: Low.", [("jpeg", "heavy"), ("noise", "light")],
     [typ("jpeg compression", "jpeg"), typ("gaussian noise", "noise")]),
    ("Downsample: 4X.", [("downsample", "x4")], []),
    ("Blur: medium (sigma 1.5).Noise: light", [("blur", "medium", {"sigma": 1.5}), ("noise", "light")], []),
    ("The noise is heavy. The blur is light.", [("noise", "heavy"), ("blur", "light")], []),
    ("Heavy noise. Light blur.", [("noise", "heavy"), ("blur", "light")], []),
    ("Noise: HEAVY\r\nBlur: NONE", [("noise", "heavy"), ("blur", "none")], []),
    ("1. Noise: heavy. 2. Blur: light.", [("noise", "heavy"), ("blur", "light")],
     [md("1. Noise: heavy"), md("2. Blur: light.")]),
    ("**Noise**: Heavy. **Blur**: None.", [("noise", "heavy"), ("blur", "none")],
     [md("**Noise**: Heavy"), md("**Blur**: None.")]),
    ("Noise: heavy. Rain: heavy.", [("noise", "heavy")], ["unknown degradation item 'Rain: heavy.'"]),
]


@pytest.mark.parametrize("body, items, problems", SENTENCES, ids=[repr(b[:40]) for b, _, _ in SENTENCES])
def test_parse_items_written_as_sentences(body, items, problems):
    plan = parse_cot(render_cot(body))
    assert _items(plan) == items and plan.problems == problems
    assert parse_degradation(body) == (plan.degradation, problems)


def test_sentence_forms_are_many_and_the_format_reward_stays_strict():
    assert len(SENTENCES) >= 20
    sentences = render_cot("Noise: HEAVY. Blur: None.")
    assert parse_cot(sentences).degradation and matches_format(sentences)  # the tags are what it checks
    assert not matches_format(sentences.replace("</degradation>", ""))
