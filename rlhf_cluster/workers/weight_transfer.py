"""Policy weights into the vLLM engines through vLLM's weight-transfer API.

vLLM (``vllm.distributed.weight_transfer``) defines the protocol. The trainer's rank 0
joins a process group with every engine worker once (``init_weight_transfer_engine``);
each sync is then ``start_weight_update`` → ``update_weights`` (the engines receive while
the trainer broadcasts) → ``finish_weight_update``. A backend is a pair of engines: one in
the trainer process, one in every vLLM worker, each looked up by name in a vLLM factory.

Backends used here (config ``rollout.weight_sync``):

- ``nccl``: vLLM's own NCCL backend, for GPU clusters.
- ``gloo``: defined in this module and registered with both of vLLM's factories (the
  ``vllm.general_plugins`` entry point ``rlhf_cluster`` runs :func:`register` in every vLLM
  process). The same protocol over a torch gloo group: the weights go as flat,
  same-dtype buckets, staged through host memory. CPU clusters use it.

:class:`TrainerWeightSource` gives either backend the trainer's full weights, gathering
ZeRO-3 partitions one decoder layer at a time (every trainer rank iterates it in lockstep).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
    layerwise_groups,
)

DEFAULT_BUCKET_BYTES = 64 << 20
GROUP_TIMEOUT_S = 600.0


# ---------------------------------------------------------------------- the bucket plan (pure)
def bucket_plan(numels: list[int], dtypes: list[str], element_sizes: list[int], bucket_bytes: int) -> list[range]:
    """Contiguous runs of parameters to send as one flat tensor each.

    A run holds one dtype and at most ``bucket_bytes`` (a larger tensor travels alone).
    Sender and receivers both compute it from the same metadata, so they cut the
    stream identically without exchanging anything else.
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


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in a weight update")
    return dt


def _plan_for(names: list[str], dtype_names: list[str], shapes: list[list[int]], bucket_bytes: int) -> list[range]:
    numels = [int(torch.Size(s).numel()) for s in shapes]
    sizes = [_dtype(d).itemsize for d in dtype_names]
    return bucket_plan(numels, dtype_names, sizes, bucket_bytes)


