"""Role groups: the ranks or replicas of one role, and how the driver calls them.

A driver never touches actors directly. It calls a group with an actor-shell method
(``group.shard(PolicyActor.logprobs, exp)``), which runs on every rank — the batch split
into contiguous row ranges with ``shard``, the same arguments with ``call`` — and returns
a :class:`Pending`; ``.get()`` names the failing role and rank instead of a bare traceback.

Two backends behind one interface:

* :class:`ActorGroup` — one Ray actor per rank, placed by a per-role placement group. On a
  GPU cluster a slot is ``gpus_per_actor`` GPUs (1 for a trainer rank, the tensor-parallel
  size for a vLLM engine); on a CPU cluster a small CPU share. Each node's slots form one
  bundle, and multi-node roles spread their bundles over distinct nodes (STRICT_SPREAD), so
  "2 nodes × 4 GPUs" means exactly that. A colocated role reuses its host's placement
  group with a fraction of each GPU.
* :class:`LocalGroup` — the same shells as plain objects in the driver's process, one rank
  per role, no Ray (``cluster.backend: local``): the loop with nothing between it and the
  workers, for debugging and for the tests of the driver loops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from rlhf_cluster.cluster.layout import RoleSpec


class ActorFailure(RuntimeError):
    """An actor died, raised or timed out: names its role and rank instead of a bare Ray traceback.

    ``kind`` tells them apart for the automatic restart: ``"died"`` (the actor's process is gone: killed, out of
    memory, its node lost) and ``"timeout"`` (a call ran past ``cluster.call_timeout_s``) may go away with fresh
    actors; ``"error"`` (an exception raised inside the actor, or a problem found before any actor started) would
    happen again. ``who`` names the actor(s), e.g. ``"policy rank 0"``.
    """

    def __init__(self, message: str, kind: str = "error", who: str | None = None):
        super().__init__(message)
        self.kind, self.who = kind, who

    @property
    def restartable(self) -> bool:
        return self.kind in ("died", "timeout")


def split_rows(n: int, parts: int) -> list[slice]:
    """Contiguous, nearly equal slices of range(n) (a shard per rank; later ranks may get one row less)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def _rows(x) -> int:
    return x.batch_size if hasattr(x, "batch_size") else len(x)


def _take(x, s: slice):
    return x.select(s) if hasattr(x, "select") else x[s]


def mean_stats(stats: Sequence[dict], prefix: str = "", skip: tuple[str, ...] = ("train_tokens", "train_seconds")) -> dict:
    """Per-rank stat dicts averaged key by key (``prefix`` prepended), e.g. for a data-parallel update."""
    keys = dict.fromkeys(k for s in stats for k, v in s.items() if k not in skip and isinstance(v, (int, float)))
    return {f"{prefix}{k}": sum(s[k] for s in stats if k in s) / sum(k in s for s in stats) for k in keys}


def train_tokens_per_second(stats: Sequence[dict]) -> float:
    """Tokens all ranks trained on over the slowest rank's time."""
    return sum(s["train_tokens"] for s in stats) / max(max(s["train_seconds"] for s in stats), 1e-9)


class Pending:
    """Calls in flight on some ranks of one group."""

    def __init__(self, group: RoleGroup, handles: list, ranks: list[int], what: str):
        self.group, self.handles, self.ranks, self.what = group, handles, ranks, what

    def get(self, timeout: float | None = None) -> list:
        """The results, rank order; ``timeout`` defaults to the group's limit for this call's phase."""
        return self.group._resolve(self, timeout if timeout is not None else self.group.timeout_for(self.what))

    def cat(self, timeout: float | None = None):
        import torch

        return torch.cat(self.get(timeout))

    def handle(self, i: int = 0):
        """Rank i's result without bringing it to the driver (an ObjectRef on Ray), to pass to another group's call."""
        return self.group._handoff(self, i)


