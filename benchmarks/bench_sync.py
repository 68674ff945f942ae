"""Weight-sync benchmark: the broadcast (vLLM weight-transfer) path against the object-store path, side by side.

    make bench-sync                                   # tiny and a ~26M-parameter model, CPU (gloo)
    python benchmarks/bench_sync.py --sizes small --ranks 2 --zero-stage 3 --engines 2

The same policy ranks and engines do both kinds of sync, alternating round by round, so
both see the same machine load:

- ``object_store``: every rank exports (ZeRO-3 gathers), rank 0's CPU state dict goes through
  Ray's object store to each engine, which runs vLLM's ``reload_weights``;
- ``broadcast``: vLLM's weight-transfer protocol (``gloo`` here, ``nccl`` on GPU clusters):
  rank 0 broadcasts bucketed weights straight into the engines' workers.

Writes ``OUT/bench_sync.json`` and prints medians, MB/s and the ratio per model size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # name -> TinySpec overrides (head_dim 64 as vLLM CPU needs)
    "tiny": {},
    "small": dict(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=8),
}


def _bench_size(name: str, model_dir: Path, a) -> dict:
    import torch

    from rlhf_cluster.cluster.actors import PolicyActor, RolloutActor
    from rlhf_cluster.cluster.groups import ActorGroup
    from rlhf_cluster.cluster.layout import RoleSpec
    from rlhf_cluster.cluster.specs import EngineSpec, TrainerSpec
    from rlhf_cluster.cluster.weight_sync import connect_weight_sync, sync_weights

    backend = "nccl" if torch.cuda.is_available() and a.use_gpu else "gloo"
    kw = dict(use_gpu=a.use_gpu, cpus_per_actor=0.01)
    policy = ActorGroup(RoleSpec("policy", 1, a.ranks), PolicyActor, **kw)
    rollout = ActorGroup(RoleSpec("rollout", 1, a.engines), RolloutActor, **kw)
    try:
        policy.start_trainers(TrainerSpec(str(model_dir), zero_stage=a.zero_stage, micro_batch_size=1,
                                          mini_batch_size=a.ranks)).get()
        rollout.call(RolloutActor.init, EngineSpec(str(model_dir), max_model_len=64, weight_transfer=backend)).get()
        connect_weight_sync(policy, rollout, backend, 1, int(a.bucket_mb * 2**20))
        params = policy.call(PolicyActor.export_state_dict).get()[0]
        mbytes = sum(t.numel() * t.element_size() for t in params.values()) / 2**20
        del params

        paths = {"object_store": "object_store", "broadcast": backend}  # label -> sync backend
        times = {label: [] for label in paths}
        version = 0
        for r in range(a.rounds + 1):  # round 0 warms both paths up; the order alternates
            for label in sorted(paths, reverse=bool(r % 2)):
                version += 1
                t = time.perf_counter()
                sync_weights(policy, rollout, paths[label], version)
                if r:
                    times[label].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {"size": name, "megabytes": mbytes, "backend": backend, "ranks": a.ranks, "engines": a.engines,
                "zero_stage": a.zero_stage, "seconds": times, "median_seconds": med,
                "mb_per_s": {k: mbytes / v for k, v in med.items()},
                "object_store_over_broadcast": med["object_store"] / med["broadcast"]}
    finally:
        policy.shutdown()
        rollout.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    p.add_argument("--ranks", type=int, default=1, help="policy data-parallel ranks")
    p.add_argument("--engines", type=int, default=1, help="vLLM engines")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--rounds", type=int, default=5, help="timed syncs of each kind (after one warm-up round)")
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--use-gpu", action="store_true", help="GPU actors and nccl (needs a GPU Ray cluster)")
    p.add_argument("--address", default=None, help="existing Ray cluster; default: a local one")
    p.add_argument("--out", default="runs/bench_sync")
    a = p.parse_args(argv)

    from rlhf_cluster.cluster.connect import connect
    from rlhf_cluster.tiny import TinySpec, build_tiny_model

    connect(a.address)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.sizes:
            model_dir = build_tiny_model(Path(tmp) / name, spec=TinySpec(**SIZES[name]))
            results.append(_bench_size(name, model_dir, a))
    (out / "bench_sync.json").write_text(json.dumps(results, indent=1))

    print(f"\nweight sync, {a.ranks} policy rank(s) at ZeRO-{a.zero_stage} -> {a.engines} engine(s), "
          f"median of {a.rounds} rounds each, alternating")
    print(f"{'model':8s} {'MB':>8s} {'object_store s':>15s} {'broadcast s':>12s} {'obj MB/s':>9s} {'bcast MB/s':>11s} {'speed-up':>9s}")
    for r in results:
        m, s = r["median_seconds"], r["mb_per_s"]
        print(f"{r['size']:8s} {r['megabytes']:8.1f} {m['object_store']:15.3f} {m['broadcast']:12.3f} "
              f"{s['object_store']:9.0f} {s['broadcast']:11.0f} {r['object_store_over_broadcast']:8.2f}x")
    print(f"\nwrote {out / 'bench_sync.json'} (broadcast backend: {results[0]['backend']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
