"""One-machine check of the broadcast weight transport with the trainer on a GPU: no Ray, no vLLM.

    python benchmarks/gpu_broadcast.py --out DIR [--device cuda|cpu] [--size tiny|base]

The trainer process runs a real PolicyTrainer (DeepSpeed ZeRO-3, bf16 on CUDA), takes one
PPO step so its weights differ from the checkpoint, then broadcasts them with the transport
the ``gloo`` weight-sync backend uses (``rlhf_cluster.workers.broadcast``: ZeRO-3 layer
gathers, flat same-dtype buckets, a gloo group of its own). A receiver process holds the
checkpoint as a plain Hugging Face model on the same device and loads each bucket as it
arrives (standing in for vLLM's ``load_weights``, which the lent GPU machine cannot run).

Checks: before the sync the receiver's log-probs differ from the trainer's; after it they
agree (both compute the same function in the same dtype); every tensor arrived. Times a few
syncs and reports MB/s. Writes DIR/gpu_broadcast.json; exits non-zero on a failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"tiny": {}, "base": {"hidden_size": 768, "intermediate_size": 2048, "num_layers": 12, "num_heads": 12,
                              "num_kv_heads": 12}}
ROUNDS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(device: str, seed: int = 0):
    from rlhf_cluster.experience import build_experience

    g = torch.Generator().manual_seed(seed)
    exp = build_experience(torch.randint(10, 700, (8, 16), generator=g).tolist(),
                           torch.randint(10, 700, (8, 24), generator=g).tolist(), pad_id=0)
    exp.advantages = torch.randn(8, 24, generator=g)
    return exp


def receiver(a) -> int:
    """Rank 1: the checkpoint as a plain HF model; receive ROUNDS+1 syncs, log-probs before and after each."""
    from transformers import AutoModelForCausalLM

    from rlhf_cluster.models import action_logprobs_and_entropy
    from rlhf_cluster.workers.broadcast import join_group, receive_buckets

    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(device).eval()
    params = dict(model.named_parameters())
    store, group = join_group("127.0.0.1", a.port, 1, 2, timeout_s=300)
    exp = _batch(a.device)

    def logps():
        with torch.no_grad():
            return action_logprobs_and_entropy(model, exp.input_ids.to(device), exp.attention_mask.to(device),
                                               exp.num_actions)[0].float().cpu()

    out = {"before": logps().tolist(), "received": []}
    meta = json.loads(store.get("meta"))

    def load(pairs):
        for name, t in pairs:
            params[name].data.copy_(t.to(device, non_blocking=False))
            out["received"].append(name)

    for _ in range(ROUNDS + 1):
        receive_buckets(group, meta["names"], meta["dtypes"], meta["shapes"], meta["bucket_bytes"], load)
        if device.type == "cuda":
            torch.cuda.synchronize()
    out["after"] = logps().tolist()
    Path(a.result).write_text(json.dumps(out))
    return 0


def trainer(a) -> int:
    from rlhf_cluster.tiny import TinySpec, build_tiny_model
    from rlhf_cluster.workers.broadcast import DEFAULT_BUCKET_BYTES, TrainerWeights, dtype_name, join_group, send_buckets
    from rlhf_cluster.workers.trainer import PolicyTrainer

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    model_dir = build_tiny_model(tmp / a.size, spec=TinySpec(**SIZES[a.size]))
    checks: dict[str, bool] = {}

    t = PolicyTrainer(model_path=str(model_dir), master_port=_free_port(), zero_stage=3, micro_batch_size=4,
                      mini_batch_size=8, learning_rate=1e-3, gradient_checkpointing=True)
    exp = _batch(a.device)
    exp.old_logprobs = t.logprobs(exp)
    stats = t.update(exp, "ppo", epochs=1, clip_eps_low=0.2, clip_eps_high=0.2, policy_loss="vanilla", policy_loss_params={},
                     loss_agg_mode="token_mean", entropy_coef=0.0)
    trainer_logps = t.logprobs(exp)
    checks["update_loss_finite"] = bool(torch.isfinite(torch.tensor(stats["loss"])))
    checks["update_moved_policy"] = bool((trainer_logps - exp.old_logprobs).abs().max() > 1e-3)

    source = TrainerWeights(t.engine.module, zero3=True)
    meta = source.metadata()
    mbytes = sum(torch.Size(m.shape).numel() * m.dtype.itemsize for m in meta) / 2**20
    port = _free_port()
    result = tmp / "receiver.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, __file__, "--role", "receiver", "--device", a.device, "--model", str(model_dir),
                             "--port", str(port), "--result", str(result), "--out", a.out], env=env)
    store, group = join_group("127.0.0.1", port, 0, 2, timeout_s=300)
    store.set("meta", json.dumps({"names": [m.name for m in meta], "dtypes": [dtype_name(m.dtype) for m in meta],
                                  "shapes": [list(m.shape) for m in meta], "bucket_bytes": DEFAULT_BUCKET_BYTES}))
    seconds = []
    for r in range(ROUNDS + 1):  # round 0 is warm-up
        t0 = time.perf_counter()
        sent = send_buckets(group, source, meta, DEFAULT_BUCKET_BYTES)
        if r:
            seconds.append(time.perf_counter() - t0)
    rc = proc.wait(timeout=600)
    checks["receiver_exit_0"] = rc == 0
    rec = json.loads(result.read_text()) if result.exists() else {"before": [], "after": [], "received": []}
    before, after = torch.tensor(rec["before"]), torch.tensor(rec["after"])
    names = [m.name for m in meta]
    checks["every_tensor_received_each_round"] = rec["received"] == names * (ROUNDS + 1)
    checks["bytes_sent_match_metadata"] = abs(sent / 2**20 - mbytes) < 1e-6
    tol = 2e-2 if a.device == "cuda" else 1e-4  # bf16 forward in two processes vs fp32
    diff_before = (before - trainer_logps).abs().max().item() if before.numel() else float("nan")
    diff_after = (after - trainer_logps).abs().max().item() if after.numel() else float("nan")
    checks["receiver_differed_before_sync"] = diff_before > tol
    checks["receiver_matches_trainer_after_sync"] = diff_after <= tol
    report = {
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "size": a.size, "megabytes": mbytes,
        "param_dtype": str(meta[0].dtype), "rounds": ROUNDS, "seconds": seconds, "median_seconds": statistics.median(seconds),
        "mb_per_s": mbytes / statistics.median(seconds), "max_abs_logp_diff_before": diff_before,
        "max_abs_logp_diff_after": diff_after, "tolerance": tol, "checks": checks,
    }
    (out / "gpu_broadcast.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "checks"}, indent=1))
    for k, v in checks.items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")
    return 0 if all(checks.values()) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_broadcast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--role", default="trainer", choices=["trainer", "receiver"])
    p.add_argument("--model")
    p.add_argument("--port", type=int)
    p.add_argument("--result")
    a = p.parse_args()
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return receiver(a) if a.role == "receiver" else trainer(a)


if __name__ == "__main__":
    sys.exit(main())
