"""Single-GPU check of the DeepSpeed trainer workers, without Ray and without vLLM.

    python benchmarks/gpu_workers.py --out DIR [--device cuda|cpu] [--big-size full|small]

What it does, in one process per ZeRO stage (the script re-runs itself with ``--stage N``,
so every stage gets a fresh process, a fresh process group and no ZeRO-3 leftovers such as
transformers' global ``HfDeepSpeedConfig``):

* builds the tiny Llama of :mod:`rlhf_cluster.tiny` and a larger random-init Llama (~115M
  parameters with ``--big-size full``) that shares the tiny tokenizer;
* joins a world-size-1 process group through :func:`init_distributed` (nccl on CUDA, gloo on CPU);
* for each model: a :class:`PolicyTrainer` and a :class:`CriticTrainer` (dtype ``auto``:
  bf16 on CUDA, gradient checkpointing on) run a few PPO / value updates on a synthetic
  experience batch, with checks (finite losses, the right parameter dtype, the update
  changes the weights, the first layer and the embedding included, so gradients came back
  through the checkpointed layers; ``export_state_dict`` returns every Hugging Face name with
  its shape; the exported weights reproduce the trainer's log-probs / values in a plain HF
  model) and timings (tokens/s of update and forward, export seconds and MB, peak memory).

The parent then checks across stages (same export names and shapes, same pre-update
log-probs), writes ``DIR/gpu_workers.json``, prints a table and exits non-zero when any
check failed or any stage crashed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STAGES = (0, 2, 3)

# Model shapes and batches. "full" is the GPU throughput model; "small" keeps a 2-core CPU run short.
BIG = {
    "full": {"hidden_size": 768, "intermediate_size": 3072, "num_layers": 12, "num_heads": 12, "batch": 32, "prompt": 64,
             "response": 128, "micro": 8, "mini": 16, "lr": 1e-3},
    "small": {"hidden_size": 256, "intermediate_size": 1024, "num_layers": 4, "num_heads": 4, "batch": 16, "prompt": 32,
              "response": 64, "micro": 4, "mini": 8, "lr": 1e-3},
}
TINY = {"batch": 16, "prompt": 16, "response": 32, "micro": 4, "mini": 8, "lr": 1e-2}
PPO_HP = {"clip_eps_low": 0.2, "clip_eps_high": 0.2, "policy_loss": "vanilla", "policy_loss_params": {},
          "loss_agg_mode": "token_mean", "entropy_coef": 0.0}
VALUE_HP = {"value_clip": 0.2}


# ----------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class Checks:
    """Named pass/fail records; every check stores the value it judged."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, ok, detail=None, warn_only: bool = False) -> bool:
        """``warn_only``: a known, explained deviation; reported, but does not fail the run."""
        ok = bool(ok)
        self.items.append({"name": name, "ok": ok, "detail": detail, "warn_only": warn_only})
        flag = "ok" if ok else ("WARN" if warn_only else "FAIL")
        print(f"  [{flag}] {name}" + (f": {detail}" if detail is not None else ""), flush=True)
        return ok

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.items if not c["ok"] and not c.get("warn_only")]

    @property
    def warned(self) -> list[dict]:
        return [c for c in self.items if not c["ok"] and c.get("warn_only")]


