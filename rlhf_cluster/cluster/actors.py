"""Thin actor shells around the workers.

Each shell declares nothing but how to build its worker from a typed spec
(:mod:`rlhf_cluster.cluster.specs`) and which of its methods are callable; resources and
placement are decided by :mod:`rlhf_cluster.cluster.groups`. A shell runs as a Ray actor
or, with ``cluster.backend: local``, as a plain object in the driver's process.
Every call is recorded as a span (name, start, end) so benchmarks can draw a timeline.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rlhf_cluster.cluster.specs import EngineSpec, RewardSpec, ScorerSpec, TrainerSpec
from rlhf_cluster.logs import quiet_libraries

if TYPE_CHECKING:  # torch comes with the worker's init: a shell that is only placed (or pinged) stays light
    import torch

    from rlhf_cluster.experience import Experience
    from rlhf_cluster.workers.reward_sources import RewardInputs


class _Shell:
    """Base of every actor: where it runs, a free port, and the span log."""

    role = "actor"

    def __init__(self, rank: int = 0, role: str | None = None):
        self.rank = rank
        if role is not None:
            self.role = role
        self._spans: list[tuple[str, float, float]] = []
        quiet_libraries()
        # Ray sets OMP_NUM_THREADS from the actor's CPU share before the process starts; torch, first imported by the
        # worker's init, takes its thread count from it.

    @contextmanager
    def _span(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self._spans.append((name, t0, time.time()))

    def placement(self) -> dict:
        import ray

        if not ray.is_initialized():  # the local backend: the driver's own process
            return {"role": self.role, "rank": self.rank, "node_id": "local", "ip": "127.0.0.1", "gpu_ids": [],
                    "pid": os.getpid()}
        ctx = ray.get_runtime_context()
        return {"role": self.role, "rank": self.rank, "node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}

    def reserve_port(self) -> tuple[str, int]:
        """A port on this node's cluster address, held open until this process's store serves it
        (:mod:`rlhf_cluster.workers.rendezvous`): the address and port the other ranks connect to."""
        import ray

        from rlhf_cluster.workers.rendezvous import reserve

        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        return host, reserve(host)

    def set_threads(self, n: int) -> None:
        """Run torch on ``n`` threads from the next call on (the driver's thread budget for the coming phase)."""
        import torch

        if n != torch.get_num_threads():
            # torch._C's setter: vLLM's CPU worker replaces torch.set_num_threads with a no-op in its process,
            # which only matters where it pins OpenMP threads to cores (its multiprocess executor, not ours).
            torch._C.set_num_threads(n)

    def spans(self) -> list[tuple[str, float, float]]:
        return list(self._spans)

    def peak_rss_mib(self) -> float:
        """This process's peak resident memory so far (the local backend: the driver's whole process)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def ping(self) -> bool:
        """Nothing: a liveness check (a dead actor answers with an error)."""
        return True

    def close(self) -> None:
        """Release the worker now (the local backend; a Ray actor is killed instead)."""
        worker = getattr(self, "worker", None)
        if worker is not None and hasattr(worker, "close"):
            worker.close()
        self.worker = None


class _TrainerShell(_Shell):
    """What every DeepSpeed trainer rank exposes: init, update/evaluate by objective, saving."""

    worker_class = ""  # a class in rlhf_cluster.workers.trainer

    def init(self, spec: TrainerSpec, world_size: int, master_addr: str, master_port: int) -> None:
        from rlhf_cluster.workers import trainer

        with self._span("init"):
            self.worker = getattr(trainer, self.worker_class)(rank=self.rank, world_size=world_size, master_addr=master_addr,
                                                              master_port=master_port, **spec.worker_kwargs())

    def update(self, batch, objective: str, **kwargs) -> dict:
        with self._span(f"{self.role}_{objective}"):
            return self.worker.update(batch, objective, **kwargs)

    def evaluate(self, batch, objective: str, **kwargs) -> dict:
        with self._span(f"eval_{objective}"):
            return self.worker.evaluate(batch, objective, **kwargs)

    def save_pretrained(self, out_dir: str) -> None:
        with self._span("save"):
            self.worker.save_pretrained(out_dir)

    def save_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        with self._span("save"):
            self.worker.save_checkpoint(ckpt_dir, tag)

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        self.worker.load_checkpoint(ckpt_dir, tag)


class PolicyActor(_TrainerShell):
    role = "policy"
    worker_class = "PolicyTrainer"

    def logprobs(self, exp: Experience) -> torch.Tensor:
        with self._span("old_logprobs"):
            return self.worker.logprobs(exp)

    def export_state_dict(self) -> dict | None:
        with self._span("export_weights"):
            return self.worker.export_state_dict()

    def import_weight_transfer(self) -> None:
        """Import vLLM's weight-transfer modules (~3 s of CPU): queued right after init, it runs while the engines are
        still starting (their init is the longest) instead of after them, on the path to the first step."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory  # noqa: F401

        from rlhf_cluster.workers import weight_transfer  # noqa: F401

    def init_weight_transfer(self, backend: str, engines: list, workers_per_engine: int, master_address: str,
                             master_port: int, bucket_bytes: int) -> None:
        """Every rank: join vLLM's weight transfer (rank 0 sends, the others take part in ZeRO-3 gathers)."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from rlhf_cluster import vllm_plugin
        from rlhf_cluster.workers.weight_transfer import TrainerWeightSource, trainer_init_info

        vllm_plugin.register()
        if backend != "gloo" and self.rank == 0:
            from rlhf_cluster.workers.rendezvous import release

            release(master_port)  # vLLM's NCCL group binds its own store on this port
        with self._span("weight_transfer_init"):
            self.client = EngineClient(engines, workers_per_engine)
            info = trainer_init_info(backend, rank=self.rank, master_address=master_address, master_port=master_port,
                                     world_size=1 + len(engines) * workers_per_engine, bucket_bytes=bucket_bytes)
            self.transfer = WeightTransferTrainerFactory.trainer_init(
                info, client=self.client, source=TrainerWeightSource(self.worker.engine.module, self.worker.zero_stage == 3))

    def send_weights(self, version: int) -> None:
        with self._span("send_weights"):
            self.client.version = version
            self.transfer.send_weights()


class CriticActor(_TrainerShell):
    role = "critic"
    worker_class = "CriticTrainer"

    def values(self, exp: Experience) -> torch.Tensor:
        with self._span("values"):
            return self.worker.values(exp)


class ReferenceActor(_Shell):
    role = "reference"

    def init(self, spec: ScorerSpec) -> None:
        from rlhf_cluster.workers.scorers import ReferenceScorer

        with self._span("init"):
            self.worker = ReferenceScorer(spec.model_path, micro_batch_size=spec.micro_batch_size, dtype=spec.dtype)

    def logprobs(self, exp: Experience) -> torch.Tensor:
        with self._span("ref_logprobs"):
            return self.worker.logprobs(exp)

    def sequence_logps(self, exp: Experience) -> torch.Tensor:
        with self._span("ref_logprobs"):
            return self.worker.sequence_logps(exp)

    def logprobs_and_entropy(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        with self._span("logprobs_entropy"):
            return self.worker.logprobs_and_entropy(exp)


class RewardActor(_Shell):
    role = "reward"

    def init(self, spec: RewardSpec) -> None:
        from rlhf_cluster.workers.reward_sources import build_reward_source

        with self._span("init"):
            self.worker = build_reward_source(spec)

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        with self._span("reward"):
            return self.worker.score(inputs)


class RolloutActor(_Shell):
    role = "rollout"

    def init(self, spec: EngineSpec) -> None:
        from rlhf_cluster.workers.rollout import RolloutEngine

        with self._span("init"):
            self.worker = RolloutEngine(spec.model_path, **spec.worker_kwargs())

    def generate(self, prompt_ids: list[list[int]], seed: int | None = None, **sampling):
        with self._span("generate"):
            return self.worker.generate(prompt_ids, seed=seed, **sampling)

    def load_weights(self, state: dict, version: int) -> float:
        with self._span("load_weights"):
            return self.worker.load_weights(state, version)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.worker.init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self.worker.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        with self._span("receive_weights"):
            self.worker.update_weights(update_info)

    def finish_weight_update(self, version: int) -> None:
        self.worker.finish_weight_update(version)

    def sequence_logprobs(self, sequences: list[list[int]], num_actions: int) -> list[list[float]]:
        return self.worker.sequence_logprobs(sequences, num_actions)


class EngineClient:
    """vLLM's ``VLLMWeightSyncClient`` over rollout actors: each call fans out to every engine and waits.

    Engines are separate vLLM instances, so engine i's workers take the transfer-group
    ranks after engine i-1's (vLLM numbers workers within one instance only).
    """

    def __init__(self, engines: list, workers_per_engine: int):
        self.engines = engines
        self.workers_per_engine = workers_per_engine
        self.version = 0

    def _all(self, method: str, *args_of) -> None:
        import ray

        ray.get([getattr(e, method).remote(*(a(i) for a in args_of)) for i, e in enumerate(self.engines)])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all("init_weight_transfer_engine",
                  lambda i: {**init_info, "rank_offset": init_info["rank_offset"] + i * self.workers_per_engine})

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._all("update_weights", lambda i: update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", lambda i: self.version)
