import math

import pytest
import torch

from rlhf_cluster.algos.core import NoParams
from rlhf_cluster.algos.preference import (
    PREFERENCE_LOSSES,
    CDPOParams,
    SimPOParams,
    bradley_terry_loss,
    get_preference_loss,
    kto_loss,
    register_preference_loss,
)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def call(name, c, r, lc=None, lr=None, rc=None, rr=None, beta=0.1, **params):
    n = len(c)
    return get_preference_loss(name).fn(
        chosen_logps=c, rejected_logps=r,
        chosen_lengths=lc if lc is not None else torch.ones(n, dtype=torch.float64),
        rejected_lengths=lr if lr is not None else torch.ones(n, dtype=torch.float64),
        ref_chosen_logps=rc, ref_rejected_logps=rr, beta=beta, **params,
    )


def test_bradley_terry_by_hand():
    loss, stats = bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2)
    assert stats["accuracy"].item() == 0.5 and stats["margin_mean"].item() == pytest.approx(0.0)
    loss, _ = bradley_terry_loss(t(2.0), t(1.0), margin=t(0.5))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)))


def test_bradley_terry_vs_loop():
    gen = torch.Generator().manual_seed(0)
    c, r, m = (torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(3))
    loss, stats = bradley_terry_loss(c, r, m)
    cl, rl, ml = c.tolist(), r.tolist(), m.tolist()
    assert loss.item() == pytest.approx(sum(-log_sigmoid(a - b - d) for a, b, d in zip(cl, rl, ml)) / 7)
    assert stats["accuracy"].item() == pytest.approx(sum(a > b for a, b in zip(cl, rl)) / 7)
    assert stats["margin_mean"].item() == pytest.approx(sum(a - b for a, b in zip(cl, rl)) / 7)


def test_registry():
    assert set(PREFERENCE_LOSSES) >= {"dpo", "cdpo", "ipo", "hinge", "simpo", "orpo"}
    assert PREFERENCE_LOSSES["cdpo"].name == "cdpo"
    assert PREFERENCE_LOSSES["cdpo"].params is CDPOParams and PREFERENCE_LOSSES["simpo"].params is SimPOParams
    for name in ("dpo", "ipo", "hinge", "orpo"):
        assert get_preference_loss(name).params is NoParams
    for name in ("dpo", "cdpo", "ipo", "hinge"):
        assert get_preference_loss(name).needs_reference
    for name in ("simpo", "orpo"):
        assert not get_preference_loss(name).needs_reference
    with pytest.raises(ValueError, match="dpo.*simpo"):
        get_preference_loss("kto_pair")
    with pytest.raises(ValueError):
        register_preference_loss("dpo", needs_reference=True)(lambda **k: None)
    with pytest.raises(ValueError, match=r"does not take its params \['gamma'\]"):
        register_preference_loss("test_no_gamma", needs_reference=False, params=SimPOParams)(lambda *, beta: None)
    assert "test_no_gamma" not in PREFERENCE_LOSSES
    with pytest.raises(ValueError):
        call("dpo", t(-1.0), t(-2.0))  # missing reference
    with pytest.raises(TypeError):  # each loss takes only its own parameters
        call("dpo", C, R, rc=RC, rr=RR, label_smoothing=0.1)


def test_params_check_their_ranges_and_fill_defaults():
    assert SimPOParams().gamma == 0.5
    for eps in (0.0, 0.5, -0.1):
        with pytest.raises(ValueError, match="label_smoothing must be > 0 and < 0.5"):
            CDPOParams(label_smoothing=eps)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        SimPOParams(gamma=-0.1)
    with pytest.raises(TypeError):  # cdpo's ε has no default: 0 would be plain dpo
        CDPOParams()


# chosen -10 (ref -12), rejected -11 (ref -10): h = 2 - (-1) = 3
C, R, RC, RR = t(-10.0), t(-11.0), t(-12.0), t(-10.0)


def test_dpo_by_hand():
    losses, cr, rr = call("dpo", C, R, rc=RC, rr=RR, beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.3)))
    assert cr.item() == pytest.approx(0.2) and rr.item() == pytest.approx(-0.1)
    losses, _, _ = call("cdpo", C, R, rc=RC, rr=RR, beta=0.1, label_smoothing=0.2)
    assert losses.item() == pytest.approx(0.8 * math.log1p(math.exp(-0.3)) + 0.2 * math.log1p(math.exp(0.3)))


