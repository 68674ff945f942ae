"""Every shipped method's held-out figure before and after, over several seeds: the numbers in the README's
methods table, reproducible with one command (``make methods``).

Each config runs from its shipped YAML on the tiny model (built if missing), in one process
(``cluster.backend=local``: the same workers and driver loops as on Ray, without actor start-up),
once per seed. Writes ``runs/methods/methods.json`` and prints a table of ranges over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# config -> the held-out figure the method optimises (a key of eval_before/eval_after, or "reward")
METHODS = {
    "sft.yaml": "loss", "rm.yaml": "accuracy", "ppo_demo.yaml": "reward", "grpo.yaml": "reward", "rloo.yaml": "reward",
    "reinforce_pp.yaml": "reward", "dpo.yaml": "reward_margin", "cdpo.yaml": "reward_margin", "ipo.yaml": "reward_margin",
    "hinge.yaml": "reward_margin", "kto.yaml": "reward_margin", "orpo.yaml": "accuracy", "simpo.yaml": "accuracy",
    "online_dpo.yaml": "reward",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="config names, e.g. dpo.yaml grpo.yaml")
    p.add_argument("--out", default="runs/methods")
    a = p.parse_args(argv)

    from rlhf_cluster.cli import run_method
    from rlhf_cluster.config import load_config
    from rlhf_cluster.tiny import build_tiny_model

    model = REPO / "runs" / "models" / "tiny-policy"
    if not (model / "config.json").is_file():
        build_tiny_model(model)
    out = Path(a.out)
    results: dict[str, list[dict]] = {}
    for name, key in METHODS.items():
        if a.only and name not in a.only:
            continue
        for seed in a.seeds:
            cfg = load_config(REPO / "configs" / name, ["cluster.backend=local", f"policy.model_name_or_path={model}",
                                                        f"seed={seed}", f"output_dir={out / name.removesuffix('.yaml') / str(seed)}",
                                                        "schedule.save_every=0"])
            s = run_method(cfg, overwrite=True)  # a rerun replaces the previous measurement's run
            before, after = s["eval_before"], s["eval_after"]
            if key != "reward":
                before, after = before[key], after[key]
            results.setdefault(name, []).append({"seed": seed, "metric": key, "before": before, "after": after})
    (out / "methods.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'config':20s} {'held-out metric':16s} {'before':>18s} {'after':>18s}   seeds")
    for name, rows in results.items():
        b, f = [r["before"] for r in rows], [r["after"] for r in rows]
        rng = lambda v: f"{min(v):+.2f}" if max(v) - min(v) < 0.005 else f"{min(v):+.2f} … {max(v):+.2f}"
        print(f"{name:20s} {rows[0]['metric']:16s} {rng(b):>18s} {rng(f):>18s}   {len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
