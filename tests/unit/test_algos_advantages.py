import dataclasses
import math

import pytest
import torch

from rlhf_cluster.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    get_advantage_estimator,
    register_advantage_estimator,
)


def run(name, rewards, mask, values=None, group_size=1, gamma=1.0, lam=1.0, std_eps=1e-6):
    fn = get_advantage_estimator(name).fn
    return fn(rewards, mask, values=values, group_size=group_size, gamma=gamma, lam=lam, std_eps=std_eps)


def random_batch(B, T, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return rewards, values, mask


def test_registry():
    assert set(ADVANTAGE_ESTIMATORS) >= {"gae", "grpo", "rloo", "reinforce_pp"}
    g = get_advantage_estimator("gae")
    assert (g.needs_critic, g.needs_groups, g.whiten) == (True, False, True)
    assert (get_advantage_estimator("grpo").needs_groups, get_advantage_estimator("grpo").whiten) == (True, False)
    assert get_advantage_estimator("rloo").needs_groups and not get_advantage_estimator("rloo").needs_critic
    rpp = get_advantage_estimator("reinforce_pp")
    assert (rpp.needs_critic, rpp.needs_groups, rpp.whiten) == (False, False, False)
    with pytest.raises(ValueError, match="gae.*grpo"):
        get_advantage_estimator("vtrace")
    with pytest.raises(ValueError):
        register_advantage_estimator("gae", needs_critic=True, needs_groups=False, whiten=True)(lambda *a, **k: None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.name = "x"


def test_registry_checks_the_keywords():
    """An estimator written before std_eps existed fails when registered, not at the first training step."""

    def old(token_rewards, mask, *, values, group_size, gamma, lam):
        return token_rewards, token_rewards

    with pytest.raises(ValueError, match=r"'old_sig': old does not take the keyword\(s\) \['std_eps'\]"):
        register_advantage_estimator("old_sig", needs_critic=False, needs_groups=False, whiten=False)(old)
    assert "old_sig" not in ADVANTAGE_ESTIMATORS
    register_advantage_estimator("kwargs_sig", needs_critic=False, needs_groups=False, whiten=False)(lambda r, m, **k: (r, r))
    ADVANTAGE_ESTIMATORS.pop("kwargs_sig")


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])  # last token is padding
    values = torch.tensor([[0.5, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = run("gae", rewards, mask, values=values, gamma=0.9, lam=0.8)
    # t=1: δ = 1 + 0.9*0 - 0.2 = 0.8, A=0.8 ; t=0: δ = 0 + 0.9*0.2 - 0.5 = -0.32, A = -0.32 + 0.72*0.8
    assert torch.allclose(adv, torch.tensor([[0.256, 0.8, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.756, 1.0, 0.0]]))


def test_gae_vs_loop():
    rewards, values, mask = random_batch(5, 8, seed=0)
    gamma, lam = 0.99, 0.95
    adv, ret = run("gae", rewards, mask, values=values, gamma=gamma, lam=lam)
    for i in range(5):
        n = int(mask[i].sum().item())
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist()
        a = [0.0] * n
        running = 0.0
        for t in reversed(range(n)):
            nv = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * nv - v[t] + gamma * lam * running
            a[t] = running
        for t in range(8):
            assert adv[i, t].item() == pytest.approx(a[t] if t < n else 0.0)
            assert ret[i, t].item() == pytest.approx(a[t] + v[t] if t < n else 0.0)


def test_gae_needs_values():
    with pytest.raises(ValueError):
        run("gae", torch.zeros(2, 3), torch.ones(2, 3))


def test_grpo_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 2.0], [2.0, 9.0], [0.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    adv, ret = run("grpo", rewards, mask, group_size=2)
    # group 1: R = [1, 3], mean 2, unbiased std sqrt(2); group 2: R = [2, 2] -> 0
    a = 1 / (math.sqrt(2) + 1e-6)
    expected = torch.tensor([[-a, -a], [a, a], [0.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(adv, expected)
    assert torch.equal(adv, ret)


def test_grpo_std_eps_damps_a_near_constant_group():
    rewards = torch.tensor([[1.0], [1.0], [1.0], [1.00002]], dtype=torch.float64)
    mask = torch.ones(4, 1, dtype=torch.float64)
    # R = [1, 1, 1, 1 + 2e-5]: mean 1 + 5e-6, deviations [-5e-6, -5e-6, -5e-6, 1.5e-5],
    # unbiased std = sqrt((3 * 25e-12 + 225e-12) / 3) = 1e-5
    dev = [-5e-6, -5e-6, -5e-6, 1.5e-5]
    for eps in (1e-6, 1e-4):
        adv, _ = run("grpo", rewards, mask, group_size=4, std_eps=eps)
        assert adv[:, 0].tolist() == pytest.approx([d / (1e-5 + eps) for d in dev], rel=1e-6)
    small, _ = run("grpo", rewards, mask, group_size=4, std_eps=1e-6)
    large, _ = run("grpo", rewards, mask, group_size=4, std_eps=1e-4)
    # ε = 1e-6: a 2e-5 spread becomes a full-size advantage (1.5e-5 / 1.1e-5 ≈ 1.36);
    # ε = 1e-4 (TRL's): damped 10× (1.5e-5 / 1.1e-4 ≈ 0.136)
    assert small[3, 0].item() == pytest.approx(15 / 11, rel=1e-6) and large[3, 0].item() == pytest.approx(0.15 / 1.1, rel=1e-6)
    # a group with a real spread barely notices ε: R = [1, 3] -> ±1 / (sqrt 2 + ε)
    spread, _ = run("grpo", torch.tensor([[1.0], [3.0]], dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64),
                    group_size=2, std_eps=1e-4)
    assert spread[:, 0].tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])


@pytest.mark.parametrize("name", ["gae", "rloo", "reinforce_pp"])
def test_other_estimators_ignore_std_eps(name):
    rewards, values, mask = random_batch(4, 5, seed=4)
    a = run(name, rewards, mask, values=values, group_size=2, gamma=0.9, lam=0.9, std_eps=1e-6)
    b = run(name, rewards, mask, values=values, group_size=2, gamma=0.9, lam=0.9, std_eps=0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_rloo_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 7.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    adv, ret = run("rloo", rewards, mask, group_size=3)
    # A_1 = 1 - (3+5)/2, A_2 = 3 - (1+5)/2, A_3 = 5 - (1+3)/2
    assert torch.allclose(adv, torch.tensor([[-3.0, 0.0], [0.0, 0.0], [3.0, 0.0]]))
    assert torch.equal(adv, ret)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_estimators_vs_loop(name):
    g = 4
    rewards, _, mask = random_batch(12, 6, seed=1)
    adv, _ = run(name, rewards, mask, group_size=g)
    R = [sum(rewards[i, t].item() for t in range(6) if mask[i, t] > 0) for i in range(12)]
    for start in range(0, 12, g):
        grp = R[start:start + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))
        for k in range(g):
            i = start + k
            if name == "grpo":
                a = (R[i] - mean) / (std + 1e-6)
            else:
                a = R[i] - sum(grp[j] for j in range(g) if j != k) / (g - 1)
            for t in range(6):
                assert adv[i, t].item() == pytest.approx(a if mask[i, t] > 0 else 0.0)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_errors(name):
    with pytest.raises(ValueError, match=r"6.*4"):
        run(name, torch.zeros(6, 2), torch.ones(6, 2), group_size=4)
    with pytest.raises(ValueError):
        run(name, torch.zeros(6, 2), torch.ones(6, 2), group_size=1)


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    adv, ret = run("reinforce_pp", rewards, mask, gamma=0.5)
    # G = [1 + 0.5*(0 + 0.5*2), 0 + 0.5*2, 2] = [1.5, 1, 2]; mean 1.5, unbiased var 0.25
    assert torch.allclose(ret, torch.tensor([[1.5, 1.0, 2.0, 0.0]], dtype=torch.float64))
    s = math.sqrt(0.25 + 1e-8)
    assert torch.allclose(adv, torch.tensor([[0.0, -0.5 / s, 0.5 / s, 0.0]], dtype=torch.float64))


def test_reinforce_pp_vs_loop():
    rewards, _, mask = random_batch(4, 7, seed=2)
    gamma = 0.9
    adv, ret = run("reinforce_pp", rewards, mask, gamma=gamma)
    G = []
    for i in range(4):
        n = int(mask[i].sum().item())
        row, running = [0.0] * 7, 0.0
        for t in reversed(range(n)):
            running = rewards[i, t].item() + gamma * running
            row[t] = running
        G.append(row)
    flat = [G[i][t] for i in range(4) for t in range(7) if mask[i, t] > 0]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1) + 1e-8)
    for i in range(4):
        for t in range(7):
            valid = mask[i, t] > 0
            assert ret[i, t].item() == pytest.approx(G[i][t])
            assert adv[i, t].item() == pytest.approx((G[i][t] - mean) / std if valid else 0.0)


@pytest.mark.parametrize("name", ["gae", "grpo", "rloo", "reinforce_pp"])
def test_masked_positions_zero(name):
    rewards, values, mask = random_batch(8, 5, seed=3)
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))
    adv, ret = run(name, rewards, mask, values=values, group_size=2, gamma=0.9, lam=0.9)
    assert adv.shape == ret.shape == mask.shape
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)
    assert torch.isfinite(adv).all() and adv.abs().max() < 1e3
