"""Rewards read from the chain of thought's text (no images), in TRL's GRPOTrainer signature.

Each reward is `f(prompts, completions, **columns) -> list[float | None]`: one value per completion,
dataset columns arrive as keyword lists aligned with `completions`, and unknown keyword arguments
(`completion_ids`, `trainer_state`, …) are ignored. A completion may be a string or a conversation
(`[{"role": "assistant", "content": str | [{"type": "text", "text": …}]}]`). Malformed completions
(empty, truncated, out of order, repeated tags, garbage, non-strings) never raise: format gives them
0 and the content rewards score whatever `cot.parse_cot` still recovers from them. None means "no
ground truth to judge by"; TRL leaves such values out of the weighted sum.

- `format` ∈ {0, 1} (RealSR-R1): 1 when the text is the seven VLCoT tags in order, each exactly once
  and none nested (`cot.matches_format`); it judges the tags, not what is inside them, and the
  parser's tolerance never raises it. `make_format_reward("released")` keeps the released code's
  full-match regex, which also passes a repeated or nested tag (its lazy `.*?` spans the repeat).
- `degradation` ∈ [0, 1] (RealSR-R1): fraction of ground-truth items whose type the completion names
  at the same level (3 of 5 → 0.6); optionally `partial_credit` for one level off.
- `understanding` ∈ [0, 1] (RealSR-R1): fraction of ground-truth content tags found in the three
  `<*_understand>` sections (3 of 4 → 0.75); optionally blended with a sentence-embedding cosine
  similarity to a reference `caption`.
- `compass_reward_value` ∈ [−4, 9] as a bound (OARS COMPASS), attainable ≈ [−0.45, 5]; the image
  reward that feeds it lives in `visual`.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np

from ..cot import DegradationItem, level_distance, matches_format, parse_cot, parse_degradation


def completion_text(c) -> str:
    """The text of a string or conversational completion ("" for anything else)."""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        c = [c]
    if not isinstance(c, (list, tuple)):
        return ""
    msgs = [m for m in c if isinstance(m, dict)]
    # TRL's completion is the assistant turn; take every message only when none names a role
    if any(m.get("role") == "assistant" for m in msgs):
        msgs = [m for m in msgs if m.get("role") == "assistant"]
    return "\n".join(_content_text(m.get("content")) for m in msgs)


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = [p if isinstance(p, str) else p.get("text") if isinstance(p, dict) else None for p in content]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def _need(column, name: str, n: int) -> list:
    if column is None:
        raise ValueError(f"the {name} reward needs a `{name}` dataset column")
    if len(column) != n:
        raise ValueError(f"`{name}` column has {len(column)} rows for {n} completions")
    return list(column)


# --- format -----------------------------------------------------------------------------------------
def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when a completion is the seven VLCoT tags in contract order, each once, else 0.0."""
    return [1.0 if matches_format(completion_text(c)) else 0.0 for c in completions]


def make_format_reward(mode: str = "strict"):
    """The format reward: `strict` (the default) or `released` (the released regex, to reproduce)."""
    matches_format("", mode)  # validates the mode now, not at the first batch

    def format(prompts, completions, **kwargs):
        return [1.0 if matches_format(completion_text(c), mode) else 0.0 for c in completions]

    return format


# --- degradation ------------------------------------------------------------------------------------
def _truth_items(row) -> list[DegradationItem]:
    """A ground-truth row: rendered text, or a list of item dicts / items / item texts.

    A downsample given without a factor ("downsample") is dropped by the parser, as in `cot`."""
    if row is None:
        return []
    if isinstance(row, str):
        return parse_degradation(row)[0]
    if isinstance(row, dict):  # one item, or a labels.jsonl record with its "items"
        row = [row] if "type" in row else row.get("items") or []
    items = []
    for x in row:
        if isinstance(x, DegradationItem):
            items.append(x)
        elif isinstance(x, dict):
            items.append(DegradationItem.from_dict(x))
        elif isinstance(x, str):
            items.extend(parse_degradation(x)[0])
        else:
            raise ValueError(f"degradation ground truth item {x!r} is not a dict or text")
    first: dict[str, DegradationItem] = {}
    for i in items:  # a contradictory truth keeps its first item per type, as the parser does
        first.setdefault(i.type, i)
    return list(first.values())


