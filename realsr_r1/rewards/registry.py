"""Rewards by name, as a training config lists them:

    rewards:
      format: 1.0                                   # name: weight; {mode: released} for the released regex
      degradation: {weight: 1.0, partial_credit: 0.5}
      understanding: {weight: 1.0, similarity_model: null}
      generation: {weight: 1.0, expert: fidelity}   # fidelity | nr-iqa | niqe | vlm-judge (+ model) | analyser
      compass: {weight: 1.0, quality: niqe, fidelity: input, gamma: 7}   # the defaults; fidelity: hr scores against the HR
      irpo_general: 1.0
      niqe: 1.0                                     # offline no-reference NIQE, mapped to [0, 1]
      my_package.my_module:my_reward: 0.5          # any TRL-style reward function (options → its factory)

`build_rewards` returns TRL's `reward_funcs` and `reward_weights`, in the config's order. Image
rewards share one `Restorations` (made on first need by `restorations`), so they render once.
`build_image_rewards` returns the image rewards alone as functions of images, `(sr, lq, hr) →
values`, for the restorer's RL (training/restorer_rl.py), where there is no text to score; a custom
`module:function` there is called as `function(images=sr, lq=lq, hr=hr)`.
"""

from __future__ import annotations

import importlib
from typing import Callable

from . import text, visual

REWARD_NAMES = ("format", "degradation", "understanding", "generation", "compass", "irpo_general", "niqe")
IMAGE_REWARDS = ("generation", "compass", "irpo_general", "niqe")
UNIT_RANGE = (0.0, 1.0)  # every reward here but COMPASS scores in [0, 1]
# COMPASS's options when a config leaves them out, for training and the lite chooser alike: Q from
# NIQE (offline, no weights) and F from consistency with the input, which needs no HR image, so the
# reward that picks at inference is the one that trains.
COMPASS_DEFAULTS = {"quality": "niqe", "fidelity": "input", "gamma": 7.0}


def reward_range(name: str, options: dict, fn: Callable | None = None) -> tuple[float, float] | None:
    """(lowest, highest) value of a reward; a `module:function` reward's own `reward_range`
    attribute, else None (unknown)."""
    if ":" in name:
        found = getattr(fn, "reward_range", None)
        return None if found is None else (float(found[0]), float(found[1]))
    if name == "compass":
        return text.compass_range(float(options.get("gamma", COMPASS_DEFAULTS["gamma"])))
    return UNIT_RANGE


def _spec(value) -> tuple[float, dict]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), {}
    if isinstance(value, dict):
        options = dict(value)
        return float(options.pop("weight", 1.0)), options
    raise ValueError(f"a reward is `name: weight` or `name: {{weight: …, options}}`, got {value!r}")


def build_rewards(spec: dict, *, restorations: Callable[[], visual.Restorations] | None = None,
                  device: str = "cpu") -> tuple[list[Callable], list[float]]:
    unknown = [n for n in spec if n not in REWARD_NAMES and ":" not in n]
    if unknown:
        raise ValueError(f"unknown reward(s) {', '.join(unknown)} (known: {', '.join(REWARD_NAMES)})")
    shared: list[visual.Restorations] = []

    def rendered() -> visual.Restorations:
        if restorations is None:
            raise ValueError("image rewards need a restorer (the config's `restorer` section)")
        if not shared:
            shared.append(restorations())
        return shared[0]

    def make(name: str, o: dict) -> Callable:
        if ":" in name:
            return _import(name, o)
        if name == "format":
            return text.make_format_reward(o.get("mode", "strict"))
        if name == "degradation":
            return text.make_degradation_reward(float(o.get("partial_credit", 0.0)))
        if name == "understanding":
            return text.make_understanding_reward(o.get("similarity_model"), float(o.get("similarity_weight", 0.5)))
        return visual.over_restorations(rendered(), image_score(name, o, device))

    return _weighted(spec, make)


