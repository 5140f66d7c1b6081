"""The VLCoT contract: the tagged chain of thought every part of realsr-r1 speaks.

A chain looks like::

    <degradation>blur: medium; noise: heavy; jpeg: light; downsample: x4</degradation>
    <rough_understand>a dog lying on grass</rough_understand>
    <rough_image></rough_image>
    <middle_understand>a brown short-haired dog on a green lawn</middle_understand>
    <middle_image></middle_image>
    <final_understand>fur texture, individual grass blades</final_understand>
    <final_image></final_image>

Tag names and order follow the released RealSR-R1 code so its format reward applies unchanged.
This module renders and parses that text. Parsing is total: any string gives a `Plan` plus a list
of what was wrong with it, because a policy in training emits broken output all the time.
It imports nothing else of the project.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

STAGES = ("rough", "middle", "final")
TAGS = (
    "degradation",
    "rough_understand",
    "rough_image",
    "middle_understand",
    "middle_image",
    "final_understand",
    "final_image",
)
DEGRADATION_TYPES = ("blur", "noise", "jpeg", "downsample")
LEVELS = ("none", "light", "medium", "heavy")

# --- Levels -------------------------------------------------------------------------------------
# Upper bounds (exclusive) of none / light / medium on the physical quantity each type is measured
# in, as seen in the low-quality image itself: noise = Gaussian sigma on the 0-255 scale, blur =
# sigma in LQ pixels of the Gaussian with the same spread as the blur. JPEG goes by quality
# (higher = milder). One table serves the synthesiser's labels, the analyser and the rewards, so
# "medium" means the same thing everywhere.
NOISE_SIGMA_BOUNDS = (2.0, 8.0, 18.0)
BLUR_SIGMA_BOUNDS = (0.7, 1.2, 2.0)
JPEG_QUALITY_BOUNDS = (95, 75, 50)  # q >= 95 none, >= 75 light, >= 50 medium, else heavy


def level_for(kind: str, value: float | None) -> str:
    """Map a measured quantity to a level of the fixed vocabulary.

    `value` is None when the degradation is absent (e.g. no JPEG compression found): 'none'.
    For `downsample` the value is the factor and the level is written `x<factor>`.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none"
    if kind == "jpeg":
        for level, bound in zip(LEVELS, JPEG_QUALITY_BOUNDS):
            if value >= bound:
                return level
        return "heavy"
    if kind == "downsample":
        return "none" if value <= 1 else f"x{_num(value)}"
    bounds = {"noise": NOISE_SIGMA_BOUNDS, "blur": BLUR_SIGMA_BOUNDS}.get(kind)
    if bounds is None:
        raise ValueError(f"unknown degradation type {kind!r}; expected one of {DEGRADATION_TYPES}")
    for level, bound in zip(LEVELS, bounds):
        if value < bound:
            return level
    return "heavy"


def level_distance(a: str, b: str) -> int | None:
    """Steps between two levels of the ordered vocabulary (None if either is not an ordered level)."""
    if a in LEVELS and b in LEVELS:
        return abs(LEVELS.index(a) - LEVELS.index(b))
    return None


def _num(v: float) -> str:
    """Short, stable number text: 1.8, 4, 0.35."""
    return format(round(float(v), 2), "g")


# --- Degradation items ----------------------------------------------------------------------------
@dataclass
class DegradationItem:
    """One `type: level (name value, …)` entry of the <degradation> tag.

    `level` is one of LEVELS, or for downsample `none` / `x<factor>`. `params` holds optional
    measured numbers (sigma, quality, …), rounded to 2 decimals so text round-trips.
    """

    type: str
    level: str
    params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params = {str(k): round(float(v), 2) for k, v in self.params.items()}

    @property
    def factor(self) -> float | None:
        """The downsampling factor for `downsample: x4` (1.0 for none; None for other types)."""
        if self.type != "downsample":
            return None
        return 1.0 if self.level == "none" else float(self.level[1:])

    def render(self) -> str:
        text = f"{self.type}: {self.level}"
        if self.params:
            text += " (" + ", ".join(f"{k} {_num(v)}" for k, v in self.params.items()) + ")"
        return text

    def to_dict(self) -> dict:
        return {"type": self.type, "level": self.level, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict) -> "DegradationItem":
        return cls(d["type"], d["level"], dict(d.get("params") or {}))