# The phases of cluster.phase_timeouts_s, by the names the drivers give their calls.
PHASES = {
    "init": ("init", "weight-transfer setup", "scheduling"),
    "generate": ("generate",),
    "score": ("reward", "eval reward", "reference log-probs", "log-probs", "old log-probs", "values", "evaluate"),
    "update": ("policy update", "critic update", "update"),
    "sync": ("weight sync", "weight export", "weight load"),
    "checkpoint": ("checkpoint save", "checkpoint load", "save"),
}
_PHASE_OF = {what: phase for phase, names in PHASES.items() for what in names}


class RoleGroup:
    """What both backends share: the role's spec and the call patterns."""

    spec: RoleSpec
    actors: list
    call_timeout_s: float | None = None  # how long a call may take before the run stops naming it (None: forever)
    phase_timeouts_s: dict[str, float] = {}  # per phase (PHASES), overriding call_timeout_s

    def timeout_for(self, what: str) -> float | None:
        return self.phase_timeouts_s.get(_PHASE_OF.get(what), self.call_timeout_s)

    def timeout_setting(self, what: str) -> str:
        """The setting that gives a call named ``what`` its time limit."""
        phase = _PHASE_OF.get(what)
        return f"cluster.phase_timeouts_s.{phase}" if phase in self.phase_timeouts_s else "cluster.call_timeout_s"

    @property
    def role(self) -> str:
        return self.spec.role

    def __len__(self) -> int:
        return len(self.actors)

    def _submit(self, rank: int, fn: Callable, args: tuple, kwargs: dict):
        raise NotImplementedError

    def _resolve(self, pending: Pending, timeout: float | None) -> list:
        raise NotImplementedError

    def _handoff(self, pending: Pending, i: int):
        return pending.handles[i]

    def call(self, fn: Callable, *args, what: str | None = None, **kwargs) -> Pending:
        """``fn(*args, **kwargs)`` on every rank (``fn`` is a method of the role's actor shell)."""
        handles = [self._submit(rank, fn, args, kwargs) for rank in range(len(self.actors))]
        return Pending(self, handles, list(range(len(self.actors))), what or fn.__name__)

    def shard(self, fn: Callable, *rows, what: str | None = None, **kwargs) -> Pending:
        """``fn(*row_shards, **kwargs)`` per rank: every positional argument (a batch with ``select``, or a
        list) split into contiguous row ranges. Ranks whose shard is empty are not called."""
        n = _rows(rows[0])
        if any(_rows(r) != n for r in rows):
            raise ValueError(f"{self.role}: shard arguments have different row counts {[_rows(r) for r in rows]}")
        handles, ranks = [], []
        for rank, s in enumerate(split_rows(n, len(self.actors))):
            if s.stop > s.start:
                handles.append(self._submit(rank, fn, tuple(_take(r, s) for r in rows), kwargs))
                ranks.append(rank)
        return Pending(self, handles, ranks, what or fn.__name__)

    def each(self, fn: Callable, per_rank: Sequence[tuple], what: str | None = None, **kwargs) -> Pending:
        """Rank i runs ``fn(*per_rank[i], **kwargs)`` (ranks beyond ``per_rank`` are not called)."""
        handles = [self._submit(rank, fn, tuple(args), kwargs) for rank, args in enumerate(per_rank[: len(self.actors)])]
        return Pending(self, handles, list(range(len(handles))), what or fn.__name__)

    def start_trainers(self, spec) -> Pending:
        """Every rank loads ``spec`` into one torch.distributed group (rank 0 hosts the rendezvous)."""
        from rlhf_cluster.cluster.actors import _TrainerShell

        addr, port = self.on_rank0(_TrainerShell.reserve_port)
        return self.call(_TrainerShell.init, spec, len(self), addr, port, what="init")

    def on_rank0(self, fn: Callable, *args):
        """``fn(*args)`` on rank 0 alone, its result (e.g. the rendezvous address rank 0 hosts)."""
        return self.each(fn, [args], what=fn.__name__).get()[0]

    def placements(self, timeout_s: float = 120.0) -> list[dict]:
        from rlhf_cluster.cluster.actors import _Shell

        return self.call(_Shell.placement, what="scheduling").get(timeout_s)

    def spans(self) -> list[list[tuple[str, float, float]]]:
        from rlhf_cluster.cluster.actors import _Shell

        return self.call(_Shell.spans).get()

    def peak_rss_mib(self) -> list[float]:
        from rlhf_cluster.cluster.actors import _Shell

        return self.call(_Shell.peak_rss_mib).get()

    def dead_ranks(self, timeout_s: float = 5.0) -> list[int]:
        """The ranks whose actor is gone (in one process: none)."""
        return []

    def shutdown(self) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- in process


