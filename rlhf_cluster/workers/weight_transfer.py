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

from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from rlhf_cluster.workers.broadcast import (
    DEFAULT_BUCKET_BYTES,
    GROUP_TIMEOUT_S,
    TrainerWeights,
    dtype_name,
    join_group,
    receive_buckets,
    send_buckets,
)


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
        self.store, self.group = join_group(init_info.master_address, init_info.master_port, rank,
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
        receive_buckets(self.group, info.names, info.dtype_names, info.shapes, self.bucket_bytes, self.model.load_weights)

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
        # The workers block in the rendezvous until rank 0 joins too, so both sides run at once;
        # whichever fails first is raised at once instead of after the other side's timeout.
        pool = ThreadPoolExecutor(max_workers=2)
        try:
            workers = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            ours = pool.submit(join_group, init_info.master_address, init_info.master_port, 0, init_info.world_size,
                               init_info.timeout_s)
            wait([workers, ours], return_when=FIRST_EXCEPTION)
            for f in (workers, ours):
                if f.done() and f.exception() is not None:
                    raise RuntimeError("gloo weight transfer: setting up the broadcast group failed") from f.exception()
            workers.result()
            engine.store, engine.group = ours.result()
        finally:
            pool.shutdown(wait=False)
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # the ZeRO-3 gathers are collectives over the trainer ranks
                pass
            return
        info = GlooWeightTransferUpdateInfo(names=[m.name for m in meta], dtype_names=[dtype_name(m.dtype) for m in meta],
                                            shapes=[list(m.shape) for m in meta])
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, asdict(info))

            def engines_still_receiving(wait_s: float | None = 0) -> None:
                # An engine that failed would leave us waiting in a broadcast until the group times out.
                if wait_s is None or received.done():
                    try:
                        received.result(timeout=wait_s)
                    except Exception as e:
                        raise RuntimeError("an engine failed while receiving weights") from e

            try:
                send_buckets(self.group, self.source, meta, self.bucket_bytes, before_bucket=engines_still_receiving)
            except Exception:
                engines_still_receiving()  # an engine's own error explains a broken broadcast best
                raise
            engines_still_receiving(wait_s=None)
        finally:
            # If the broadcast failed the workers are stuck in theirs; waiting would hang.
            pool.shutdown(wait=False)
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group, self.store = None, None


# ---------------------------------------------------------------------- the trainer's weights
class TrainerWeightSource(TrainerWeights, WeightSource):
    """:class:`TrainerWeights` as the ``WeightSource`` vLLM's trainer engines take."""


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
