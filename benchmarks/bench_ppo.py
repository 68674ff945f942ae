"""PPO throughput benchmark: a few steps of the real loop, per-phase tokens/s, and a timeline.

    make bench                       # tiny model, local Ray, CPU
    python benchmarks/bench_ppo.py --config my.yaml --steps 5 key=value ...

Writes ``OUT/bench.json`` (every step's metrics plus the per-phase summary), ``OUT/timeline.png``
(what each actor was doing when) and prints the phase table. The first step carries warm-up
(lazy kernels, allocator growth) and is excluded from the summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = [  # (metric with seconds, metric with tokens/s or None, label)
    ("time/generation", "tps/generation", "generation (vLLM)"),
    ("time/scoring", "tps/scoring", "scoring (reward ∥ ref ∥ old logp ∥ values)"),
    ("time/advantages", None, "advantages (driver)"),
    ("time/training", "tps/train_policy", "training (policy ∥ critic)"),
    ("time/sync", None, "weight sync"),
    ("time/other", None, "other"),
]


def draw_timeline(spans: dict, out_png: Path, t0: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({s[0] for v in spans.values() for s in v})
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    t0 = t0 if t0 is not None else min(s[1] for v in spans.values() for s in v)
    rows = sorted(spans)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.5))
    for y, actor in enumerate(rows):
        for name, a, b in spans[actor]:
            if name == "init":
                continue
            ax.barh(y, max(b - a, 1e-3), left=a - t0, color=colors[name], edgecolor="none")
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first training call")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in names if n != "init"]
    ax.legend(handles, [n for n in names if n != "init"], loc="upper center",
              bbox_to_anchor=(0.5, -0.25 if len(rows) < 6 else -0.12), ncol=5, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "ppo_demo.yaml"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    from rlhf_cluster.cli import run_method
    from rlhf_cluster.config import load_config
    from rlhf_cluster.tiny import build_tiny_model

    out = Path(a.out)
    cfg = load_config(a.config, [f"schedule.num_steps={a.steps}", "schedule.save_every=0", f"output_dir={out}", *a.overrides])
    if not (Path(cfg.policy.model_name_or_path) / "config.json").exists() and "tiny" in cfg.policy.model_name_or_path:
        build_tiny_model(cfg.policy.model_name_or_path)
    t = time.perf_counter()
    summary = run_method(cfg, overwrite=True)  # a rerun replaces the previous benchmark's run
    wall = time.perf_counter() - t
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "time/step" in m]
    measured = steps[1:] if len(steps) > 1 else steps  # step 1 carries warm-up

    def mean(k):
        vals = [m[k] for m in measured if k in m]
        return statistics.fmean(vals) if vals else float("nan")

    step_time = mean("time/step")
    table = []
    for t_key, tps_key, label in PHASES:
        row = {"phase": label, "seconds": mean(t_key), "share": mean(t_key) / step_time}
        if tps_key:
            row["tokens_per_s"] = mean(tps_key)
        table.append(row)
    ratios = {
        "generation_vs_policy_training_tokens_per_s": mean("tps/generation") / mean("tps/train_policy"),
        "scoring_vs_generation_tokens_per_s": mean("tps/scoring") / mean("tps/generation"),
        "sync_share_of_step": mean("time/sync") / step_time,
    }
    spans = json.loads(Path(summary["timeline"]).read_text())
    first_train = min(s[1] for v in spans.values() for s in v if s[0] != "init")
    png = draw_timeline(spans, out / "timeline.png", first_train)
    result = {"config": cfg.model_dump(mode="json"), "steps_measured": len(measured), "step_seconds": step_time,
              "phases": table, "ratios": ratios, "wall_seconds_including_startup": wall, "per_step": steps,
              "machine": _machine()}
    (out / "bench.json").write_text(json.dumps(result, indent=1))

    print(f"\nPPO benchmark: {len(measured)} measured steps (after 1 warm-up step), mean step {step_time:.2f} s")
    print(f"{'phase':48s} {'s/step':>8s} {'share':>7s} {'tokens/s':>10s}")
    for row in table:
        tps = f"{row['tokens_per_s']:10.0f}" if "tokens_per_s" in row else f"{'':>10s}"
        print(f"{row['phase']:48s} {row['seconds']:8.3f} {row['share']:7.1%} {tps}")
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.3f}")
    print(f"\nwrote {out / 'bench.json'} and {png}")
    return 0


def _machine() -> dict:
    import os
    import platform

    import torch

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


if __name__ == "__main__":
    sys.exit(main())