# ----------------------------------------------------------------------------- models
def build_models(root: Path, big_size: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_cluster.tiny import build_tiny_model

    tiny = build_tiny_model(root / "tiny")
    from rlhf_cluster.models import load_tokenizer

    tok = load_tokenizer(tiny)
    b = BIG[big_size]
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=b["hidden_size"], intermediate_size=b["intermediate_size"],
        num_hidden_layers=b["num_layers"], num_attention_heads=b["num_heads"], num_key_value_heads=b["num_heads"],
        max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    big = root / "big"
    model.save_pretrained(big, safe_serialization=True)
    tok.save_pretrained(big)
    del model
    return {"tiny": str(tiny), "big": str(big), "big_params": n_params}


def expected_shapes(model_dir: str, role: str) -> dict[str, list[int]]:
    """The Hugging Face names and shapes the export must give: the checkpoint's own tensors for
    the policy (what vLLM's load_weights reads), a meta-device scalar model for the critic."""
    if role == "policy":
        from safetensors import safe_open

        files = sorted(Path(model_dir).glob("*.safetensors"))
        out = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    out[k] = list(h.get_slice(k).get_shape())
        return out
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(model_dir, num_labels=1)
    with torch.device("meta"):
        m = AutoModelForSequenceClassification.from_config(cfg)
    return {k: list(v.shape) for k, v in m.state_dict().items()}


def synthetic_batch(vocab: int, pad_id: int, B: int, P: int, A: int, seed: int):
    """Ragged rows (left-padded prompts of P/2..P, responses of A/2..A), row 0 full length."""
    import torch

    from rlhf_cluster.experience import build_experience

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(B):
        p = P if i == 0 else int(torch.randint(P // 2, P + 1, (1,), generator=g))
        a = A if i == 0 else int(torch.randint(A // 2, A + 1, (1,), generator=g))
        prompts.append(torch.randint(10, vocab, (p,), generator=g).tolist())
        responses.append(torch.randint(10, vocab, (a,), generator=g).tolist())
    exp = build_experience(prompts, responses, pad_id=pad_id)
    exp.advantages = torch.randn(exp.action_mask.shape, generator=g) * exp.action_mask
    exp.returns = torch.randn(exp.action_mask.shape, generator=g) * exp.action_mask
    return exp


# ----------------------------------------------------------------------------- one stage (child process)
def _state_mb(sd) -> float:
    return sum(t.numel() * t.element_size() for t in sd.values()) / 2**20


def _changed(before, after) -> dict[str, bool]:
    import torch

    return {k: not torch.equal(before[k], after[k]) for k in before if k in after}


def _first_layer_key(keys, role: str) -> list[str]:
    want = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
            "lm_head.weight" if role == "policy" else "score.weight"]
    return [k for k in want if k in keys]


def _export_checks(checks: Checks, tag: str, sd, expected: dict, dtype) -> dict:
    shapes = {k: list(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in expected if k in shapes and shapes[k] != expected[k])
    checks.add(f"{tag} export has every HF name", not missing and not extra,
               {"n": len(shapes), "expected": len(expected), "missing": missing[:5], "extra": extra[:5]})
    checks.add(f"{tag} export shapes match", not wrong and not missing,
               {"wrong": [(k, shapes[k], expected[k]) for k in wrong[:5]]})
    float_dtypes = sorted({str(v.dtype) for v in sd.values() if v.is_floating_point()})
    checks.add(f"{tag} export dtype is {dtype}", float_dtypes == [str(dtype)], float_dtypes)
    checks.add(f"{tag} export tensors on cpu", all(v.device.type == "cpu" for v in sd.values()))
    return shapes


def _timed(device, fn):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def run_role(role: str, model_key: str, model_dir: str, expected: dict, shape: dict, stage: int, args, checks: Checks,
             port: int) -> dict:
    import gc

    import torch

    from rlhf_cluster.models import token_values
    from rlhf_cluster.workers.trainer import CriticTrainer, PolicyTrainer

    tag = f"z{stage}/{model_key}/{role}"
    device = args.device
    print(f"\n== {tag}", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cls = PolicyTrainer if role == "policy" else CriticTrainer
    t0 = time.perf_counter()
    trainer = cls(model_path=model_dir, zero_stage=stage, gradient_checkpointing=True, dtype=args.dtype,
                  micro_batch_size=shape["micro"], mini_batch_size=shape["mini"], learning_rate=shape["lr"],
                  master_port=port, seed=0)
    init_s = time.perf_counter() - t0
    res: dict = {"tag": tag, "stage": stage, "model": model_key, "role": role, "init_seconds": init_s}

    # -- setup checks
    want_dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "bf16": torch.bfloat16,
                  "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    dev_type = trainer.device.type
    checks.add(f"{tag} trainer device is {device}", dev_type == device, dev_type)
    pdtypes = sorted({str(p.dtype) for p in trainer.engine.module.parameters()})
    checks.add(f"{tag} parameter dtype {want_dtype}", pdtypes == [str(want_dtype)], pdtypes)
    pdev = sorted({(p.ds_tensor if hasattr(p, "ds_tensor") else p).device.type for p in trainer.engine.module.parameters()})
    checks.add(f"{tag} parameters on {device}", pdev == [device], pdev)
    checks.add(f"{tag} zero stage {stage}", trainer.engine.zero_optimization_stage() == stage,
               trainer.engine.zero_optimization_stage())
    gc_on = bool(getattr(trainer.engine.module, "is_gradient_checkpointing", False))
    checks.add(f"{tag} gradient checkpointing on", gc_on)
    res["optimizer"] = type(trainer.engine.optimizer).__name__

    tok = trainer.tokenizer
    exp = synthetic_batch(len(tok), tok.pad_token_id, shape["batch"], shape["prompt"], shape["response"], seed=7)
    ntok = exp.num_tokens()
    res.update(batch=list(exp.input_ids.shape), real_tokens=ntok)

    forward = trainer.logprobs if role == "policy" else trainer.values
    before, fwd_s = _timed(device, partial(forward, exp))
    _, fwd_s2 = _timed(device, partial(forward, exp))  # second call: warm
    res["forward_tokens_per_s"] = ntok / fwd_s2
    res["forward_first_seconds"] = fwd_s
    checks.add(f"{tag} forward finite", bool(torch.isfinite(before).all()), list(before.shape))
    checks.add(f"{tag} forward shape (B, A)", list(before.shape) == list(exp.action_mask.shape), list(before.shape))
    if role == "policy":
        exp.old_logprobs = before.clone()
        res["logprobs_before"] = before[:2, :8].tolist()  # for the cross-stage check
        res["logprobs_before_mean"] = float((before * exp.action_mask).sum() / exp.action_mask.sum())
    else:
        exp.values = before.clone()
        res["values_before"] = before[:2, :8].tolist()  # differs across stages when the fresh head does

    sd0, exp_s0 = _timed(device, trainer.export_state_dict)

    # -- updates
    objective, hp = ("ppo", PPO_HP) if role == "policy" else ("value", VALUE_HP)
    updates = []
    for i in range(args.updates):
        st, secs = _timed(device, partial(trainer.update, exp, objective, epochs=1, **hp))
        st = {k: float(v) for k, v in st.items() if isinstance(v, (int, float))}
        st["seconds"] = secs
        st["tokens_per_s"] = ntok / secs
        updates.append(st)
        print(f"  update {i}: loss {st['loss']:.4f} grad_norm {st['grad_norm']:.4f} {st['tokens_per_s']:.0f} tok/s", flush=True)
    res["updates"] = updates
    losses = [u["loss"] for u in updates]
    checks.add(f"{tag} losses finite", all(math.isfinite(x) for x in losses), losses)
    norms = [u["grad_norm"] for u in updates]
    checks.add(f"{tag} grad norms finite", all(math.isfinite(x) for x in norms), norms)
    if not any(x > 0 for x in norms):
        print(f"  [warn] {tag} grad_norm reported 0 on every update (DeepSpeed may not report it at this stage)", flush=True)
    # DeepSpeed's ZeRO-0 half-precision wrapper (FP16_UnfusedOptimizer, used for bf16 with a client
    # torch optimizer) calls optimizer.step() once on zero grads at construction; the trainer uncounts
    # that step (else torch Adam's bias correction runs one step ahead, ~0.73x lr at first).
    n_steps = args.updates * (shape["batch"] // shape["mini"])
    adam_steps = sorted({int(v["step"]) for v in trainer.engine.basic_optimizer.state.values() if "step" in v})
    res["adam_state_steps"] = adam_steps
    res["engine_global_steps"] = int(trainer.engine.global_steps)
    checks.add(f"{tag} engine took {n_steps} optimizer steps", trainer.engine.global_steps == n_steps,
               int(trainer.engine.global_steps))
    checks.add(f"{tag} torch Adam state step == optimizer steps ({n_steps})", adam_steps == [n_steps],
               {"adam_steps": adam_steps, "optimizer": res["optimizer"]})
    warm = updates[1:] or updates
    res["update_tokens_per_s"] = sum(ntok for _ in warm) / sum(u["seconds"] for u in warm)
    if device == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30

    after = forward(exp)
    diff_update = float(((after - before).abs() * exp.action_mask).max())
    res["forward_change_after_update"] = diff_update
    checks.add(f"{tag} {'log-probs' if role == 'policy' else 'values'} changed by the update", diff_update > 1e-3, diff_update)

    # -- export after the update
    sd1, exp_s = _timed(device, trainer.export_state_dict)
    res["export_seconds"] = exp_s
    res["export_seconds_first"] = exp_s0
    res["export_mb"] = _state_mb(sd1)
    res["export_shapes"] = _export_checks(checks, tag, sd1, expected, want_dtype)
    changed = _changed(sd0, sd1)
    frac = sum(changed.values()) / max(len(changed), 1)
    res["fraction_tensors_changed"] = frac
    key_ones = _first_layer_key(sd1, role)
    unchanged_key = [k for k in key_ones if not changed.get(k, False)]
    checks.add(f"{tag} weights changed (embedding, layer 0, head)", len(key_ones) == 4 and not unchanged_key,
               {"unchanged": unchanged_key, "fraction_changed": round(frac, 3)})

    micro_batches = list(trainer._micro_batches(exp))
    del trainer, forward, sd0
    gc.collect()
    # A ZeRO-3 trainer registers transformers' global HfDeepSpeedConfig, which would make the plain
    # model below load partitioned; in the cluster the scorers live in other processes.
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    unset_hf_deepspeed_config()
    checks.add(f"{tag} (harness) ZeRO-3 global config cleared before the replay", not is_deepspeed_zero3_enabled())
    if device == "cuda":
        torch.cuda.empty_cache()

    # -- the exported weights reproduce the trainer in a plain HF model (the weight-sync contract)
    if role == "policy":
        from rlhf_cluster.workers.scorers import ReferenceScorer

        plain = ReferenceScorer(model_dir, micro_batch_size=shape["micro"], dtype=args.dtype)
        plain.load_state_dict(sd1)
        replay = plain.logprobs(exp)
        del plain
    else:
        from rlhf_cluster.models import load_scalar_model, pick_device, resolve_dtype

        dev = pick_device()
        m = load_scalar_model(model_dir, resolve_dtype(args.dtype, dev)).to(dev).eval()
        m.load_state_dict(sd1)
        with torch.no_grad():
            replay = torch.cat([token_values(m, s.input_ids, s.attention_mask, exp.num_actions).cpu()
                                for s in micro_batches])
        del m
    diff_sync = float(((replay - after).abs() * exp.action_mask).max())
    tol = 5e-2 if want_dtype != torch.float32 else 1e-4
    res["export_replay_max_diff"] = diff_sync
    checks.add(f"{tag} exported weights reproduce the trainer (max diff < {tol}, < update change / 4)",
               diff_sync < tol and diff_sync < diff_update / 4, {"replay": diff_sync, "update": diff_update})

    del sd1, micro_batches
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def run_stage(args) -> int:
    import torch

    out: dict = {"stage": args.stage, "results": [], "errors": []}
    checks = Checks()
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        if args.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # also set by the parent; trainer code asks torch.cuda
        import deepspeed
        import torch.distributed as dist
        import transformers

        from rlhf_cluster.workers.trainer import init_distributed

        init_distributed(0, 1, "127.0.0.1", args.port)
        backend = dist.get_backend()
        want = "nccl" if args.device == "cuda" else "gloo"
        checks.add(f"z{args.stage} process group backend {want}", backend == want, backend)
        checks.add(f"z{args.stage} world size 1", dist.get_world_size() == 1, dist.get_world_size())
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()._name
        checks.add(f"z{args.stage} deepspeed accelerator {args.device}", accel == args.device, accel)
        out["env"] = {
            "python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None,
            "backend": backend, "accelerator": accel,
        }
        models = json.loads(Path(args.models).read_text())
        shapes = {"tiny": TINY, "big": BIG[args.big_size]}
        for model_key in args.only:
            for role in ("policy", "critic"):
                try:
                    out["results"].append(run_role(role, model_key, models[model_key], models["expected"][model_key][role],
                                                   shapes[model_key], args.stage, args, checks, args.port))
                except Exception as e:
                    tb = traceback.format_exc()
                    print(tb, flush=True)
                    checks.add(f"z{args.stage}/{model_key}/{role} ran without exception", False, f"{type(e).__name__}: {e}")
                    out["errors"].append({"tag": f"z{args.stage}/{model_key}/{role}", "traceback": tb[-4000:]})
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:
        tb = traceback.format_exc()
        print(tb, flush=True)
        checks.add(f"z{args.stage} stage setup", False, f"{type(e).__name__}: {e}")
        out["errors"].append({"tag": f"z{args.stage}", "traceback": tb[-4000:]})
    out["checks"] = checks.items
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 1 if checks.failed else 0


# ----------------------------------------------------------------------------- parent
def cross_stage_checks(stage_out: dict, checks: Checks, dtype_is_lowp: bool) -> None:
    import torch

    by = {}
    for s, o in stage_out.items():
        for r in o.get("results", []):
            by.setdefault((r["model"], r["role"]), {})[s] = r
    for (model, role), per in sorted(by.items()):
        if len(per) < 2:
            continue
        ref_s = min(per)
        ref = per[ref_s]
        for s, r in sorted(per.items()):
            if s == ref_s:
                continue
            checks.add(f"z{ref_s}~z{s}/{model}/{role} same export names and shapes", r["export_shapes"] == ref["export_shapes"],
                       {"n": len(r["export_shapes"])})
            if role == "policy":
                d = float((torch.tensor(r["logprobs_before"]) - torch.tensor(ref["logprobs_before"])).abs().max())
                tol = 5e-2 if dtype_is_lowp else 1e-4
                checks.add(f"z{ref_s}~z{s}/{model}/policy same pre-update log-probs (< {tol})", d < tol, d)
        # Same data, same shuffle, same start: the first update's mean loss (its first mini-batch is
        # computed before any step) must agree between any two stages. A stage whose Adam runs one step
        # ahead (ZeRO-0 bf16, see run_role) is a known deviation and only warns.
        known = {s for s, r in per.items() if r.get("adam_state_steps") != [r.get("engine_global_steps")]
                 and r.get("optimizer") == "FP16_UnfusedOptimizer"}
        # The critic loads a causal LM with a freshly initialised score head. ZeRO-3 initialises it
        # inside zero.Init on the device (the CUDA RNG on GPUs), the other stages on the CPU, so the
        # heads, and with them the value losses, differ: only a warning when the initial values do.
        if role == "critic":
            ref_v = torch.tensor(ref["values_before"])
            for s, r in per.items():
                if s != ref_s and (torch.tensor(r["values_before"]) - ref_v).abs().max() > (5e-2 if dtype_is_lowp else 1e-4):
                    known.add(s)
        stages = sorted(per)
        for i, a in enumerate(stages):
            for b in stages[i + 1:]:
                la, lb = per[a]["updates"][0]["loss"], per[b]["updates"][0]["loss"]
                ltol = (5e-2 + 5e-2 * abs(la)) if dtype_is_lowp else (1e-4 + 1e-4 * abs(la))
                checks.add(f"z{a}~z{b}/{model}/{role} same first-update loss (< {ltol:.2g})", abs(la - lb) < ltol,
                           {f"z{a}": la, f"z{b}": lb}, warn_only=bool({a, b} & known))


def fmt(x, f="{:.0f}"):
    return "-" if x is None else f.format(x)


def print_table(report: dict) -> None:
    rows = [r for s in sorted(report["stages"], key=int) for r in report["stages"][s].get("results", [])]
    env = next((o["env"] for o in report["stages"].values() if "env" in o), {})
    print(f"\n{env.get('device_name', '?')} | torch {env.get('torch')} | deepspeed {env.get('deepspeed')} | "
          f"transformers {env.get('transformers')} | backend {env.get('backend')} | big model {report['big_params'] / 1e6:.1f}M params")
    hdr = (f"{'stage/model/role':22s} {'batch':>10s} {'upd tok/s':>10s} {'fwd tok/s':>10s} {'export s':>9s} {'MB':>7s} "
           f"{'peak GB':>8s} {'loss0->N':>17s} {'optimizer':>18s}")
    print(hdr)
    for r in rows:
        u = r.get("updates", [])
        loss = f"{u[0]['loss']:.3f}->{u[-1]['loss']:.3f}" if u else "-"
        print(f"{r['tag']:22s} {'x'.join(map(str, r['batch'])):>10s} {fmt(r.get('update_tokens_per_s')):>10s} "
              f"{fmt(r.get('forward_tokens_per_s')):>10s} {fmt(r.get('export_seconds'), '{:.2f}'):>9s} "
              f"{fmt(r.get('export_mb'), '{:.0f}'):>7s} {fmt(r.get('peak_mem_gb'), '{:.2f}'):>8s} {loss:>17s} "
              f"{r.get('optimizer', '-'):>18s}")
    n = report["n_checks"]
    failed, warned = report["failed_checks"], report["warned_checks"]
    print(f"\nchecks: {n - len(failed) - len(warned)}/{n} passed, {len(warned)} known-deviation warnings, "
          f"{len(failed)} failed; stage rc: {report['stage_rc']}")
    for c in warned:
        print(f"  WARN {c['name']}: {c['detail']}")
    for c in failed:
        print(f"  FAIL {c['name']}: {c['detail']}")
    print("RESULT:", "FAIL" if failed else "PASS")


def run_parent(args) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    t_start = time.perf_counter()
    report: dict = {"argv": sys.argv, "device": args.device, "big_size": args.big_size, "dtype": args.dtype, "stages": {},
                    "stage_rc": {}}
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="gpu_workers_") as tmp:
        t = time.perf_counter()
        models = build_models(Path(tmp), args.big_size)
        report["big_params"] = models.pop("big_params")
        models["expected"] = {m: {r: expected_shapes(models[m], r) for r in ("policy", "critic")} for m in ("tiny", "big")}
        (Path(tmp) / "models.json").write_text(json.dumps(models))
        report["build_seconds"] = time.perf_counter() - t
        print(f"built models in {report['build_seconds']:.1f}s: big {report['big_params'] / 1e6:.1f}M params", flush=True)
        for stage in args.stages:
            js = Path(tmp) / f"stage{stage}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", str(stage), "--json", str(js),
                   "--models", str(Path(tmp) / "models.json"), "--port", str(free_port()), "--device", args.device,
                   "--big-size", args.big_size, "--dtype", args.dtype, "--updates", str(args.updates),
                   "--only", ",".join(args.only), "--out", str(out_dir)]
            print(f"\n######## ZeRO stage {stage}", flush=True)
            t = time.perf_counter()
            try:
                rc = subprocess.run(cmd, timeout=args.stage_timeout, check=False).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            report["stage_rc"][stage] = rc
            o = json.loads(js.read_text()) if js.exists() else {"results": [], "checks": [], "errors": []}
            o["seconds"] = time.perf_counter() - t
            report["stages"][str(stage)] = o
            checks.add(f"z{stage} process finished and wrote its report", js.exists() and rc in (0, 1), rc)
            checks.items.extend(o.get("checks", []))
    lowp = args.dtype in ("bf16", "fp16") or (args.dtype == "auto" and args.device == "cuda")
    cross_stage_checks(report["stages"], checks, lowp)
    report["n_checks"] = len(checks.items)
    report["failed_checks"] = checks.failed
    report["warned_checks"] = checks.warned
    report["wall_seconds"] = time.perf_counter() - t_start
    path = out_dir / "gpu_workers.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {path} ({report['wall_seconds']:.0f}s)")
    print_table(report)
    return 1 if checks.failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--big-size", choices=sorted(BIG), default=None, help="default: full on cuda, small on cpu")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="trainer dtype (auto: bf16 on cuda)")
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--updates", type=int, default=3)
    p.add_argument("--stage-timeout", type=int, default=300)
    p.add_argument("--only", default="tiny,big", help="which models to train: tiny, big or both")
    # internal: one stage in a child process
    p.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.big_size = a.big_size or ("full" if a.device == "cuda" else "small")
    a.stages = [int(s) for s in str(a.stages).split(",") if s != ""]
    a.only = [m for m in a.only.split(",") if m]
    if not a.only or set(a.only) - {"tiny", "big"}:
        p.error("--only takes tiny, big or tiny,big")
    if a.updates < 1:
        p.error("--updates must be at least 1")
    if a.stage is not None:
        return run_stage(a)
    return run_parent(a)


if __name__ == "__main__":
    sys.exit(main())
