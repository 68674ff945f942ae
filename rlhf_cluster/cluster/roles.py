"""Assembly: every role a run needs, started where the layout places it and loaded from typed specs.

``start_roles`` creates the groups (Ray actors, or plain objects with the local backend)
and checks capacity before anything starts; ``init_roles`` loads every model concurrently,
then connects the weight-sync group. Drivers get a :class:`Roles` and never see Ray.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_cluster.cluster.actors import CriticActor, PolicyActor, ReferenceActor, RewardActor, RolloutActor
from rlhf_cluster.cluster.groups import ActorFailure, ActorGroup, LocalGroup, RoleGroup, check_capacity, cluster_has_gpus
from rlhf_cluster.cluster.layout import role_layout
from rlhf_cluster.cluster.specs import engine_spec, reward_spec, scorer_spec, trainer_spec
from rlhf_cluster.cluster.threads import ThreadBudget, node_cpus_and_placement
from rlhf_cluster.cluster.weight_sync import connect_weight_sync, resolve_backend

SHELLS = {"policy": PolicyActor, "critic": CriticActor, "reward_model": CriticActor, "reference": ReferenceActor,
          "reward": RewardActor, "rollout": RolloutActor}
TRAINERS = ("policy", "critic", "reward_model")
FROZEN = ("reference", "reward")  # no training state: a restart after another role's failure can keep them loaded


@dataclass
class Roles:
    groups: dict[str, RoleGroup] = field(default_factory=dict)
    weight_sync: str = "object_store"  # resolved backend: nccl, gloo or object_store
    use_gpu: bool = False
    budget: ThreadBudget | None = None  # torch threads per actor on CPU clusters (cluster.threads_per_actor)

    def _get(self, name: str) -> RoleGroup | None:
        return self.groups.get(name)

    policy = property(lambda self: self._get("policy"))
    critic = property(lambda self: self._get("critic"))
    reference = property(lambda self: self._get("reference"))
    reward = property(lambda self: self._get("reward"))
    rollout = property(lambda self: self._get("rollout"))
    reward_model = property(lambda self: self._get("reward_model"))

    @property
    def trainer(self) -> RoleGroup:
        """The model an offline stage trains (the policy, or the reward model)."""
        return self.groups.get("policy") or self.groups["reward_model"]

    def sharing(self, *names: str):
        """A block in which the roles ``names`` run at once: on a CPU cluster their actors split each node's CPUs
        (outside such a block an actor working alone gets them all)."""
        return self.budget.sharing(*names) if self.budget is not None else nullcontext()

    def all(self) -> list[RoleGroup]:
        return list(self.groups.values())

    def summary(self) -> str:
        return ", ".join(f"{g.role}×{len(g)}" for g in self.all())

    def shutdown(self, keep: tuple[RoleGroup, ...] = ()) -> None:
        for g in reversed(self.all()):  # guests before the hosts whose placement groups they use
            if not any(g is k for k in keep):
                g.shutdown()

    def survivors(self, failure: ActorFailure) -> dict[str, RoleGroup]:
        """The frozen roles a restart after ``failure`` can keep: not the failed role, alive in every rank, and owning
        their placement (a colocated guest goes with its host)."""
        culprit = (failure.who or "").split(" ")[0]
        if not culprit:
            return {}  # the failure names no actor: keep nothing
        out = {}
        for name in FROZEN:
            g = self.groups.get(name)
            if isinstance(g, ActorGroup) and name != culprit and g.owns_pg and not g.dead_ranks():
                out[name] = g
        return out

    def save_placement(self, path: Path) -> Path:
        """Where every actor runs: ``{"policy": [{"rank", "node_id", "ip", "gpu_ids", "pid"}, ...], ...}``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({g.role: g.placements() for g in self.all()}, indent=1))
        return path

    def peak_memory_mib(self) -> dict[str, float]:
        """Every actor's peak resident memory, ``{"policy/0": MiB, ...}`` (one process for the local backend)."""
        return {f"{g.role}/{rank}": round(m, 1) for g in self.all() for rank, m in enumerate(g.peak_rss_mib())}

    def save_diagnostics(self, out: Path, log=print) -> dict:
        """After training: ``timeline.json`` and every actor's peak memory. An actor lost now costs these figures
        (a warning), never a restart of the finished run."""
        try:
            return {"timeline": str(self.save_timeline(out / "timeline.json")), "peak_rss_mib": self.peak_memory_mib()}
        except ActorFailure as e:
            log(f"warning: no timeline or memory figures: {str(e).splitlines()[0]}")
            return {}

    def save_timeline(self, path: Path) -> Path:
        """Every actor's recorded calls as ``{"policy/0": [[name, start, end], ...], ...}`` (wall-clock seconds)."""
        spans = {f"{g.role}/{rank}": s for g in self.all() for rank, s in enumerate(g.spans())}
        path.write_text(json.dumps(spans))
        return path


