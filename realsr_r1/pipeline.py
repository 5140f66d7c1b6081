"""The one restoration pipeline: a generator of events that the CLI, the demo and evaluation consume.

    image ──► analyser ──► policy ──text deltas──► parser ──► plan
                                                          │
              rough ◄── restorer(image, plan, rough) ◄────┘
              middle ◄── restorer(rough ×2, …)
              final ◄── restorer(middle ×2, …) ──► result

Nothing here knows which models run: a policy streams the chain-of-thought text, a stage restorer
yields stage images. Profiles (configs/*.yaml) pick the implementations; `profiles.py` builds them.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from .analyze import Analysis, analyze, jpeg_quality_from_file
from .cot import STAGES, TAGS, Plan, parse_cot
from .imageio import LoadedImage


# --- Events ------------------------------------------------------------------------------------
@dataclass
class AnalysisReady:
    analysis: Analysis


@dataclass
class TextDelta:
    text: str  # the next piece of the chain of thought, as the policy produced it


@dataclass
class PlanUpdate:
    section: str  # the tag that just closed: degradation or <stage>_understand
    plan: Plan  # the chain parsed so far (problems for the sections still to come)


@dataclass
class PlanReady:
    plan: Plan  # the parsed chain (with its problems, if any)
    text: str


@dataclass
class StageStarted:
    stage: str
    size: tuple[int, int]  # (width, height) the stage will have


@dataclass
class StagePreview:
    stage: str
    image: np.ndarray  # an intermediate look at the stage (diffusion profiles)
    step: int
    total: int


@dataclass
class StageImage:
    stage: str
    rgb: np.ndarray  # HxWx3, float32 [0,1] or uint8/uint16
    alpha: np.ndarray | None
    seconds: float
    choice: dict | None = None  # how the restorer chose among candidates (sidecar's `choice`)
    candidates: list | None = None  # a look at each candidate (HxWx3 float), for the demo's strip


@dataclass
class ImageInContext:
    stage: str  # reflect mode: this stage's image is now in the VLM's context
    size: tuple[int, int]  # (width, height) as the VLM sees it (its pixel budget)


@dataclass
class Done:
    result: "RestorationResult"


@dataclass
class Failed:
    message: str  # one line, for people
    error: BaseException | None = None  # for --debug


Event = (AnalysisReady | TextDelta | PlanUpdate | PlanReady | StageStarted | StagePreview | StageImage | ImageInContext
         | Done | Failed)


@dataclass
class RestorationResult:
    rgb: np.ndarray
    alpha: np.ndarray | None
    plan: Plan
    cot: str  # the chain as the policy wrote it
    analysis: Analysis
    stages: dict[str, StageImage] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    scale: float = 4.0
    info: dict = field(default_factory=dict)  # profile, precision, device, model names


# --- What a profile plugs in ---------------------------------------------------------------------
class Policy(Protocol):
    name: str
    note: str  # what the sidecar should say about this policy's output ("" when nothing)

    def stream(self, image: LoadedImage, analysis: Analysis, *, seed: int, scale: float) -> Iterator[str]:
        """Yield the chain-of-thought text piece by piece."""

    def describe(self) -> dict:
        """Model, precision and decoding facts for the sidecar."""

    @property
    def last_stats(self) -> dict:
        """{"new_tokens", "seconds"} of the last stream() in this thread; {} when nothing was generated."""

    def reflect(self, image: LoadedImage, analysis: Analysis, *, seed: int, scale: float):
        """A reflective chain (`realsr_r1/reflect.py`: until_image(), see(), opened, record), or None
        for a policy that writes its chain in one pass."""


class StageRestorer(Protocol):
    name: str

    def stages(
        self, image: LoadedImage, plan: Plan, *, sizes: dict[str, tuple[int, int]], seed: int
    ) -> Iterator[StageStarted | StagePreview | StageImage]:
        """Yield, for rough, middle and final in order: StageStarted, any previews, StageImage.

        A stage reads `plan` when it starts (after its StageStarted is taken), so a reflective
        pipeline can complete the plan between stages."""

    def describe(self) -> dict:
        """Device, precision and model facts for the sidecar."""

    def restore_final_batch(self, rgb: np.ndarray, plans: list[Plan], *, scale: float = 4.0, seed: int = 0,
                            batch_size: int | None = None) -> list[np.ndarray]:
        """The final stage for many chains of thought about one image (GRPO's image rewards)."""


def stage_sizes(width: int, height: int, scale: float) -> dict[str, tuple[int, int]]:
    """rough = input size, middle = ×2 (or halfway for small scales), final = ×scale."""
    middle = 2.0 if scale >= 2 else (1.0 + scale) / 2
    factors = {"rough": 1.0, "middle": middle, "final": scale}
    return {s: (max(1, round(width * f)), max(1, round(height * f))) for s, f in factors.items()}


class RestorationPipeline:
    """Runs one image through analyser → policy → parser → stage restorer, as events."""

    def __init__(self, policy: Policy, restorer: StageRestorer, *, profile: str, scale: float = 4.0):
        self.policy = policy
        self.restorer = restorer
        self.profile = profile
        self.scale = float(scale)

    def run(self, image: LoadedImage, *, seed: int = 0, scale: float | None = None) -> Iterator[Event]:
        scale = float(scale or self.scale)
        timings: dict[str, float] = {}
        try:
            t = time.perf_counter()
            file_q = jpeg_quality_from_file(image.path) if image.path and image.format == "JPEG" else None
            analysis = analyze(image.rgb, jpeg_quality_from_file=file_q)
            timings["analyse"] = time.perf_counter() - t
            yield AnalysisReady(analysis)

            sizes = stage_sizes(*image.size, scale)
            stages: dict[str, StageImage] = {}
            reflect = getattr(self.policy, "reflect", None)  # policies without it write in one pass
            reflection = reflect(image, analysis, seed=seed, scale=scale) if reflect else None
            if reflection is None:
                t = time.perf_counter()
                cot = yield from self._reason(self.policy.stream(image, analysis, seed=seed, scale=scale), "")
                timings["reason"] = time.perf_counter() - t
                plan = parse_cot(cot)
                yield PlanReady(plan, cot)
                yield from self._stages(self.restorer.stages(image, plan, sizes=sizes, seed=seed), plan, stages, timings)
            else:
                cot, plan = yield from self._reflect(reflection, image, sizes, seed, stages, timings)
            missing = [s for s in STAGES if s not in stages]
            if missing:
                raise RuntimeError(f"restorer produced no image for stage(s) {', '.join(missing)}")
            final = stages["final"]
            summary = (final.choice or {}).get("summary")
            if summary and not (plan.understanding.get("final") or "").strip():
                # A policy that wrote no final understanding (the lite analyser): what the choice did.
                plan.understanding["final"] = summary
                cot = re.sub(r"<final_understand>\s*</final_understand>",
                             lambda _: f"<final_understand>{summary}</final_understand>", cot, count=1)
            info = {"profile": self.profile, "policy": self.policy.name, **self.restorer.describe(),
                    "policy_info": self.policy.describe()}
            if (final.choice or {}).get("restorer"):  # what ran for this image, of what was loaded
                info["restorer"] = final.choice["restorer"]
            for name in STAGES:  # how a restorer chose among candidates: `choice` (final), `rough_choice`, ...
                if stages[name].choice is not None:
                    info["choice" if name == "final" else f"{name}_choice"] = stages[name].choice
            if reflection is not None:
                info["reflect"] = reflection.record
            if self.policy.last_stats:  # tokens generated, for tokens/s
                info["reason_tokens"] = self.policy.last_stats["new_tokens"]
            yield Done(RestorationResult(final.rgb, final.alpha, plan, cot, analysis, stages,
                                         timings, seed, scale, info))
        except Exception as e:  # one image failing must not end the caller's batch
            yield Failed(_one_line(e), e)

    def _reason(self, deltas: Iterator[str], cot: str):
        """Generator: pass text deltas on, with a PlanUpdate for each tag that closes; returns the text."""
        waiting = [tag for tag in TAGS if not tag.endswith("_image") and f"</{tag}>" not in cot]
        for delta in deltas:
            cot += delta
            yield TextDelta(delta)
            # Parsed as it arrives: a section is usable (e.g. shown) as soon as its tag closes.
            closed = [tag for tag in waiting if ">" in delta and f"</{tag}>" in cot]
            for tag in closed:
                waiting.remove(tag)
                yield PlanUpdate(tag, parse_cot(cot))
        return cot

    @staticmethod
    def _stages(events: Iterator, plan: Plan, stages: dict, timings: dict, until: str | None = None):
        """Generator: pass the restorer's events on up to StageImage(`until`) (or to its end)."""
        for event in events:
            if isinstance(event, StageImage):
                stages[event.stage] = event
                timings[event.stage] = event.seconds
                plan.images[event.stage] = f"{event.rgb.shape[1]}x{event.rgb.shape[0]}"
            yield event
            if isinstance(event, StageImage) and event.stage == until:
                return

    def _reflect(self, reflection, image: LoadedImage, sizes: dict, seed: int, stages: dict, timings: dict):
        """Generator: text up to each stage's image tag, that stage, its image into the VLM's context.

        Every chain ends with three stage images and the restorer's one pass over them: a chain that
        never opens the expected tag (or opens another) is finished in one pass and the remaining
        stages use that plan; the problem is recorded. The VLM runs at most four times."""
        plan = Plan()
        events = self.restorer.stages(image, plan, sizes=sizes, seed=seed)
        cot, reflecting, t_reason = "", True, 0.0
        for stage in STAGES:
            if reflecting and stage != "final" and stage not in reflection.stages:
                reflecting = False  # trained to see no more stage images: the rest in one pass
                t = time.perf_counter()
                cot = yield from self._reason(reflection.until_image(stop_at_tags=False), cot)
                t_reason += time.perf_counter() - t
            if reflecting:
                t = time.perf_counter()
                cot = yield from self._reason(reflection.until_image(), cot)
                if reflection.opened != stage:
                    found = "the chain ended" if reflection.opened is None else f"it wrote <{reflection.opened}_image>"
                    reflection.record["problems"].append(
                        f"expected <{stage}_image> but {found}; the remaining stages use the one-pass plan")
                    reflecting = False
                    cot = yield from self._reason(reflection.until_image(stop_at_tags=False), cot)
                t_reason += time.perf_counter() - t
            _refresh(plan, parse_cot(cot))
            if stage == "rough":
                yield PlanReady(plan, cot)  # the plan so far: the later stages' text is still to come
            yield from self._stages(events, plan, stages, timings, until=stage)
            if stage not in stages:
                break
            if reflecting:
                size_text = plan.images[stage]
                closing = f"{size_text}</{stage}_image>"
                if stage != "final":
                    seen = reflection.see(stage, stages[stage].rgb, size_text)
                    yield ImageInContext(stage, tuple(seen))
                cot += closing
                yield TextDelta(closing)

        yield from self._stages(events, plan, stages, timings)  # a restorer that yields past the final stage
        timings["reason"] = t_reason
        reflection.record["policy_output_problems"] = parse_cot(cot).problems
        _refresh(plan, parse_cot(cot))
        return cot, plan


def _refresh(plan: Plan, parsed: Plan) -> None:
    """Update the plan the restorer holds in place (its stage images' sizes stay)."""
    images = dict(plan.images)
    plan.degradation, plan.understanding, plan.problems = parsed.degradation, parsed.understanding, parsed.problems
    plan.images = {s: images.get(s) or parsed.images.get(s, "") for s in STAGES}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, MemoryError) or "out of memory" in text.lower():
        return f"out of memory ({text[:120]}); try a smaller --tile"
    return f"{type(e).__name__}: {text[:200]}"
