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
    """Pays for pixel variance (the std of the grey image): noise raises it, so it is anti-correlated
    with fidelity, the reward hacking the guard is for. A global statistic, so the tiny random
    model can move it in a few steps (a local one, such as Laplacian energy, it barely moves)."""
    import numpy as np

    return [float(np.asarray(s, np.float32).mean(axis=2).std()) for s in images]


def smoothness(images, lq, hr, **kwargs):
    """The opposite: pays for low pixel variance, which brings a random model's output towards the
    HR's mean and raises its PSNR (the guard's control)."""
    return [-v for v in noise_paying(images, lq, hr)]


def brightness(images, lq, hr, **kwargs):
    """The mean pixel value: the simplest thing a restorer can learn to change."""
    import numpy as np

    return [float(np.asarray(s, np.float32).mean()) for s in images]


def perfect(images, lq, hr, **kwargs):
    """1.0 for every image: a group with nothing left to learn (the OARS group filter drops it)."""
    return [1.0 for _ in images]


def darkness(images, lq, hr, **kwargs):
    """1 − mean brightness: a no-reference reward with an obvious favourite among blends."""
    import numpy as np

    return [float(1.0 - np.asarray(s, np.float32).mean()) for s in images]


# Ranges, for the group filter's thresholds (rewards/registry.py `reward_range`): all in [0, 1]
# except the grey std, which is at most 0.5.
for _fn in (letter_fraction, closeness, brightness, perfect, darkness):
    _fn.reward_range = (0.0, 1.0)
noise_paying.reward_range = (0.0, 0.5)
smoothness.reward_range = (-0.5, 0.0)
