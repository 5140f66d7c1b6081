"""Rewards that look at the restored image: generation (visual expert), COMPASS (OARS), IRPO general.

Each needs the final image a completion's chain of thought drives the restorer to. `Restorations`
makes those once: it groups a batch's completions by input image, renders each group's final stage
in one batched restorer call (GRPO samples G completions per image, and all G meet the same noise,
so their rewards differ by their text only) and caches results by (image, text) hash, so several
image rewards in one config restore once.

Scorers (the "visual experts"), each returning per image a number or None where it cannot judge:

- `fidelity` (full reference, [0, 1]): against the HR from the `hr_path` column: mean of PSNR mapped
  linearly 15 dB → 0 … 35 dB → 1 and SSIM (Y channel, metrics.py); with pyiqa installed also
  1 − DISTS (OARS derives its F from DISTS).
- `nr-iqa` ([0, 1]): RealSR-R1's released expert, the mean of TOPIQ-NR, MUSIQ/100, MANIQA and CLIPIQA
  through pyiqa (an optional extra; needs its weights).
- `vlm-judge` ([1, 5]): IRPO's expert reward: any chat VLM sees the degraded and the restored image
  (and the reference when there is one) and answers with a 1–5 restoration score.
- `analyser` ([1, 5]): an offline no-reference proxy: 5 − 4 · (mean level of blur, noise and JPEG
  that the classical analyser measures in the image, none = 0 … heavy = 1).
- `niqe` ([1, 5]): offline no-reference NIQE (niqe.py, pyiqa's protocol, no weights), lower is
  better, mapped linearly NIQE 3 → 5 … 11 → 1 (clipped); None for images under 96×96 pixels.

Rewards: `generation` ∈ [0, 1] (the expert's score, [1, 5] mapped to [0, 1]); `compass` ≈ [−0.45, 5]
(R = F·Q_LR + F^(Q_LR/γ)·(Q_SR − Q_LR), F from `fidelity`, Q from a [1, 5] scorer, others mapped);
`irpo_general` ∈ [0, 1] (IRPO's general reward from the fidelity metrics available: PSNR and SSIM
as above, 1 − LPIPS and 1 − DISTS with pyiqa; its CLIP and aesthetic terms are not implemented).
"""

from __future__ import annotations

import hashlib
import logging
import re
from functools import lru_cache

import numpy as np

from .. import fullref
from ..cot import LEVELS, parse_cot
from ..imageio import read_image, to_float
from ..restorers.blend import resize
from .text import compass_reward_value, completion_text

log = logging.getLogger(__name__)

PSNR_RANGE = (15.0, 35.0)  # dB mapped to [0, 1] for fidelity
NR_IQA = ("topiq_nr", "musiq", "maniqa", "clipiqa")


def to_unit(q: float | None) -> float | None:
    """[1, 5] → [0, 1]."""
    return None if q is None else float(np.clip((q - 1.0) / 4.0, 0.0, 1.0))


def to_mos(u: float | None) -> float | None:
    """[0, 1] → [1, 5]."""
    return None if u is None else float(1.0 + 4.0 * np.clip(u, 0.0, 1.0))


def as_rgb(img) -> np.ndarray:
    """A dataset image (PIL, or HxWx3 array) as float32 RGB in [0, 1]."""
    if hasattr(img, "convert"):
        img = np.asarray(img.convert("RGB"))
    return to_float(np.asarray(img))[..., :3]


def image_key(rgb: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rgb).tobytes() + str(rgb.shape).encode()).hexdigest()


# --- Rendering the final images ----------------------------------------------------------------
class Restorations:
    """Final images for (LQ image, completion text) pairs: batched per image, cached by hash.

    `restorer` is anything with `restore_final_batch(rgb, plans, scale=, seed=, batch_size=)`
    (DiffusionStages, LiteStages). The cache serves the reward functions of one batch: a call that
    brings new pairs drops the images of earlier batches (final images are HR-sized: keeping many
    would take gigabytes). `calls` counts restorer calls (for tests and benchmarks).
    """

    def __init__(self, restorer, *, scale: float = 4.0, seed: int = 0, batch_size: int | None = None):
        self.restorer = restorer
        self.scale = float(scale)
        self.seed = int(seed)
        self.batch_size = batch_size
        self.cache: dict[tuple[str, str], np.ndarray] = {}
        self.calls = 0

    def final(self, images: list, texts: list[str]) -> list[np.ndarray]:
        rgbs = [as_rgb(i) for i in images]
        keys = [(image_key(r), hashlib.sha1(t.encode()).hexdigest()) for r, t in zip(rgbs, texts)]
        todo: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k not in self.cache:
                todo.setdefault(k[0], []).append(i)
        if todo:  # a new batch: what earlier batches rendered will not be asked for again
            wanted = set(keys)
            self.cache = {k: v for k, v in self.cache.items() if k in wanted}
        for rows in todo.values():
            unique = list({keys[i][1]: i for i in rows}.values())  # identical texts render once
            self.calls += 1
            outs = self.restorer.restore_final_batch(rgbs[unique[0]], [parse_cot(texts[i]) for i in unique],
                                                     scale=self.scale, seed=self.seed, batch_size=self.batch_size)
            for i, out in zip(unique, outs):
                self.cache[keys[i]] = out
        return [self.cache[k] for k in keys]


