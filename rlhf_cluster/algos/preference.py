"""Reward-model and direct preference-optimisation losses.

Sequence-level inputs: ``*_logps`` are SUMMED log-probs of the response tokens, shape
(B,); ``*_lengths`` are response token counts, shape (B,) (int or float).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from .core import NoParams, masked_mean


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise reward-model loss -log σ(r_c - r_r - m), batch mean.

    chosen_scores r_c: (B,); rejected_scores r_r: (B,); margin m: (B,) or None
    (Ouyang et al. 2022, eq. 1; margin as in Touvron et al. 2023, Llama 2, eq. 2).
    stats: accuracy — fraction with r_c > r_r; margin_mean — mean of r_c - r_r.
    """
    diff = chosen_scores - rejected_scores
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        stats = {"accuracy": (diff > 0).to(diff.dtype).mean(), "margin_mean": diff.mean()}
    return loss, stats


# --------------------------------------------------------------------------- #
# Pairwise preference losses: common keyword inputs plus the loss's own parameters
#   fn(*, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths,
#      ref_chosen_logps, ref_rejected_logps, beta, **params)
#   -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,))
# ``params`` are the fields of the frozen dataclass the loss registers with (its
# __post_init__ checks their ranges; the config fills them from preference.loss_params).
# Per-example losses (caller averages); implicit rewards are detached.
# --------------------------------------------------------------------------- #
PreferenceFn = Callable[..., tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered pairwise loss; needs_reference: requires ref_* log-probs from π_ref;
    params: frozen dataclass of the loss's own parameters (keyword arguments of fn)."""

    name: str
    fn: PreferenceFn
    needs_reference: bool
    params: type = NoParams


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(name: str, *, needs_reference: bool, params: type = NoParams):
    """Decorator registering ``fn`` in PREFERENCE_LOSSES under ``name``.

    ``params``: a frozen dataclass whose fields ``fn`` takes as keyword arguments. A duplicate
    name, or a field ``fn`` does not accept, raises ValueError.
    """

    def deco(fn: PreferenceFn) -> PreferenceFn:
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss {name!r} already registered")
        missing = [f.name for f in fields(params) if f.name not in inspect.signature(fn).parameters]
        if missing:
            raise ValueError(f"preference loss {name!r}: {fn.__name__} does not take its params {missing}")
        PREFERENCE_LOSSES[name] = PreferenceLoss(name, fn, needs_reference, params)
        return fn

    return deco


def get_preference_loss(name: str) -> PreferenceLoss:
    """Look up a preference loss by name; ValueError listing the valid names if unknown."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; valid: {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name]


def _log_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> tuple[Tensor, Tensor]:
    """(log π_c - log π_ref_c, log π_r - log π_ref_r), each (B,)."""
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("this preference loss needs reference log-probs (ref_*_logps is None)")
    return chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps


@register_preference_loss("dpo", needs_reference=True)
def dpo_loss(*, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO (Rafailov et al. 2023, eq. 7).

    chosen/rejected_logps log π(y_w|x), log π(y_l|x): (B,); ref_*: log π_ref, (B,);
    beta β. Lengths are ignored.
    h = (log π_c - log π_ref_c) - (log π_r - log π_ref_r); loss = -log σ(βh), (B,).
    Rewards β·(log π - log π_ref), (B,).
    """
    c, r = _log_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * (c - r))
    return losses, (beta * c).detach(), (beta * r).detach()


@dataclass(frozen=True)
class CDPOParams:
    """label_smoothing ε: the assumed fraction of flipped labels, 0 < ε < 0.5 (0 is plain dpo)."""

    label_smoothing: float

    def __post_init__(self):
        if not 0 < self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be > 0 and < 0.5 (0 is plain dpo), got {self.label_smoothing}")


@register_preference_loss("cdpo", needs_reference=True, params=CDPOParams)
def cdpo_loss(*, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, ref_chosen_logps, ref_rejected_logps, beta,
              label_smoothing):
    """Conservative DPO (Mitchell 2023): DPO with label smoothing ε.

    Inputs (B,) as in DPO; label_smoothing ε. h as in DPO;
    loss = -(1-ε) log σ(βh) - ε log σ(-βh), (B,). Rewards as in DPO.
    """
    c, r = _log_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = c - r
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, (beta * c).detach(), (beta * r).detach()


@register_preference_loss("ipo", needs_reference=True)
def ipo_loss(*, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, ref_chosen_logps, ref_rejected_logps, beta):
    """IPO (Azar et al. 2023, eq. 17) on length-averaged log-ratios (as clarified by the authors).

    Inputs (B,) as in DPO plus chosen/rejected_lengths |y|: (B,); beta β (IPO's τ).
    h = (log π_c - log π_ref_c)/|y_c| - (log π_r - log π_ref_r)/|y_r|;
    loss = (h - 1/(2β))², (B,). Rewards β·(log π - log π_ref)/|y|, (B,).
    """
    c, r = _log_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    c, r = c / chosen_lengths, r / rejected_lengths
    losses = (c - r - 1 / (2 * beta)) ** 2
    return losses, (beta * c).detach(), (beta * r).detach()


