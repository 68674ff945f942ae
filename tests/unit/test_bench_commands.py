"""benchmarks/vs_trl.py builds our side of each workload as a CLI command line: every one must be a valid
config with the settings the comparison states (a renamed field would otherwise surface only when someone
runs `make bench-trl`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rlhf_cluster.config import find_config, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", REPO / "benchmarks" / "vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("workload", ["grpo", "grpo_long", "dpo", "ppo"])
def test_our_side_of_each_workload_is_a_valid_config(vs_trl, workload, tmp_path):
    cmd = vs_trl.ours_cmd(workload, str(tmp_path / "model_small"), str(tmp_path / "run"))
    assert cmd[1] == "train"
    cfg = load_config(find_config(cmd[2]), [a for a in cmd[3:] if not a.startswith("--")])
    assert cfg.seed == vs_trl.SEED
    if workload == "ppo":
        p = vs_trl.PPO
        assert cfg.method == "ppo" and cfg.algorithm.advantage_estimator == "gae"
        assert cfg.reward.kind == "model" and cfg.reward.model_name_or_path == str(tmp_path / "model_rm")
        assert cfg.critic.model_name_or_path == cfg.reward.model_name_or_path  # both critics start from the reward model
        assert (cfg.algorithm.kl_penalty, cfg.algorithm.kl_estimator, cfg.algorithm.kl_coef) == ("reward", "k1", p["beta"])
        assert (cfg.schedule.prompts_per_step, cfg.rollout.n_samples_per_prompt) == (p["rollouts"], 1)
        assert (cfg.algorithm.ppo_epochs, cfg.algorithm.mini_batch_size) == (p["epochs"], p["rollouts"])
        assert cfg.policy.learning_rate == cfg.critic.learning_rate == p["lr"]
    elif workload in vs_trl.GRPO:
        g = vs_trl.GRPO[workload]
        assert cfg.algorithm.advantage_estimator == "grpo" and cfg.algorithm.kl_penalty == "loss"
        assert cfg.rollout.max_new_tokens == g["new_tokens"] and cfg.schedule.num_steps == g["steps"]
    else:
        assert cfg.method == "dpo" and cfg.preference.reference_mode == "on_the_fly"