def test_ipo_by_hand():
    # per-token: chosen (−10+12)/2 = 1, rejected (−11+10)/4 = −0.25 ; h = 1.25, 1/(2β) = 1
    losses, cr, rr = call("ipo", C, R, lc=t(2.0), lr=t(4.0), rc=RC, rr=RR, beta=0.5)
    assert losses.item() == pytest.approx(0.0625)
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.125)


def test_hinge_by_hand():
    losses, cr, _ = call("hinge", C, R, rc=RC, rr=RR, beta=0.1)
    assert losses.item() == pytest.approx(0.7)
    assert cr.item() == pytest.approx(0.2)
    losses, _, _ = call("hinge", C, R, rc=RC, rr=RR, beta=1.0)
    assert losses.item() == 0.0


def test_simpo_by_hand():
    # β·(−10/5) − β·(−12/4) − γ = −4 + 6 − 0.5 = 1.5
    losses, cr, rr = call("simpo", t(-10.0), t(-12.0), lc=t(5.0), lr=t(4.0), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)))
    assert cr.item() == pytest.approx(-4.0) and rr.item() == pytest.approx(-6.0)


def test_orpo_by_hand():
    a_c, a_r = -0.5, -1.5  # −2/4, −3/2
    lo_c = a_c - math.log(1 - math.exp(a_c))
    lo_r = a_r - math.log(1 - math.exp(a_r))
    losses, cr, rr = call("orpo", t(-2.0), t(-3.0), lc=t(4.0), lr=t(2.0), beta=0.25)
    assert losses.item() == pytest.approx(0.5 + 0.25 * math.log1p(math.exp(-(lo_c - lo_r))))
    assert cr.item() == pytest.approx(-0.125) and rr.item() == pytest.approx(-0.375)


def reference_loss(name, c, r, lc, lr, rc, rr, beta, eps, gamma):
    """Per-example loss and rewards written with math.* only."""
    if name in ("dpo", "cdpo", "hinge"):
        h = (c - rc) - (r - rr)
        if name == "hinge":
            return max(0.0, 1 - beta * h), beta * (c - rc), beta * (r - rr)
        if name == "dpo":
            return -log_sigmoid(beta * h), beta * (c - rc), beta * (r - rr)
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h), beta * (c - rc), beta * (r - rr)
    if name == "ipo":
        h = (c - rc) / lc - (r - rr) / lr
        return (h - 1 / (2 * beta)) ** 2, beta * (c - rc) / lc, beta * (r - rr) / lr
    if name == "simpo":
        return -log_sigmoid(beta * c / lc - beta * r / lr - gamma), beta * c / lc, beta * r / lr
    a_c, a_r = c / lc, r / lr
    lo = lambda a: a - math.log(1 - math.exp(a))
    return -a_c - beta * log_sigmoid(lo(a_c) - lo(a_r)), beta * a_c, beta * a_r


@pytest.mark.parametrize("name", ["dpo", "cdpo", "ipo", "hinge", "simpo", "orpo"])
def test_preference_losses_vs_loop(name):
    gen = torch.Generator().manual_seed(1)
    B = 9
    lc = torch.randint(1, 50, (B,), generator=gen)  # int lengths
    lr = torch.randint(1, 50, (B,), generator=gen)
    c = -torch.rand(B, generator=gen, dtype=torch.float64) * lc * 2
    r = -torch.rand(B, generator=gen, dtype=torch.float64) * lr * 2
    rc = c + torch.randn(B, generator=gen, dtype=torch.float64)
    rr = r + torch.randn(B, generator=gen, dtype=torch.float64)
    beta, eps, gamma = 0.3, 0.1, 0.7
    params = {"cdpo": {"label_smoothing": eps}, "simpo": {"gamma": gamma}}.get(name, {})
    c.requires_grad_(True)
    losses, cr, rw = call(name, c, r, lc, lr, rc, rr, beta=beta, **params)
    assert losses.shape == cr.shape == rw.shape == (B,)
    assert losses.requires_grad and not cr.requires_grad and not rw.requires_grad
    for i in range(B):
        exp = reference_loss(name, c[i].item(), r[i].item(), lc[i].item(), lr[i].item(),
                             rc[i].item(), rr[i].item(), beta, eps, gamma)
        assert (losses[i].item(), cr[i].item(), rw[i].item()) == pytest.approx(exp)


