"""The plan's model-state estimate against the tensors a real DeepSpeed engine holds.

This repo's PolicyTrainer on a tiny Llama, 1 and 2 data-parallel ranks (gloo on 127.0.0.1),
ZeRO 0-3, fp32 as on CPU and bf16 as on GPU. Inside the first real optimizer step — when
gradients, optimizer state and fp32 masters coexist — every distinct storage reachable from
the model's parameters and DeepSpeed's optimizer object is summed (views deduplicated by
storage) and compared with ``model_states(...).at_step``.
"""

import gc
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rlhf_cluster.plan import ModelShape, model_states, param_numels, zero3_partition_numel

# (dtype, ZeRO stage); ZeRO-3 last, as its HfDeepSpeedConfig changes how later models load.
CASES = [(dtype, stage) for stage in (0, 1, 2) for dtype in ("fp32", "bf16")] + [("fp32", 3), ("bf16", 3)]
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def _walk(obj, path: str, seen: set, found: dict, depth: int = 0) -> None:
    """Record every storage reachable from ``obj`` as data_ptr -> (bytes, first path)."""
    if depth > 12:
        return
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in found:
            found[storage.data_ptr()] = (storage.nbytes(), path)
        if obj.grad is not None:
            _walk(obj.grad, path + ".grad", seen, found, depth + 1)
        for k, v in vars(obj).items():  # ZeRO-3's ds_tensor partition, grad_accum, ...
            if isinstance(v, (torch.Tensor, list, tuple, dict)):
                _walk(v, f"{path}.{k}", seen, found, depth + 1)
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            if isinstance(k, torch.Tensor):  # torch optimizers key their state by parameter
                _walk(k, f"{path}[param]", seen, found, depth + 1)
            _walk(v, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]", seen, found, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", seen, found, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
        for k, v in vars(obj).items():
            if k not in ("module", "_modules", "timers", "dp_process_group", "mpu"):
                _walk(v, f"{path}.{k}", seen, found, depth + 1)


def engine_storages(engine) -> dict[int, tuple[int, str]]:
    found: dict[int, tuple[int, str]] = {}
    seen: set = set()
    for name, p in engine.module.named_parameters():
        _walk(p, name, seen, found)
    _walk(engine.optimizer, "optimizer", seen, found)
    return found


def _measure_both(i: int, ports: tuple[int, int], model: str, out: str) -> None:
    """Process 0 is a one-rank job, processes 1 and 2 the ranks of a two-rank job, all started at once."""
    world, rank = (1, 0) if i == 0 else (2, i - 1)
    _measure(rank, world, ports[world - 1], model, f"{out}{world}")


def _measure(rank: int, world: int, port: int, model: str, out: str) -> None:
    """One rank: every case in turn, one real SFT update each, measured inside the step."""
    from rlhf_cluster.experience import build_experience
    from rlhf_cluster.workers.trainer import PolicyTrainer

    results = {}
    for dtype, stage in CASES:
        trainer = PolicyTrainer(model_path=model, rank=rank, world_size=world, master_addr="127.0.0.1",
                                master_port=port, zero_stage=stage, micro_batch_size=2, mini_batch_size=2 * world,
                                dtype=dtype, learning_rate=1e-3)
        engine = trainer.engine
        inner = engine.basic_optimizer  # the torch AdamW every DeepSpeed wrapper ends up calling
        step = inner.step

        def measured_step(*args, _step=step, _key=f"{dtype} {stage}", _engine=engine, **kwargs):
            loss = _step(*args, **kwargs)
            found = engine_storages(_engine)
            results[_key] = {"total": sum(b for b, _ in found.values()),
                               "buckets": sum(b for b, path in found.values() if "ipg_buckets" in path)}
            return loss

        inner.step = measured_step
        g = torch.Generator().manual_seed(rank)
        exp = build_experience(torch.randint(10, 700, (2, 6), generator=g).tolist(),
                               torch.randint(10, 700, (2, 10), generator=g).tolist(), pad_id=0)
        trainer.update(exp, "sft")
        del trainer, engine, inner, step
        gc.collect()
    Path(f"{out}.{rank}").write_text(json.dumps(results))


def _free_ports(n: int) -> tuple[int, ...]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once: n different ports
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlhf_cluster.tiny import TinySpec, build_tiny_model

    # ~3M parameters: big enough that the step counters and norms are noise, small enough to be quick.
    spec = TinySpec(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=4)
    return build_tiny_model(tmp_path_factory.mktemp("estimate_model"), spec=spec)


def test_model_states_match_the_engine(model_dir, tmp_path):
    """1 and 2 data-parallel ranks (three processes, spawned together)."""
    out = str(tmp_path / "measured")
    mp.spawn(_measure_both, args=(_free_ports(2), str(model_dir), out), nprocs=3)
    numels = param_numels(ModelShape.from_dir(model_dir), "lm")
    rows = []
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        measured = json.loads(Path(f"{out}{world}.{rank}").read_text())
        for dtype, stage in CASES:
            m = measured[f"{dtype} {stage}"]
            est = model_states(sum(numels), zero_stage=stage, dp=world, dtype_bytes=DTYPE_BYTES[dtype],
                               num_tensors=len(numels), largest_tensor=max(numels),
                               zero3_partition=zero3_partition_numel(numels, world))
            states, measured_states = est.at_step - est.buffers_at_step, m["total"] - m["buckets"]
            rows.append(f"{dtype} ZeRO-{stage} N={world} rank {rank}: measured {m['total']:,} B "
                        f"(buckets {m['buckets']:,}), estimated {est.at_step:,} B (buckets {est.buffers_at_step:,})")
            assert est.buffers_at_step == m["buckets"], rows[-1]
            assert abs(states - measured_states) <= 0.05 * measured_states, rows[-1]
            assert abs(est.at_step - m["total"]) <= 0.05 * m["total"], rows[-1]
    print("\n" + "\n".join(rows))
