"""A rerun into a used output_dir (refused, or --overwrite), and the decisions of the automatic restart: which
failures get one, what is recorded and said. The restarts themselves run in tests/cluster/test_recovery.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from cli_here import cli

from rlhf_cluster.cluster.groups import ActorFailure, _died
from rlhf_cluster.config import ConfigError
from rlhf_cluster.drivers.common import BadSteps, BadStepsError, RunLock, RunLockError, check_output_dir, clear_output_dir
from rlhf_cluster.drivers.rl import Restarts
from rlhf_cluster.stopping import STOP

REPO = Path(__file__).resolve().parents[2]


def used(d: Path) -> Path:
    """A directory as a finished run leaves it, plus a file of the user's."""
    (d / "checkpoints" / "step_000003").mkdir(parents=True)
    (d / "metrics.jsonl").write_text('{"step": 7, "old": true}\n')
    (d / "policy").mkdir()
    (d / "reward_curve.png").write_bytes(b"png")
    (d / "eval").mkdir()  # `rlhf-cluster eval` of its policy
    (d / "notes.txt").write_text("mine")
    return d


# ----------------------------------------------------------------------------- a used output_dir


@pytest.mark.parametrize("config, choices", [("configs/grpo.yaml", "pass --resume to continue it, --overwrite to start afresh"),
                                             ("configs/sft.yaml", "pass --overwrite to start afresh")])
def test_a_rerun_into_a_used_output_dir_is_refused_before_anything_starts(tmp_path, config, choices):
    used(tmp_path)
    # The model path does not exist: the refusal comes first, before any file is checked or anything loads.
    p = cli("train", config, f"output_dir={tmp_path}", "policy.model_name_or_path=nowhere")
    assert p.returncode == 2, p.stderr
    assert p.stderr == (f"error: output_dir {tmp_path} already holds a run (metrics.jsonl or checkpoints/); {choices} "
                        "(deleting its outputs), or choose another output_dir\n")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 7, "old": true}\n'


def test_resume_and_overwrite_together_is_a_usage_error(tmp_path):
    p = cli("train", "configs/grpo.yaml", f"output_dir={tmp_path}", "--resume", "--overwrite")
    assert p.returncode == 2 and "argument --overwrite: not allowed with argument --resume" in p.stderr, p.stderr


def test_overwrite_deletes_the_previous_runs_outputs_and_starts_afresh(tmp_path, tiny_model_dir):
    out = used(tmp_path / "run")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(line + "\n" for line in (REPO / "configs" / "data" / "sft_train.jsonl").read_text().splitlines()[:16]))
    p = cli("train", "configs/sft.yaml", f"output_dir={out}", f"policy.model_name_or_path={tiny_model_dir}",
            "cluster.backend=local", f"data.train_path={data}", f"data.eval_path={data}", "schedule.num_epochs=1",
            "--overwrite")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"--overwrite: removed the previous run's checkpoints, metrics.jsonl, reward_curve.png, policy, eval from {out}" in p.stdout
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1]  # this run's lines only
    assert not any((out / x).exists() for x in ("checkpoints", "reward_curve.png", "eval"))
    assert (out / "notes.txt").read_text() == "mine" and (out / "policy" / "config.json").is_file()


def test_a_pipeline_checks_every_stage_before_the_first_starts(tmp_path, tiny_model_dir):
    import yaml

    from rlhf_cluster.pipeline import load_pipeline, run_pipeline

    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "sft", "config": str(REPO / "configs" / "sft.yaml"),
         "overrides": {"policy.model_name_or_path": str(tiny_model_dir)}},
        {"name": "dpo", "config": str(REPO / "configs" / "dpo.yaml"), "overrides": {"policy.model_name_or_path": "${sft.policy}"}}]}))
    stages = load_pipeline(path)
    used(tmp_path / "out" / "dpo")
    ran = []
    with pytest.raises(ConfigError, match=rf"^output_dir {tmp_path / 'out' / 'dpo'} already holds a run .*; pass --overwrite "):
        run_pipeline(stages, ran.append, log=lambda _: None)
    assert ran == []  # the first stage did not start either
    run_pipeline(stages, ran.append, log=lambda _: None, overwrite=True)
    assert len(ran) == 2 and not (tmp_path / "out" / "dpo" / "metrics.jsonl").exists()