def test_orpo_finite_at_extremes():
    c = torch.tensor([-1e-6, -1e3, 0.0, -20.0], requires_grad=True)
    r = torch.tensor([-1e3, -1e-6, -5.0, 0.0], requires_grad=True)
    ones = torch.ones(4)
    losses, cr, rr = call("orpo", c, r, lc=ones, lr=ones, beta=0.5)
    assert torch.isfinite(losses).all()
    losses.sum().backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    # a = −1e-6: log odds = a − log(1 − e^a) ≈ −log(1e-6)
    lo_c = -1e-6 - math.log(-math.expm1(-1e-6))
    lo_r = -1e3 - math.log1p(-math.exp(-1e3))
    assert losses[0].item() == pytest.approx(1e-6 + 0.5 * -log_sigmoid(lo_c - lo_r), rel=1e-4)


def kto(**kw):
    base = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    base.update(kw)
    return kto_loss(**base)


def test_kto_by_hand():
    loss, stats = kto(policy_logps=t(-5.0, -6.0), ref_logps=t(-6.0, -5.0), kl_policy_logps=t(-3.0, -4.0),
                      kl_ref_logps=t(-3.5, -4.1), desirable=torch.tensor([True, False]))
    z0 = 0.3  # mean(0.5, 0.1)
    sig = lambda x: 1 / (1 + math.exp(-x))
    l0 = 1.0 * (1 - sig(0.5 * (1.0 - z0)))
    l1 = 2.0 * (1 - sig(0.5 * (z0 - (-1.0))))
    assert loss.item() == pytest.approx((l0 + l1) / 2)
    assert stats["kl_ref_point"].item() == pytest.approx(z0)
    assert stats["chosen_rewards_mean"].item() == pytest.approx(0.5)
    assert stats["rejected_rewards_mean"].item() == pytest.approx(-0.5)
    # negative KL estimate is clamped to 0; no undesirable examples -> rejected mean 0
    loss, stats = kto(policy_logps=t(-5.0), ref_logps=t(-6.0), kl_policy_logps=t(-5.0), kl_ref_logps=t(-4.0),
                      desirable=torch.tensor([True]))
    assert stats["kl_ref_point"].item() == 0.0 and stats["rejected_rewards_mean"].item() == 0.0
    assert loss.item() == pytest.approx(1 - sig(0.5))


def test_kto_vs_loop():
    gen = torch.Generator().manual_seed(2)
    B, beta, wd, wu = 10, 0.2, 1.5, 0.7
    pol, ref, kp, kr = (-torch.rand(B, generator=gen, dtype=torch.float64) * 20 for _ in range(4))
    des = torch.rand(B, generator=gen) > 0.5
    loss, stats = kto_loss(policy_logps=pol, ref_logps=ref, kl_policy_logps=kp, kl_ref_logps=kr,
                           desirable=des, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    z0 = max(0.0, sum(kp[i].item() - kr[i].item() for i in range(B)) / B)
    total, ch, rj = 0.0, [], []
    for i in range(B):
        r = pol[i].item() - ref[i].item()
        if des[i]:
            total += wd * (1 - 1 / (1 + math.exp(-beta * (r - z0))))
            ch.append(beta * r)
        else:
            total += wu * (1 - 1 / (1 + math.exp(-beta * (z0 - r))))
            rj.append(beta * r)
    assert loss.item() == pytest.approx(total / B)
    assert stats["kl_ref_point"].item() == pytest.approx(z0)
    assert stats["chosen_rewards_mean"].item() == pytest.approx(sum(ch) / len(ch) if ch else 0.0)
    assert stats["rejected_rewards_mean"].item() == pytest.approx(sum(rj) / len(rj) if rj else 0.0)


def test_kto_reference_point_detached():
    pol = torch.tensor([-5.0, -6.0], requires_grad=True)
    kp = torch.tensor([-3.0, -4.0], requires_grad=True)
    kr = torch.tensor([-3.5, -4.5], requires_grad=True)
    loss, stats = kto(policy_logps=pol, ref_logps=torch.tensor([-6.0, -5.0]), kl_policy_logps=kp,
                      kl_ref_logps=kr, desirable=torch.tensor([True, False]))
    g_pol, g_kp, g_kr = torch.autograd.grad(loss, [pol, kp, kr], allow_unused=True)
    assert g_pol is not None and torch.all(g_pol != 0)
    assert g_kp is None and g_kr is None
    assert not stats["kl_ref_point"].requires_grad