# Words a policy (or the paper's free-form list: "medium blur, light compression") may use.
_TYPE_SYNONYMS = {
    "blur": "blur", "blurry": "blur", "blurred": "blur", "blurring": "blur", "defocus": "blur",
    "out-of-focus": "blur",
    "noise": "noise", "noisy": "noise", "grain": "noise", "grainy": "noise",
    "jpeg": "jpeg", "jpg": "jpeg", "compression": "jpeg", "compressed": "jpeg",
    "artifacts": "jpeg", "artefacts": "jpeg", "artifact": "jpeg", "artefact": "jpeg", "blocking": "jpeg",
    "downsample": "downsample", "downsampled": "downsample", "downsampling": "downsample",
    "downscale": "downsample", "downscaled": "downsample", "resize": "downsample",
    "low-resolution": "downsample", "lowres": "downsample", "scale": "downsample",
}
# Words that narrow a type without changing it ("gaussian noise", "motion blur", "blur level").
_TYPE_MODIFIERS = {"gaussian", "motion", "lens", "camera", "sensor", "shot", "color", "colour", "chroma",
                   "luminance", "image", "level", "amount", "degree", "strength", "factor"}
# Fixed phrases read as one word, hence as a plain synonym.
_TYPE_PHRASES = {"out of focus": "out-of-focus", "low resolution": "low-resolution"}
_LEVEL_SYNONYMS = {
    "none": "none", "no": "none", "clean": "none", "zero": "none",
    "light": "light", "slight": "light", "mild": "light", "low": "light", "weak": "light",
    "medium": "medium", "moderate": "medium", "mid": "medium",
    "heavy": "heavy", "severe": "heavy", "strong": "heavy", "high": "heavy",
}
# Words around a level that add nothing the four levels can say ("very heavy", "medium level").
_LEVEL_FILLERS = {"very", "quite", "fairly", "rather", "relatively", "somewhat", "level"}
# Words of an item written as a sentence ("The noise is heavy."), which say nothing of type or level
_SENTENCE_WORDS = {"the", "a", "an", "is", "are", "seems", "appears", "looks", "there"}
_LEVEL_RANGE = re.compile(r"\s*(?:-|–|—|/|\bto\b|\bor\b)\s*")
_FACTOR_RE = re.compile(r"^(?:x|×)\s*(\d+(?:\.\d+)?)$|^(\d+(?:\.\d+)?)\s*(?:x|×)$|^(\d+(?:\.\d+)?)$")
_PARAM_RE = re.compile(r"([a-z_]+)\s*[=:]?\s*(-?\d+(?:\.\d+)?)")
_PARAMS_AT_END = re.compile(r"\(([^()]*)(\)?)\s*$")
# What a comma inside an unclosed "(" continues: another number ("size 7"), not a new item.
_PARAM_NEXT = re.compile(r"\s*[a-z_]+\s*[=:]?\s*-?\d", re.IGNORECASE)
# A list marker (not "1.5x": numbering never runs into a digit), then emphasis and code marks.
_LIST_MARKER = re.compile(r"^\s*(?:[-+•–—]+|#+|\(?\d{1,2}[.)](?!\d))\s*")
_EMPHASIS = re.compile(r"\*+|`+|(?<!\w)_+|_+(?!\w)")


def _group_end(text: str, start: int) -> int:
    """End of the "(" group at `start`: after its ")", or, when a separator or another "(" comes
    first, before that separator (or before a comma that starts a new item), so an unclosed "("
    does not swallow the items after it."""
    stop = next((j for j in range(start + 1, len(text)) if text[j] in ");\n("), len(text))
    if stop < len(text) and text[stop] == ")":
        return stop + 1
    return next((j for j in range(start + 1, stop) if text[j] == "," and not _PARAM_NEXT.match(text, j + 1)),
                stop)


_NEXT_SENTENCE = re.compile(r"[ \t]*(?:[A-Za-z*_`]|\d{1,2}[.)]\s)")  # a word, markdown, or "2. " numbering


def _ends_sentence(text: str, i: int, cur: list[str]) -> bool:
    """A full stop (or ! ?) at `i` that ends an item written as a sentence ("Noise: heavy. Blur:
    none."): a letter follows (after any spaces), and the item so far has letters, so neither a
    decimal ("sigma 1.8") nor list numbering ("1. blur") splits."""
    decimal = 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
    return text[i] in ".!?" and not decimal and bool(_NEXT_SENTENCE.match(text, i + 1)) and any(c.isalpha() for c in cur)


