"""DiffusionNFT's objective on tensors whose loss is computed by hand here (references.md, DiffusionNFT)."""

import math

import pytest
import torch

from realsr_r1.training import nft

A = 0.64  # ᾱ: √ᾱ = 0.8, √(1−ᾱ) = 0.6
X0 = [1.0, 0.0]
XT = [0.5, 0.5]
CURRENT = [0.2, -0.1]
OLD = [0.1, 0.3]
BETA, CLIP = 0.5, 5.0


def by_hand_x0(p: list[float], kind: str) -> list[float]:
    if kind == "v_prediction":
        return [0.8 * x - 0.6 * q for x, q in zip(XT, p)]
    return [(x - 0.6 * q) / 0.8 for x, q in zip(XT, p)]


def by_hand_term(pred: list[float], kind: str) -> float:
    """‖x0(pred) − x0‖² / mean|x0(pred) − x0| (means over the two elements)."""
    d = [e - x for e, x in zip(by_hand_x0(pred, kind), X0)]
    return (sum(v * v for v in d) / 2) / max(sum(abs(v) for v in d) / 2, 1e-5)


def tensors():
    shape = (1, 1, 1, 2)
    t = lambda v: torch.tensor(v, dtype=torch.float32).view(shape)  # noqa: E731
    current = t(CURRENT).requires_grad_(True)
    return current, t(OLD), t(XT), t(X0), torch.full((1, 1, 1, 1), A)


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
@pytest.mark.parametrize("r", [1.0, 0.0, 0.25])
def test_the_loss_is_the_hand_computed_mix_of_positive_and_negative_terms(kind, r):
    current, old, x_t, x0, a = tensors()
    out = nft.nft_loss(current, old, x_t, x0, a, torch.tensor([r]), prediction_type=kind, beta=BETA, adv_clip=CLIP)
    positive_pred = [BETA * c + (1 - BETA) * o for c, o in zip(CURRENT, OLD)]
    negative_pred = [(1 + BETA) * o - BETA * c for c, o in zip(CURRENT, OLD)]
    pos, neg = by_hand_term(positive_pred, kind), by_hand_term(negative_pred, kind)
    assert float(out.positive) == pytest.approx(pos, rel=1e-5)
    assert float(out.negative) == pytest.approx(neg, rel=1e-5)
    assert float(out.total.detach()) == pytest.approx(CLIP * (r * pos + (1 - r) * neg) / BETA, rel=1e-5)
    assert pos != pytest.approx(neg, rel=1e-2)  # the two terms are distinguishable on these numbers


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_r_one_pulls_the_positive_estimate_and_r_zero_the_negative_one_towards_x0(kind):
    """The gradient with respect to the current prediction: at r = 1 one step lowers the positive
    term; at r = 0 it lowers the negative term (and moves the current prediction the other way)."""
    moved = {}
    for r in (1.0, 0.0):
        current, old, x_t, x0, a = tensors()
        out = nft.nft_loss(current, old, x_t, x0, a, torch.tensor([r]), prediction_type=kind, beta=BETA, adv_clip=CLIP)
        out.total.backward()
        stepped = (current - 1e-3 * current.grad).detach()
        after = nft.nft_loss(stepped, old, x_t, x0, a, torch.tensor([r]), prediction_type=kind, beta=BETA, adv_clip=CLIP)
        moved[r] = stepped - current.detach()
        if r == 1.0:
            assert float(after.positive) < float(out.positive)
        else:
            assert float(after.negative) < float(out.negative)
    # the negative estimate moves against the current prediction: the two steps point opposite ways
    assert float((moved[1.0] * moved[0.0]).sum()) < 0


