"""Rollouts for RL of the diffusion restorer: K samples of one stage per input, as inference makes it.

The stages before the trained one run as in inference (DiffusionStages.stages, a fixed seed per
input), so the trained stage starts from what it will start from in use: by default the final
stage, img2img from the middle stage, conditioned on the rough image. A LoRA adapter is trained on
its stage alone and inference turns it on there only (restorers/adapter.py), so the stages before
it come from the base weights (`previous_weights`): with the model in training making them, the
start of every rollout would drift with the weights, a change the loss of the trained stage does
not see (on the tiny model at strength 0.5, the held-out reward fell as the training reward rose). Then K samples of
the trained stage are denoised in one batch, each from its own noise (its own generator), in
`steps` sampler steps (OARS: 6), without classifier-free guidance (ROLLOUT_GUIDANCE). DiffusionNFT needs only the clean results, so any scheduler works
and no log-probabilities are kept; what the training forward needs is kept with them: the clean
latents, the noised low-resolution image, the text embeddings and noise levels of the conditional
branch, and the largest timestep the sampler visited.

Each input's conditioning text (`conditioning:`):
- `policy`: the frozen VLM's chain of thought, written once per input and cached on disk;
- `caption`: the dataset row's caption as every stage's understanding, no degradations;
- `analyser`: the classical analyser's degradations, understanding empty.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..cot import STAGES, Plan, parse_cot
from ..imageio import LoadedImage, atomic_write_text, to_float
from ..pipeline import StageImage, stage_sizes
from ..restorers.color import color_fix
from ..restorers.denoise import denoise, initial_latents, model_inputs
from ..restorers.diffusion import PAD_MULTIPLE, _pad, drain
from ..restorers.blend import resize

log = logging.getLogger(__name__)

CONDITIONING = ("policy", "caption", "analyser")
# The trained stage is sampled without classifier-free guidance, as DiffusionNFT samples
# (config/nft.py: guidance_scale 1.0): its loss takes the old model's conditional prediction as the
# policy that made the clean samples, and that holds only when the sampler used that prediction.
# Inference keeps its guidance (the profile's guidance_scale) on top of the trained model.
ROLLOUT_GUIDANCE = 1.0
START_TOLERANCE = 5  # timesteps: how far a rollout may start from inference's start (ᾱ moves < 1 %)


@dataclass
class Rollout:
    """K samples of one input's trained stage."""

    latents: torch.Tensor  # K×4×h×w clean latents (the sampler's result)
    image: torch.Tensor  # K×3×h×w the noised low-resolution image the UNet saw
    embeds: torch.Tensor  # K×77×D text embeddings (conditional branch)
    level: torch.Tensor  # K noise levels
    images: list[np.ndarray]  # the K stage images as inference returns them (cropped, colour-fixed)
    t_max: int  # the first (largest) timestep the sampler ran

    def __len__(self) -> int:
        return len(self.images)


def _previous(stages, lq: np.ndarray, plan: Plan, stage: str, sizes: dict, seed: int):
    """(reference, previous stage image): what the trained stage conditions on and starts from."""
    inp = to_float(lq)
    rough = stages._rough_reference(inp, [plan])  # the plan's reading picks the experts' mix, as in inference
    reference = inp if rough is None else resize(rough[0][0], tuple(sizes["rough"]))
    index = STAGES.index(stage)
    if index == 0:
        return reference, None
    wanted = STAGES[index - 1]
    for event in stages.stages(LoadedImage(rgb=lq), plan, sizes=sizes, seed=seed):
        if isinstance(event, StageImage) and event.stage == wanted:
            return reference, event.rgb
    raise RuntimeError(f"the restorer made no {wanted} stage")  # pragma: no cover - stages() always does


def rollout_schedule(sched, inference_steps: int, strength: float, sampling_steps: int) -> tuple[int, int]:
    """(steps, skip) for an img2img rollout of at least `sampling_steps` sampler steps that starts at
    (or next to) the timestep inference starts at with `inference_steps` at `strength`, so training
    sees the noise levels inference visits. The same number of steps at the same strength would start
    lower (DDIM's 6-step grid at 0.8 starts at 665, its 20-step grid at 751), so among the
    scheduler's own grids of `sampling_steps` to 4× as many steps, the one with a timestep nearest
    that start (and enough steps below it) is used, the fewest steps within START_TOLERANCE: 751
    itself with 8 steps; 778 with 9 for 40-step inference's 776."""
    from ..restorers.denoise import img2img_skip

    sched.set_timesteps(int(inference_steps))
    t_start = int(sched.timesteps[img2img_skip(int(inference_steps), strength, sched.order)])
    best = None  # (distance, steps, skip)
    for steps in range(int(sampling_steps), 4 * int(sampling_steps) + 1):
        sched.set_timesteps(steps)
        grid = [int(t) for t in sched.timesteps]
        for skip, t in enumerate(grid):
            if len(grid) - skip >= sampling_steps * sched.order and (best is None or abs(t - t_start) < best[0]):
                best = (abs(t - t_start), steps, skip)
        if best is not None and best[0] <= START_TOLERANCE:  # the fewest steps that start close enough
            break
    return best[1], best[2]