def _join_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo group of its own (rank 0 hosts the store): the default group stays untouched."""
    from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

    timeout = datetime.timedelta(seconds=timeout_s)
    store = TCPStore(address, port, world_size, rank == 0, timeout=timeout)
    group = ProcessGroupGloo(PrefixStore("rlhf_cluster_weights", store), rank, world_size, timeout)
    return store, group


def _broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


# ---------------------------------------------------------------------- worker side (inside vLLM)
@dataclass(kw_only=True)
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = GROUP_TIMEOUT_S


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"weight update metadata disagrees: {len(self.names)} names, "
                             f"{len(self.dtype_names)} dtypes, {len(self.shapes)} shapes")


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """Receives bucketed broadcasts from the trainer and loads them with vLLM's layerwise reload.

    ``start``/``finish`` bracket the update with vLLM's layerwise reload, as its NCCL
    backend does: the CPU build repacks linear weights after loading, which a bare
    ``load_weights`` would leave stale.
    """

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.store = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.bucket_bytes = init_info.bucket_bytes
        self.store, self.group = _join_group(init_info.master_address, init_info.master_port, rank,
                                             init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def receive_weights(self, info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: init_weight_transfer_engine was never called")
        for run in _plan_for(info.names, info.dtype_names, info.shapes, self.bucket_bytes):
            shapes = [torch.Size(info.shapes[i]) for i in run]
            flat = torch.empty(sum(s.numel() for s in shapes), dtype=_dtype(info.dtype_names[run.start]))
            _broadcast(self.group, flat)
            views = flat.split([s.numel() for s in shapes])
            self.model.load_weights([(info.names[i], v.view(s)) for i, v, s in zip(run, views, shapes)])

    def shutdown(self) -> None:
        self.group, self.store = None, None


# ---------------------------------------------------------------------- trainer side
@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = "gloo"

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = GROUP_TIMEOUT_S


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Rank 0 broadcasts; the other trainer ranks only take part in the ZeRO-3 gathers."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None
        self.store = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker_info = GlooWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port, rank_offset=1,
            world_size=init_info.world_size, bucket_bytes=init_info.bucket_bytes, timeout_s=init_info.timeout_s)
        # The workers block in the rendezvous until rank 0 joins too: ask them from a side thread.
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.store, engine.group = _join_group(init_info.master_address, init_info.master_port, 0,
                                                     init_info.world_size, init_info.timeout_s)
            joined.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # the ZeRO-3 gathers are collectives over the trainer ranks
                pass
            return
        info = GlooWeightTransferUpdateInfo(names=[m.name for m in meta], dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
                                            shapes=[list(m.shape) for m in meta])
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, asdict(info))
            self._send(meta, info)
            received.result()
        finally:
            # If the broadcast failed the workers are stuck in theirs; waiting would hang.
            pool.shutdown(wait=False)
        self.client.finish_weight_update()

    def _send(self, meta: list[ParamMeta], info: GlooWeightTransferUpdateInfo) -> None:
        plan = _plan_for(info.names, info.dtype_names, info.shapes, self.bucket_bytes)
        pairs = iter(self.source)
        for run in plan:
            parts = []
            for i in run:
                name, t = next(pairs)
                m = meta[i]
                if name != m.name or t.dtype != m.dtype or tuple(t.shape) != tuple(m.shape):
                    raise ValueError(f"weight source yielded {name!r} {t.dtype} {tuple(t.shape)} where its metadata "
                                     f"declared {m.name!r} {m.dtype} {tuple(m.shape)}")
                parts.append(t.detach().reshape(-1).cpu())
            _broadcast(self.group, torch.cat(parts) if len(parts) > 1 else parts[0].contiguous())
        if next(pairs, None) is not None:
            raise ValueError("weight source yielded more tensors than its metadata declared")

    def shutdown(self) -> None:
        self.group, self.store = None, None


# ---------------------------------------------------------------------- the trainer's weights
class TrainerWeightSource(WeightSource):
    """Full weights of a (possibly ZeRO-3-partitioned) module, in Hugging Face names.

    Under ZeRO-3 each decoder layer is gathered as one collective and yielded as copies,
    so the tensors stay valid after DeepSpeed re-partitions; every trainer rank must
    iterate in step. Otherwise the parameters are yielded as they are.
    """

    def __init__(self, module: torch.nn.Module, zero3: bool):
        self.module = module
        self.zero3 = zero3

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape) if self.zero3 else p.shape))
                for n, p in self.module.named_parameters()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        params = dict(self.module.named_parameters())
        if not self.zero3:
            for n, p in params.items():
                yield n, p.detach()
            return
        import deepspeed

        # layerwise_groups regroups names by layer; the metadata order is what receivers expect.
        order = {n: i for i, n in enumerate(params)}
        groups = layerwise_groups(list(params))
        if [n for g in groups for n in g] != list(params):
            groups = [[n] for n in sorted(params, key=order.get)]
        for names in groups:
            with deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None):
                copies = [(n, params[n].detach().clone()) for n in names]
            yield from copies


# ---------------------------------------------------------------------- backend choice
def trainer_init_info(backend: str, *, rank: int, master_address: str, master_port: int, world_size: int,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> TrainerInitInfo:
    """The trainer-side init info of a backend, from the same few facts."""
    if backend == "gloo":
        return GlooTrainerInitInfo(rank=rank, master_address=master_address, master_port=master_port,
                                   world_size=world_size, bucket_bytes=bucket_bytes)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(rank=rank, master_address=master_address, master_port=master_port,
                                   world_size=world_size, packed=True, packed_buffer_size_bytes=bucket_bytes)
    raise ValueError(f"no trainer-side weight transfer for backend {backend!r}")