@register_preference_loss("hinge", needs_reference=True)
def hinge_loss(*, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, ref_chosen_logps, ref_rejected_logps, beta):
    """SLiC hinge loss (Zhao et al. 2023, eq. 3 with reference log-ratios as in DPO).

    Inputs (B,) as in DPO; h as in DPO; loss = relu(1 - βh), (B,). Rewards as in DPO.
    """
    c, r = _log_ratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * (c - r))
    return losses, (beta * c).detach(), (beta * r).detach()


@dataclass(frozen=True)
class SimPOParams:
    """gamma γ: the target reward margin, >= 0."""

    gamma: float = 0.5

    def __post_init__(self):
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")


@register_preference_loss("simpo", needs_reference=False, params=SimPOParams)
def simpo_loss(*, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, ref_chosen_logps, ref_rejected_logps, beta,
               gamma):
    """SimPO (Meng et al. 2024, eq. 6), reference-free.

    chosen/rejected_logps: (B,); chosen/rejected_lengths |y|: (B,); beta β; gamma γ.
    loss = -log σ(β·log π_c/|y_c| - β·log π_r/|y_r| - γ), (B,). Rewards β·log π/|y|, (B,).
    """
    c = beta * chosen_logps / chosen_lengths
    r = beta * rejected_logps / rejected_lengths
    losses = -F.logsigmoid(c - r - gamma)
    return losses, c.detach(), r.detach()


@register_preference_loss("orpo", needs_reference=False)
def orpo_loss(*, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, ref_chosen_logps, ref_rejected_logps, beta):
    """ORPO (Hong et al. 2024, eqs. 4-7), reference-free; beta plays ORPO's λ.

    chosen/rejected_logps: (B,); chosen/rejected_lengths: (B,).
    a = log π/|y| (average per-token log-prob, < 0); log odds(y) = a - log(1 - exp(a));
    L_OR = -log σ(log odds_c - log odds_r); loss = -a_c + λ·L_OR, (B,).
    Rewards β·a, (B,). log(1 - exp(a)) is computed as log(-expm1(a)) with a clamped to
    <= -1e-7 there, so it stays finite for a -> 0 and for very negative a.
    """
    a_c = chosen_logps / chosen_lengths
    a_r = rejected_logps / rejected_lengths

    def log_odds(a: Tensor) -> Tensor:  # log(p / (1 - p)), p = exp(a)
        return a - torch.log(-torch.expm1(a.clamp(max=-1e-7)))

    l_or = -F.logsigmoid(log_odds(a_c) - log_odds(a_r))  # eq. 7
    losses = -a_c + beta * l_or  # L_SFT + λ L_OR, eq. 6
    return losses, (beta * a_c).detach(), (beta * a_r).detach()


def kto_loss(
    *,
    policy_logps: Tensor,
    ref_logps: Tensor,
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    desirable: Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO (Ethayarajh et al. 2024, eq. 8).

    policy_logps log π(y|x), ref_logps log π_ref(y|x): (B,) for the real pairs;
    kl_policy_logps, kl_ref_logps: (B,) log-probs of MISMATCHED prompt–completion pairs
    (x, y') with y' taken from another example — they only estimate the reference point
    z0 = max(0, mean(log π(y'|x) - log π_ref(y'|x))), which is detached (no gradient);
    desirable: (B,) bool; beta β; desirable_weight λ_D; undesirable_weight λ_U.
    r = log π - log π_ref; per-example loss λ_D(1 - σ(β(r - z0))) if desirable else
    λ_U(1 - σ(β(z0 - r))); loss = their sum / B (0-d).
    stats: kl_ref_point (z0), chosen_rewards_mean / rejected_rewards_mean (mean β·r over
    desirable / undesirable examples; 0 if there are none).
    """
    z0 = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()  # z_0 = KL(π || π_ref) estimate
    r = policy_logps - ref_logps
    des = desirable.bool()
    losses = torch.where(
        des,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),  # λ_D (1 - v(x, y)), desirable
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),  # λ_U (1 - v(x, y)), undesirable
    )
    loss = losses.sum() / losses.shape[0]
    with torch.no_grad():
        rewards = beta * r
        stats = {
            "kl_ref_point": z0,
            "chosen_rewards_mean": masked_mean(rewards, des),
            "rejected_rewards_mean": masked_mean(rewards, ~des),
        }
    return loss, stats
