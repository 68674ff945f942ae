import math

import pytest
import torch

from rlhf_cluster.algos.core import (
    KL_ESTIMATORS,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    token_level_rewards,
)


def random_mask(B, T, gen, min_len=1):
    """Right-padded (B, T) float64 mask with random lengths in [min_len, T]."""
    lengths = torch.randint(min_len, T + 1, (B,), generator=gen)
    return (torch.arange(T)[None, :] < lengths[:, None]).double()


X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_sum_mean_by_hand():
    assert masked_sum(X, M).item() == pytest.approx(7.0)
    assert masked_mean(X, M).item() == pytest.approx(7.0 / 3.0)
    assert torch.allclose(masked_sum(X, M, dim=-1), torch.tensor([3.0, 4.0]))
    assert torch.allclose(masked_mean(X, M, dim=-1), torch.tensor([1.5, 4.0]))
    assert torch.allclose(masked_mean(X, M.bool(), dim=0), torch.tensor([2.5, 2.0, 0.0]))
    assert masked_mean(X, torch.zeros_like(M)).item() == 0.0


def test_masked_reductions_ignore_nan_padding():
    x = torch.tensor([1.0, float("nan"), float("inf")])
    m = torch.tensor([1.0, 0.0, 0.0])
    assert masked_sum(x, m).item() == 1.0
    assert masked_mean(x, m).item() == 1.0


def test_masked_var_by_hand():
    x = torch.tensor([[1.0, 2.0, 4.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(42 / 27)
    assert masked_var(x, m, unbiased=True).item() == pytest.approx(42 / 18)
    one = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert masked_var(x, one).item() == 0.0


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 4.0, 100.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    mean, std = 7 / 3, math.sqrt(7 / 3 + 1e-8)
    expected = torch.tensor([[(1 - mean) / std, (2 - mean) / std, (4 - mean) / std, 0.0]], dtype=torch.float64)
    assert torch.allclose(masked_whiten(x, m), expected)
    noshift = [(1 - mean) / std + mean, (2 - mean) / std + mean, (4 - mean) / std + mean, 0.0]
    expected_noshift = torch.tensor([noshift], dtype=torch.float64)
    assert torch.allclose(masked_whiten(x, m, shift_mean=False), expected_noshift)


def test_masked_stats_vs_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    m = random_mask(5, 7, gen)
    vals = [x[i, j].item() for i in range(5) for j in range(7) if m[i, j] > 0]
    n = len(vals)
    mean = sum(vals) / n
    var_b = sum((v - mean) ** 2 for v in vals) / n
    var_u = var_b * n / (n - 1)
    assert masked_sum(x, m).item() == pytest.approx(sum(vals))
    assert masked_mean(x, m).item() == pytest.approx(mean)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(var_b)
    assert masked_var(x, m).item() == pytest.approx(var_u)
    w = masked_whiten(x, m)
    for i in range(5):
        row = [x[i, j].item() for j in range(7) if m[i, j] > 0]
        assert masked_mean(x[i], m[i]).item() == pytest.approx(sum(row) / len(row))
        for j in range(7):
            exp = (x[i, j].item() - mean) / math.sqrt(var_u + 1e-8) if m[i, j] > 0 else 0.0
            assert w[i, j].item() == pytest.approx(exp)


def test_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, math.log(3.0), -1e9]]])
    labels = torch.tensor([[2, 0]])
    lp = logprobs_from_logits(logits, labels)
    assert lp[0, 0].item() == pytest.approx(3 - math.log(math.e + math.e**2 + math.e**3), rel=1e-6)
    assert lp[0, 1].item() == pytest.approx(math.log(0.25), rel=1e-6)
    ent = entropy_from_logits(logits)
    p = [math.exp(k) for k in (1, 2, 3)]
    p = [v / sum(p) for v in p]
    assert ent[0, 0].item() == pytest.approx(-sum(v * math.log(v) for v in p), rel=1e-5)
    assert ent[0, 1].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-5)
    assert entropy_from_logits(torch.zeros(1, 1, 8))[0, 0].item() == pytest.approx(math.log(8), rel=1e-6)


def test_logprobs_entropy_vs_loop_and_bf16():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (2, 3), generator=gen)
    lp, ent = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    for b in range(2):
        for t in range(3):
            z = [logits[b, t, v].item() for v in range(5)]
            lse = math.log(sum(math.exp(v) for v in z))
            assert lp[b, t].item() == pytest.approx(z[labels[b, t].item()] - lse)
            assert ent[b, t].item() == pytest.approx(-sum(math.exp(v - lse) * (v - lse) for v in z))
    bf = logits.to(torch.bfloat16)
    lp16, ent16 = logprobs_from_logits(bf, labels), entropy_from_logits(bf)
    assert lp16.dtype == torch.float32 and ent16.dtype == torch.float32
    ref = logprobs_from_logits(bf.double(), labels)
    assert torch.allclose(lp16.double(), ref, atol=1e-5)


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5)
    # log r = ref - lp = -1 -> exp(-1) - (-1) - 1
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(math.exp(-1.0))
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_kl_estimators_vs_loop():
    gen = torch.Generator().manual_seed(2)
    lp = -torch.rand(3, 4, generator=gen, dtype=torch.float64) * 3
    ref = -torch.rand(3, 4, generator=gen, dtype=torch.float64) * 3
    k1, k2, k3 = (kl_penalty(lp, ref, k) for k in ("k1", "k2", "k3"))
    for i in range(3):
        for j in range(4):
            a, b = lp[i, j].item(), ref[i, j].item()
            assert k1[i, j].item() == pytest.approx(a - b)
            assert k2[i, j].item() == pytest.approx(0.5 * (a - b) ** 2)
            assert k3[i, j].item() == pytest.approx(math.exp(b - a) - (b - a) - 1)
            assert k3[i, j].item() >= 0


def test_kl_penalty_unknown():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_token_level_rewards_by_hand():
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0])
    kl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    r = token_level_rewards(scores, kl, mask, beta=0.1)
    expected = torch.tensor([
        [-0.1, -0.2 + 10.0, 0.0],
        [-0.4, -0.5, -0.6 + 20.0],
        [0.0, 0.0, 0.0],  # all-zero mask: no score
        [0.0, -0.1 + 40.0, 0.0],  # last 1 found even if not right-padded
    ])
    assert torch.allclose(r, expected)


def test_token_level_rewards_vs_loop():
    gen = torch.Generator().manual_seed(3)
    B, T, beta = 6, 9, 0.05
    scores = torch.randn(B, generator=gen, dtype=torch.float64)
    kl = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = random_mask(B, T, gen)
    mask[0] = 0
    r = token_level_rewards(scores, kl, mask, beta)
    for i in range(B):
        valid = [j for j in range(T) if mask[i, j] > 0]
        for j in range(T):
            exp = -beta * kl[i, j].item() if mask[i, j] > 0 else 0.0
            if valid and j == valid[-1]:
                exp += scores[i].item()
            assert r[i, j].item() == pytest.approx(exp)