def _split_items(text: str) -> list[str]:
    """Split on ; , newlines or full stops that end a sentence, outside parentheses (an unclosed
    one ends early)."""
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "(":
            end = _group_end(text, i)
            cur.append(text[i:end])
            i = end
            continue
        if ch in ";,\n" or _ends_sentence(text, i, cur):
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _strip_markdown(text: str) -> str:
    return _EMPHASIS.sub("", _LIST_MARKER.sub("", text, count=1)).strip()


def _read_type(words: list[str]) -> tuple[str | None, str | None]:
    """The one type the words name, allowing modifiers; (None, None) when not exactly one."""
    kinds = {_TYPE_SYNONYMS[w] for w in words if w in _TYPE_SYNONYMS}
    rest = [w for w in words if w not in _TYPE_SYNONYMS]
    if len(kinds) != 1 or any(w not in _TYPE_MODIFIERS for w in rest):
        return None, None
    kind = kinds.pop()
    return kind, (f"degradation type {' '.join(words)!r} read as {kind!r}" if len(words) > 1 else None)


def _one_level(words: str) -> str | None:
    kept = [w for w in words.split() if w not in _LEVEL_FILLERS]
    return _LEVEL_SYNONYMS.get(kept[0]) if len(kept) == 1 else None


def _read_level(kind: str, words: str) -> tuple[str | None, str | None]:
    """(level, note on how it was read) or (None, None)."""
    words = " ".join(words.split())
    if kind == "downsample":
        if _LEVEL_SYNONYMS.get(words) == "none":
            return "none", None
        m = _FACTOR_RE.match(words.replace(" ", ""))
        return (level_for("downsample", float(next(g for g in m.groups() if g))) if m else None), None
    if words in _LEVEL_SYNONYMS:
        return _LEVEL_SYNONYMS[words], None
    pieces = _LEVEL_RANGE.split(words)
    levels = [_one_level(p) for p in pieces]
    if None in levels:
        return None, None
    if len(levels) == 1:
        return levels[0], f"level {words!r} read as {levels[0]!r}"
    # A range reads as one level, the heavier: the same for "medium-heavy" and "heavy to medium",
    # and a hedge never earns the degradation reward for both of its levels.
    level = max(levels, key=LEVELS.index)
    return level, f"level range {words!r} read as {level!r} (the heavier)"


def _type_and_level_words(body: str) -> tuple[str | None, str | None, str]:
    """(type, note, level words) from "type: level" or free form ("medium blur", "downsample x4")."""
    for phrase, word in _TYPE_PHRASES.items():
        body = body.replace(phrase, word)
    if ":" in body:
        head, _, tail = body.partition(":")
        return (*_read_type(head.split()), tail)
    words = [w.strip(".,:=!-–—") for w in body.split()]  # "blur - medium": a dash between is no word
    words = [w for w in words if w and w not in _SENTENCE_WORDS]
    named = [w for w in words if w in _TYPE_SYNONYMS or w in _TYPE_MODIFIERS]
    kind, note = _read_type(named)
    return kind, note, " ".join(w for w in words if w not in named)


def parse_item(text: str) -> tuple[DegradationItem | None, list[str]]:
    """Parse one item: (item, notes on what was normalised) or (None, [the problem]).

    Markdown (bullets, numbering, bold), modifiers of a type, level ranges and an unclosed "(" are
    read and noted; an empty item (a markdown rule, a bare bullet) gives (None, [])."""
    raw = text.strip()
    notes: list[str] = []
    body = _strip_markdown(raw)
    if body != raw:
        notes.append(f"markdown removed from degradation item {raw!r}")
    body = body.lower().rstrip(".!").strip()
    if not any(ch.isalnum() for ch in body):
        return None, []
    params: dict[str, float] = {}
    m = _PARAMS_AT_END.search(body)
    if m:
        params = {k: float(v) for k, v in _PARAM_RE.findall(m.group(1))}
        body = body[: m.start()].strip()
        if not m.group(2):
            notes.append(f"unclosed '(' in degradation item {raw!r}")
    kind, type_note, level_words = _type_and_level_words(body)
    if kind is None:
        return None, [f"unknown degradation item {raw!r}"]
    level, level_note = _read_level(kind, level_words)
    if level is None:
        if kind == "downsample" and not level_words.strip():
            return None, [f"downsample item without a factor: {raw!r}"]
        return None, [f"unknown level in degradation item {raw!r}"]
    notes += [n for n in (type_note, level_note) if n]
    return DegradationItem(kind, level, params), notes


