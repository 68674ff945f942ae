import math

import pytest
import torch

from rlhf_cluster.algos.core import masked_mean
from rlhf_cluster.algos.ppo import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    DualClipParams,
    explained_variance,
    get_policy_loss,
    kl_loss,
    ppo_policy_loss,
    ppo_value_loss,
    register_policy_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_policy_loss_by_hand():
    old = t([0.0, 0.0, 0.0])
    logp = t([math.log(1.5), math.log(1.1), 3.0])  # third token is padding
    adv = t([1.0, -1.0, 100.0])
    mask = t([1.0, 1.0, 0.0])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(1.1, 1.1) = 1.1 (not clipped)
    assert loss.item() == pytest.approx((-1.2 + 1.1) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(1.3)
    k3 = (0.5 - math.log(1.5) + 0.1 - math.log(1.1)) / 2
    assert stats["approx_kl"].item() == pytest.approx(k3)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_policy_loss_asymmetric_and_dual_clip_by_hand():
    mask = t([1.0])
    # ratio 1.25, A=1: inside [0.8, 1.28] -> -1.25
    loss, _ = ppo_policy_loss(t([math.log(1.25)]), t([0.0]), t([1.0]), mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(-1.25)
    # ratio 5, A=-1: standard = max(5, 1.2) = 5; dual clip c=3 -> min(5, 3) = 3
    loss, _ = ppo_policy_loss(t([math.log(5.0)]), t([0.0]), t([-1.0]), mask, 0.2, 0.2)
    assert loss.item() == pytest.approx(5.0)
    loss, _ = ppo_policy_loss(t([math.log(5.0)]), t([0.0]), t([-1.0]), mask, 0.2, 0.2, policy_loss="dual_clip",
                              policy_loss_params={"c": 3.0})
    assert loss.item() == pytest.approx(3.0)
    # the registry's default c is 3.0; c=4 -> min(5, 4) = 4
    loss, _ = ppo_policy_loss(t([math.log(5.0)]), t([0.0]), t([-1.0]), mask, 0.2, 0.2, policy_loss="dual_clip")
    assert loss.item() == pytest.approx(3.0)
    loss, _ = ppo_policy_loss(t([math.log(5.0)]), t([0.0]), t([-1.0]), mask, 0.2, 0.2, policy_loss="dual_clip",
                              policy_loss_params={"c": 4.0})
    assert loss.item() == pytest.approx(4.0)
    # A > 0 is untouched by dual clip: ratio 5, A=1 -> max(-5, -1.2) = -1.2
    loss, _ = ppo_policy_loss(t([math.log(5.0)]), t([0.0]), t([1.0]), mask, 0.2, 0.2, policy_loss="dual_clip")
    assert loss.item() == pytest.approx(-1.2)


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_dual_clip_must_exceed_one(c):
    with pytest.raises(ValueError, match="c must be > 1"):
        DualClipParams(c=c)
    with pytest.raises(ValueError, match="c must be > 1"):
        ppo_policy_loss(t([0.0]), t([0.0]), t([1.0]), t([1.0]), 0.2, 0.2, policy_loss="dual_clip", policy_loss_params={"c": c})


def test_policy_loss_registry():
    assert set(POLICY_LOSSES) >= {"vanilla", "dual_clip"}
    assert get_policy_loss("dual_clip").params is DualClipParams and DualClipParams().c == 3.0
    assert set(LOSS_AGG_MODES) == {"token_mean", "seq_mean_token_sum", "seq_mean_token_mean"}
    with pytest.raises(ValueError, match="dual_clip.*vanilla"):
        get_policy_loss("vanila")
    with pytest.raises(ValueError, match="token_mean"):
        ppo_policy_loss(t([0.0]), t([0.0]), t([1.0]), t([1.0]), 0.2, 0.2, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("vanilla")(lambda ratio, advantages, **k: None)
    with pytest.raises(ValueError, match=r"does not take its params \['c'\]"):
        register_policy_loss("test_no_c", params=DualClipParams)(lambda ratio, advantages, *, clip_eps_low, clip_eps_high: None)
    with pytest.raises(TypeError):  # vanilla has no parameters
        ppo_policy_loss(t([0.0]), t([0.0]), t([1.0]), t([1.0]), 0.2, 0.2, policy_loss_params={"c": 3.0})


def test_default_path_is_the_pre_registry_formula_bit_for_bit():
    """vanilla + token_mean: the same operations as before the registry, so recorded runs still reproduce."""
    gen = torch.Generator().manual_seed(3)
    logp = (-torch.rand(5, 7, generator=gen) * 2).requires_grad_(True)
    old, adv = -torch.rand(5, 7, generator=gen) * 2, torch.randn(5, 7, generator=gen)
    mask = (torch.rand(5, 7, generator=gen) > 0.3).float()
    loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, 0.28)
    (grad,) = torch.autograd.grad(loss, logp)
    ratio = torch.exp((logp - old).clamp(-20.0, 20.0))
    before = masked_mean(torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28)), mask)
    (grad_before,) = torch.autograd.grad(before, logp)
    assert torch.equal(loss, before) and torch.equal(grad, grad_before)