def test_clean_estimate_matches_the_ddim_scheduler():
    from diffusers import DDIMScheduler

    for kind in nft.PREDICTION_TYPES:
        sched = DDIMScheduler(num_train_timesteps=1000, prediction_type=kind, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
        sched.set_timesteps(10)
        g = torch.Generator().manual_seed(0)
        x_t, pred = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
        t = sched.timesteps[3]
        expected = sched.step(pred, t, x_t).pred_original_sample
        a = nft.alpha_bar(sched.alphas_cumprod, torch.tensor([int(t)] * 2), x_t)
        assert torch.allclose(nft.clean_estimate(pred, x_t, a, kind), expected, atol=1e-5)
    assert nft.clean_estimate(pred, None, None, "sample") is pred  # a one-step model's output is x0 itself
    with pytest.raises(ValueError, match="flow"):
        nft.clean_estimate(pred, x_t, a, "flow")


def test_weights_turn_the_mean_into_a_weighted_sum_and_bf16_predictions_mix_in_fp32():
    current, old, x_t, x0, a = tensors()
    two = lambda t: torch.cat([t, t])  # noqa: E731
    r = torch.tensor([1.0, 0.0])
    full = nft.nft_loss(two(current), two(old), two(x_t), two(x0), two(a), r, prediction_type="epsilon",
                        beta=BETA, adv_clip=CLIP)
    masked = nft.nft_loss(two(current), two(old), two(x_t), two(x0), two(a), r, prediction_type="epsilon",
                          beta=BETA, adv_clip=CLIP, weights=torch.tensor([1.0, 0.0]))
    first = nft.nft_loss(current, old, x_t, x0, a, r[:1], prediction_type="epsilon", beta=BETA, adv_clip=CLIP)
    assert float(masked.total.detach()) == pytest.approx(float(first.total.detach()), rel=1e-6)
    assert float(full.total.detach()) != pytest.approx(float(first.total.detach()), rel=1e-3)
    # old and current differ by less than bf16 resolves around 1: mixed in fp32 the negative term sees it
    base = torch.full((1, 1, 1, 2), 1.0)
    cur, prev = (base + 1e-3).to(torch.bfloat16), base.to(torch.bfloat16)
    out = nft.nft_loss(cur, prev, x_t, x0, a, torch.tensor([0.0]), prediction_type="epsilon", beta=0.1, adv_clip=CLIP)
    by_hand = by_hand_term([1.1 * 1.0 - 0.1 * float(cur.flatten()[0])] * 2, "epsilon")
    assert float(out.negative) == pytest.approx(by_hand, rel=1e-5)


def test_kl_term_is_the_mean_squared_distance_to_the_reference():
    current, old, x_t, x0, a = tensors()
    ref = torch.tensor([0.0, 0.0]).view(1, 1, 1, 2)
    out = nft.nft_loss(current, old, x_t, x0, a, torch.tensor([1.0]), prediction_type="epsilon", beta=BETA,
                       adv_clip=CLIP, reference=ref, kl_beta=0.1)
    plain = nft.nft_loss(current, old, x_t, x0, a, torch.tensor([1.0]), prediction_type="epsilon", beta=BETA, adv_clip=CLIP)
    kl = (0.2**2 + 0.1**2) / 2
    assert float(out.kl) == pytest.approx(kl)
    assert float(out.total.detach()) == pytest.approx(float(plain.total.detach()) + 0.1 * kl, rel=1e-6)


def test_advantages_and_r():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = nft.group_advantages(rewards, 3)
    std = (2 / 3) ** 0.5  # the population std of 1, 2, 3 (np.std, as the released code)
    assert adv[:3].tolist() == pytest.approx([-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4)], rel=1e-6)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # a flat group teaches nothing: r = 0.5 for each
    # a reward that could not be given is left out of its group: the others are ranked among themselves
    gapped = nft.group_advantages(torch.tensor([0.80, 0.81, 0.82, float("nan")]), 4)
    s = 0.01 * (2 / 3) ** 0.5
    assert gapped.tolist() == pytest.approx([-0.01 / (s + 1e-4), 0.0, 0.01 / (s + 1e-4), 0.0], rel=1e-4)
    r = nft.optimality(torch.tensor([-10.0, -5.0, 0.0, 2.5, 10.0]), clip=5.0)
    assert r.tolist() == [0.0, 0.0, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="adv_clip"):
        nft.optimality(adv, 0.0)


def test_ema_decay_schedule_and_update():
    assert nft.ema_decay(0) == 0.0
    assert nft.ema_decay(100) == pytest.approx(0.1)
    assert nft.ema_decay(10_000) == 0.5
    assert nft.ema_decay(50, flat=75, rate=0.0075, max_decay=0.999) == 0.0
    assert nft.ema_decay(175, flat=75, rate=0.0075, max_decay=0.999) == pytest.approx(0.75)
    old, cur = [torch.tensor([0.0, 4.0])], [torch.tensor([2.0, 0.0])]
    nft.ema_update(old, cur, 0.25)
    assert old[0].tolist() == [1.5, 1.0]
    assert not math.isnan(nft.ema_decay(-3))
