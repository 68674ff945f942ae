"""Broadcasting full weights over a process group of their own: the transport under the gloo backend.

Plain torch, no vLLM: the sender (policy rank 0) cuts the weights into flat, same-dtype
buckets and broadcasts each; every receiver cuts identically from the same metadata, so
only the metadata (names, dtypes, shapes) travels besides the bytes. Tensors are staged
through host memory, so either end may hold them on CPU or GPU.

:class:`TrainerWeights` yields a trainer's full weights, gathering ZeRO-3 partitions one
decoder layer at a time.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 64 << 20
GROUP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Meta:
    """Name, dtype and full shape of one parameter (the fields of vLLM's ``ParamMeta``)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def bucket_plan(numels: list[int], dtypes: list[str], element_sizes: list[int], bucket_bytes: int) -> list[range]:
    """Contiguous runs of parameters to send as one flat tensor each.

    A run holds one dtype and at most ``bucket_bytes`` (a larger tensor travels alone).
    """
    plan: list[range] = []
    start, size = 0, 0
    for i, (n, dt, es) in enumerate(zip(numels, dtypes, element_sizes)):
        nbytes = n * es
        if i > start and (dt != dtypes[start] or size + nbytes > bucket_bytes):
            plan.append(range(start, i))
            start, size = i, 0
        size += nbytes
    if numels:
        plan.append(range(start, len(numels)))
    return plan


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in a weight update")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def plan_for(dtype_names: list[str], shapes: list[list[int]], bucket_bytes: int) -> list[range]:
    numels = [int(torch.Size(s).numel()) for s in shapes]
    sizes = [dtype_from_name(d).itemsize for d in dtype_names]
    return bucket_plan(numels, dtype_names, sizes, bucket_bytes)


def join_group(address: str, port: int, rank: int, world_size: int, timeout_s: float = GROUP_TIMEOUT_S):
    """A gloo group of its own (rank 0 hosts the store); the processes' default groups stay untouched.

    Returns ``(store, group)``; keep the store referenced as long as the group is used.
    """
    from torch.distributed import PrefixStore, ProcessGroupGloo

    from rlhf_cluster.workers.rendezvous import store as tcp_store

    timeout = datetime.timedelta(seconds=timeout_s)
    store = tcp_store(address, port, world_size, rank == 0, timeout_s)
    group = ProcessGroupGloo(PrefixStore("rlhf_cluster_weights", store), rank, world_size, timeout)
    return store, group


def _broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def send_buckets(group, pairs: Iterable[tuple[str, torch.Tensor]], meta: list[Meta], bucket_bytes: int,
                 before_bucket: Callable[[], None] | None = None) -> int:
    """Rank 0: broadcast ``pairs`` (which must match ``meta`` in order) bucket by bucket; returns bytes sent.

    ``before_bucket`` runs before each broadcast and may raise to stop (e.g. a receiver failed).
    """
    plan = plan_for([dtype_name(m.dtype) for m in meta], [list(m.shape) for m in meta], bucket_bytes)
    it = iter(pairs)
    sent = 0
    for run in plan:
        if before_bucket is not None:
            before_bucket()
        parts = []
        for i in run:
            name, t = next(it)
            m = meta[i]
            if name != m.name or t.dtype != m.dtype or tuple(t.shape) != tuple(m.shape):
                raise ValueError(f"weight source yielded {name!r} {t.dtype} {tuple(t.shape)} where its metadata "
                                 f"declared {m.name!r} {m.dtype} {tuple(m.shape)}")
            parts.append(t.detach().reshape(-1).cpu())
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        _broadcast(group, flat)
        sent += flat.numel() * flat.element_size()
    if next(it, None) is not None:
        raise ValueError("weight source yielded more tensors than its metadata declared")
    return sent


def receive_buckets(group, names: list[str], dtype_names: list[str], shapes: list[list[int]], bucket_bytes: int,
                    load: Callable[[list[tuple[str, torch.Tensor]]], object]) -> None:
    """Every other rank: receive what :func:`send_buckets` sends; ``load`` gets each bucket's (name, tensor) pairs."""
    for run in plan_for(dtype_names, shapes, bucket_bytes):
        sizes = [torch.Size(shapes[i]) for i in run]
        flat = torch.empty(sum(s.numel() for s in sizes), dtype=dtype_from_name(dtype_names[run.start]))
        _broadcast(group, flat)
        views = flat.split([s.numel() for s in sizes])
        load([(names[i], v.view(s)) for i, v, s in zip(run, views, sizes)])


class TrainerWeights:
    """Full weights of a (possibly ZeRO-3-partitioned) module, in Hugging Face names.

    Under ZeRO-3 each decoder layer is gathered as one collective and yielded as copies,
    so the tensors stay valid after DeepSpeed re-partitions; every trainer rank must
    iterate in step. Otherwise the parameters are yielded as they are.
    """

    def __init__(self, module: torch.nn.Module, zero3: bool):
        self.module = module
        self.zero3 = zero3

    def metadata(self) -> list[Meta]:
        return [Meta(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape) if self.zero3 else p.shape))
                for n, p in self.module.named_parameters()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        params = dict(self.module.named_parameters())
        if not self.zero3:
            for n, p in params.items():
                yield n, p.detach()
            return
        import deepspeed

        for names in layer_runs(list(params)):
            with deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None):
                copies = [(n, params[n].detach().clone()) for n in names]
            yield from copies


def layer_runs(names: list[str]) -> list[list[str]]:
    """Consecutive names that share a layer prefix (``model.layers.3.``), in order: the ZeRO-3 gather unit."""
    runs: list[list[str]] = []
    key = None
    for n in names:
        parts = n.split(".")
        k = next((".".join(parts[: i + 1]) for i, x in enumerate(parts) if x.isdigit()), n)
        if runs and k == key:
            runs[-1].append(n)
        else:
            runs.append([n])
            key = k
    return runs
