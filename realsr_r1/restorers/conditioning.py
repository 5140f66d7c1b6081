"""Plan → what one diffusion sample is conditioned on: prompt, negative prompt, noise level.

Positive prompt: quality words, then the stage's understanding text ("clean, sharp, high quality; a
dog on grass"). In that order because the pipeline's `encode_prompt` truncates prompts to CLIP's
77 tokens: a long understanding from a real VLM would otherwise cut the quality words off. The detected degradations go into the negative prompt, after the configured one
("blurry, …, heavy noise, light blur"), as SUPIR and SeeSR do: CLIP text encoders largely ignore
negation, so "remove heavy noise" in the positive prompt would pull towards noise under CFG (and in
GRPO penalise completions that report degradations correctly). Without CFG there is no negative.

noise_level (the upscaler's augmentation level, 0..max_noise_level) from the plan's noise level:
none → 10, light → 20, medium → 40, heavy → 80, clamped to the pipeline's `max_noise_level`.
Higher values let the model discard more of the (noisy) conditioning image.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cot import Plan

NOISE_LEVELS = {"none": 10, "light": 20, "medium": 40, "heavy": 80}
QUALITY_WORDS = "clean, sharp, high quality"
DEFAULT_NEGATIVE = "blurry, noisy, jpeg artifacts, oversmoothed, low quality"


@dataclass(frozen=True)
class Condition:
    """What one sample of a batch is conditioned on."""

    prompt: str
    negative: str  # used only with classifier-free guidance
    noise_level: int


def noise_level_for(plan: Plan | None, max_noise_level: int = 350) -> int:
    """The upscaler's noise_level for the plan's noise estimate (see the module doc)."""
    level = plan.level("noise") if plan is not None else "none"
    return int(max(0, min(NOISE_LEVELS.get(level, NOISE_LEVELS["none"]), max_noise_level)))


def degradation_words(plan: Plan | None) -> str:
    """"light blur, heavy noise, medium jpeg artifacts": the plan's degradations, downsampling aside."""
    words = []
    for item in getattr(plan, "degradation", None) or []:
        if item.type == "downsample" or item.level in (None, "", "none"):
            continue
        words.append(f"{item.level} {'jpeg artifacts' if item.type == 'jpeg' else item.type}")
    return ", ".join(words)


def stage_prompt(plan: Plan | None, stage: str) -> str:
    """"clean, sharp, high quality; <understanding>" (no understanding: the quality words alone)."""
    understanding = ""
    if plan is not None and isinstance(getattr(plan, "understanding", None), dict):
        understanding = str(plan.understanding.get(stage) or "").strip()
    return "; ".join(p for p in (QUALITY_WORDS, understanding) if p)


def negative_prompt_for(plan: Plan | None, base: str | None = DEFAULT_NEGATIVE) -> str:
    """The configured negative prompt, then the plan's degradation words."""
    return ", ".join(p for p in ((base or "").strip(), degradation_words(plan)) if p)


def condition_for(plan: Plan | None, stage: str, negative: str | None = DEFAULT_NEGATIVE,
                  max_noise_level: int = 350) -> Condition:
    return Condition(stage_prompt(plan, stage), negative_prompt_for(plan, negative),
                     noise_level_for(plan, max_noise_level))
