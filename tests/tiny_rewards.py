"""A custom TRL-style reward for tests: configs can name `module:function` rewards."""


def letter_fraction(prompts, completions, **kwargs):
    """Fraction of letters in each completion: varies with any text, so GRPO groups always differ."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else "".join(m.get("content", "") for m in c if isinstance(m.get("content"), str))
        out.append(sum(ch.isalpha() for ch in text) / len(text) if text else 0.0)
    return out