def test_a_run_still_writing_there_is_named_not_overwritten(tmp_path):
    used(tmp_path)
    with RunLock(tmp_path):
        for attempt in (check_output_dir, clear_output_dir):
            with pytest.raises(RunLockError, match=rf"in use by another run \(pid {os.getpid()} "):
                attempt(tmp_path)
    assert (tmp_path / "metrics.jsonl").is_file()


# ----------------------------------------------------------------------------- the automatic restart


def test_only_a_dead_actor_or_a_hung_call_is_restarted():
    from ray.exceptions import ActorDiedError, RayTaskError

    r = Restarts(max_restarts=1, log=lambda _: None)
    assert r.allow(ActorFailure("policy rank 0 died during update", "died", "policy rank 0"))
    assert r.allow(ActorFailure("reward rank 0 did not finish reward within 5 s", "timeout", "reward rank 0"))
    assert not r.allow(ActorFailure("reward rank 0 failed during reward: RewardError: ...", "error", "reward rank 0"))
    STOP.signum = 15  # SIGTERM asked the run to stop: its actors going is no reason to start them again
    try:
        assert not r.allow(ActorFailure("policy rank 0 died during update", "died", "policy rank 0"))
    finally:
        STOP.signum = None
    # Ray's view: an actor that is gone, versus one that raised because an actor it called is gone.
    assert _died(ActorDiedError())
    assert not _died(RayTaskError("send_weights", "Traceback ...", ActorDiedError()).as_instanceof_cause())