@torch.no_grad()
def sample_stage(stages, lq: np.ndarray, plan: Plan, *, stage: str, scale: float, seeds: list[int],
                 steps: int, previous_seed: int, batch: int | None = None,
                 guidance: float = ROLLOUT_GUIDANCE, previous_weights=None) -> Rollout:
    """len(seeds) samples of `stage` for one LQ image (HxWx3 uint8 or float) and its plan, with the
    pipeline's current UNet (the caller selects the old model), `batch` samples per denoising call
    (all at once by default; fewer for memory), at classifier-free `guidance` (module doc).
    `previous_weights()`: a context in which the stages before `stage` are made (module doc)."""
    pipe = stages.pipe
    device = pipe._execution_device
    inp = to_float(lq)
    h, w = inp.shape[:2]
    sizes = stage_sizes(w, h, scale)
    with (previous_weights or contextlib.nullcontext)():
        reference, previous = _previous(stages, lq, plan, stage, sizes, previous_seed)
    tw, th = sizes[stage]
    lw, lh = max(1, round(tw / 4)), max(1, round(th / 4))
    ph, pw = -(-lh // PAD_MULTIPLE) * PAD_MULTIPLE, -(-lw // PAD_MULTIPLE) * PAD_MULTIPLE
    cond = _pad(resize(reference, (lw, lh)), ph, pw)
    start = None
    if previous is not None and stages.strength < 1:
        start = stages._encode(_pad(resize(previous, (4 * lw, 4 * lh)), 4 * ph, 4 * pw), device)
    skip = None
    if start is not None:
        steps, skip = rollout_schedule(pipe.scheduler, stages.steps, stages.strength, int(steps))
    condition = stages._condition(plan, stage)
    loop = SimpleNamespace(unet=pipe.unet, scheduler=pipe.scheduler)  # denoise reads only these two
    parts = []
    for i in range(0, len(seeds), batch or len(seeds)):
        chunk = seeds[i:i + (batch or len(seeds))]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk]  # a different noise per sample
        inputs = model_inputs(pipe, cond, [condition] * len(chunk), gens, guidance, device)
        shape = (len(chunk), pipe.vae.config.latent_channels, ph, pw)
        latents, timesteps = initial_latents(pipe.scheduler, shape, gens, int(steps), stages.strength, start,
                                             device, inputs.embeds.dtype, skip=skip)
        final = drain(denoise(loop, inputs, latents, timesteps, tile=stages.tile,
                              overlap=min(stages.tile_overlap, stages.tile // 2),
                              extra=pipe.prepare_extra_step_kwargs(gens[0], 0.0)))
        decoded = stages._decode(final)
        k = len(chunk)  # under guidance the conditional branch is the second half (model_inputs: negative first)
        parts.append((final.float().cpu(), inputs.image[-k:].cpu(), inputs.embeds[-k:].cpu(), inputs.level[-k:].cpu(),
                      [color_fix(resize(np.clip(o[: 4 * lh, : 4 * lw], 0, 1), (tw, th)), inp, stages.color_fix,
                                 device=stages.device) for o in np.nan_to_num(decoded, nan=0.5)]))
    return Rollout(latents=torch.cat([q[0] for q in parts]), image=torch.cat([q[1] for q in parts]),
                   embeds=torch.cat([q[2] for q in parts]), level=torch.cat([q[3] for q in parts]),
                   images=[img for q in parts for img in q[4]], t_max=int(timesteps[0]))


# --- Conditioning texts ---------------------------------------------------------------------------
def caption_plan(caption: str) -> Plan:
    text = (caption or "").strip()
    return Plan(understanding={s: text for s in STAGES})


def analyser_plan(rgb: np.ndarray) -> Plan:
    from ..analyze import analyze

    return Plan(degradation=[i for i in analyze(to_float(rgb)).items if i.type != "downsample"])


class PolicyTexts:
    """The frozen policy's chain of thought per input, written once and kept in a JSONL cache
    (keyed by the LQ file and the policy), so a resumed or repeated run does not write them again."""

    def __init__(self, policy_section: dict, cache: Path, device: str):
        self.section = dict(policy_section)
        self.cache = Path(cache)
        self.device = device
        self.key = json.dumps(self.section, sort_keys=True, default=str)
        self.texts: dict[str, str] = {}
        if self.cache.is_file():
            for line in self.cache.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                if row.get("policy") == self.key:
                    self.texts[row["input"]] = row["text"]
        self._policy = None

    def text(self, name: str, rgb: np.ndarray, seed: int) -> str:
        if name not in self.texts:
            if self._policy is None:
                from ..profiles import build_policy

                self._policy = build_policy(self.section, device=self.device)
            from ..analyze import analyze

            rgb_f = to_float(rgb)
            self.texts[name] = "".join(self._policy.stream(LoadedImage(rgb=rgb), analyze(rgb_f), seed=seed))
            lines = [json.dumps({"input": k, "policy": self.key, "text": v}) for k, v in self.texts.items()]
            atomic_write_text(self.cache, "\n".join(lines) + "\n")
        return self.texts[name]


def plan_for(mode: str, row: dict, rgb: np.ndarray, policy_texts: PolicyTexts | None = None) -> Plan:
    """The conditioning of one dataset row (module doc)."""
    if mode == "caption":
        return caption_plan(row.get("caption") or "")
    if mode == "analyser":
        return analyser_plan(rgb)
    if mode == "policy":
        name = Path(str(row.get("lq_path") or "")).name or str(row.get("seed"))
        return parse_cot(policy_texts.text(name, rgb, int(row.get("seed") or 0)))
    raise ValueError(f"conditioning: {mode!r} is not one of {', '.join(CONDITIONING)}")