def _item_credit(truth: DegradationItem, said: DegradationItem | None, partial: float) -> float:
    if said is None:  # not naming a type is no answer, even when the truth is "none"
        return 0.0
    if said.level == truth.level or (said.factor is not None and said.factor == truth.factor):
        return 1.0
    # downsample factors are not an ordered level, so they get no partial credit
    return partial if level_distance(said.level, truth.level) == 1 else 0.0


def degradation_reward(prompts, completions, degradation=None, partial_credit: float = 0.0,
                       **kwargs) -> list[float | None]:
    """Fraction of the ground-truth items the completion's <degradation> states (None: no truth)."""
    if not 0.0 <= partial_credit <= 1.0:  # keeps the reward in [0, 1]
        raise ValueError(f"partial_credit must be in [0, 1], got {partial_credit!r}")
    truths = _need(degradation, "degradation", len(completions))
    out: list[float | None] = []
    for c, row in zip(completions, truths):
        truth = _truth_items(row)
        if not truth:
            out.append(None)
            continue
        plan = parse_cot(completion_text(c))  # keeps the first item of a repeated type
        out.append(sum(_item_credit(t, plan.item(t.type), partial_credit) for t in truth) / len(truth))
    return out


def make_degradation_reward(partial_credit: float = 0.0):
    """The degradation reward with credit `partial_credit` ∈ [0, 1] for an item one level off."""
    p = float(partial_credit)
    degradation_reward(None, [], [], partial_credit=p)  # validates p now, not at the first batch

    def degradation(prompts, completions, degradation=None, **kwargs):
        return degradation_reward(prompts, completions, degradation, partial_credit=p, **kwargs)

    return degradation


# --- understanding ----------------------------------------------------------------------------------
def _word_forms(word: str) -> list[str]:
    """A word with its simple singular and plural forms: dog/dogs, box/boxes, berry/berries."""
    bases = {word}
    if len(word) > 4 and word.endswith("ies"):
        bases.add(word[:-3] + "y")
    if len(word) > 3 and word.endswith("es"):
        bases.add(word[:-2])
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        bases.add(word[:-1])
    forms = set(bases)
    for b in bases:
        forms |= {b + "s", b + "es"}
        if len(b) > 1 and b.endswith("y") and b[-2] not in "aeiou":
            forms.add(b[:-1] + "ies")
    return sorted(forms, key=len, reverse=True)


@lru_cache(maxsize=4096)
def _tag_pattern(tag: str) -> re.Pattern:
    # only the last word inflects ("red car" / "red cars"); lookarounds keep "cat" out of "category"
    *head, last = tag.split()
    body = "".join(re.escape(w) + r"\s+" for w in head)
    body += "(?:" + "|".join(re.escape(f) for f in _word_forms(last)) + ")"
    return re.compile(r"(?<!\w)" + body + r"(?!\w)")


def _clean_tags(row) -> list[str]:
    if isinstance(row, str):
        row = row.split(",")
    tags = [" ".join(t.lower().split()) for t in (row or []) if isinstance(t, str)]
    return list(dict.fromkeys(t for t in tags if t))  # a tag listed twice counts once


def tag_fraction(text: str, tags) -> float | None:
    """Fraction of `tags` found in `text` (None when there are no tags)."""
    tags = _clean_tags(tags)
    if not tags:
        return None
    text = " ".join(text.lower().split())
    return sum(1 for t in tags if _tag_pattern(t).search(text)) / len(tags)


def understanding_text(completion) -> str:
    return " ".join(v for v in parse_cot(completion_text(completion)).understanding.values() if v)


def understanding_reward(prompts, completions, tags=None, **kwargs) -> list[float | None]:
    """Fraction of a row's content tags named in the <*_understand> sections (None: no tags)."""
    rows = _need(tags, "tags", len(completions))
    return [tag_fraction(understanding_text(c), t) for c, t in zip(completions, rows)]


def _sentence_transformer():
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError("understanding similarity_model needs the package sentence-transformers "
                          "(pip install sentence-transformers)") from None
    return SentenceTransformer


