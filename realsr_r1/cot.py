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
    "noise": "noise", "noisy": "noise", "grain": "noise", "grainy": "noise",
    "jpeg": "jpeg", "jpg": "jpeg", "compression": "jpeg", "compressed": "jpeg",
    "artifacts": "jpeg", "artefacts": "jpeg", "blocking": "jpeg",
    "downsample": "downsample", "downsampled": "downsample", "downsampling": "downsample",
    "downscale": "downsample", "downscaled": "downsample", "resize": "downsample",
    "low-resolution": "downsample", "lowres": "downsample", "scale": "downsample",
}
_LEVEL_SYNONYMS = {
    "none": "none", "no": "none", "clean": "none", "zero": "none",
    "light": "light", "slight": "light", "mild": "light", "low": "light", "weak": "light",
    "medium": "medium", "moderate": "medium", "mid": "medium",
    "heavy": "heavy", "severe": "heavy", "strong": "heavy", "high": "heavy",
}
_FACTOR_RE = re.compile(r"^(?:x|×)\s*(\d+(?:\.\d+)?)$|^(\d+(?:\.\d+)?)\s*(?:x|×)$|^(\d+(?:\.\d+)?)$")
_PARAM_RE = re.compile(r"([a-z_]+)\s*[=:]?\s*(-?\d+(?:\.\d+)?)")


def _split_items(text: str) -> list[str]:
    """Split on ; , or newlines that are not inside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch in ";,\n" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _parse_level(kind: str, words: str) -> str | None:
    words = words.strip().lower()
    if kind == "downsample":
        if words in ("", "yes", "true"):
            return None  # present, factor unknown
        if _LEVEL_SYNONYMS.get(words) == "none":
            return "none"
        m = _FACTOR_RE.match(words.replace(" ", ""))
        if m:
            return level_for("downsample", float(next(g for g in m.groups() if g)))
        return None
    return _LEVEL_SYNONYMS.get(words)


def parse_item(text: str) -> tuple[DegradationItem | None, str | None]:
    """Parse one item. Returns (item, None) or (None, problem)."""
    raw = text.strip()
    params: dict[str, float] = {}
    m = re.search(r"\((.*)\)\s*$", raw, flags=re.S)
    body = raw
    if m:
        params = {k.lower(): float(v) for k, v in _PARAM_RE.findall(m.group(1).lower())}
        body = raw[: m.start()].strip()
    body = body.lower().strip().rstrip(".")
    if ":" in body:  # canonical "type: level"
        head, _, tail = body.partition(":")
        kind = _TYPE_SYNONYMS.get(head.strip())
        level_words = tail
    else:  # free form: "medium blur", "heavy noise", "downsample x4", "light jpeg compression"
        words = body.split()
        kind = next((_TYPE_SYNONYMS[w] for w in words if w in _TYPE_SYNONYMS), None)
        level_words = " ".join(w for w in words if _TYPE_SYNONYMS.get(w) is None)
        if kind == "downsample" and not level_words:
            level_words = ""
    if kind is None:
        return None, f"unknown degradation item {raw!r}"
    level = _parse_level(kind, level_words)
    if level is None:
        if kind == "downsample" and not level_words.strip():
            return None, f"downsample item without a factor: {raw!r}"
        return None, f"unknown level in degradation item {raw!r}"
    return DegradationItem(kind, level, params), None


def parse_degradation(text: str) -> tuple[list[DegradationItem], list[str]]:
    """Parse the body of <degradation>. Unknown or repeated items are reported, not fatal."""
    items: list[DegradationItem] = []
    problems: list[str] = []
    seen: set[str] = set()
    for part in _split_items(text):
        item, problem = parse_item(part)
        if problem:
            problems.append(problem)
            continue
        if item.type in seen:
            problems.append(f"repeated degradation type {item.type!r} (kept the first)")
            continue
        seen.add(item.type)
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


def matches_format(text: str) -> bool:
    """True when `text` is exactly the seven tags in contract order (whitespace between is fine)."""
    return bool(FORMAT_PATTERN.match(text or ""))


def parse_cot(text: str | None) -> Plan:
    """Parse any string into a Plan. Never raises; `plan.problems` says what was wrong."""
    text = text if isinstance(text, str) else ""
    problems: list[str] = []
    contents: dict[str, str] = {}
    order: list[str] = []
    tokens = list(_TAG_TOKEN.finditer(text))
    pos = 0
    outside: list[str] = []
    open_tag: str | None = None
    open_end = 0
    body_parts: list[str] = []  # pieces of the open tag's body (stray closing tags cut out)

    def close_open(end: int, closed: bool) -> None:
        nonlocal open_tag
        body = "".join(body_parts) + text[open_end:end]
        if not closed:
            body = _PARTIAL_TAG_AT_END.sub("", body) if end == len(text) else body
            problems.append(
                f"<{open_tag}> is not closed" + (" (text ends inside it)" if end == len(text) else "")
            )
        if open_tag in contents:
            problems.append(f"repeated <{open_tag}> (kept the first)")
        else:
            contents[open_tag] = body.strip()
            order.append(open_tag)
        open_tag = None

    for tok in tokens:
        is_close, name = tok.group(1) == "/", tok.group(2).lower()
        if open_tag is None:
            outside.append(text[pos : tok.start()])
            if is_close:
                problems.append(f"</{name}> without an opening tag")
            else:
                open_tag, open_end, body_parts = name, tok.end(), []
        elif is_close and name == open_tag:
            close_open(tok.start(), closed=True)
        elif is_close:
            problems.append(f"</{name}> inside <{open_tag}> (tags nested or crossed)")
            body_parts.append(text[open_end : tok.start()])
            open_end = tok.end()
        else:  # a new tag opens before the current one closed
            close_open(tok.start(), closed=False)
            open_tag, open_end, body_parts = name, tok.end(), []
        pos = tok.end()
    if open_tag is not None:
        close_open(len(text), closed=False)
    else:
        outside.append(_PARTIAL_TAG_AT_END.sub("", text[pos:]))

    stray = " ".join(s.strip() for s in outside if s.strip())
    if stray:
        problems.append(f"text outside the tags: {stray[:60]!r}")
    missing = [t for t in TAGS if t not in contents]
    if missing:
        problems.append("missing " + ", ".join(f"<{t}>" for t in missing))
    present_order = [t for t in TAGS if t in order]
    if order != present_order:
        problems.append("tags out of order: " + " ".join(order))

    items, deg_problems = parse_degradation(contents.get("degradation", ""))
    problems.extend(deg_problems)
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
