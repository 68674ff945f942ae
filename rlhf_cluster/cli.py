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
        overrides = list(args.overrides) + ([f"cluster.address={args.address}"] if args.address else [])
        cfg = load_config(args.config, overrides)
        from rlhf_cluster.config import preflight

        preflight(cfg)
        from rlhf_cluster.drivers.ppo import run_ppo

        summary = run_ppo(cfg, resume=args.resume)
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
    before, after = summary.get("eval_before"), summary.get("eval_after")
    print()
    if before is not None and after is not None:
        print(f"held-out reward: before {before:+.4f}  after {after:+.4f}  ({after - before:+.4f})")
    print(f"metrics:      {summary['metrics']}")
    print(f"reward curve: {summary['reward_curve']}")
    print(f"policy:       {summary['policy']}")
    print("summary: " + json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
