"""PPO policy losses (a registry, with loss-aggregation modes), the clipped value loss
(Schulman et al. 2017) and explained variance.

All per-token tensors are (B, T); mask is (B, T) with 1 = real response token.
Stats are detached 0-d tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .core import NoParams, kl_penalty, masked_mean, masked_sum, masked_var

# --------------------------------------------------------------------------- #
# Policy losses: per-token surrogate losses behind one keyword signature
#   fn(ratio, advantages, *, clip_eps_low, clip_eps_high, **params) -> loss_t (B, T)
# ratio ρ = π_θ/π_θold and advantages Â: (B, T); ``params`` are the fields of the
# frozen dataclass the loss registers with (its __post_init__ checks their ranges).
# --------------------------------------------------------------------------- #
PolicyLossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss; params: frozen dataclass of its own parameters (keyword arguments of fn)."""

    name: str
    fn: PolicyLossFn
    params: type = NoParams


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, *, params: type = NoParams):
    """Decorator registering ``fn`` in POLICY_LOSSES under ``name``.

    ``params``: a frozen dataclass whose fields ``fn`` takes as keyword arguments. A duplicate
    name, or a field ``fn`` does not accept, raises ValueError.
    """

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} already registered")
        missing = [f.name for f in fields(params) if f.name not in inspect.signature(fn).parameters]
        if missing:
            raise ValueError(f"policy loss {name!r}: {fn.__name__} does not take its params {missing}")
        POLICY_LOSSES[name] = PolicyLoss(name, fn, params)
        return fn

    return deco


def get_policy_loss(name: str) -> PolicyLoss:
    """Look up a policy loss by name; ValueError listing the valid names if unknown."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


@register_policy_loss("vanilla")
def vanilla_policy_loss(ratio: Tensor, advantages: Tensor, *, clip_eps_low: float, clip_eps_high: float) -> Tensor:
    """Clipped surrogate (Schulman et al. 2017, eq. 7) with the asymmetric range [1-ε_low, 1+ε_high].

    ratio ρ, advantages Â: (B, T). Returns -min(ρÂ, clip(ρ, 1-ε_low, 1+ε_high)Â), (B, T).
    """
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    return torch.maximum(unclipped, clipped)  # -min(ρÂ, clip(ρ)Â), eq. 7


@dataclass(frozen=True)
class DualClipParams:
    """c: the bound on the loss for Â < 0, as a multiple of -Â; c > 1."""

    c: float = 3.0

    def __post_init__(self):
        if self.c <= 1.0:
            raise ValueError(f"c must be > 1, got {self.c}")


@register_policy_loss("dual_clip", params=DualClipParams)
def dual_clip_policy_loss(ratio: Tensor, advantages: Tensor, *, clip_eps_low: float, clip_eps_high: float, c: float) -> Tensor:
    """Dual-clip PPO (Ye et al. 2020, eq. 5): the vanilla loss, bounded by -cÂ where Â < 0.

    ratio ρ, advantages Â: (B, T); c > 1. Returns (B, T).
    """
    loss_t = vanilla_policy_loss(ratio, advantages, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)
    return torch.where(advantages < 0, torch.minimum(loss_t, -advantages * c), loss_t)  # eq. 5: bound for Â < 0


# --------------------------------------------------------------------------- #
# Loss aggregation (as verl's agg_loss): per-token losses l (B, T) and mask m (B, T)
# -> 0-d loss, over the micro-batch a trainer step sees. The seq_mean modes divide by
# the number of sequences with at least one response token (verl excludes empty rows
# too; a generated response always has one, so this is B). The trainer averages equal
# micro-batches, so those modes equal their mini-batch values.
# --------------------------------------------------------------------------- #
def token_mean(loss_t: Tensor, mask: Tensor) -> Tensor:
    """Σ_{i,t} m·l / Σ_{i,t} m: every token weighs the same, so long responses weigh more."""
    return masked_mean(loss_t, mask)


def seq_mean_token_sum(loss_t: Tensor, mask: Tensor) -> Tensor:
    """mean_i Σ_t m·l: each sequence's summed token losses, averaged over sequences."""
    return masked_mean(masked_sum(loss_t, mask, dim=-1), mask.sum(-1) > 0)


