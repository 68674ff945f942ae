"""Thread budgets: how many torch threads each actor runs with on a CPU cluster.

A step's phases run one after another (generation, scoring, the updates, the weight sync), and
inside a phase some roles run at once (PPO scores with the reference, the policy and the critic
together; the policy and critic update together). Ray gives an actor with a fractional CPU share
one OpenMP thread, which leaves most of a node idle whenever one actor works alone. Giving every
actor all cores instead oversubscribes the concurrent phases, and OpenMP's barriers then wait for
descheduled threads (measured on the PPO demo: 6x slower steps). So the actors a phase runs at
once split their node's CPUs, and an actor that works alone gets all of them.

``cluster.threads_per_actor: auto`` does this on CPU clusters; a number fixes every actor's
threads; GPU clusters are left as Ray starts them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager


def shares(nodes: Mapping[str, Sequence[str]], node_cpus: Mapping[str, int], busy: Iterable[str]) -> dict[str, list[int]]:
    """Threads per rank of every group in ``busy``: its node's CPUs over the busy ranks on that node (at least 1).

    ``nodes``: each group's ranks' node ids, rank order; ``node_cpus``: CPUs per node id.
    """
    busy = [name for name in busy if name in nodes]
    on_node = Counter(node for name in busy for node in nodes[name])
    return {name: [max(1, node_cpus[node] // on_node[node]) for node in nodes[name]] for name in busy}


class ThreadBudget:
    """Sets each group's per-rank thread counts (applied by the group before its next call to that rank)."""

    def __init__(self, groups: Mapping, nodes: Mapping[str, Sequence[str]], node_cpus: Mapping[str, int],
                 fixed: int | None = None):
        self.groups, self.nodes, self.node_cpus, self.fixed = groups, nodes, node_cpus, fixed
        self.alone()

    def _assign(self, threads: Mapping[str, list[int]]) -> None:
        for name, per_rank in threads.items():
            self.groups[name].threads = list(per_rank)

    def alone(self) -> None:
        """Every group as if it ran by itself: its ranks on a node share that node's CPUs."""
        if self.fixed is not None:
            self._assign({name: [self.fixed] * len(ranks) for name, ranks in self.nodes.items()})
            return
        for name in self.nodes:
            self._assign(shares(self.nodes, self.node_cpus, [name]))

    @contextmanager
    def sharing(self, *names: str):
        """The groups ``names`` run at once inside the block: their ranks on one node split its CPUs."""
        if self.fixed is None:
            self._assign(shares(self.nodes, self.node_cpus, names))
        try:
            yield
        finally:
            self.alone()

    def describe(self) -> str:
        if self.fixed is not None:
            return f"every actor runs torch on {self.fixed} thread(s) (cluster.threads_per_actor={self.fixed})"
        cpus = sorted(set(self.node_cpus.values()))
        return (f"actors that run at once share their node's CPUs ({'/'.join(map(str, cpus))} per node), one working "
                "alone gets them all (cluster.threads_per_actor=auto)")


def node_cpus_and_placement(groups: Mapping) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Each Ray group's ranks' node ids, and every alive node's CPU count as Ray knows it."""
    import ray

    nodes = {name: [p["node_id"] for p in g.placements()] for name, g in groups.items()}
    cpus = {n["NodeID"]: max(1, int(n["Resources"].get("CPU", 1))) for n in ray.nodes() if n.get("Alive")}
    return nodes, cpus
