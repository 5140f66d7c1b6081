"""A custom TRL-style reward for tests: configs can name `module:function` rewards."""


def letter_fraction(prompts, completions, **kwargs):
    """Fraction of letters in each completion: varies with any text, so GRPO groups always differ."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else "".join(m.get("content", "") for m in c if isinstance(m.get("content"), str))
        out.append(sum(ch.isalpha() for ch in text) / len(text) if text else 0.0)
    return out


def closeness(images, lq, hr, **kwargs):
    """1 − mean |SR − HR|: a full-reference reward that moves with any change of the tiny model's output."""
    import numpy as np

    return [None if h is None else float(1.0 - np.abs(np.asarray(s, np.float32) - h).mean()) for s, h in zip(images, hr)]


def noise_paying(images, lq, hr, **kwargs):
    """Pays for high-frequency energy (the mean absolute Laplacian): anti-correlated with fidelity,
    the reward hacking the guard is for."""
    import numpy as np

    out = []
    for s in images:
        g = np.asarray(s, np.float32).mean(axis=2)
        lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
        out.append(float(np.abs(lap).mean()))
    return out


def brightness(images, lq, hr, **kwargs):
    """The mean pixel value: the simplest thing a restorer can learn to change."""
    import numpy as np

    return [float(np.asarray(s, np.float32).mean()) for s in images]


def perfect(images, lq, hr, **kwargs):
    """1.0 for every image: a group with nothing left to learn (the OARS group filter drops it)."""
    return [1.0 for _ in images]