def start_roles(cfg, reuse: dict[str, RoleGroup] | None = None) -> Roles:
    """Create every role's actors (or local objects) where the layout places them; nothing is loaded yet. ``reuse``:
    groups of a previous attempt of this run, started and loaded already, taken as they are."""
    reuse = reuse or {}
    layout = role_layout(cfg)
    local = cfg.cluster.backend == "local"
    if local:
        import torch

        use_gpu = torch.cuda.is_available()
        roles = Roles({name: LocalGroup(spec, SHELLS[name]) for name, spec in layout.items()}, use_gpu=use_gpu)
    else:
        c = cfg.cluster
        use_gpu = c.device == "cuda" or (c.device == "auto" and cluster_has_gpus())
        check_capacity(list(layout.values()), use_gpu)
        if use_gpu and c.memory_check:
            check_memory(cfg)
        roles = Roles(use_gpu=use_gpu)
        try:
            for name, spec in layout.items():
                roles.groups[name] = reuse.get(name) or ActorGroup(
                    spec, SHELLS[name], use_gpu=use_gpu, cpus_per_actor=c.cpus_per_actor,
                    host=roles.groups[spec.host] if spec.host else None)
        except BaseException:
            roles.shutdown()
            raise
    if "rollout" in layout:
        roles.weight_sync = resolve_backend(cfg.rollout.weight_sync, use_gpu, local)
    for g in roles.all():
        g.call_timeout_s = cfg.cluster.call_timeout_s
        g.phase_timeouts_s = dict(cfg.cluster.phase_timeouts_s)
    return roles


def _gpu_memory_gib() -> float | None:
    """Total memory of GPU 0 where this runs (a Ray task on a GPU node), or None without CUDA."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None


def check_memory(cfg) -> None:
    """Refuse, before any actor starts, a config whose estimated per-GPU memory exceeds this cluster's GPUs.

    The estimate is :func:`rlhf_cluster.plan.build_plan` for the cluster's GPU nodes; the error
    lists, per role, the shortfall and the settings that would make it fit.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rlhf_cluster.cluster.groups import ActorFailure
    from rlhf_cluster.plan import build_plan

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1]
    if not nodes:
        return
    mem = cfg.cluster.gpu_memory_gib
    if mem is None:
        probe = ray.remote(num_cpus=0)(_gpu_memory_gib).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[0]["NodeID"], soft=False))
        mem = ray.get(probe.remote(), timeout=120)
        if mem is None:
            return  # GPUs Ray was told about but CUDA cannot see: nothing to measure against
    plan = build_plan(cfg, nodes=len(nodes), gpus_per_node=int(min(n["Resources"]["GPU"] for n in nodes)),
                      gpu_memory_gib=mem)
    if not plan.fits:
        raise ActorFailure("this config does not fit the cluster's GPUs (estimated before any actor started; "
                           "`rlhf-cluster plan` shows the whole table; cluster.memory_check=false skips this check):\n  "
                           + "\n  ".join(plan.problems))