def seq_mean_token_mean(loss_t: Tensor, mask: Tensor) -> Tensor:
    """mean_i (Σ_t m·l / Σ_t m): each sequence's token mean, averaged over sequences
    (GRPO's 1/|o_i| normalisation, Shao et al. 2024, eq. 3)."""
    return masked_mean(masked_mean(loss_t, mask, dim=-1), mask.sum(-1) > 0)


LOSS_AGG_MODES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token_mean": token_mean, "seq_mean_token_sum": seq_mean_token_sum, "seq_mean_token_mean": seq_mean_token_mean}


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    policy_loss: str = "vanilla",
    policy_loss_params: Mapping[str, Any] | None = None,
    loss_agg_mode: str = "token_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """A registered per-token policy loss, aggregated by a registered mode.

    logprobs log π_θ: (B, T); old_logprobs log π_θold: (B, T); advantages Â: (B, T);
    mask: (B, T); clip_eps_low/high: ε_low, ε_high (asymmetric clip range
    [1-ε_low, 1+ε_high]); policy_loss: a POLICY_LOSSES name, with policy_loss_params its
    params' fields (missing ones take their defaults; ValueError out of range);
    loss_agg_mode: a LOSS_AGG_MODES name.
    Returns (loss 0-d, stats) with stats, all token means whatever the loss:
      clipfrac  — fraction of masked tokens where the [1-ε_low, 1+ε_high] clip is active,
      approx_kl — masked mean of k3 = (ρ - 1) - log ρ, ρ = π_θ/π_θold, an estimate
                  of KL(π_θold || π_θ) (Schulman's low-variance estimator),
      ratio_mean — masked mean of ρ.
    log ρ is clamped to [-20, 20] before exp so padding garbage cannot produce inf/NaN.
    """
    spec = get_policy_loss(policy_loss)
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; valid: {sorted(LOSS_AGG_MODES)}")
    params = asdict(spec.params(**(policy_loss_params or {})))
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)  # ρ_t = π_θ / π_θold
    loss_t = spec.fn(ratio, advantages, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, **params)
    loss = LOSS_AGG_MODES[loss_agg_mode](loss_t, mask)
    with torch.no_grad():
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(loss.dtype), mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),  # k3
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k3",
            loss_agg_mode: str = "token_mean") -> Tensor:
    """The KL term of the GRPO objective (Shao et al. 2024, eq. 3-4), without its β: a per-token estimate
    of KL(π_θ‖π_ref) on the sampled tokens, aggregated like the policy loss -> 0-d.

    logprobs log π_θ (with grad): (B, T); ref_logprobs log π_ref: (B, T); mask: (B, T); estimator: a
    KL_ESTIMATORS name (the paper's is k3 = π_ref/π_θ - log(π_ref/π_θ) - 1, whose gradient is that of the
    KL; k1's is zero in expectation); loss_agg_mode: a LOSS_AGG_MODES name. The log-ratio is clamped to
    [-20, 20] as in ppo_policy_loss.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; valid: {sorted(LOSS_AGG_MODES)}")
    log_r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    kl_t = kl_penalty(ref_logprobs - log_r, ref_logprobs, estimator)  # the estimator at the clamped log-ratio
    return LOSS_AGG_MODES[loss_agg_mode](kl_t, mask)


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, token-level mean.

    values V_θ: (B, T); old_values V_θold: (B, T); returns R: (B, T); mask: (B, T);
    clip_eps ε (None = unclipped). Loss = ½·max((V - R)², (V_clip - R)²) with
    V_clip = V_old + clip(V - V_old, -ε, ε); without clipping ½·(V - R)².
    stats: vf_clipfrac — fraction of masked tokens where the clipped term is larger.
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        loss_t = unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = (v_clip - returns) ** 2
        loss_t = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask).detach()
    return 0.5 * masked_mean(loss_t, mask), {"vf_clipfrac": clipfrac}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Explained variance 1 - Var[R - V] / Var[R] over masked tokens -> 0-d tensor.

    values V: (B, T); returns R: (B, T); mask: (B, T). 1 = perfect critic, 0 = no better
    than a constant, < 0 = worse. Returns 0 when Var[R] == 0 (undefined).
    """
    var_r = masked_var(returns, mask)
    var_res = masked_var(returns - values, mask)
    ev = 1.0 - var_res / torch.where(var_r > 0, var_r, torch.ones_like(var_r))
    return torch.where(var_r > 0, ev, torch.zeros_like(ev))
