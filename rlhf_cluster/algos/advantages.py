"""Advantage estimators behind one uniform signature::

    fn(token_rewards, mask, *, values, group_size, gamma, lam, std_eps) -> (advantages, returns)

token_rewards, mask, values: (B, T); outputs (B, T), zeroed where mask == 0.
Every estimator takes every keyword and ignores those it does not use, so the caller can
dispatch blindly; registration checks the signature, so an estimator missing one fails at
import, not at the first training step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .core import masked_sum, masked_whiten

AdvantageFn = Callable[..., tuple[Tensor, Tensor]]
KEYWORDS = ("values", "group_size", "gamma", "lam", "std_eps")  # what the caller passes every estimator


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator and what it requires of the trainer.

    needs_critic: requires ``values`` (a value model); needs_groups: rows come in
    consecutive groups of ``group_size`` responses to the same prompt; whiten: the
    caller should whiten the advantages over the batch afterwards.
    """

    name: str
    fn: AdvantageFn
    needs_critic: bool
    needs_groups: bool
    whiten: bool


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str, *, needs_critic: bool, needs_groups: bool, whiten: bool):
    """Decorator registering ``fn`` in ADVANTAGE_ESTIMATORS under ``name``.

    A duplicate name, or an ``fn`` that does not accept every keyword in KEYWORDS (by name or
    through ``**kwargs``), raises ValueError.
    """

    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} already registered")
        params = inspect.signature(fn).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            missing = [k for k in KEYWORDS if k not in params]
            if missing:
                raise ValueError(f"advantage estimator {name!r}: {fn.__name__} does not take the keyword(s) {missing}; "
                                 f"estimators take all of {KEYWORDS} and ignore those they do not use")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_critic, needs_groups, whiten)
        return fn

    return deco


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """Look up an estimator by name; ValueError listing the valid names if unknown."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def _zero_pad(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


@register_advantage_estimator("gae", needs_critic=True, needs_groups=False, whiten=True)
def gae(token_rewards: Tensor, mask: Tensor, *, values: Tensor | None, group_size: int, gamma: float, lam: float,
        std_eps: float):
    """Generalized Advantage Estimation (Schulman et al. 2016, eqs. 11-16).

    token_rewards r: (B, T); mask: (B, T); values V: (B, T) critic values; gamma γ; lam λ.
    V and r beyond the last valid token are treated as 0. group_size and std_eps are ignored.
    Returns advantages A (B, T) and returns R = A + V (B, T), both 0 where mask == 0.
    Raises ValueError if values is None.
    """
    if values is None:
        raise ValueError("GAE needs critic values, got values=None")
    v, r = _zero_pad(values, mask), _zero_pad(token_rewards, mask)
    T = r.shape[-1]
    last = torch.zeros_like(r[:, 0])
    next_v = torch.zeros_like(v[:, 0])
    out = []
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_v - v[:, t]  # δ_t = r_t + γ V_{t+1} - V_t
        last = delta + gamma * lam * last  # A_t = δ_t + γλ A_{t+1}
        out.append(last)
        next_v = v[:, t]
    adv = torch.stack(out[::-1], dim=-1)
    return _zero_pad(adv, mask), _zero_pad(adv + v, mask)


def _grouped_scores(token_rewards: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """Sequence rewards R_i = Σ_t r_t (masked), reshaped to (B // group_size, group_size)."""
    B = token_rewards.shape[0]
    if group_size < 2:
        raise ValueError(f"group-based advantages need group_size >= 2, got {group_size}")
    if B % group_size != 0:
        raise ValueError(f"batch size {B} is not divisible by group_size {group_size}")
    return masked_sum(token_rewards, mask, dim=-1).view(-1, group_size)


@register_advantage_estimator("grpo", needs_critic=False, needs_groups=True, whiten=False)
def grpo(token_rewards: Tensor, mask: Tensor, *, values: Tensor | None, group_size: int, gamma: float, lam: float,
         std_eps: float):
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2).

    token_rewards: (B, T); mask: (B, T). Rows [0:g], [g:2g], ... (g = group_size >= 2,
    B divisible by g) are responses to the same prompt. With R_i = Σ_t r_t:
    A_i = (R_i - mean_group(R)) / (std_group(R) + std_eps), std unbiased, broadcast to
    every masked token. std_eps > 0 keeps a constant group finite (its advantages are 0)
    and bounds a near-constant one: |A_i| <= (g - 1) / sqrt(g) · std / (std + std_eps).
    values/gamma/lam are ignored. returns = advantages (there is no critic target).
    Both (B, T), 0 where mask == 0.
    """
    R = _grouped_scores(token_rewards, mask, group_size)
    A = (R - R.mean(-1, keepdim=True)) / (R.std(-1, keepdim=True) + std_eps)  # Â_i = (r_i - mean) / (std + ε)
    adv = _zero_pad(A.reshape(-1, 1).expand_as(token_rewards), mask)
    return adv, adv.clone()


@register_advantage_estimator("rloo", needs_critic=False, needs_groups=True, whiten=False)
def rloo(token_rewards: Tensor, mask: Tensor, *, values: Tensor | None, group_size: int, gamma: float, lam: float,
         std_eps: float):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, eq. 5 / Kool et al. 2019).

    token_rewards: (B, T); mask: (B, T); groups as in GRPO (g >= 2).
    A_i = R_i - mean_{j≠i} R_j = g/(g-1) · (R_i - mean_group(R)), broadcast to masked
    tokens. values/gamma/lam/std_eps are ignored. returns = advantages. Both (B, T), 0 where mask == 0.
    """
    R = _grouped_scores(token_rewards, mask, group_size)
    A = group_size / (group_size - 1) * (R - R.mean(-1, keepdim=True))  # leave-one-out baseline
    adv = _zero_pad(A.reshape(-1, 1).expand_as(token_rewards), mask)
    return adv, adv.clone()


@register_advantage_estimator("reinforce_pp", needs_critic=False, needs_groups=False, whiten=False)
def reinforce_pp(token_rewards: Tensor, mask: Tensor, *, values: Tensor | None, group_size: int, gamma: float, lam: float,
                 std_eps: float):
    """REINFORCE++ (Hu 2025): discounted return-to-go, whitened over the whole batch.

    token_rewards r: (B, T); mask: (B, T); gamma γ. G_t = Σ_{k>=t} γ^{k-t} r_k (masked).
    returns = G (B, T); advantages = masked_whiten(G, mask) (B, T) — already whitened,
    hence whiten=False in the registry. values/group_size/lam/std_eps are ignored.
    """
    r = _zero_pad(token_rewards, mask)
    running = torch.zeros_like(r[:, 0])
    out = []
    for t in reversed(range(r.shape[-1])):
        running = r[:, t] + gamma * running  # G_t = r_t + γ G_{t+1}
        out.append(running)
    G = _zero_pad(torch.stack(out[::-1], dim=-1), mask)
    return masked_whiten(G, mask), G