def test_loss_agg_modes_by_hand():
    loss_t = t([1.0, 2.0, 99.0], [3.0, 99.0, 99.0], [99.0, 99.0, 99.0])
    mask = t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0])  # the last row has no response tokens: not a sequence
    assert LOSS_AGG_MODES["token_mean"](loss_t, mask).item() == pytest.approx((1 + 2 + 3) / 3)
    assert LOSS_AGG_MODES["seq_mean_token_sum"](loss_t, mask).item() == pytest.approx((3 + 3) / 2)
    assert LOSS_AGG_MODES["seq_mean_token_mean"](loss_t, mask).item() == pytest.approx((1.5 + 3) / 2)
    for agg in LOSS_AGG_MODES.values():
        assert agg(loss_t, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize("policy_loss, params", [("vanilla", {}), ("dual_clip", {"c": 2.5})])
def test_policy_loss_vs_loop(policy_loss, params, agg):
    gen = torch.Generator().manual_seed(0)
    B, T, lo, hi = 4, 6, 0.2, 0.3
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64) * 2
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, lo, hi, policy_loss=policy_loss, policy_loss_params=params,
                                  loss_agg_mode=agg)
    rows, clipped, kls, ratios = [], [], [], []
    for i in range(B):
        row = []
        for j in range(int(lengths[i])):
            lr = logp[i, j].item() - old[i, j].item()
            r, a = math.exp(lr), adv[i, j].item()
            u, c = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
            l = max(u, c)
            if policy_loss == "dual_clip" and a < 0:
                l = min(l, -a * params["c"])
            row.append(l)
            clipped.append(1.0 if c > u else 0.0)
            kls.append(r - 1 - lr)
            ratios.append(r)
        rows.append(row)
    n = len(clipped)
    expected = {"token_mean": sum(sum(row) for row in rows) / n,
                "seq_mean_token_sum": sum(sum(row) for row in rows) / B,
                "seq_mean_token_mean": sum(sum(row) / len(row) for row in rows) / B}[agg]
    assert loss.item() == pytest.approx(expected)
    assert stats["clipfrac"].item() == pytest.approx(sum(clipped) / n)
    assert stats["approx_kl"].item() == pytest.approx(sum(kls) / n)
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / n)


def test_policy_loss_garbage_padding_has_finite_grad():
    logp = torch.tensor([[-1.0, 1e4]], requires_grad=True)
    old = torch.tensor([[-1.2, -1e4]])
    loss, _ = ppo_policy_loss(logp, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]), 0.2, 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 1].item() == 0.0