@lru_cache(maxsize=2)
def _load_encoder(path: str):
    return _sentence_transformer()(path)


def _similarities(encoder, texts: list[str], refs: list[str]) -> list[float]:
    """Cosine similarity of each text to its reference, clipped to [0, 1]; one encode call."""
    emb = np.asarray(encoder.encode(texts + refs), dtype=np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    a, b = emb[: len(texts)], emb[len(texts):]
    return [float(np.clip(s, 0.0, 1.0)) for s in (a * b).sum(axis=1)]


def make_understanding_reward(similarity_model: str | None = None, weight: float = 0.5, encoder=None):
    """The understanding reward; with a sentence-transformers model (or any object with
    `encode(list[str]) -> array`) and a `caption` column it scores (1−weight)·tags + weight·cosine."""
    w = float(weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"similarity weight must be in [0, 1], got {weight!r}")
    if encoder is None and similarity_model:
        # Loaded now, when the config is built: a missing package fails before training starts,
        # and under DeepSpeed ZeRO-3 a model loaded after GRPOConfig would be partitioned (training/grpo.py).
        encoder = _load_encoder(str(similarity_model))

    def understanding(prompts, completions, tags=None, caption=None, **kwargs):
        n = len(completions)
        use_sim = caption is not None and encoder is not None
        # with a caption to compare against, a dataset may come without tags
        tag_rows = [None] * n if tags is None and use_sim else _need(tags, "tags", n)
        texts = [understanding_text(c) for c in completions]
        scores = [tag_fraction(t, r) for t, r in zip(texts, tag_rows)]
        if not use_sim:
            return scores
        caps = _need(caption, "caption", n)
        # an empty understanding says nothing about the picture: similarity 0 without asking the model
        rows = [i for i in range(n) if isinstance(caps[i], str) and caps[i].strip()]
        asked = [i for i in rows if texts[i].strip()]
        sims = dict.fromkeys(rows, 0.0)
        if asked:
            sims.update(zip(asked, _similarities(encoder, [texts[i] for i in asked], [caps[i] for i in asked])))
        for i, s in sims.items():
            scores[i] = s if scores[i] is None else (1.0 - w) * scores[i] + w * s
        return scores

    return understanding


# --- COMPASS (OARS) ---------------------------------------------------------------------------------
def compass_range(gamma: float = 7.0) -> tuple[float, float]:
    """(lowest, highest) COMPASS reward attainable at this γ: over F ∈ [0, 1] and Q_LR, Q_SR ∈ [1, 5]
    (R is linear in Q_SR, so its ends are at Q_SR = 1 or 5)."""
    import numpy as np

    f = np.linspace(0, 1, 401)[:, None]
    q = np.linspace(1, 5, 161)[None, :]
    values = [f * q + f ** (q / gamma) * (s - q) for s in (1.0, 5.0)]
    return float(min(v.min() for v in values)), float(max(v.max() for v in values))


def compass_reward_value(fidelity: float, q_lr: float, q_sr: float, gamma: float = 7.0) -> float:
    """OARS COMPASS: R = F·Q_LR + F^(Q_LR/γ)·(Q_SR − Q_LR), F clipped to [0, 1], Q to [1, 5].

    A good input (large Q_LR) raises the exponent, so low fidelity shrinks the quality gain more.
    R ∈ [−4, 9] by the terms' own ranges; the attainable range is ≈ [−0.45, 5].
    """
    if not gamma > 0:
        raise ValueError(f"COMPASS gamma must be > 0, got {gamma!r}")
    values = [float(fidelity), float(q_lr), float(q_sr)]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"COMPASS inputs must be finite, got F={fidelity!r} Q_LR={q_lr!r} Q_SR={q_sr!r}")
    f = min(max(values[0], 0.0), 1.0)
    lr, sr = (min(max(v, 1.0), 5.0) for v in values[1:])
    return f * lr + f ** (lr / gamma) * (sr - lr)  # 0.0 ** positive = 0, so F = 0 gives 0


TEXT_REWARDS = {"format": format_reward, "degradation": degradation_reward, "understanding": understanding_reward}
FACTORIES = {"format": make_format_reward, "degradation": make_degradation_reward,
             "understanding": make_understanding_reward}