def test_a_restart_is_recorded_and_said_and_the_last_failure_counts_them(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    torch.save({"step": 2}, ckpt / "driver_state.pt")
    said = []
    r = Restarts(max_restarts=1, log=said.append)
    first = ActorFailure("policy rank 0 died during old log-probs: ActorDiedError: ...", "died", "policy rank 0")
    r.failed(first, reached=3, ckpt=ckpt)
    assert said[-1] == (f"warning: policy rank 0 died after step 3 ({first}); restarting every role and resuming from "
                        f"{ckpt} (automatic restart 1 of 1, fault_tolerance.max_restarts)")
    r.resumed()
    (rec,) = r.records
    assert {k: v for k, v in rec.items() if k != "seconds"} == {
        "actor": "policy rank 0", "kind": "died", "failed_at_step": 3, "resumed_from_step": 2, "steps_lost": 1}
    assert rec["seconds"] >= 0 and said[-1] == f"recovered in {rec['seconds']:.1f} s from policy rank 0's failure: " \
                                               "resumed at step 2, 1 step lost (redone)"
    second = ActorFailure("policy rank 0 died during update: ActorDiedError: ...", "died", "policy rank 0")
    assert not r.allow(second)  # none left
    r.annotate(second)
    assert str(second) == "policy rank 0 died during update: ActorDiedError: ... (after 1 automatic restart)"
    r.failed(ActorFailure("x", "timeout", "reward rank 0"), reached=1, ckpt=None)  # nothing saved yet: from step 0
    assert r.records[-1]["resumed_from_step"] == 0 and "resuming from step 0 (no checkpoint yet)" in said[-1]


def test_skipped_steps_are_said_and_only_so_many_in_a_row_are_tolerated():
    said = []
    bad = BadSteps(3, said.append)
    bad.record(1, "reward.function='m:f' returned nan")
    bad.record(2, None)  # a clean step resets the count
    bad.record(3, "policy: 1 of 1 optimizer steps skipped")
    bad.record(4, "x")
    with pytest.raises(BadStepsError, match=r"stopped at step 5: 3 steps in a row were skipped for non-finite values "
                                            r"\(fault_tolerance.max_bad_steps=3\); the last: the last one\. Usual causes"):
        bad.record(5, "the last one")
    assert bad.total == 4 and len(said) == 4
    assert said[0] == ("warning: step 1: reward.function='m:f' returned nan (1 in a row; the run stops at "
                       "fault_tolerance.max_bad_steps=3)")


def test_auto_resume_continues_a_checkpoint_else_starts_afresh(tmp_path, tiny_model_dir):
    """What a requeued job (same command line) gets: the checkpoint if there is one, a fresh start otherwise."""
    from rlhf_cluster.cli import auto_resume
    from rlhf_cluster.config import load_config

    def cfg(name, out):
        return load_config(REPO / "configs" / name, [f"output_dir={out}", f"policy.model_name_or_path={tiny_model_dir}"])

    said = []
    assert auto_resume(cfg("grpo.yaml", tmp_path / "new"), said.append) == (False, False)  # nothing there: plain start
    crashed = used(tmp_path / "crashed")  # metrics and a step directory, but no committed checkpoint (no manifest)
    assert auto_resume(cfg("grpo.yaml", crashed), said.append) == (False, True)
    (crashed / "checkpoints" / "step_000003" / "manifest.json").write_text("{}")  # finished, `latest` not yet moved
    assert auto_resume(cfg("grpo.yaml", crashed), said.append) == (True, False)
    assert auto_resume(cfg("sft.yaml", crashed), said.append) == (False, True)  # offline stages restart from inputs
    assert said == [f"--auto-resume: no checkpoint in {crashed}; starting afresh in {crashed}",
                    f"--auto-resume: resuming from the checkpoint in {crashed}",
                    f"--auto-resume: method=sft restarts from its inputs; starting afresh in {crashed}"]
    p = cli("train", "configs/grpo.yaml", "--auto-resume", "--resume")
    assert p.returncode == 2 and "not allowed with argument" in p.stderr, p.stderr


def test_an_output_dir_without_room_or_not_writable_is_refused_before_anything_starts(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    import shutil as sh
    from collections import namedtuple

    from rlhf_cluster.config import checkpoint_bytes, count_params, load_config, preflight
    from rlhf_cluster.models import load_causal_lm

    n = count_params(tiny_model_dir)
    assert n == sum(p.numel() for p in load_causal_lm(str(tiny_model_dir), torch.float32).parameters())
    (tmp_path / "a_file").write_text("")
    cfg = load_config(REPO / "configs" / "ppo_demo.yaml", [f"policy.model_name_or_path={tiny_model_dir}",
                                                          f"output_dir={tmp_path / 'a_file' / 'run'}"])
    with pytest.raises(ConfigError, match=r"output_dir='.*a_file/run' is not writable \(it would be made in .*a_file\)"):
        preflight(cfg)
    cfg.output_dir = str(tmp_path / "run")
    # PPO trains the policy and a critic of the same size: weights + Adam moments each (fp32 on CPU counted as
    # bf16 for `auto`: 2 + 8 + 4 bytes a parameter), plus the policy as a model directory (2 bytes).
    assert checkpoint_bytes(cfg) == n * 14 * 2 + n * 2
    monkeypatch.setattr(sh, "disk_usage", lambda path: namedtuple("u", "total used free")(2**30, 2**30, 1000))
    with pytest.raises(ConfigError, match=r"a checkpoint of this run needs about 0.\d\d GiB and .* has 0.00 GiB free"):
        preflight(cfg)


def test_phase_timeouts_take_the_phases_the_drivers_name(tiny_model_dir):
    from rlhf_cluster.cluster.groups import RoleGroup
    from rlhf_cluster.config import load_config

    base = [f"policy.model_name_or_path={tiny_model_dir}"]
    cfg = load_config(REPO / "configs" / "grpo.yaml", [*base, "cluster.phase_timeouts_s={generate: 600, checkpoint: 7200}"])
    g = RoleGroup()
    g.call_timeout_s, g.phase_timeouts_s = cfg.cluster.call_timeout_s, cfg.cluster.phase_timeouts_s
    assert (g.timeout_for("generate"), g.timeout_for("checkpoint save"), g.timeout_for("policy update")) == (600, 7200, 3600)
    assert g.timeout_setting("checkpoint save") == "cluster.phase_timeouts_s.checkpoint"
    assert g.timeout_setting("policy update") == "cluster.call_timeout_s"
    with pytest.raises(ConfigError, match=r"phase_timeouts_s"):
        load_config(REPO / "configs" / "grpo.yaml", [*base, "cluster.phase_timeouts_s={generation: 600}"])


def test_the_cli_says_each_user_error_in_one_line_and_shows_a_bugs_traceback():
    """Every class the CLI treats as the user's to fix exists where it is looked up (by name, without importing)."""
    import importlib

    from rlhf_cluster import cli

    for mod, name in cli.USER_ERRORS:
        assert issubclass(getattr(importlib.import_module(mod), name), Exception), (mod, name)
    assert cli._user_error(ConfigError("x")) and cli._user_error(FileNotFoundError("x"))
    assert cli._user_error(ActorFailure("policy rank 0 died")) and cli._user_error(BadStepsError("x"))
    assert not cli._user_error(ValueError("a bug")) and not cli._user_error(KeyError("a bug"))
