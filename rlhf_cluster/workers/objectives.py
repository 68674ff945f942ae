"""Training objectives: the model forward a method needs plus its loss from :mod:`rlhf_cluster.algos`.

One registry; a trainer runs ``OBJECTIVES[name](model, micro_batch, **hyper_params)``
inside its mini-batch loop, so every method (PPO, the critic, SFT, reward modelling, the
DPO family, KTO) trains on the same DeepSpeed trainer. Each returns ``(loss, stats)``;
stats are detached 0-d tensors averaged over micro-batches by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch

from rlhf_cluster.algos.core import masked_mean
from rlhf_cluster.algos.ppo import kl_loss, ppo_policy_loss, ppo_value_loss
from rlhf_cluster.algos.preference import bradley_terry_loss, get_preference_loss, kto_loss
from rlhf_cluster.experience import Experience, FeedbackBatch, PairBatch
from rlhf_cluster.models import action_logprobs_and_entropy, sequence_scores, token_values

OBJECTIVES: dict[str, Callable] = {}


def register_objective(name: str):
    def deco(fn):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        OBJECTIVES[name] = fn
        return fn

    return deco


OWN_LOGPROBS = "own_logprobs"  # a stats key that is no stat: the (B, A) log-probs a first forward took as the old ones


def get_objective(name: str) -> Callable:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def sequence_logps(model, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t log π(a_t|s_t) over each response (B,) and the response lengths (B,)."""
    logp, _ = action_logprobs_and_entropy(model, exp.input_ids, exp.attention_mask, exp.num_actions)
    return (logp * exp.action_mask).sum(-1), exp.action_mask.sum(-1)


@register_objective("ppo")
def ppo_objective(model, m: Experience, *, policy_loss, policy_loss_params, loss_agg_mode, clip_eps_low, clip_eps_high,
                  entropy_coef, kl_coef=0.0, kl_estimator="k3"):
    """A registered policy loss (algos.ppo.POLICY_LOSSES) aggregated by ``loss_agg_mode``, minus the entropy bonus,
    plus β·KL(π_θ‖π_ref) when ``kl_coef`` > 0 (the batch then carries ref_logprobs: the KL in the loss).

    Without ``m.old_logprobs`` this forward runs before the update's first optimizer step (one mini-batch: every
    micro-batch runs before it), so π_θold is this forward's π_θ, detached: the separate old-log-prob forward is
    saved and the ratio is 1 with the policy gradient's value. Those log-probs go back to the trainer (stats'
    ``OWN_LOGPROBS``) as the old log-probs of any later epoch. The entropy gets a gradient only when it is in
    the loss; otherwise it is measured without one.
    """
    logp, ent = action_logprobs_and_entropy(model, m.input_ids, m.attention_mask, m.num_actions, with_entropy=True,
                                            entropy_grad=entropy_coef > 0)
    old = logp.detach() if m.old_logprobs is None else m.old_logprobs
    pg_loss, stats = ppo_policy_loss(logp, old, m.advantages, m.action_mask, clip_eps_low, clip_eps_high,
                                     policy_loss=policy_loss, policy_loss_params=policy_loss_params, loss_agg_mode=loss_agg_mode)
    entropy = masked_mean(ent, m.action_mask)
    loss = pg_loss - entropy_coef * entropy if entropy_coef > 0 else pg_loss
    stats = {"pg_loss": pg_loss.detach(), "entropy": entropy.detach(), **stats}
    if kl_coef > 0:
        kl = kl_loss(logp, m.ref_logprobs, m.action_mask, kl_estimator, loss_agg_mode)
        loss = loss + kl_coef * kl
        stats["kl_loss"] = kl.detach()
    if m.old_logprobs is None:
        stats[OWN_LOGPROBS] = old
        if m.rollout_logprobs is not None:  # the engine's view of the same tokens
            stats["logprob_mismatch"] = masked_mean((old - m.rollout_logprobs).abs(), m.action_mask)
    return loss, stats


@register_objective("value")
def value_objective(model, m: Experience, *, value_clip):
    v = token_values(model, m.input_ids, m.attention_mask, m.num_actions)
    return ppo_value_loss(v, m.values, m.returns, m.action_mask, value_clip)


@register_objective("sft")
def sft_objective(model, m: Experience):
    """Negative log-likelihood of the response tokens only (token mean)."""
    logp, _ = action_logprobs_and_entropy(model, m.input_ids, m.attention_mask, m.num_actions)
    nll = -masked_mean(logp, m.action_mask)
    return nll, {"nll": nll.detach()}


def _pair_stats(chosen_rewards, rejected_rewards) -> dict:
    return {"chosen_rewards": chosen_rewards.mean(), "rejected_rewards": rejected_rewards.mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "accuracy": (chosen_rewards > rejected_rewards).float().mean()}


@register_objective("pairwise")
def pairwise_objective(model, m: PairBatch, *, loss, beta, loss_params):
    """A registered pairwise loss (algos.preference.PREFERENCE_LOSSES) on interleaved chosen/rejected rows;
    ``loss_params``: its params' fields (missing ones take their defaults)."""
    spec = get_preference_loss(loss)
    params = asdict(spec.params(**loss_params))
    logps, lengths = sequence_logps(model, m.seqs)
    ref = m.ref_logps
    if spec.needs_reference and ref is None:
        raise ValueError(f"loss {loss!r} needs reference log-probs in the batch")
    losses, cr, rr = spec.fn(
        chosen_logps=logps[0::2], rejected_logps=logps[1::2], chosen_lengths=lengths[0::2], rejected_lengths=lengths[1::2],
        ref_chosen_logps=None if ref is None else ref[0::2], ref_rejected_logps=None if ref is None else ref[1::2],
        beta=beta, **params)
    return losses.mean(), _pair_stats(cr, rr)


@register_objective("kto")
def kto_objective(model, m: FeedbackBatch, *, beta, desirable_weight, undesirable_weight):
    logps, _ = sequence_logps(model, m.seqs)
    with torch.no_grad():  # only the detached reference point uses the mismatched pairs
        kl_logps, _ = sequence_logps(model, m.kl_seqs)
    loss, stats = kto_loss(policy_logps=logps, ref_logps=m.ref_logps, kl_policy_logps=kl_logps, kl_ref_logps=m.kl_ref_logps,
                           desirable=m.desirable, beta=beta, desirable_weight=desirable_weight,
                           undesirable_weight=undesirable_weight)
    return loss, {**stats, "reward_margin": stats["chosen_rewards_mean"] - stats["rejected_rewards_mean"]}


@register_objective("bradley_terry")
def bradley_terry_objective(model, m: PairBatch):
    """Reward-model training on a scalar-head model: −log σ(r_c − r_r − m)."""
    scores = sequence_scores(model, m.seqs.input_ids, m.seqs.attention_mask)
    loss, stats = bradley_terry_loss(scores[0::2], scores[1::2], m.margin)
    return loss, {**stats, "chosen_scores": scores[0::2].mean().detach(), "rejected_scores": scores[1::2].mean().detach()}
