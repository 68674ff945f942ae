"""Actor groups: one Ray actor per rank or replica, placed by a per-role placement group.

A role asks for ``num_nodes × per_node`` slots. On a GPU cluster a slot is
``gpus_per_actor`` GPUs (1 for a trainer rank, the tensor-parallel size for a vLLM
engine); on a CPU cluster it is a small CPU share. Each node's slots form one bundle,
and multi-node roles spread their bundles over distinct nodes (STRICT_SPREAD), so
"2 nodes × 4 GPUs" means exactly that. A colocated role reuses another role's
placement group with a fraction of each GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class ActorFailure(RuntimeError):
    """An actor died or raised: names its role and rank instead of a bare Ray traceback."""


@dataclass(frozen=True)
class RoleSpec:
    """What one role asks of the cluster."""

    role: str
    num_nodes: int
    per_node: int
    gpus_per_actor: float = 1.0

    @property
    def size(self) -> int:
        return self.num_nodes * self.per_node


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def check_capacity(specs: Sequence[RoleSpec], use_gpu: bool, colocated: set[str] = frozenset()) -> None:
    """Fail before any actor starts when the roles cannot fit, saying what is short."""
    if not use_gpu:
        return
    need = sum(s.size * s.gpus_per_actor for s in specs if s.role not in colocated)
    have = ray.cluster_resources().get("GPU", 0)
    if need > have:
        detail = ", ".join(f"{s.role} {s.num_nodes}×{s.per_node}×{s.gpus_per_actor:g}" for s in specs if s.role not in colocated)
        raise ActorFailure(
            f"the roles need {need:g} GPUs ({detail}) but the cluster has {have:g}; lower the num_nodes / "
            f"num_gpus_per_node / rollout.num_engines settings or enable cluster.colocate_* options"
        )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for s in specs:
        if s.num_nodes > 1 and sum(1 for n in nodes if n["Resources"].get("GPU", 0) >= s.per_node * s.gpus_per_actor) < s.num_nodes:
            raise ActorFailure(f"{s.role} asks for {s.num_nodes} nodes with {s.per_node * s.gpus_per_actor:g} free GPUs each; "
                               f"the cluster has fewer such nodes")


def make_placement_group(spec: RoleSpec, use_gpu: bool, cpus_per_actor: float, timeout_s: float = 120.0) -> PlacementGroup:
    bundle = {"CPU": spec.per_node * cpus_per_actor}
    if use_gpu and spec.gpus_per_actor > 0:
        bundle["GPU"] = spec.per_node * spec.gpus_per_actor
    strategy = "STRICT_SPREAD" if spec.num_nodes > 1 else "PACK"
    pg = placement_group([dict(bundle) for _ in range(spec.num_nodes)], strategy=strategy, name=f"rlhf_{spec.role}_{time.time_ns()}")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ActorFailure(f"{spec.role}: could not reserve {spec.num_nodes} × {bundle} within {timeout_s:.0f} s; "
                           f"cluster resources are {ray.available_resources()}") from None
    return pg


class ActorGroup:
    """The actors of one role, rank i in bundle ``i // per_node`` of the role's placement group."""

    def __init__(self, spec: RoleSpec, actor_cls: type, *, use_gpu: bool, cpus_per_actor: float,
                 pg: PlacementGroup | None = None, gpu_fraction: float = 1.0, env: dict[str, str] | None = None):
        self.spec = spec
        self.role = spec.role
        self.owns_pg = pg is None
        self.pg = pg or make_placement_group(spec, use_gpu, cpus_per_actor)
        remote_cls = ray.remote(actor_cls)
        self.actors = []
        for rank in range(spec.size):
            opts: dict[str, Any] = dict(
                # A colocated role is a guest in another role's bundles, whose CPU share is already taken.
                num_cpus=cpus_per_actor if self.owns_pg else 0,
                num_gpus=spec.gpus_per_actor * gpu_fraction if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank // spec.per_node),
                max_concurrency=1,
            )
            if env:
                opts["runtime_env"] = {"env_vars": env}
            self.actors.append(remote_cls.options(**opts).remote(rank))

    def __len__(self) -> int:
        return len(self.actors)

    def get(self, refs: list, what: str):
        """ray.get that names the failing rank and role."""
        try:
            return ray.get(refs)
        except (RayActorError, RayTaskError) as e:
            for rank, r in enumerate(refs):
                try:
                    ray.get(r, timeout=0)
                except (RayActorError, RayTaskError) as err:
                    raise ActorFailure(f"{self.role} rank {rank} failed during {what}: {_cause(err)}") from err
                except Exception:
                    pass
            raise ActorFailure(f"{self.role} failed during {what}: {_cause(e)}") from e

    def start_trainers(self, **kwargs) -> list:
        """Start loading every rank into one torch.distributed group (rank 0 hosts the rendezvous); returns refs."""
        addr, port = ray.get(self.actors[0].free_port.remote())
        return [a.init.remote(world_size=len(self), master_addr=addr, master_port=port, **kwargs) for a in self.actors]

    def init_trainers(self, **kwargs) -> None:
        self.get(self.start_trainers(**kwargs), "init")

    def init_all(self, **kwargs) -> None:
        self.get([a.init.remote(**kwargs) for a in self.actors], "init")

    def placements(self, timeout_s: float = 120.0) -> list[dict]:
        try:
            return ray.get([a.placement.remote() for a in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ActorFailure(f"{self.role}: actors were not scheduled within {timeout_s:.0f} s") from None

    def spans(self) -> list[list[tuple[str, float, float]]]:
        return ray.get([a.spans.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.owns_pg:
            remove_placement_group(self.pg)


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


# Models load from local directories only (no hub at run time); keep library chatter down.
ACTOR_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """A fresh embedded Ray (``address=None``) or a connection to an existing cluster.

    ``address="local"`` always starts a new instance: a plain ``ray.init()`` would first try a
    stale ``/tmp/ray/ray_current_cluster`` left by a crashed run.
    """
    if ray.is_initialized():
        return
    if address is None:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": ACTOR_ENV})
    else:
        ray.init(address=address, runtime_env={"env_vars": ACTOR_ENV})
