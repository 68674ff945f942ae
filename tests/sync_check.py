"""Shared by the worker and cluster tiers: after an update and a sync, every engine's log-probs equal the trainer's."""

from __future__ import annotations

import torch

from rlhf_cluster.cluster.actors import PolicyActor, RolloutActor
from rlhf_cluster.cluster.specs import TrainerSpec
from rlhf_cluster.cluster.weight_sync import sync_weights
from rlhf_cluster.experience import Experience, build_experience


def random_batch(B=8, P=6, A=10, seed=0) -> Experience:
    """Equal-length rows, so a token mean over any grouping of rows is the same number."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, 700, (B, P), generator=g).tolist()
    responses = torch.randint(10, 700, (B, A), generator=g).tolist()
    exp = build_experience(prompts, responses, pad_id=0)
    exp.advantages = torch.randn(B, A, generator=g)
    return exp


def trainer_spec(model, **kw) -> TrainerSpec:
    return TrainerSpec(model_path=str(model), micro_batch_size=2, mini_batch_size=8, learning_rate=1e-2, seed=0, **kw)


def assert_sync_exact(policy, rollout, backend: str) -> None:
    """Engines match the trainer before an update, the update moves the policy, and after the sync they match again."""
    exp = random_batch()
    seqs = exp.input_ids.tolist()

    def engine_logprobs():
        return [torch.tensor(x) for x in rollout.call(RolloutActor.sequence_logprobs, seqs, exp.num_actions).get()]

    trainer_before = policy.shard(PolicyActor.logprobs, exp).cat()
    for got in engine_logprobs():
        assert torch.allclose(got, trainer_before, atol=1e-4), (got - trainer_before).abs().max()
    exp.old_logprobs = trainer_before
    policy.shard(PolicyActor.update, exp, objective="ppo", epochs=1, clip_eps_low=0.2, clip_eps_high=0.2,
                 policy_loss="vanilla", policy_loss_params={}, loss_agg_mode="token_mean", entropy_coef=0.0).get()
    sync_weights(policy, rollout, backend, version=1)
    trainer_after = policy.shard(PolicyActor.logprobs, exp).cat()
    assert (trainer_after - trainer_before).abs().max() > 1e-2  # the update changed the policy
    for got in engine_logprobs():
        assert torch.allclose(got, trainer_after, atol=1e-4), (got - trainer_after).abs().max()