class LocalGroup(RoleGroup):
    """The role's shell as a plain object in this process (one rank); calls run when submitted."""

    def __init__(self, spec: RoleSpec, shell_cls: type):
        if spec.size != 1:
            raise ValueError(f"{spec.role}: the local backend runs one rank per role, got {spec.num_nodes}×{spec.per_node}")
        self.spec = spec
        self.actors = [shell_cls(0, spec.role)]

    def _submit(self, rank, fn, args, kwargs):
        try:
            return ("ok", fn(self.actors[rank], *args, **kwargs))
        except Exception as e:
            return ("error", e)

    def _resolve(self, pending: Pending, timeout: float | None) -> list:
        out = []
        for rank, (status, value) in zip(pending.ranks, pending.handles):
            if status == "error":
                raise ActorFailure(f"{self.role} rank {rank} failed during {pending.what}: {type(value).__name__}: {value}",
                                   who=f"{self.role} rank {rank}") from value
            out.append(value)
        return out

    def _handoff(self, pending: Pending, i: int):
        return self._resolve(Pending(self, [pending.handles[i]], [pending.ranks[i]], pending.what), None)[0]

    def shutdown(self) -> None:
        for a in self.actors:
            a.close()
        self.actors = []


# ----------------------------------------------------------------------------- Ray


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def check_capacity(specs: Sequence[RoleSpec], use_gpu: bool) -> None:
    """Fail before any actor starts when the roles cannot fit, saying what is short."""
    import ray

    from rlhf_cluster.cluster.layout import gpu_demand

    if not use_gpu:
        return
    own = [s for s in specs if s.host is None]
    need = gpu_demand({s.role: s for s in own})
    have = ray.cluster_resources().get("GPU", 0)
    if need > have:
        detail = ", ".join(f"{s.role} {s.num_nodes}×{s.per_node}×{s.gpus_per_actor:g}" for s in own)
        raise ActorFailure(
            f"the roles need {need:g} GPUs ({detail}) but the cluster has {have:g}; lower the num_nodes / "
            f"num_gpus_per_node / rollout.num_engines settings or enable cluster.colocate_* options"
        )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for s in own:
        if s.num_nodes > 1 and sum(1 for n in nodes if n["Resources"].get("GPU", 0) >= s.per_node * s.gpus_per_actor) < s.num_nodes:
            raise ActorFailure(f"{s.role} asks for {s.num_nodes} nodes with {s.per_node * s.gpus_per_actor:g} free GPUs each; "
                               f"the cluster has fewer such nodes")


def make_placement_group(spec: RoleSpec, use_gpu: bool, cpus_per_actor: float, timeout_s: float = 120.0):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

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