def _weighted(spec: dict, make: Callable[[str, dict], Callable]) -> tuple[list[Callable], list[float]]:
    """(functions, weights) in the config's order, each made by `make(name, options)` and named by
    the config (the last part of a `module:function`); zero weights are left out."""
    funcs, weights = [], []
    for name, value in spec.items():
        weight, o = _spec(value)
        if weight == 0:
            continue
        fn = make(name, o)
        named = _named(fn, name.rpartition(":")[2])
        named.reward_range = reward_range(name, o, fn)  # the group filter's thresholds are on it
        funcs.append(named)
        weights.append(weight)
    if not funcs:
        raise ValueError("no reward with a non-zero weight in the config")
    return funcs, weights


def image_score(name: str, o: dict, device: str = "cpu") -> visual.ImageReward:
    """One image reward by name (options as in the doc; `module:function` too), as an ImageReward:
    `(sr, lq, hr, q_lr=None) → values`, with its parts and combination."""
    if ":" in name:
        custom = _import(name, o)
        reward = visual.single(name.rpartition(":")[2], lambda sr, lq, hr: custom(images=sr, lq=lq, hr=hr))
        reward.reward_range = getattr(custom, "reward_range", None)
        return reward
    if name == "generation":
        expert = visual.build_scorer(o.get("expert", "fidelity"), **_scorer_options(o, "expert", device))
        return visual.generation_score(expert)
    if name == "compass":
        o = {**COMPASS_DEFAULTS, **o}
        quality = visual.build_scorer(o["quality"], **_scorer_options(o, "quality", device))
        source = o["fidelity"]
        if source not in visual.FIDELITY_SOURCES:
            raise ValueError(f"compass.fidelity: {source!r} is not one of {', '.join(visual.FIDELITY_SOURCES)}")
        fidelity = visual.InputConsistency() if source == "input" else None
        return visual.compass_score(quality, fidelity, gamma=float(o["gamma"]), device=device)
    if name == "niqe":
        reward = visual.generation_score(visual.NiqeQuality())
        reward.__name__ = reward.__qualname__ = "niqe"
        return reward
    return visual.irpo_general_score(device=device)


def check_image_rewards(spec: dict) -> None:
    """The names of a restorer RL config's rewards, checked before any model loads (one line)."""
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"rewards: expected `name: weight` lines (image rewards: {', '.join(IMAGE_REWARDS)})")
    text_only = [n for n in spec if n in REWARD_NAMES and n not in IMAGE_REWARDS]
    if text_only:
        raise ValueError(f"rewards.{text_only[0]}: scores the chain of thought, which restorer training does not "
                         f"write (image rewards: {', '.join(IMAGE_REWARDS)})")
    unknown = [n for n in spec if n not in REWARD_NAMES and ":" not in n]
    if unknown:
        raise ValueError(f"unknown reward(s) {', '.join(unknown)} (image rewards: {', '.join(IMAGE_REWARDS)})")
    for value in spec.values():
        _spec(value)


def build_image_rewards(spec: dict, *, device: str = "cpu") -> tuple[list[Callable], list[float]]:
    """The config's rewards as functions of images, for RL of the restorer (no text rewards there)."""
    check_image_rewards(spec)

    return _weighted(spec, lambda name, o: image_score(name, o, device))


def _import(path: str, options: dict) -> Callable:
    """`package.module:function`: the function itself, or what it returns when options are given."""
    module, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {path}: cannot import it ({e})") from None
    return fn(**options) if options else fn


def _named(fn: Callable, name: str) -> Callable:
    """TRL logs each reward under its function's __name__: make that the config's name."""
    if getattr(fn, "__name__", None) == name:
        return fn

    def reward(*args, **kwargs):
        return fn(*args, **kwargs)

    reward.__name__ = reward.__qualname__ = name
    return reward


def _scorer_options(o: dict, key: str, device: str) -> dict:
    kind = o.get(key, "fidelity" if key == "expert" else "analyser")
    if kind == "vlm-judge":
        return {"model": o.get(f"{key}_model"), "device": device}
    if kind in ("nr-iqa", "fidelity"):
        return {"device": device}
    return {}