@lru_cache(maxsize=16)  # a batch's references (G rows share one); HR images are large
def _reference(path: str, width: int, height: int) -> np.ndarray:
    rgb = to_float(read_image(path).rgb)
    return resize(rgb, (width, height))


def reference_for(hr_path: str | None, like: np.ndarray) -> np.ndarray | None:
    """The HR image at `like`'s size (None without a readable path)."""
    if not hr_path:
        return None
    try:
        return _reference(str(hr_path), like.shape[1], like.shape[0])
    except Exception as e:  # noqa: BLE001 - a missing reference makes the reward None, not the run fail
        log.warning("reference %s unreadable (%s): fidelity rewards skip it", hr_path, type(e).__name__)
        return None


# --- Scorers -------------------------------------------------------------------------------------
class FidelityScorer:
    """Full reference, [0, 1]: PSNR mapped 15→0 … 35→1 dB, SSIM, and 1 − DISTS when pyiqa is there."""

    scale = "unit"

    def __init__(self, use_pyiqa: bool = True, device: str = "cpu"):
        self.dists = _optional_pyiqa("dists", device) if use_pyiqa else None

    def parts(self, sr: np.ndarray, hr: np.ndarray) -> dict[str, float]:
        from .. import metrics as M

        p, g = M.as_batch(sr), M.as_batch(hr)
        psnr = float(M.psnr(p, g)[0])
        lo, hi = PSNR_RANGE
        out = {"psnr": float(np.clip((psnr - lo) / (hi - lo), 0, 1)), "ssim": float(np.clip(float(M.ssim(p, g)[0]), 0, 1))}
        if self.dists is not None:
            out["dists"] = float(np.clip(1 - float(self.dists(p.float(), g.float())[0]), 0, 1))
        return out

    def __call__(self, sr: list, lq: list, hr: list) -> list[float | None]:
        return [None if h is None else float(np.mean(list(self.parts(s, h).values()))) for s, h in zip(sr, hr)]


class InputConsistency:
    """Fidelity without an HR, [0, 1]: the SR image resized down to the LQ input's size, scored
    against the input as `fidelity` scores against an HR (PSNR mapped, SSIM). What COMPASS's F can
    be when training needs no HR (`compass: {fidelity: input}`): it pays for keeping the input's
    content and cannot see detail finer than the input's pixels, so the quality term decides there."""

    scale = "unit"

    def __call__(self, sr: list, lq: list, hr: list) -> list[float | None]:
        out: list[float | None] = [None] * len(sr)
        groups: dict[tuple, list[int]] = {}  # one batched PSNR/SSIM per input size: a chooser scores many
        for i, q in enumerate(lq):
            groups.setdefault(q.shape[:2], []).append(i)
        lo, hi = PSNR_RANGE
        for (h, w), rows in groups.items():
            down = np.stack([downscale(to_float(sr[i]), (h, w)) for i in rows])
            ref = np.stack([to_float(lq[i])[..., :3] for i in rows])
            # numpy, not metrics.py's torch: the lite process never imports torch for this
            psnr = np.clip((fullref.psnr_y(down, ref) - lo) / (hi - lo), 0, 1)
            if min(h, w) < fullref.SSIM_WINDOW:  # too small for SSIM's window: PSNR alone
                out_rows = psnr
            else:
                out_rows = (psnr + np.clip(fullref.ssim_y(down, ref), 0, 1)) / 2
            for i, v in zip(rows, out_rows):
                out[i] = float(v)
        return out