class ActorGroup(RoleGroup):
    """The actors of one role, rank i in bundle ``i // per_node`` of the role's placement group
    (a colocated guest: of its host's group)."""

    def __init__(self, spec: RoleSpec, shell_cls: type, *, use_gpu: bool, cpus_per_actor: float, host: ActorGroup | None = None,
                 env: dict[str, str] | None = None):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.spec = spec
        self.owns_pg = host is None
        self.pg = host.pg if host is not None else make_placement_group(spec, use_gpu, cpus_per_actor)
        remote_cls = ray.remote(shell_cls)
        self.actors = []
        for rank in range(spec.size):
            opts: dict[str, Any] = dict(
                # A colocated role is a guest in another role's bundles, whose CPU share is already taken.
                num_cpus=cpus_per_actor if self.owns_pg else 0,
                num_gpus=spec.gpus_per_actor * spec.gpu_fraction if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank // spec.per_node),
                max_concurrency=1,
            )
            if env:
                opts["runtime_env"] = {"env_vars": env}
            self.actors.append(remote_cls.options(**opts).remote(rank, spec.role))
        self.threads: list[int | None] = [None] * spec.size  # torch threads each rank should use (rlhf_cluster.cluster.threads)
        self._threads_told: list[int | None] = [None] * spec.size

    def _submit(self, rank, fn, args, kwargs):
        actor = self.actors[rank]
        want = self.threads[rank] if self.threads else None
        if want is not None and want != self._threads_told[rank]:
            # Calls from one caller run in submission order, so this lands before the call it is for.
            actor.set_threads.remote(want)
            self._threads_told[rank] = want
        return getattr(actor, fn.__name__).remote(*args, **kwargs)

    def _resolve(self, pending: Pending, timeout: float | None) -> list:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(pending.handles, timeout=timeout)
        except GetTimeoutError:
            failure = self._failure(pending)  # a rank that died or raised, its peers blocked in a collective with it
            if failure is not None:
                raise failure from failure.__cause__
            ready, _ = ray.wait(pending.handles, num_returns=len(pending.handles), timeout=0)
            late = [rank for rank, h in zip(pending.ranks, pending.handles) if h not in ready]
            who = f"{self.role} rank{'s' if len(late) > 1 else ''} {', '.join(map(str, late))}"
            raise ActorFailure(f"{who} did not finish {pending.what} within {timeout:g} s (a hung call, or a slow "
                               f"one: raise {self.timeout_setting(pending.what)})", "timeout", who) from None
        except (RayActorError, RayTaskError) as e:
            failure = self._failure(pending)
            if failure is not None:
                raise failure from failure.__cause__
            raise ActorFailure(f"{self.role} failed during {pending.what}: {_cause(e)}", "died" if _died(e) else "error",
                               self.role) from e

    def _failure(self, pending: Pending) -> ActorFailure | None:
        """The failure of the calls that have finished with an error: a dead rank first, since its death explains
        its peers' errors (a broken collective); None when none has."""
        import ray

        failed = []
        for rank, r in zip(pending.ranks, pending.handles):
            try:
                ray.get(r, timeout=0)
            except Exception as err:  # GetTimeoutError: still running
                if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)):
                    failed.append((rank, err))
        if not failed:
            return None
        dead = [(rank, err) for rank, err in failed if _died(err)]
        rank, err = (dead or failed)[0]
        who = f"{self.role} rank {rank}"
        failure = ActorFailure(f"{who} died during {pending.what}: {_death(err)}" if dead else
                               f"{who} failed during {pending.what}: {_cause(err)}", "died" if dead else "error", who)
        failure.__cause__ = err
        return failure

    def dead_ranks(self, timeout_s: float = 5.0) -> list[int]:
        """The ranks whose actor is gone, found with a no-op call to each: a dead actor answers it at once with an
        error, a live one (when busy, after ``timeout_s``) with nothing; a rank that did not answer counts as alive."""
        import ray

        pings = [a.ping.remote() for a in self.actors]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        dead = []
        for rank, ref in enumerate(pings):
            if ref in ready:
                try:
                    ray.get(ref, timeout=0)
                except Exception as err:
                    if _died(err):
                        dead.append(rank)
        return dead

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.owns_pg:
            remove_placement_group(self.pg)


def _died(err: BaseException) -> bool:
    """Ray says this actor is gone (not: it raised, perhaps because another actor it called is gone)."""
    from ray.exceptions import RayActorError, RayTaskError

    # An exception raised in a task is a RayTaskError made an instance of its cause's class as well, so one whose
    # cause is ActorDiedError (an actor this one called) is a RayActorError too: not this actor's death.
    return isinstance(err, RayActorError) and not isinstance(err, RayTaskError)


def _death(err: BaseException) -> str:
    """Ray's account of an actor's death in one line: how its process exited, without the paragraph of advice."""
    import re

    text = " ".join(str(err).split()).split(" Some common causes")[0]
    m = re.search(r"Worker exit type: (\S+) Worker exit detail: (.*)", text)
    return f"{type(err).__name__}: " + (f"its process exited ({m.group(1)}: {m.group(2)[:300]})" if m else text[:300])


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
