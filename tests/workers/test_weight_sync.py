"""The object_store weight sync (a state dict into vLLM's reload_weights) on the real trainer and engine in one
process: exact. The broadcast (gloo) path needs several processes and is checked in tests/cluster."""

from sync_check import assert_sync_exact, trainer_spec

from rlhf_cluster.cluster.actors import PolicyActor, RolloutActor
from rlhf_cluster.cluster.groups import LocalGroup
from rlhf_cluster.cluster.layout import RoleSpec
from rlhf_cluster.cluster.specs import EngineSpec


def test_object_store_sync_is_exact_and_samples_draw_independent_streams(tiny_model_dir):
    policy, rollout = LocalGroup(RoleSpec("policy", 1, 1), PolicyActor), LocalGroup(RoleSpec("rollout", 1, 1), RolloutActor)
    try:
        policy.start_trainers(trainer_spec(tiny_model_dir, zero_stage=2)).get()
        rollout.call(RolloutActor.init, EngineSpec(str(tiny_model_dir), max_model_len=64)).get()
        assert_sync_exact(policy, rollout, "object_store")
        # The same prompt twice, two samples each: four independent random streams. (Seeding prompt i with
        # seed + i made sample 1 of prompt 0 repeat sample 0 of prompt 1, since vLLM seeds sample j with seed + j.)
        samples, _ = rollout.call(RolloutActor.generate, [[5, 6, 7]] * 2, 11, n=2, max_new_tokens=16).get()[0]
        responses = [tuple(s.response_ids) for s in samples]
        assert len(set(responses)) == 4, responses
        again, _ = rollout.call(RolloutActor.generate, [[5, 6, 7]] * 2, 11, n=2, max_new_tokens=16).get()[0]
        assert [tuple(s.response_ids) for s in again] == responses  # and reproducible
    finally:
        rollout.shutdown()
        policy.shutdown()
