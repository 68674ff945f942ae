"""PPO clipped policy / value losses (Schulman et al. 2017) and explained variance.

All per-token tensors are (B, T); mask is (B, T) with 1 = real response token.
Stats are detached 0-d tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import masked_mean, masked_var


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss, token-level mean.

    logprobs log π_θ: (B, T); old_logprobs log π_θold: (B, T); advantages Â: (B, T);
    mask: (B, T); clip_eps_low/high: ε_low, ε_high (asymmetric clip range
    [1-ε_low, 1+ε_high]); dual_clip: c > 1 (Ye et al. 2020) or None.
    Returns (loss 0-d, stats) with stats:
      clipfrac  — fraction of masked tokens where the clipped branch is active,
      approx_kl — masked mean of k3 = (ρ - 1) - log ρ, ρ = π_θ/π_θold, an estimate
                  of KL(π_θold || π_θ) (Schulman's low-variance estimator),
      ratio_mean — masked mean of ρ.
    log ρ is clamped to [-20, 20] before exp so padding garbage cannot produce inf/NaN.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)  # ρ_t = π_θ / π_θold
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss_t = torch.maximum(unclipped, clipped)  # -min(ρÂ, clip(ρ)Â), eq. 7
    if dual_clip is not None:
        dual = torch.minimum(loss_t, -advantages * dual_clip)  # Ye et al. 2020, eq. 5: bound for Â < 0
        loss_t = torch.where(advantages < 0, dual, loss_t)
    loss = masked_mean(loss_t, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(loss.dtype), mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),  # k3
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


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
