"""Masked reductions, log-prob/entropy helpers, per-token KL estimators,
token-level reward shaping, and the empty parameter set of a loss without parameters.

Notation: B = batch (rows), T = response length (tokens), V = vocabulary size.
A ``mask`` is a float or bool tensor broadcastable to ``x`` with 1 = real token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class NoParams:
    """The parameters of a registered loss that has none of its own (the registries' default ``params``)."""


# --------------------------------------------------------------------------- #
# Masked reductions
# --------------------------------------------------------------------------- #
def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is 1.

    x: any shape; mask: same shape as x (float or bool, 1 = real).
    dim: reduce over this dim (None = all elements -> 0-d tensor).
    Masked-out entries are selected away (not multiplied), so NaN/inf padding is harmless.
    """
    xm = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over masked positions: sum(x*mask) / max(sum(mask), 1e-8).

    x, mask: same shape. Returns 0-d tensor (dim=None) or x reduced over ``dim``.
    An all-zero mask gives 0 (not NaN).
    """
    count = mask.to(x.dtype)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1e-8)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all masked elements -> 0-d tensor.

    x, mask: same shape. With ``unbiased`` and n > 1 masked elements the Bessel
    factor n/(n-1) is applied; with n <= 1 the (biased) value is returned.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * torch.where(n > 1, n / (n - 1).clamp(min=1e-8), torch.ones_like(n))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` with masked statistics: (x - mean) / sqrt(var + eps).

    x, mask: same shape (e.g. (B, T)); mean/var (unbiased) are taken over all masked
    elements. If ``shift_mean`` is False the mean is added back (scale only).
    Output has x's shape and is 0 where mask == 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


# --------------------------------------------------------------------------- #
# Log-probs / entropy
# --------------------------------------------------------------------------- #
def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(y_t | context) for the given labels, computed in float32.

    logits: (B, T, V) any float dtype (bf16 is upcast); labels: (B, T) int64.
    Returns (B, T) float32 (float64 stays float64).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)  # log softmax = z_y - logsumexp(z)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy H(π(·|context)) = -Σ_v p_v log p_v of the categorical given by logits.

    logits: (B, T, V) -> (B, T), computed in float32 (float64 stays float64).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)  # H = lse(z) - Σ p z


# --------------------------------------------------------------------------- #
# Per-token KL estimators (Schulman, "Approximating KL divergence", 2020)
# Samples are drawn from π; all estimate KL(π || π_ref). No masking inside.
# --------------------------------------------------------------------------- #
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log π - log π_ref (unbiased, high variance). logprobs, ref_logprobs: (B, T) -> (B, T)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½ (log π - log π_ref)² (biased, low variance). (B, T) -> (B, T)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(log π_ref - log π) - (log π_ref - log π) - 1 (unbiased, low variance, >= 0).

    logprobs, ref_logprobs: (B, T) -> (B, T).
    """
    log_r = ref_logprobs - logprobs  # log r, r = π_ref / π
    return torch.exp(log_r) - log_r - 1  # k3 = (r - 1) - log r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate KL_t between π (logprobs) and π_ref (ref_logprobs).

    logprobs, ref_logprobs: (B, T); estimator: one of KL_ESTIMATORS. Returns (B, T),
    unmasked (the caller masks). Raises ValueError for an unknown estimator.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def token_level_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """KL-shaped per-token rewards (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2).

    scores: (B,) sequence score from the reward model; kl: (B, T) per-token KL_t;
    mask: (B, T) response mask; beta: KL coefficient β.
    Returns r (B, T): r_t = -β·KL_t on response tokens, plus the score at the last
    position with mask == 1 in each row; 0 where mask == 0. Rows whose mask is all
    zero get no score (they are entirely 0).
    """
    m = mask.bool()
    rewards = torch.where(m, -beta * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    T = mask.shape[-1]
    pos = torch.arange(1, T + 1, device=mask.device)
    last = (m * pos).argmax(dim=-1, keepdim=True)  # index of the last 1 in each row
    has_any = m.any(dim=-1)
    score = torch.where(has_any, scores, torch.zeros_like(scores)).to(rewards.dtype)
    return rewards.scatter_add(-1, last, score.unsqueeze(-1))  # r_T += score