def test_value_loss_by_hand():
    values, old, ret = t([1.0, 0.6, 50.0]), t([0.5, 0.5, 0.0]), t([2.0, 0.0, 0.0])
    mask = t([1.0, 1.0, 0.0])
    # token 0: unclipped 1, V_clip = 0.7 -> 1.69 (clipped larger); token 1: 0.36 both
    loss, stats = ppo_value_loss(values, old, ret, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.36) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    loss, stats = ppo_value_loss(values, old, ret, mask, clip_eps=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.36) / 2)
    assert stats["vf_clipfrac"].item() == 0.0


def test_value_loss_vs_loop():
    gen = torch.Generator().manual_seed(1)
    B, T, eps = 3, 5, 0.1
    values, old, ret = (torch.randn(B, T, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(B, T, generator=gen) > 0.3).double()
    loss, stats = ppo_value_loss(values, old, ret, mask, clip_eps=eps)
    ls, cf = [], []
    for i in range(B):
        for j in range(T):
            if mask[i, j] == 0:
                continue
            v, o, r = values[i, j].item(), old[i, j].item(), ret[i, j].item()
            vc = o + min(max(v - o, -eps), eps)
            ls.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
            cf.append(1.0 if (vc - r) ** 2 > (v - r) ** 2 else 0.0)
    assert loss.item() == pytest.approx(sum(ls) / len(ls))
    assert stats["vf_clipfrac"].item() == pytest.approx(sum(cf) / len(cf))


def test_explained_variance_by_hand():
    ret, mask = t([1.0, 2.0, 3.0, 99.0]), t([1.0, 1.0, 1.0, 0.0])
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret), ret, mask).item() == pytest.approx(0.0)
    # residual [0, 0, 1]: unbiased var 1/3; Var[R] = 1
    assert explained_variance(t([1.0, 2.0, 2.0, 0.0]), ret, mask).item() == pytest.approx(2 / 3)
    const = t([4.0, 4.0, 4.0, 0.0])
    assert explained_variance(t([1.0, 2.0, 3.0, 0.0]), const, mask).item() == 0.0


def test_explained_variance_vs_loop():
    gen = torch.Generator().manual_seed(2)
    values, ret = (torch.randn(3, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = (torch.rand(3, 6, generator=gen) > 0.3).double()
    idx = [(i, j) for i in range(3) for j in range(6) if mask[i, j] > 0]

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    R = [ret[i, j].item() for i, j in idx]
    res = [ret[i, j].item() - values[i, j].item() for i, j in idx]
    assert explained_variance(values, ret, mask).item() == pytest.approx(1 - var(res) / var(R))


def test_kl_loss_by_hand():
    """Token (0,0): π = 0.5, π_ref = 0.25, so r = π_ref/π = 0.5, k3 = r - log r - 1 = log 2 - 0.5 and k1 = log 2.
    Tokens (0,1) and (1,0) have π = π_ref (0); (1,1) is masked out."""
    logp = t([math.log(0.5), math.log(0.5)], [math.log(0.25), 0.0])
    ref = t([math.log(0.25), math.log(0.5)], [math.log(0.25), -5.0])
    mask = t([1, 1], [1, 0])
    k3 = math.log(2) - 0.5
    assert kl_loss(logp, ref, mask, "k3", "token_mean").item() == pytest.approx(k3 / 3)
    assert kl_loss(logp, ref, mask, "k3", "seq_mean_token_mean").item() == pytest.approx((k3 / 2 + 0.0) / 2)
    assert kl_loss(logp, ref, mask, "k1", "seq_mean_token_sum").item() == pytest.approx(math.log(2) / 2)


def test_kl_loss_gradient_is_the_kl_gradient():
    """d k3 / d log π = 1 - π_ref/π: the gradient of KL(π‖π_ref) per sampled token, zero where π = π_ref."""
    logp = t([math.log(0.5), math.log(0.25)]).requires_grad_()
    ref = t([math.log(0.25), math.log(0.25)])
    kl_loss(logp, ref, t([1, 1]), "k3", "seq_mean_token_sum").backward()
    assert logp.grad[0].tolist() == pytest.approx([1 - 0.25 / 0.5, 0.0])