def parse_degradation(text: str) -> tuple[list[DegradationItem], list[str]]:
    """Parse the body of <degradation>. Unknown or repeated items are reported, not fatal."""
    items: list[DegradationItem] = []
    problems: list[str] = []
    for part in _split_items(text):
        item, notes = parse_item(part)
        if item is not None and any(i.type == item.type for i in items):
            problems.append(f"repeated degradation type {item.type!r} (kept the first)")
            continue
        problems.extend(notes)
        if item is not None:
            items.append(item)
    return items, problems


def render_degradation(items: list[DegradationItem]) -> str:
    return "; ".join(item.render() for item in items)


# --- The plan ---------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a chain of thought says, in a form the pipeline and the rewards can use."""

    degradation: list[DegradationItem] = field(default_factory=list)
    understanding: dict[str, str] = field(default_factory=lambda: {s: "" for s in STAGES})
    images: dict[str, str] = field(default_factory=lambda: {s: "" for s in STAGES})
    problems: list[str] = field(default_factory=list)

    def item(self, kind: str) -> DegradationItem | None:
        return next((i for i in self.degradation if i.type == kind), None)

    def level(self, kind: str, default: str = "none") -> str:
        item = self.item(kind)
        return item.level if item else default

    def downsample_factor(self, default: float = 4.0) -> float:
        item = self.item("downsample")
        return item.factor if item and item.factor else default

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        return render_cot(self.degradation, self.understanding, self.images)

    def to_dict(self) -> dict:
        return {
            "degradation": [i.to_dict() for i in self.degradation],
            "understanding": dict(self.understanding),
            "images": dict(self.images),
            "problems": list(self.problems),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(
            [DegradationItem.from_dict(i) for i in d.get("degradation", [])],
            {s: d.get("understanding", {}).get(s, "") for s in STAGES},
            {s: d.get("images", {}).get(s, "") for s in STAGES},
            list(d.get("problems", [])),
        )


def render_cot(
    degradation: list[DegradationItem] | str,
    understanding: dict[str, str] | None = None,
    images: dict[str, str] | None = None,
) -> str:
    """Render the canonical chain: one tag per line, in contract order."""
    understanding = understanding or {}
    images = images or {}
    deg = degradation if isinstance(degradation, str) else render_degradation(degradation)
    lines = [f"<degradation>{deg}</degradation>"]
    for stage in STAGES:
        lines.append(f"<{stage}_understand>{understanding.get(stage, '')}</{stage}_understand>")
        lines.append(f"<{stage}_image>{images.get(stage, '')}</{stage}_image>")
    return "\n".join(lines)


# Only our own tag names are structure; anything else in angle brackets is content.
_TAG_TOKEN = re.compile(r"<\s*(/?)\s*(" + "|".join(TAGS) + r")\s*>", re.IGNORECASE)
_PARTIAL_TAG_AT_END = re.compile(r"<\s*/?\s*[a-z_]*$", re.IGNORECASE)
# The full-match pattern of the released format reward: every tag, in order, nothing else.
FORMAT_PATTERN = re.compile(
    r"^\s*" + r"\s*".join(rf"<{t}>.*?</{t}>" for t in TAGS) + r"\s*$", re.DOTALL
)
FORMAT_MODES = ("strict", "released")


def matches_format(text: str, mode: str = "strict") -> bool:
    """True when `text` is the seven tags in contract order, whitespace between them allowed.

    `released` is the released code's regex, whose lazy `.*?` also spans a repeated or nested tag
    (`<degradation>…</degradation><degradation>…</degradation>` passes); `strict` also requires
    that no tag of ours (in any spelling the parser reads) occurs anywhere else, so a policy
    cannot learn to repeat sections."""
    if mode not in FORMAT_MODES:
        raise ValueError(f"format mode {mode!r}: expected one of {', '.join(FORMAT_MODES)}")
    text = text or ""
    if not FORMAT_PATTERN.match(text):
        return False
    return mode == "released" or len(_TAG_TOKEN.findall(text)) == 2 * len(TAGS)


def _scan_sections(text: str) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(tag, body) of every opened tag in text order, the text outside tags, and the problems.

    A tag that opens before the current one closed closes it; a stray closing tag inside a body is
    cut out of it; a tag name cut off by the end of the text is not content."""
    sections: list[tuple[str, str]] = []
    outside: list[str] = []
    problems: list[str] = []
    open_tag, body, pos = None, [], 0
    for tok in _TAG_TOKEN.finditer(text):
        is_close, name = tok.group(1) == "/", tok.group(2).lower()
        piece, pos = text[pos : tok.start()], tok.end()
        if open_tag is None:
            outside.append(piece)
            if is_close:
                problems.append(f"</{name}> without an opening tag")
            else:
                open_tag, body = name, []
            continue
        body.append(piece)
        if is_close and name == open_tag:
            sections.append((open_tag, "".join(body)))
            open_tag = None
        elif is_close:
            problems.append(f"</{name}> inside <{open_tag}> (tags nested or crossed)")
        else:
            problems.append(f"<{open_tag}> is not closed")
            sections.append((open_tag, "".join(body)))
            open_tag, body = name, []
    if open_tag is None:
        outside.append(_PARTIAL_TAG_AT_END.sub("", text[pos:]))
    else:
        problems.append(f"<{open_tag}> is not closed (text ends inside it)")
        sections.append((open_tag, _PARTIAL_TAG_AT_END.sub("", "".join(body) + text[pos:])))
    return sections, outside, problems


def _layout_problems(order: list[str], outside: list[str]) -> list[str]:
    """Stray text, missing tags and tags out of order, given the tags in order of appearance."""
    problems = []
    stray = " ".join(s.strip() for s in outside if s.strip())
    if stray:
        problems.append(f"text outside the tags: {stray[:60]!r}")
    missing = [t for t in TAGS if t not in order]
    if missing:
        problems.append("missing " + ", ".join(f"<{t}>" for t in missing))
    if order != [t for t in TAGS if t in order]:
        problems.append("tags out of order: " + " ".join(order))
    return problems


def parse_cot(text: str | None) -> Plan:
    """Parse any string into a Plan. Never raises; `plan.problems` says what was wrong."""
    sections, outside, problems = _scan_sections(text if isinstance(text, str) else "")
    contents: dict[str, str] = {}
    for name, body in sections:
        if name in contents:
            problems.append(f"repeated <{name}> (kept the first)")
        else:
            contents[name] = body.strip()
    problems += _layout_problems(list(contents), outside)
    items, deg_problems = parse_degradation(contents.get("degradation", ""))
    problems += deg_problems
    if "degradation" in contents and not items:
        problems.append("no degradation item recognised")
    return Plan(
        degradation=items,
        understanding={s: contents.get(f"{s}_understand", "") for s in STAGES},
        images={s: contents.get(f"{s}_image", "") for s in STAGES},
        problems=problems,
    )


# --- Prompts ----------------------------------------------------------------------------------------
SYSTEM_PROMPT = (
    "You are an expert in image restoration. Before restoring a low-quality image you reason about "
    "it in a fixed format."
)
USER_PROMPT = (
    "Perceive the degradation of this low-quality image, understand its content, and restore the "
    "high-quality image step by step from coarse to fine.\n"
    "Answer with exactly these tags, in this order:\n"
    "<degradation>blur: LEVEL; noise: LEVEL; jpeg: LEVEL; downsample: xFACTOR</degradation> where "
    "LEVEL is one of none, light, medium, heavy\n"
    "<rough_understand>what the image shows, in a few words</rough_understand>\n"
    "<rough_image></rough_image>\n"
    "<middle_understand>the main objects, their colours and layout</middle_understand>\n"
    "<middle_image></middle_image>\n"
    "<final_understand>fine details and textures to recover</final_understand>\n"
    "<final_image></final_image>\n"
    "Leave the image tags empty: the restorer fills them."
)


def build_messages(image=None) -> list[dict]:
    """Chat messages for a VLM processor's chat template (image placeholder first, then the task)."""
    user_content: list[dict] = [{"type": "image"} if image is None else {"type": "image", "image": image}]
    user_content.append({"type": "text", "text": USER_PROMPT})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": user_content},
    ]
