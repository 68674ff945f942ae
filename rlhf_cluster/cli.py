"""``rlhf-cluster``: train, submit and manage jobs on a Ray cluster, plan memory, print configs, build tiny models.

Overrides (``section.field=value``) may come before or after the flags. Every error a
user can cause is one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from rlhf_cluster.config import ConfigError
from rlhf_cluster.logs import quiet_libraries
from rlhf_cluster.stopping import Terminated

COMMANDS = {
    "train": "run a training job (any method; a pipeline file runs its stages in order)",
    "submit": "submit a training job to a Ray cluster's Jobs API (validated here first)",
    "status": "a submitted job's status",
    "logs": "a submitted job's output (--follow: until it ends)",
    "stop": "stop a submitted job; its actors go with it",
    "list": "the jobs submitted to a cluster",
    "plan": "where each role's actors go and the GPU memory each needs; the verdict",
    "config": "print the merged, validated config (--explain: every field's meaning, default and allowed values)",
    "build-tiny": "write a tiny Llama + tokenizer directory (offline, deterministic)",
    "data": "data report FILE: is a preference/SFT/KTO file good enough to train on? (duplicates, length bias, ...)",
    "eval": "a trained policy against its reference: win rate by the reward (with a CI), KL, refusals, sycophancy, judge",
}

OVERRIDES_HELP = "dotted overrides, e.g. policy.zero_stage=3 rollout.temperature=0.7 (before or after the flags)"
JOBS_ADDRESS_HELP = "the dashboard's Jobs API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    ps = {}

    def new(cmd: str) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"rlhf-cluster {cmd}", description=COMMANDS[cmd])
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        ps[cmd] = p
        return p

    t = new("train")
    t.add_argument("config", help="YAML config (or pipeline) file, or a shipped config's name (ppo_demo, grpo, dpo, ...)")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.add_argument("--address", default=None,
                   help="existing Ray cluster: its GCS HOST:PORT, 'auto' on a cluster node, or ray://HOST:10001; "
                        "default: a local Ray")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir that verifies")
    again.add_argument("--overwrite", action="store_true",
                       help="output_dir holds a previous run: delete its outputs (checkpoints, metrics, plots, the "
                            "trained model) and start afresh; without it (or --resume) such a run is refused")
    again.add_argument("--auto-resume", action="store_true",
                       help="continue from the newest checkpoint that verifies if output_dir has one, else start "
                            "afresh (replacing what a run that never checkpointed left): for a scheduler that "
                            "requeues a preempted job with the same command line (Slurm --requeue, Kubernetes)")
    t.add_argument("--no-checkpoint-on-signal", dest="checkpoint_on_signal", action="store_false",
                   help="on SIGTERM/SIGINT stop after the current step without writing a checkpoint first")
    t.add_argument("--connect-timeout", type=float, default=None, metavar="S", help="give up reaching --address after S seconds")

    s = new("submit")
    s.add_argument("config", help="YAML config (or pipeline) file or a shipped config's name, validated here before submitting")
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.add_argument("--address", default=None, help=JOBS_ADDRESS_HELP)
    s.add_argument("--follow", action="store_true", help="print the job's output until it ends; exit 0 only if it succeeded")
    s.add_argument("--job-id", default=None, help="submission id (default: one Ray makes up)")
    s.add_argument("--overwrite", action="store_true", help="the job deletes a previous run's outputs in output_dir "
                   "and starts afresh (train --overwrite)")
    s.add_argument("--connect-timeout", type=float, default=30.0, metavar="S")

    for cmd in ("status", "logs", "stop"):
        j = new(cmd)
        j.add_argument("job_id")
        j.add_argument("--address", default=None, help=JOBS_ADDRESS_HELP)
        j.add_argument("--connect-timeout", type=float, default=30.0, metavar="S")
        if cmd == "logs":
            j.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only if it succeeded")
    ls = new("list")
    ls.add_argument("--address", default=None, help=JOBS_ADDRESS_HELP)
    ls.add_argument("--connect-timeout", type=float, default=30.0, metavar="S")

    pl = new("plan")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    pl.add_argument("--nodes", type=int, default=1, help="nodes in the cluster to plan for")
    pl.add_argument("--gpus-per-node", type=int, default=8)
    pl.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB", help="memory of each GPU")

    c = new("config")
    c.add_argument("config", nargs="?", default=None)
    c.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    c.add_argument("--explain", action="store_true", help="each field's meaning, default and allowed values")

    b = new("build-tiny")
    b.add_argument("out_dir")
    b.add_argument("--kind", choices=["causal_lm", "scalar"], default="causal_lm")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--if-missing", action="store_true", help="do nothing when out_dir already holds a model")

    d = new("data")
    d.add_argument("action", choices=["report"], help="report: write report.md/.json/.png and print a summary")
    d.add_argument("file", help="pairwise, unpaired-feedback (KTO) or SFT data: JSONL, JSON, Parquet or a datasets directory")
    d.add_argument("--eval", default=None, metavar="FILE", help="held-out data: flags training prompts that appear in it")
    d.add_argument("--deploy", default=None, metavar="FILE", help="prompts the model will serve: flags low overlap with training")
    d.add_argument("--config", default=None, help="a config whose data section names the columns and lengths and whose "
                   "policy tokenizer counts tokens (default: whitespace words)")
    d.add_argument("--out", default=None, metavar="DIR", help="where the report goes (default: data_report/<file stem>)")
    d.add_argument("--strict", action="store_true", help="exit 1 when any flag fires")
    d.add_argument("--harmful-patterns", default=None, metavar="FILE", help="regexes (one a line) replacing the default list")
    d.add_argument("--refusal-patterns", default=None, metavar="FILE", help="regexes (one a line) replacing the default list")

    e = new("eval")
    e.add_argument("config", help="the training config (or a shipped config's name): its reward, rollout sampling settings, "
                   "data.eval_path / prompt_key / apply_chat_template / max_prompt_length and cluster settings")
    e.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    e.add_argument("--policy", required=True, metavar="DIR", help="the trained policy (a Hugging Face model directory)")
    e.add_argument("--reference", default=None, metavar="DIR", help="what it is compared with (default: the config's "
                   "reference.model_name_or_path, i.e. its base model policy.model_name_or_path)")
    e.add_argument("--prompts", default=None, metavar="FILE", help="eval prompts: our JSONL, MT-Bench question.jsonl or "
                   "AlpacaEval JSON (default: data.eval_path)")
    e.add_argument("--samples", type=int, default=1, metavar="N", help="answers per prompt and model; the win rate compares "
                   "per-prompt means (default 1)")
    e.add_argument("--max-prompts", type=int, default=None, metavar="N", help="only the first N prompts")
    e.add_argument("--pairs", default=None, metavar="FILE", help="pairwise preferences: held-out accuracy of the policy's "
                   "implicit reward beta*(log pi - log pi_ref), chosen vs rejected")
    e.add_argument("--beta", type=float, default=None, help="beta of that implicit reward (default: preference.beta)")
    e.add_argument("--capability", default=None, metavar="FILE", help="SFT-format file: alignment tax = mean per-token NLL "
                   "of its responses under the policy minus under the reference")
    e.add_argument("--benign", default=None, metavar="FILE", help="requests a model should answer: over-refusal rate "
                   "(default: the shipped configs/data/eval_benign.jsonl)")
    e.add_argument("--harmful", default=None, metavar="FILE", help="requests a model should refuse: refusal rate "
                   "(default: the shipped configs/data/eval_harmful.jsonl)")
    e.add_argument("--sycophancy", default=None, metavar="FILE", help="prompts asserting something false: rate of answers "
                   "that agree (default: the shipped configs/data/eval_sycophancy.jsonl)")
    e.add_argument("--no-probes", dest="probes", action="store_false", help="skip the shipped benign/harmful/sycophancy "
                   "sets (a file given with its flag still runs)")
    e.add_argument("--refusal-patterns", default=None, metavar="FILE", help="regexes (one a line) replacing the default "
                   "refusal list")
    e.add_argument("--agreement-patterns", default=None, metavar="FILE", help="regexes (one a line) replacing the default "
                   "agreement list")
    e.add_argument("--judge-url", default=None, metavar="URL", help="an OpenAI-compatible API base, e.g. http://HOST:8000/v1: "
                   "an LLM judge compares each prompt's first answers in both orders")
    e.add_argument("--judge-model", default=None, metavar="NAME", help="the judge's model name")
    e.add_argument("--judge-key-env", default=None, metavar="VAR", help="environment variable holding the judge's API key")
    e.add_argument("--judge-timeout", type=float, default=None, metavar="S", help="seconds per judge request (default 60)")
    e.add_argument("--self-check", action="store_true", help="also compare the reference with a second, independent sample "
                   "of its own answers (about 50%%: the eval's noise floor)")
    e.add_argument("--out", default=None, metavar="DIR", help="where eval.json/.md/.png go (default: eval/ beside a "
                   "policy/ directory, else <policy dir>_eval)")
    e.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    return ps


def _parser() -> argparse.ArgumentParser:
    """The top-level parser (help and the list of commands)."""
    p = argparse.ArgumentParser(prog="rlhf-cluster", description="Distributed RLHF on Ray actors.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + "\n".join(f"  {k:11s} {v}" for k, v in COMMANDS.items()))
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, text in COMMANDS.items():
        sub.add_parser(cmd, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    code = _main(list(sys.argv[1:] if argv is None else argv))
    if argv is None:  # the console script: its results are out, so Ray's stop is left to the watcher of an embedded Ray
        from rlhf_cluster.cluster import reaper

        reaper.exit_now(code)
    return code


def _main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv)  # prints usage (and the unknown command) and exits
        return 2
    args = _parsers()[argv[0]].parse_intermixed_args(argv[1:])
    args.cmd = argv[0]
    quiet_libraries()
    try:
        return _run(args)
    except Terminated as t:
        import signal

        name = signal.Signals(t.signum).name
        where = f" at step {t.step}" if t.step is not None else ""
        print(f"\nstopped on {name}{where}; the actors were shut down", file=sys.stderr)
        if t.checkpoint is not None:
            again = [a for a in argv[1:] if a != "--overwrite"]  # the resumed run keeps what this one wrote
            print(f"checkpoint: {t.checkpoint}\nresume with: rlhf-cluster train {' '.join(again)}"
                  f"{'' if {'--resume', '--auto-resume'} & set(again) else ' --resume'}", file=sys.stderr)
        return 128 + t.signum
    except KeyboardInterrupt:
        print("\ninterrupted; the actors were shut down", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not _user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


# The errors a user can fix, said in one line (anything else is a bug: its traceback is shown). Looked up by name in
# the modules already loaded: an exception of one of these classes exists only if its module was imported, and
# importing them all here (the trainer, the drivers: torch, DeepSpeed) would add seconds to every failed command.
USER_ERRORS = (
    ("rlhf_cluster.config", "ConfigError"), ("rlhf_cluster.data", "DataError"),
    ("rlhf_cluster.cluster.groups", "ActorFailure"), ("rlhf_cluster.cluster.connect", "ConnectError"),
    ("rlhf_cluster.jobs", "JobError"), ("rlhf_cluster.drivers.common", "CheckpointError"),
    ("rlhf_cluster.drivers.common", "RunLockError"), ("rlhf_cluster.drivers.common", "BadStepsError"),
    ("rlhf_cluster.drivers.rl", "MonitorStop"), ("rlhf_cluster.workers.reward_sources", "RewardError"),
    ("rlhf_cluster.workers.trainer", "UnsafeCheckpointError"),
)


def _user_error(e: Exception) -> bool:
    if isinstance(e, FileNotFoundError):
        return True
    return any(isinstance(e, getattr(sys.modules[mod], name)) for mod, name in USER_ERRORS if mod in sys.modules)


def _run(args) -> int:
    if getattr(args, "config", None) is not None:
        from rlhf_cluster.config import find_config

        args.config = str(find_config(args.config))  # a path, or the name of a shipped config
    if args.cmd == "config":
        return _config(args)
    if args.cmd == "data":
        return _data_report(args)
    if args.cmd == "eval":
        return _eval(args)
    if args.cmd == "build-tiny":
        from pathlib import Path

        from rlhf_cluster.tiny import build_tiny_model

        if args.if_missing and (Path(args.out_dir) / "config.json").is_file():
            print(f"{args.out_dir}: already built")
            return 0
        print(build_tiny_model(args.out_dir, args.kind, args.seed))
        return 0
    if args.cmd == "plan":
        from rlhf_cluster.config import load_config
        from rlhf_cluster.plan import build_plan

        plan = build_plan(load_config(args.config, args.overrides), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                          gpu_memory_gib=args.gpu_memory)
        print(plan.format())
        return 0 if plan.fits else 1
    if args.cmd in ("submit", "status", "logs", "stop", "list"):
        from rlhf_cluster import jobs

        t = args.connect_timeout
        if args.cmd == "submit":
            return jobs.submit(args.config, args.overrides, args.address, follow=args.follow, job_id=args.job_id, timeout_s=t,
                               overwrite=args.overwrite)
        if args.cmd == "status":
            return jobs.status(args.job_id, args.address, timeout_s=t)
        if args.cmd == "logs":
            return jobs.logs(args.job_id, args.address, follow=args.follow, timeout_s=t)
        if args.cmd == "stop":
            return jobs.stop(args.job_id, args.address, timeout_s=t)
        return jobs.list_jobs(args.address, timeout_s=t)
    return _train(args)


def _cluster_overrides(args) -> list[str]:
    extra = []
    if args.address:
        extra.append(f"cluster.address={args.address}")
    if args.connect_timeout is not None:
        extra.append(f"cluster.connect_timeout_s={args.connect_timeout}")
    return extra


def _train(args) -> int:
    from rlhf_cluster.config import load_config
    from rlhf_cluster.pipeline import is_pipeline, load_data_report, load_pipeline, run_pipeline

    _terminate_gracefully(args)
    if is_pipeline(args.config):
        if args.resume or args.auto_resume:
            raise ConfigError(f"--{'resume' if args.resume else 'auto-resume'} continues one run; for a pipeline, "
                              "resume its stage's config instead")
        stages = load_pipeline(args.config, args.overrides)
        for st in stages:
            if args.address:
                st.config.cluster.address = args.address
            if args.connect_timeout is not None:
                st.config.cluster.connect_timeout_s = args.connect_timeout
        _check_reachable(stages[0].config)
        results = run_pipeline(stages, run_method, overwrite=args.overwrite, data_report=load_data_report(args.config))
        results.pop("data_report", None)  # said as it ran
        for name, summary in results.items():
            print(f"\n--- {name}")
            print_summary(summary)
        return 0
    cfg = load_config(args.config, list(args.overrides) + _cluster_overrides(args))
    _check_reachable(cfg)
    resume, overwrite = auto_resume(cfg) if args.auto_resume else (args.resume, args.overwrite)
    summary = run_method(cfg, resume=resume, overwrite=overwrite)
    print_summary(summary)
    return 0


def _check_reachable(cfg) -> None:
    """A cluster address that cannot work is said in the first second, not after the data is read and tokenized."""
    if cfg.cluster.backend == "ray":
        from rlhf_cluster.cluster.connect import check_reachable

        check_reachable(cfg.cluster.address, cfg.cluster.connect_timeout_s)


def _terminate_gracefully(args) -> None:
    """SIGTERM/SIGINT: finish the step, checkpoint (unless --no-checkpoint-on-signal), shut the roles down."""
    from rlhf_cluster.stopping import STOP

    STOP.checkpoint = args.checkpoint_on_signal
    STOP.install()


def _eval(args) -> int:
    from rlhf_cluster.config import load_config
    from rlhf_cluster.drivers.evaluate import EvalOptions, format_summary, run_eval

    cfg = load_config(args.config, args.overrides)
    opts = EvalOptions(**{k: v for k, v in vars(args).items() if k not in ("cmd", "config", "overrides", "debug")})
    print(format_summary(run_eval(cfg, opts)))
    return 0


def _data_report(args) -> int:
    from pathlib import Path

    from rlhf_cluster.quality.data_report import format_summary, run_report, write_report

    report = run_report(args.file, eval_path=args.eval, deploy_path=args.deploy, config_path=args.config,
                        harmful_path=args.harmful_patterns, refusal_path=args.refusal_patterns)
    paths = write_report(report, args.out or Path("data_report") / Path(args.file).stem)
    print(format_summary(report))
    print("report: " + ", ".join(map(str, paths)))
    return 1 if args.strict and report["flags"] else 0


def _config(args) -> int:
    from rlhf_cluster.config import dump_config, explain, load_config
    from rlhf_cluster.pipeline import is_pipeline, load_pipeline

    if args.config is None:
        if args.overrides:
            print(dump_config(load_config(None, args.overrides)), end="")
        else:
            print(explain(None), end="")
        return 0
    if is_pipeline(args.config):
        for st in load_pipeline(args.config, args.overrides):
            print(f"# --- stage {st.name} ({st.config.method}) -> {st.config.output_dir}")
            print(explain(st.config) if args.explain else dump_config(st.config), end="")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(explain(cfg) if args.explain else dump_config(cfg), end="")
    return 0


def auto_resume(cfg, log=print) -> tuple[bool, bool]:
    """``--auto-resume``: ``(resume, overwrite)`` for what ``cfg.output_dir`` holds — resume from a checkpoint that
    verifies (online methods), else start afresh over whatever an earlier attempt left (offline stages always
    restart from their inputs)."""
    from rlhf_cluster.drivers.common import committed_checkpoints, previous_outputs

    online = cfg.method in ("ppo", "online_dpo")
    if online and committed_checkpoints(cfg.output_dir):  # the resume verifies them (falling back as usual)
        log(f"--auto-resume: resuming from the checkpoint in {cfg.output_dir}")
        return True, False
    if previous_outputs(cfg.output_dir):
        why = f"no checkpoint in {cfg.output_dir}" if online else f"method={cfg.method} restarts from its inputs"
        log(f"--auto-resume: {why}; starting afresh in {cfg.output_dir}")
        return False, True
    return False, False


def run_method(cfg, resume: bool = False, log=print, overwrite: bool = False) -> dict:
    """Dispatch on ``cfg.method`` to its driver loop.

    An output_dir that holds a previous run is refused before anything starts, unless the run continues it
    (``resume``) or replaces it (``overwrite``: its outputs are deleted once the config's files check out).
    """
    from rlhf_cluster.drivers.common import check_output_dir, clear_output_dir, previous_outputs

    online = cfg.method in ("ppo", "online_dpo")
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite deletes it: pass one of them")
    if resume and not online:
        raise ConfigError(f"--resume is supported for ppo and online_dpo runs; method={cfg.method} restarts from its inputs")
    if overwrite:
        if previous_outputs(cfg.output_dir):
            from rlhf_cluster.config import preflight

            preflight(cfg)  # a config whose files are missing does not cost the previous run
            clear_output_dir(cfg.output_dir, log)
    elif not resume:
        check_output_dir(cfg.output_dir, can_resume=online)
    if cfg.method == "ppo":
        from rlhf_cluster.drivers.ppo import run_ppo

        return run_ppo(cfg, resume=resume, log=log)
    if cfg.method == "online_dpo":
        from rlhf_cluster.drivers.online_dpo import run_online_dpo

        return run_online_dpo(cfg, resume=resume, log=log)
    from rlhf_cluster.drivers.offline import run_offline

    return run_offline(cfg, log=log)


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
    if summary.get("peak_rss_mib"):
        print(f"{'peak memory:':14s}" + ", ".join(f"{k} {v / 1024:.2f} GiB" for k, v in summary["peak_rss_mib"].items()))
    for r in summary.get("restarts") or []:
        print(f"restarted:    after {r['actor']} {'timed out' if r['kind'] == 'timeout' else 'died'} at step "
              f"{r['failed_at_step']}: resumed at step {r['resumed_from_step']} ({r['steps_lost']} lost) in {r['seconds']} s")
    print("summary: " + json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, dict, list))}))


if __name__ == "__main__":
    sys.exit(main())