def init_roles(roles: Roles, cfg, loaded: tuple[str, ...] = ()) -> None:
    """Load every model (all roles concurrently; trainers form their process groups), then connect weight sync.
    The roles in ``loaded`` are kept from a previous attempt and not loaded again."""
    pending = []
    for name, g in roles.groups.items():
        if name in loaded:
            continue
        if name in TRAINERS:
            section = cfg.critic if name == "critic" else cfg.policy
            pending.append(g.start_trainers(trainer_spec(section, cfg.algorithm.mini_batch_size, cfg.seed)))
            if name == "policy" and roles.rollout is not None and roles.weight_sync != "object_store":
                pending.append(g.call(PolicyActor.import_weight_transfer, what="init"))
        elif name == "reference":
            pending.append(g.call(ReferenceActor.init, scorer_spec(cfg.reference), what="init"))
        elif name == "reward":
            pending.append(g.call(RewardActor.init, reward_spec(cfg.reward, allow_nonfinite=True), what="init"))
        elif name == "rollout":
            transfer = None if roles.weight_sync == "object_store" else roles.weight_sync
            pending.append(g.each(RolloutActor.init, [(engine_spec(cfg, i, transfer),) for i in range(len(g))], what="init"))
    for p in pending:
        p.get()
    if roles.rollout is not None and roles.weight_sync != "object_store":
        r = cfg.rollout
        connect_weight_sync(roles.policy, roles.rollout, roles.weight_sync, r.tensor_parallel_size,
                            int(r.weight_sync_bucket_mb * 2**20))


def thread_budget(cfg, roles: Roles) -> ThreadBudget | None:
    """cluster.threads_per_actor on a Ray CPU cluster (None: the local backend, or GPUs with ``auto``)."""
    t = cfg.cluster.threads_per_actor
    if cfg.cluster.backend == "local" or (roles.use_gpu and t == "auto"):
        return None
    nodes, cpus = node_cpus_and_placement(roles.groups)
    return ThreadBudget(roles.groups, nodes, cpus, fixed=None if t == "auto" else int(t))


def model_paths(cfg) -> dict[str, str]:
    """The model directories the run's actors load, by config field."""
    layout = role_layout(cfg)
    out = {"policy.model_name_or_path": cfg.policy.model_name_or_path}
    if "critic" in layout:
        out["critic.model_name_or_path"] = cfg.critic.model_name_or_path
    if "reference" in layout:
        out["reference.model_name_or_path"] = cfg.reference.model_name_or_path
    if "reward" in layout and cfg.reward.model_name_or_path:
        out["reward.model_name_or_path"] = cfg.reward.model_name_or_path
    return out


@contextmanager
def open_roles(cfg, log=print, kept: dict[str, RoleGroup] | None = None, restarting=None):
    """Connect (or start a local Ray), start and load every role; shut them down on the way out.

    On an existing cluster the model paths and output_dir are first checked on every node. ``kept``: roles left
    running by the previous attempt of this run, used instead of new ones; when ``restarting(failure)`` says a failure
    will be followed by a restart, the frozen roles that survived it are left running and put into ``kept``.
    """
    reuse = dict(kept or {})
    if kept is not None:
        kept.clear()
    if cfg.cluster.backend == "ray":
        from rlhf_cluster.cluster.connect import check_paths_on_nodes, connect, stage_module

        code = None
        if cfg.reward.function and cfg.reward.code_dir and cfg.method in ("ppo", "online_dpo"):
            code = stage_module(cfg.reward.code_dir, cfg.reward.function.partition(":")[0])
        connect(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, timeout_s=cfg.cluster.connect_timeout_s, working_dir=code)
        if cfg.cluster.address is not None:
            check_paths_on_nodes(model_paths(cfg), {"output_dir": cfg.output_dir})
    t = time.perf_counter()
    try:
        roles = start_roles(cfg, reuse)
    except BaseException:
        for g in reuse.values():  # start_roles may have shut them down already
            with suppress(Exception):
                g.shutdown()
        raise
    keep: dict[str, RoleGroup] = {}
    try:
        init_roles(roles, cfg, loaded=tuple(reuse))
        roles.budget = thread_budget(cfg, roles)
        log(f"actors ready in {time.perf_counter() - t:.1f} s: {roles.summary()}"
            + (f" ({', '.join(reuse)} kept loaded from before the restart)" if reuse else "")
            + (f"; threads: {roles.budget.describe()}" if roles.budget else ""))
        roles.save_placement(Path(cfg.output_dir) / "placement.json")
        yield roles
    except ActorFailure as e:
        if kept is not None and restarting is not None and restarting(e):
            keep = roles.survivors(e)
            kept.update(keep)
        raise
    finally:
        roles.shutdown(keep=tuple(keep.values()))
