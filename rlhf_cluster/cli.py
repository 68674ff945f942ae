"""``rlhf-cluster``: train, print the merged config, build tiny local models."""

from __future__ import annotations

import argparse
import json
import sys

from rlhf_cluster.config import ConfigError, dump_config, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-cluster", description="Distributed RLHF on Ray actors.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="run a training job (PPO family)")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. policy.zero_stage=3 rollout.temperature=0.7")
    t.add_argument("--address", default=None, help="existing Ray cluster ('auto', 'ray://host:10001'); default: a local Ray")
    t.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")

    c = sub.add_parser("config", help="print the fully merged, validated config")
    c.add_argument("config", nargs="?", default=None)
    c.add_argument("overrides", nargs="*")

    b = sub.add_parser("build-tiny", help="write a tiny Llama + tokenizer directory (offline, deterministic)")
    b.add_argument("out_dir")
    b.add_argument("--kind", choices=["causal_lm", "scalar"], default="causal_lm")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--if-missing", action="store_true", help="do nothing when out_dir already holds a model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "config":
            print(dump_config(load_config(args.config, args.overrides)), end="")
            return 0
        if args.cmd == "build-tiny":
            from pathlib import Path

            from rlhf_cluster.tiny import build_tiny_model

            if args.if_missing and (Path(args.out_dir) / "config.json").is_file():
                print(f"{args.out_dir}: already built")
                return 0
            print(build_tiny_model(args.out_dir, args.kind, args.seed))
            return 0
        from rlhf_cluster.pipeline import is_pipeline, load_pipeline, run_pipeline

        if is_pipeline(args.config):
            stages = load_pipeline(args.config, args.overrides)
            if args.address:
                for st in stages:
                    st.config.cluster.address = args.address
            results = run_pipeline(stages, run_method)
            for name, summary in results.items():
                print(f"\n--- {name}")
                print_summary(summary)
            return 0
        overrides = list(args.overrides) + ([f"cluster.address={args.address}"] if args.address else [])
        cfg = load_config(args.config, overrides)
        summary = run_method(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # data errors and actor failures: one clear line, not a traceback wall
        from rlhf_cluster.cluster.groups import ActorFailure
        from rlhf_cluster.data import DataError

        if isinstance(e, (DataError, ActorFailure, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    print_summary(summary)
    return 0


def run_method(cfg, resume: bool = False) -> dict:
    """Dispatch on ``cfg.method`` to its driver loop."""
    if cfg.method == "ppo":
        from rlhf_cluster.drivers.ppo import run_ppo

        return run_ppo(cfg, resume=resume)
    if cfg.method == "online_dpo":
        from rlhf_cluster.drivers.online_dpo import run_online_dpo

        return run_online_dpo(cfg, resume=resume)
    if resume:
        raise ConfigError(f"--resume is supported for ppo and online_dpo runs; method={cfg.method} restarts from its inputs")
    from rlhf_cluster.drivers.offline import run_offline

    return run_offline(cfg)


def print_summary(summary: dict) -> None:
    before, after = summary.get("eval_before"), summary.get("eval_after")
    print()
    if isinstance(before, float) and isinstance(after, float):
        print(f"held-out reward: before {before:+.4f}  after {after:+.4f}  ({after - before:+.4f})")
    elif isinstance(before, dict) and isinstance(after, dict):
        for k in before:
            if k in after:
                print(f"held-out {k}: before {before[k]:+.4f}  after {after[k]:+.4f}  ({after[k] - before[k]:+.4f})")
    for key in ("metrics", "reward_curve", "curve", "policy", "model", "timeline"):
        if key in summary:
            print(f"{key + ':':14s}{summary[key]}")
    print("summary: " + json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, dict))}))


if __name__ == "__main__":
    sys.exit(main())
