"""Side by side with TRL on this machine: the same tiny model, data, reward and hyper-parameters, run by
TRL's trainers and by ``rlhf-cluster train``, each as a fresh process, alternated in one invocation.

    make bench-trl                                  # installs TRL (the `bench` extra), prints the table
    python benchmarks/vs_trl.py --workloads grpo dpo ppo --repeats 2 --out runs/bench_trl

TRL 1.16 has no PPO trainer (1.13 removed ``trl.experimental.ppo``): the ppo workload runs TRL 1.12's, which
``make bench-trl`` installs beside the venv's packages (``pip install --no-deps --target .venv/trl-1.12``) and
only the ppo child process puts first on its path.

Per run: train wall (the training steps alone: TRL's ``trainer.train()``, our summed ``time/step``),
process wall (start-up and shutdown included), samples/s over the train wall, peak memory (the PSS of
the whole process tree, sampled every second: the driver, Ray's processes and every actor) and the
learning outcome (mean reward of the first and last 5 steps; DPO: the reward margin). Ratios: train
throughput ours/TRL and process wall TRL/ours (above 1: we are faster), peak memory ours/TRL (below 1: less).

Like TRL here, our GRPO run skips the held-out evaluations and the final checkpoint (schedule.eval_prompts=0,
schedule.save_final=false); it still writes the final policy directory.

Workloads (both sides):
  grpo  30 steps x 4 prompts x 8 samples, 16 new tokens, beta 0.04 (k3 in the loss on both sides, TRL's
        bias correction off), group std epsilon 1e-4, lr 1e-4 constant, AdamW betas (0.9, 0.95), one update
        per rollout, the demo's sentiment reward and prompts (chat template applied on both sides).
  dpo   one epoch of the 256 shipped preference pairs, 8 pairs per step (32 steps), beta 0.1, lr 1e-3, the
        reference's log-probs computed every step on both sides (ours: preference.reference_mode=on_the_fly).
  grpo_long  8 steps, 128 new tokens, on a random-init ~26M model (hidden 512, 8 layers): ~115 tokens per
        completion, where generation dominates.
  ppo   30 steps x 32 prompts x 1 sample, 16 new tokens, stopping at EOS; GAE (gamma 1, lambda 0.95) with a
        critic, advantages whitened over the batch, k1 KL (beta 0.05) in the per-token reward, 2 PPO epochs of one
        mini-batch, clip 0.2, value clip 0.2, lr 3e-4 constant for policy and critic, AdamW betas (0.9, 0.95), no
        gradient clipping (TRL's PPO loop has none). The reward is a scalar-head model (TRL's PPO takes no reward
        function): the small model's backbone with a seeded random score head, the same file on both sides, and
        both critics start from it. TRL's two ``gc.collect()`` calls per step are disabled (as in issue 12's
        measurement): they cost TRL time and change nothing here.
The models: random-init Llamas with the project's tiny tokenizer; grpo and dpo use hidden 256, 4 layers, 4 heads
of 64 (3.6M parameters).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "rlhf-cluster"
DATA = REPO / "rlhf_cluster" / "configs" / "data"
SEED = 0  # the models' and the reward model's init; a run's own seed is --seeds
GRPO = {  # the tiny workload, and a generation-heavy one on a ~26M model that does not stop early
    "grpo": dict(steps=30, prompts=4, samples=8, new_tokens=16, beta=0.04, lr=1e-4, model="small"),
    "grpo_long": dict(steps=8, prompts=4, samples=8, new_tokens=128, beta=0.04, lr=1e-4, model="26m"),
}
MODELS = {"small": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4),
          "26m": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=8)}
DPO = dict(pairs_per_step=8, beta=0.1, lr=1e-3, max_length=64)
PPO = dict(steps=30, rollouts=32, new_tokens=16, beta=0.05, lr=3e-4, epochs=2, lam=0.95)
TRL_PPO = REPO / ".venv" / "trl-1.12"  # TRL 1.12: the last release with a PPO trainer (see the docstring)
WORKLOADS = [*GRPO, "dpo", "ppo"]


# --------------------------------------------------------------------------- measuring a process tree


def peak_pss(proc: subprocess.Popen, every_s: float = 1.0) -> dict:
    """Poll the PSS of ``proc`` and all its descendants until it exits; {"peak_gib": ...} filled in a thread."""
    import psutil

    out = {"peak_gib": 0.0}

    def poll():
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while proc.poll() is None:
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            out["peak_gib"] = max(out["peak_gib"], total / 2**30)
            time.sleep(every_s)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out["thread"] = t
    return out


def run_measured(cmd: list[str], log: Path) -> tuple[float, float, str]:
    """(process wall seconds, peak PSS GiB, stdout) of ``cmd``; its output is kept in ``log``."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True)
        mem = peak_pss(proc)
        stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    mem["thread"].join(timeout=2)
    log.write_text(log.read_text() + "\n--- stdout ---\n" + stdout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return wall, mem["peak_gib"], stdout


# --------------------------------------------------------------------------- the model and data


def build_model(out: Path, shape: str) -> Path:
    from rlhf_cluster.tiny import TinySpec, build_tiny_model

    if not (out / "config.json").is_file():
        build_tiny_model(out, spec=TinySpec(**MODELS[shape]), seed=SEED)
    return out


def build_reward_model(small: Path, out: Path) -> Path:
    """The ppo workload's reward: ``small``'s backbone with a seeded random score head, scaled so that scores
    have a spread of ~1 (the default init's 0.02 would leave the KL penalty all there is to optimise)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small))
    model = AutoModelForSequenceClassification.from_pretrained(str(small), num_labels=1)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g) * model.config.hidden_size ** -0.5)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_last(xs: list[float], k: int = 5) -> tuple[float, float]:
    return statistics.mean(xs[:k]), statistics.mean(xs[-k:])


# --------------------------------------------------------------------------- TRL (child processes)


def trl_grpo(model: str, out: str, workload: str, seed: int = SEED) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_cluster.rewards import sentiment

    prompts = [[{"role": "user", "content": r["prompt"]}] for r in jsonl(DATA / "demo_prompts.jsonl")]

    def reward(prompts, completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(x) for x in sentiment([""] * len(texts), texts)]

    g = GRPO[workload]
    args = GRPOConfig(
        output_dir=out, seed=seed, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, max_steps=g["steps"], per_device_train_batch_size=g["prompts"] * g["samples"],
        num_generations=g["samples"], max_completion_length=g["new_tokens"], temperature=1.0, beta=g["beta"],
        learning_rate=g["lr"], lr_scheduler_type="constant", adam_beta2=0.95, max_grad_norm=1.0, num_iterations=1,
        epsilon=0.2, loss_type="dapo", use_bias_correction_kl=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    t0 = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t0
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"train_wall": train_wall, "steps": len(rewards), "samples": len(rewards) * g["prompts"] * g["samples"],
            "curve": rewards}


def trl_dpo(model: str, out: str, workload: str = "dpo", seed: int = SEED) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in jsonl(DATA / "prefs_train.jsonl")]
    d = DPO
    args = DPOConfig(
        output_dir=out, seed=seed, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, num_train_epochs=1, per_device_train_batch_size=d["pairs_per_step"], beta=d["beta"],
        learning_rate=d["lr"], lr_scheduler_type="constant", adam_beta2=0.95, max_grad_norm=1.0,
        max_length=d["max_length"], dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    t0 = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t0
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    return {"train_wall": train_wall, "steps": len(margins), "samples": len(rows), "curve": margins}


def need_trl_ppo() -> None:
    if not (TRL_PPO / "trl").is_dir():
        raise SystemExit(f"the ppo workload needs TRL 1.12 at {TRL_PPO}: `make bench-trl` installs it "
                         f"(pip install --no-deps --target {TRL_PPO} trl==1.12.0)")


def trl_ppo(model: str, out: str, workload: str = "ppo", seed: int = SEED) -> dict:
    need_trl_ppo()
    sys.path.insert(0, str(TRL_PPO))
    import types

    import trl.experimental.ppo.ppo_trainer as ppo_trainer
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    ppo_trainer.gc = types.SimpleNamespace(collect=lambda: 0)  # its per-step gc.collect() calls, off
    rm = str(Path(model).parent / "model_rm")
    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"  # queries are left-padded, responses appended after them

    def ids(prompt: str) -> list[int]:  # as our data loader: the chat template's text, then its tokens
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    rows = [{"input_ids": ids(r["prompt"])} for r in jsonl(DATA / "demo_prompts.jsonl")]
    p = PPO
    args = PPOConfig(
        output_dir=out, seed=seed, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, total_episodes=p["steps"] * p["rollouts"], per_device_train_batch_size=p["rollouts"],
        gradient_accumulation_steps=1, num_mini_batches=1, local_rollout_forward_batch_size=p["rollouts"],
        num_ppo_epochs=p["epochs"], response_length=p["new_tokens"], temperature=1.0, stop_token="eos",
        kl_coef=p["beta"], kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=p["lam"],
        learning_rate=p["lr"], lr_scheduler_type="constant", adam_beta2=0.95, num_sample_generations=0,
        dataloader_num_workers=0)
    trainer = PPOTrainer(
        args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(model),
        ref_model=AutoModelForCausalLM.from_pretrained(model),
        reward_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
        train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:8]))
    t0 = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t0
    scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    return {"train_wall": train_wall, "steps": len(scores), "samples": len(scores) * p["rollouts"], "curve": scores}


# --------------------------------------------------------------------------- ours


def ours_cmd(workload: str, model: str, out: str, seed: int = SEED) -> list[str]:
    common = [f"policy.model_name_or_path={model}", f"output_dir={out}", f"seed={seed}", "--overwrite"]
    if workload in GRPO:
        g = GRPO[workload]
        return [str(CLI), "train", "grpo", *common, f"rollout.n_samples_per_prompt={g['samples']}",
                f"rollout.max_new_tokens={g['new_tokens']}", f"schedule.prompts_per_step={g['prompts']}",
                f"schedule.num_steps={g['steps']}", "schedule.save_every=0", f"algorithm.kl_coef={g['beta']}",
                f"algorithm.mini_batch_size={g['prompts'] * g['samples']}", "algorithm.ppo_epochs=1",
                f"policy.learning_rate={g['lr']}", f"policy.micro_batch_size={g['prompts'] * g['samples']}",
                f"reference.micro_batch_size={g['prompts'] * g['samples']}",  # one forward per batch, as TRL's
                "algorithm.group_std_eps=1e-4",  # TRL's (R - mean) / (std + 1e-4)
                "monitors.max_kl_per_token=100", "schedule.eval_prompts=0", "schedule.save_final=false"]
    if workload == "ppo":
        p, rm = PPO, str(Path(model).parent / "model_rm")
        return [str(CLI), "train", "ppo_demo", *common, "reward.function=null", f"reward.model_name_or_path={rm}",
                f"critic.model_name_or_path={rm}", "rollout.n_samples_per_prompt=1", f"rollout.max_new_tokens={p['new_tokens']}",
                "rollout.temperature=1.0", f"schedule.prompts_per_step={p['rollouts']}", f"schedule.num_steps={p['steps']}",
                "schedule.save_every=0", "schedule.eval_prompts=0", "schedule.save_final=false",
                "algorithm.advantage_estimator=gae", "algorithm.gamma=1.0", f"algorithm.lam={p['lam']}",
                f"algorithm.mini_batch_size={p['rollouts']}", f"algorithm.ppo_epochs={p['epochs']}",
                f"algorithm.kl_coef={p['beta']}", "algorithm.kl_penalty=reward", "algorithm.kl_estimator=k1",
                "algorithm.value_clip=0.2", *(f"{role}.{k}" for role in ("policy", "critic") for k in (
                    f"learning_rate={p['lr']}", f"micro_batch_size={p['rollouts']}", "max_grad_norm=1e9")),
                f"reference.micro_batch_size={p['rollouts']}", f"reward.micro_batch_size={p['rollouts']}",
                "monitors.max_kl_per_token=100"]
    d = DPO
    return [str(CLI), "train", "dpo", *common, f"algorithm.mini_batch_size={d['pairs_per_step']}",
            f"policy.micro_batch_size={d['pairs_per_step']}", f"preference.beta={d['beta']}", f"policy.learning_rate={d['lr']}",
            "schedule.num_epochs=1", "preference.reference_mode=on_the_fly"]  # TRL's reference runs every step


def ours_result(workload: str, out: Path) -> dict:
    metrics = jsonl(out / "metrics.jsonl")
    steps = [m for m in metrics if "time/step" in m]
    train_wall = sum(m["time/step"] for m in steps)
    if workload in GRPO:
        curve = [m["reward/mean"] for m in steps]
        samples = len(steps) * GRPO[workload]["prompts"] * GRPO[workload]["samples"]
    elif workload == "ppo":
        curve = [m["reward/mean"] for m in steps]
        samples = len(steps) * PPO["rollouts"]
    else:
        curve = [m["train/reward_margin"] for m in steps if "train/reward_margin" in m]
        samples = len(jsonl(DATA / "prefs_train.jsonl"))
    return {"train_wall": train_wall, "steps": len(steps), "samples": samples, "curve": curve}


# --------------------------------------------------------------------------- the table


def one_run(side: str, workload: str, model: Path, out: Path, i: int, seed: int = SEED) -> dict:
    run_dir = out / f"{workload}_{side}_{i}" if seed == SEED else out / f"{workload}_{side}_{i}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if side == "trl":
        cmd = [sys.executable, __file__, "--child", workload, "--model", str(model), "--out", str(run_dir), "--seeds", str(seed)]
    else:
        cmd = ours_cmd(workload, str(model), str(run_dir), seed)
    wall, mem, stdout = run_measured(cmd, run_dir / "log.txt")
    if side == "trl":
        res = json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))
    else:
        res = ours_result(workload, run_dir)
    first, last = first_last(res["curve"])
    res.update(side=side, workload=workload, process_wall=wall, peak_gib=mem, first5=first, last5=last,
               samples_per_s=res["samples"] / res["train_wall"])
    res.pop("curve")
    res["seed"] = seed
    print(f"  {workload:5s} {side:4s} run {i} seed {seed}: train {res['train_wall']:6.1f} s  process {wall:6.1f} s  "
          f"{res['samples_per_s']:6.1f} samples/s  peak {mem:4.2f} GiB  outcome {first:+.3f} -> {last:+.3f}", flush=True)
    return res


def table(results: list[dict]) -> str:
    lines = ["| workload | side | train wall s | process wall s | samples/s | peak memory GiB | outcome (first 5 → last 5) |",
             "|---|---|---|---|---|---|---|"]
    ratios = ["", "| workload | train throughput ours/TRL | process wall TRL/ours | peak memory ours/TRL | "
              "outcome rise (last 5 − first 5, mean over runs) TRL, ours |", "|---|---|---|---|---|"]
    for w in dict.fromkeys(r["workload"] for r in results):
        agg = {}
        for side in ("trl", "ours"):
            rs = [r for r in results if r["workload"] == w and r["side"] == side]
            med = {k: statistics.median(r[k] for r in rs) for k in ("train_wall", "process_wall", "samples_per_s", "peak_gib")}
            med["rise"] = statistics.mean(r["last5"] - r["first5"] for r in rs)
            rng = f" ({min(r['train_wall'] for r in rs):.1f}–{max(r['train_wall'] for r in rs):.1f})" if len(rs) > 1 else ""
            seeds = len({r["seed"] for r in rs}) > 1
            outcome = ", ".join(f"{r['first5']:+.3f} → {r['last5']:+.3f}" + (f" (seed {r['seed']})" if seeds else "") for r in rs)
            lines.append(f"| {w} | {'TRL' if side == 'trl' else 'rlhf_cluster'} | {med['train_wall']:.1f}{rng} | "
                         f"{med['process_wall']:.1f} | {med['samples_per_s']:.1f} | {med['peak_gib']:.2f} | {outcome} |")
            agg[side] = med
        t, o = agg["trl"], agg["ours"]
        ratios.append(f"| {w} | {o['samples_per_s'] / t['samples_per_s']:.2f}× | {t['process_wall'] / o['process_wall']:.2f}× | "
                      f"{o['peak_gib'] / t['peak_gib']:.2f}× | {t['rise']:+.3f}, {o['rise']:+.3f} |")
    return "\n".join(lines + ratios)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["grpo", "dpo", "ppo"], choices=WORKLOADS,
                   help="grpo_long (8 steps of 128 new tokens on a ~26M model) takes several minutes per side")
    p.add_argument("--repeats", type=int, default=1, help="runs per side and workload, alternated TRL, ours, TRL, ...")
    p.add_argument("--seeds", type=int, nargs="+", default=[SEED], help="each run's seed (sampling, shuffling; the "
                   "models' init stays fixed): several give the learning outcome's spread, alternated TRL, ours per seed")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_trl"))
    p.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:  # one TRL run in this fresh process: its result as the last stdout line
        res = (trl_grpo if a.child in GRPO else trl_ppo if a.child == "ppo" else trl_dpo)(a.model, a.out, a.child, a.seeds[0])
        print(json.dumps(res))
        return
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: `make bench-trl` installs it (pip install -e '.[bench]')") from None
    out = Path(a.out)
    ppo = " (ppo: TRL 1.12's PPO trainer, from .venv/trl-1.12)" if "ppo" in a.workloads else ""
    if ppo:
        need_trl_ppo()
    print(f"TRL {trl.__version__}{ppo}; alternating TRL and ours, {a.repeats} run(s) each per seed {a.seeds}")
    results = []
    for w in a.workloads:
        shape = GRPO[w]["model"] if w in GRPO else "small"
        model = build_model(out / f"model_{shape}", shape)
        if w == "ppo":
            build_reward_model(model, out / "model_rm")
        print(f"{w}: model {model} ({sum(math.prod(x) for x in _shapes(model)) / 1e6:.1f}M params)", flush=True)
        for i in range(a.repeats):
            for seed in a.seeds:
                for side in ("trl", "ours"):
                    results.append(one_run(side, w, model, out, i, seed))
    text = table(results)
    (out / "vs_trl.json").write_text(json.dumps(results, indent=1))
    (out / "vs_trl.md").write_text(text + "\n")
    print("\n" + text + f"\n\nwritten: {out / 'vs_trl.md'}, {out / 'vs_trl.json'}")


def _shapes(model: Path):
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        return [f.get_slice(k).get_shape() for k in f.keys()]


if __name__ == "__main__":
    main()
