"""The DiffusionNFT objective (arXiv 2509.16117), written for a DDPM-style model's own parameterisation.

DiffusionNFT trains on the forward process: given clean samples x0 that the "old" model made and
their rewards, it noises each x0 to a random timestep and pulls the current model's clean estimate
towards x0 where the reward was good and the implicit negative's estimate towards x0 where it was
bad. The published code (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py) is for flow matching
(x0 = x_t − t·v); for the x4 upscaler's DDPM schedule the clean estimate is, with ᾱ = alphas_cumprod[t],

    epsilon:       x0 = (x_t − √(1−ᾱ)·ε) / √ᾱ
    v_prediction:  x0 = √ᾱ·x_t − √(1−ᾱ)·v

Both are affine in the prediction, so mixing predictions mixes clean estimates, which is all the
objective needs (references.md, OARS / DiffusionNFT):

    p⁺ = β·p_θ + (1−β)·p_old            p⁻ = (1+β)·p_old − β·p_θ
    w± = mean|x0± − x0|  (no gradient, ≥ 1e-5)
    L  = c · mean[ r·‖x0⁺ − x0‖²/w⁺ + (1−r)·‖x0⁻ − x0‖²/w⁻ ] / β   (+ β_KL·‖p_θ − p_ref‖²)

with r = clamp(clip(A, −c, c)/(2c) + 0.5, 0, 1) from the group-normalised advantage A. At r = 1 only
the positive term remains (supervised regression of x0⁺ on good samples); at r = 0 only the
negative one. After each step the old model moves towards the current one by an EMA whose decay
rises from 0 (`ema_decay`, the paper's `return_decay`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")  # the x4 upscaler's; "sample" is a one-step model's clean output
MIN_WEIGHT = 1e-5  # the adaptive weight's floor, as in the published code
ADVANTAGE_EPS = 1e-4  # added to the group std before dividing (the published code's)


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for each row of `like` (Bx…), broadcastable against it."""
    a = alphas_cumprod.to(like.device, torch.float32)[t.to(like.device).long()]
    return a.view(-1, *([1] * (like.ndim - 1)))


def clean_estimate(prediction: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 implied by the model's prediction at x_t (ᾱ = a), as DDIMScheduler.step computes it;
    "sample": the prediction is x0 itself (x_t and a unused)."""
    if prediction_type == "sample":
        return prediction
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * prediction
    raise ValueError(f"DiffusionNFT: prediction_type {prediction_type!r} is not supported (use {', '.join(PREDICTION_TYPES)})")


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(R − group mean) / (group std + 1e-4) for rewards laid out group after group. The std is the
    population one (np.std, as the released DiffusionNFT and flow-GRPO code compute it). A NaN
    reward (one the reward could not give) is left out of its group's mean and std, and gets 0."""
    g = rewards.view(-1, group_size).double()
    present = ~torch.isnan(g)
    n = present.sum(dim=1, keepdim=True).clamp(min=1)
    mean = torch.where(present, g, 0).sum(dim=1, keepdim=True) / n
    var = torch.where(present, (g - mean) ** 2, 0).sum(dim=1, keepdim=True) / n
    adv = (g - mean) / (var.sqrt() + ADVANTAGE_EPS)
    return torch.where(present, adv, 0).view(-1).to(rewards.dtype)


def optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """r ∈ [0, 1]: the clipped advantage mapped linearly, 0.5 for an average sample."""
    if clip <= 0:
        raise ValueError(f"DiffusionNFT: adv_clip must be > 0, got {clip}")
    return (advantages.clamp(-clip, clip) / (2 * clip) + 0.5).clamp(0, 1)


@dataclass
class NFTLoss:
    """The loss and its parts (per-batch means, detached but the total) for the log."""

    total: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    kl: torch.Tensor

    def terms(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "loss_positive": float(self.positive),
                "loss_negative": float(self.negative), "kl": float(self.kl)}


def nft_loss(current: torch.Tensor, old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor,
             r: torch.Tensor, *, prediction_type: str, beta: float, adv_clip: float,
             reference: torch.Tensor | None = None, kl_beta: float = 0.0,
             weights: torch.Tensor | None = None) -> NFTLoss:
    """DiffusionNFT's loss (module doc) for a batch: predictions of the current model (with grad),
    the old model and optionally the reference model (no grad), at x_t noised from the clean x0.
    `weights` (one per sample) turn the batch mean into a weighted sum: a caller that splits a step
    into micro-batches, or masks samples out, passes each sample's share of the step."""
    if beta <= 0:
        raise ValueError(f"DiffusionNFT: beta must be > 0, got {beta}")
    dims = tuple(range(1, x0.ndim))
    # fp32 before mixing: in bf16, (1+β)·p_old − β·p_θ would lose the small difference that is the signal
    current, old = current.float(), old.detach().float()
    x0 = x0.detach().float()
    positive_pred = beta * current + (1 - beta) * old
    negative_pred = (1 + beta) * old - beta * current
    x_t = None if x_t is None else x_t.float()  # None for "sample"
    x0_pos = clean_estimate(positive_pred.float(), x_t, a, prediction_type)
    x0_neg = clean_estimate(negative_pred.float(), x_t, a, prediction_type)
    with torch.no_grad():
        w_pos = (x0_pos - x0).abs().mean(dim=dims, keepdim=True).clamp(min=MIN_WEIGHT)
        w_neg = (x0_neg - x0).abs().mean(dim=dims, keepdim=True).clamp(min=MIN_WEIGHT)
    positive = ((x0_pos - x0) ** 2 / w_pos).mean(dim=dims)
    negative = ((x0_neg - x0) ** 2 / w_neg).mean(dim=dims)
    r = r.to(positive.device, positive.dtype)
    per_sample = adv_clip * (r * positive + (1 - r) * negative) / beta
    kl = torch.zeros_like(per_sample)
    if reference is not None and kl_beta > 0:
        kl = ((current - reference.detach().float()) ** 2).mean(dim=dims)
    total = per_sample + kl_beta * kl
    if weights is None:
        weights = torch.full_like(per_sample, 1.0 / per_sample.numel())
    weights = weights.to(per_sample.device, per_sample.dtype)
    share = weights / weights.sum().clamp(min=1e-12)  # the logged parts are means over the weighted samples
    return NFTLoss((weights * total).sum(), (share * positive).sum().detach(), (share * negative).sum().detach(),
                   (share * kl).sum().detach())


def ema_decay(step: int, *, flat: int = 0, rate: float = 0.001, max_decay: float = 0.5) -> float:
    """The old model's EMA decay at `step`: 0 for `flat` steps, then rising by `rate` up to `max_decay`
    (the published `return_decay`; its type 1 is these defaults, type 2 is flat 75, rate 0.0075, 0.999)."""
    if step < flat:
        return 0.0
    return float(min(max(0.0, (step - flat) * rate), max_decay))


@torch.no_grad()
def ema_update(old: list[torch.Tensor], current: list[torch.Tensor], decay: float) -> None:
    """old ← decay·old + (1 − decay)·current, in place."""
    for o, c in zip(old, current):
        o.mul_(decay).add_(c.detach().to(o.dtype), alpha=1 - decay)
