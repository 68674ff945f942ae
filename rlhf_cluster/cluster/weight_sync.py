"""New policy weights into every rollout engine.

``nccl`` / ``gloo``: vLLM's weight-transfer protocol — policy rank 0 and every engine
worker form one broadcast group once (:func:`connect_weight_sync`); each sync is
start → update (engines receive while rank 0 broadcasts) → finish. ``object_store``:
rank 0's state dict through Ray's object store (or, in one process, handed over
directly), then vLLM's ``reload_weights``. Under ZeRO-3 every policy rank takes part
(the weights are gathered layer by layer).
"""

from __future__ import annotations

from rlhf_cluster.cluster.actors import PolicyActor, RolloutActor
from rlhf_cluster.cluster.groups import ActorFailure, RoleGroup


def resolve_backend(requested: str, use_gpu: bool, local: bool) -> str:
    """``auto`` → nccl on GPU clusters, gloo otherwise; one process has no second party to broadcast to."""
    if local:
        return "object_store"
    backend = requested if requested != "auto" else ("nccl" if use_gpu else "gloo")
    if backend == "nccl" and not use_gpu:
        raise ValueError("rollout.weight_sync=nccl needs GPUs, and this cluster has none: use weight_sync=gloo (or auto)")
    return backend


def connect_weight_sync(policy: RoleGroup, rollout: RoleGroup, backend: str, tensor_parallel_size: int,
                        bucket_bytes: int) -> None:
    """Policy rank 0 and every engine worker form one broadcast group (vLLM's weight-transfer protocol)."""
    addr, port = policy.on_rank0(PolicyActor.reserve_port)
    policy.call(PolicyActor.init_weight_transfer, backend, rollout.actors, tensor_parallel_size, addr, port, bucket_bytes,
                what="weight-transfer setup").get()


def sync_weights(policy: RoleGroup, rollout: RoleGroup, backend: str, version: int) -> None:
    """Policy weights into every engine, by ``backend`` (after :func:`connect_weight_sync` for nccl/gloo).

    Both roles take part, so when it fails the actor that died is named (an engine that died shows up first as
    policy rank 0's error sending to it).
    """
    try:
        if backend != "object_store":
            policy.call(PolicyActor.send_weights, version, what="weight sync").get()
            return
        export = policy.call(PolicyActor.export_state_dict, what="weight export")  # every rank: ZeRO-3 gathers
        loads = rollout.call(RolloutActor.load_weights, export.handle(0), version, what="weight load")
        export.get()
        loads.get()
    except ActorFailure as e:
        if e.kind == "died":
            raise
        dead = _dead_actor(policy, rollout)
        if dead is None:
            raise
        raise ActorFailure(f"{dead} died during weight sync ({str(e).splitlines()[0]})", "died", dead) from e


def _dead_actor(*groups: RoleGroup) -> str | None:
    """'rollout rank 0' for the first actor of ``groups`` that is gone, or None (all alive, or no answer)."""
    for g in groups:
        try:
            dead = g.dead_ranks()
        except Exception:  # a diagnosis that fails must not hide the failure it explains
            continue
        if dead:
            return f"{g.role} rank {dead[0]}"
    return None