@lru_cache(maxsize=32)
def _lanczos_matrix(src: int, dst: int) -> np.ndarray:
    """PIL's Lanczos resampling of one axis (src → dst samples) as a dst x src matrix: PIL's own
    weights, taken by resizing the identity, so the product equals restorers.blend.resize's result."""
    from PIL import Image

    eye = np.eye(src, dtype=np.float32)
    return np.asarray(Image.fromarray(eye, "F").resize((src, dst), Image.LANCZOS), dtype=np.float32)


def downscale(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An HxWx3 float image Lanczos-resized to (h, w), clipped to [0, 1]: blend.resize's result as two
    matrix products (about 10x faster at 512² → 128², which a chooser does for every candidate)."""
    h, w = size
    ry, rx = _lanczos_matrix(rgb.shape[0], h), _lanczos_matrix(rgb.shape[1], w)
    rows = (ry @ rgb.reshape(rgb.shape[0], -1)).reshape(h, rgb.shape[1], -1)  # one GEMM per axis
    return np.clip((rows.transpose(0, 2, 1) @ rx.T).transpose(0, 2, 1), 0, 1)


FIDELITY_SOURCES = ("hr", "input")


class NRIQAScorer:
    """RealSR-R1's visual expert: mean of TOPIQ-NR, MUSIQ/100, MANIQA, CLIPIQA (pyiqa), [0, 1]."""

    scale = "unit"

    def __init__(self, device: str = "cpu"):
        import torch

        from .. import metrics as M

        self.metrics = {name: M.PyiqaMetric(name, torch.device(device)) for name in NR_IQA}  # raises if unavailable

    def __call__(self, sr: list, lq: list, hr: list) -> list[float | None]:
        from .. import metrics as M

        scores = []
        for s in sr:
            t = M.as_batch(s).float()
            vals = [float(m(t, None)[0]) / (100.0 if name == "musiq" else 1.0) for name, m in self.metrics.items()]
            scores.append(float(np.clip(np.mean(vals), 0, 1)))
        return scores


def reading_quality(items) -> float:
    """A degradation reading (`DegradationItem`s, the <degradation> tag) as a quality in [1, 5]:
    5 − 4 · the mean level of blur, noise and JPEG (none = 0 … heavy = 1; a type not named is none)."""
    levels = {i.type: i.level for i in items}
    steps = [LEVELS.index(levels.get(k, "none")) / (len(LEVELS) - 1) if levels.get(k, "none") in LEVELS else 0.0
             for k in ("blur", "noise", "jpeg")]
    return 5.0 - 4.0 * float(np.mean(steps))


class AnalyserQuality:
    """Offline no-reference proxy in [1, 5]: the classical analyser's reading of the image (reading_quality)."""

    scale = "mos"

    def __call__(self, sr: list, lq: list, hr: list) -> list[float | None]:
        from ..analyze import analyze

        return [reading_quality(analyze(s).items) for s in sr]


NIQE_RANGE = (3.0, 11.0)  # NIQE mapped to 5 … 1: clean photos read about 3-5, degraded LQ 7-11 and up


class NiqeQuality:
    """Offline no-reference expert in [1, 5] from NIQE (lower is better): NIQE_RANGE → 5 … 1."""

    scale = "mos"

    def __call__(self, sr: list, lq: list, hr: list) -> list[float | None]:
        from ..niqe import niqe

        lo, hi = NIQE_RANGE
        out = []
        for s in sr:
            try:
                v = niqe(s)
            except ValueError:  # under 96x96 pixels, or all flat: NIQE cannot judge it
                out.append(None)
                continue
            out.append(float(5.0 - 4.0 * np.clip((v - lo) / (hi - lo), 0.0, 1.0)))
        return out


JUDGE_PROMPT = ("You are an expert in image restoration. The first image is a degraded photo, the second is "
                "its restoration{ref}. Rate the restoration from 1 (worse or unusable) to 5 (clean, sharp, "
                "faithful). Answer with one digit.")


def parse_score(text: str) -> float | None:
    """The first standalone digit 1–5 in a judge's answer, else None."""
    m = re.search(r"(?<!\d)(?<!\d\.)([1-5])(?!\d|\.\d)", text or "")
    return float(m.group(1)) if m else None


class VLMJudge:
    """IRPO's expert reward: a chat VLM scores degraded → restored (→ reference) from 1 to 5."""

    scale = "mos"

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", load_in_4bit: bool = False):
        from ..vlm import load_vlm

        self.model, self.processor, _, _ = load_vlm(model_path, device=device, dtype=dtype, load_in_4bit=load_in_4bit)
        self.model.eval()

    def answer(self, images: list[np.ndarray]) -> str:
        import torch
        from PIL import Image

        from ..decoding import Decoding

        pils = [Image.fromarray((np.clip(i, 0, 1) * 255 + 0.5).astype("uint8")) for i in images]
        ref = " and the third is the undegraded reference" if len(pils) == 3 else ""
        content = [{"type": "image"} for _ in pils] + [{"type": "text", "text": JUDGE_PROMPT.format(ref=ref)}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                    add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=pils, return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            # every decoding field explicit: the checkpoint's repetition penalty must not bend a score
            ids = self.model.generate(**inputs, **Decoding(max_new_tokens=8, do_sample=False).generate_kwargs(self.model))
        return self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]

    def __call__(self, sr: list, lq: list, hr: list) -> list[float | None]:
        return [parse_score(self.answer([q, s] + ([h] if h is not None else []))) for s, q, h in zip(sr, lq, hr)]


def _optional_pyiqa(name: str, device: str):
    import torch

    from .. import metrics as M

    try:
        return M.PyiqaMetric(name, torch.device(device))
    except M.MetricUnavailable:
        return None


def build_scorer(name: str, **options):
    """A scorer by its config name: fidelity, nr-iqa, vlm-judge (needs `model`), analyser, niqe."""
    if name == "fidelity":
        return FidelityScorer(**options)
    if name == "nr-iqa":
        return NRIQAScorer(**options)
    if name == "vlm-judge":
        if not options.get("model"):
            raise ValueError("the vlm-judge expert needs `model` (a chat VLM folder)")
        return VLMJudge(options.pop("model"), **options)
    if name == "analyser":
        return AnalyserQuality()
    if name == "niqe":
        return NiqeQuality()
    raise ValueError(f"unknown visual expert {name!r} (fidelity, nr-iqa, vlm-judge, analyser, niqe)")


def _unit(scorer, values: list) -> list[float | None]:
    return [to_unit(v) for v in values] if scorer.scale == "mos" else values


def _mos(scorer, values: list) -> list[float | None]:
    return values if scorer.scale == "mos" else [to_mos(v) for v in values]


# --- Rewards -------------------------------------------------------------------------------------
class ImageReward:
    """One image reward, in two steps: `parts(sr, lq, hr)` measures what does not depend on the
    input's quality (COMPASS: F and Q_SR per image), `combine(parts, q_lr)` makes the rewards. The
    lite chooser measures its candidates once and combines them under the reading; training calls
    the whole, `reward(sr, lq, hr, q_lr=None)`. Both run these same two functions, so the same image
    and the same Q_LR give the same number.

    Q_LR is the input's quality on [1, 5] (rewards that do not use it ignore it): where a degradation
    reading exists it comes from it (reading_quality: the chain of thought's at inference, the
    dataset's recorded degradation in training, see `q_lr_for`), else `input_quality(lq)` measures it.
    `needs_hr`: the reward scores nothing without an HR image (inference has none)."""

    def __init__(self, name: str, parts, combine=None, input_quality=None, needs_hr: bool = False,
                 uses_q_lr: bool = False):
        self.__name__ = self.__qualname__ = name
        self.parts = parts
        self._combine = combine
        self._input_quality = input_quality
        self.needs_hr = needs_hr
        self.uses_q_lr = uses_q_lr

    def combine(self, parts: list[dict], q_lr: list[float | None]) -> list[float | None]:
        if self._combine is None:
            return [p.get("reward") for p in parts]
        return self._combine(parts, q_lr)

    def input_quality(self, lq: list) -> list[float | None]:
        if not self.uses_q_lr or self._input_quality is None:
            return [None] * len(lq)
        return self._input_quality(lq)

    def __call__(self, sr, lq, hr, q_lr=None) -> list[float | None]:
        parts = self.parts(sr, lq, hr)
        if not self.uses_q_lr:
            return self.combine(parts, [None] * len(sr))
        if q_lr is None:
            q_lr = [None] * len(sr)
        q_lr = list(q_lr)
        missing = [i for i, q in enumerate(q_lr) if q is None]
        if missing:
            measured = self.input_quality([lq[i] for i in missing])
            for i, q in zip(missing, measured):
                q_lr[i] = q
        return self.combine(parts, q_lr)


def single(name: str, fn, needs_hr: bool = False) -> ImageReward:
    """A plain `fn(sr, lq, hr) -> values` as an ImageReward (its one part is the reward)."""
    return ImageReward(name, lambda sr, lq, hr: [{"reward": v} for v in fn(sr, lq, hr)], needs_hr=needs_hr)


def q_lr_for(degradation) -> float | None:
    """Q_LR from a degradation reading (items or their dicts, the dataset's `degradation` column);
    None without one (the reward then measures the input)."""
    from ..cot import DegradationItem

    if not degradation:
        return None
    items = [DegradationItem.from_dict(d) if isinstance(d, dict) else d for d in degradation]
    return reading_quality(items)


def generation_score(expert) -> ImageReward:
    """RealSR-R1's generation reward: the expert's score of the final image, in [0, 1]."""
    return single("generation", lambda sr, lq, hr: _unit(expert, expert(sr, lq, hr)),
                  needs_hr=isinstance(expert, FidelityScorer))


def compass_score(quality, fidelity=None, gamma: float = 7.0, device: str = "cpu") -> ImageReward:
    """OARS COMPASS: F from a fidelity scorer (against the HR by default), Q_LR/Q_SR from `quality` on [1, 5],
    R = F·Q_LR + F^(Q_LR/γ)·(Q_SR − Q_LR) (ImageReward: parts F and Q_SR, combined with Q_LR)."""
    fidelity = fidelity or FidelityScorer(use_pyiqa=True, device=device)
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")

    def parts(sr, lq, hr) -> list[dict]:
        f = _unit(fidelity, fidelity(sr, lq, hr))
        return [{"F": a, "Q_SR": b} for a, b in zip(f, _mos(quality, quality(sr, lq, hr)))]

    def input_quality(lq) -> list[float | None]:
        # once per distinct input: the G samples of a group share it
        first = {image_key(x): x for x in lq}
        scored = dict(zip(first, _mos(quality, quality(list(first.values()), list(first.values()),
                                                       [None] * len(first)))))
        return [scored[image_key(x)] for x in lq]

    def combine(measured: list[dict], q_lr: list[float | None]) -> list[float | None]:
        return [None if None in (m["F"], q, m["Q_SR"]) else compass_reward_value(m["F"], q, m["Q_SR"], gamma)
                for m, q in zip(measured, q_lr)]

    return ImageReward("compass", parts, combine, input_quality, needs_hr=isinstance(fidelity, FidelityScorer),
                       uses_q_lr=True)


def irpo_general_score(device: str = "cpu") -> ImageReward:
    """IRPO's general reward from the fidelity metrics available here, in [0, 1]."""
    from .. import metrics as M

    scorer = FidelityScorer(use_pyiqa=True, device=device)
    lpips = _optional_pyiqa("lpips", device)

    def irpo_general(sr, lq, hr):
        out = []
        for s, h in zip(sr, hr):
            if h is None:
                out.append(None)
                continue
            parts = scorer.parts(s, h)
            if lpips is not None:
                parts["lpips"] = float(np.clip(1 - float(lpips(M.as_batch(s).float(), M.as_batch(h).float())[0]), 0, 1))
            out.append(float(np.mean(list(parts.values()))))
        return out

    return single("irpo_general", irpo_general, needs_hr=True)


def over_restorations(restorations: Restorations, score):
    """`score` as a TRL reward: each completion's final image (rendered once, shared) is scored."""
    def reward(prompts, completions, image, hr_path=None, degradation=None, **kwargs):
        sr, lq, hr = _inputs(restorations, completions, image, hr_path)
        # Q_LR from the row's recorded degradation, not from the completion's own reading: a
        # completion must not raise its reward by reading the input as worse (ImageReward).
        q_lr = [q_lr_for(d) for d in degradation] if degradation is not None else None
        return score(sr, lq, hr, q_lr=q_lr)

    reward.__name__ = reward.__qualname__ = score.__name__
    return reward


def _inputs(restorations: Restorations, completions, image, hr_path):
    texts = [completion_text(c) for c in completions]
    sr = restorations.final(image, texts)
    lq = [as_rgb(i) for i in image]
    hr = [reference_for(p, s) for p, s in zip(hr_path or [None] * len(sr), sr)]
    return sr, lq, hr


def make_generation_reward(restorations: Restorations, expert):
    return over_restorations(restorations, generation_score(expert))


def make_compass_reward(restorations: Restorations, quality, fidelity=None, gamma: float = 7.0,
                        device: str = "cpu"):
    return over_restorations(restorations, compass_score(quality, fidelity, gamma, device))


def make_irpo_general_reward(restorations: Restorations, device: str = "cpu"):
    return over_restorations(restorations, irpo_general_score(device))
