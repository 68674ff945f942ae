"""Every offline stage and the critic-free estimators, end to end through the CLI on the tiny model.

The data is the shipped synthetic set (positive beats negative); each method must improve
the held-out figure it optimises.
"""

from __future__ import annotations

import pytest

from test_e2e import metrics, run_cli, summary_of, train_rewards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "policy"
    run_cli("build-tiny", str(out))
    return out


def test_sft_lowers_held_out_loss(policy_dir, tmp_path):
    s = summary_of(run_cli("train", "configs/sft.yaml", f"policy.model_name_or_path={policy_dir}", f"output_dir={tmp_path}"))
    assert s["eval_after"]["loss"] < s["eval_before"]["loss"] - 2.0, s
    assert (tmp_path / "policy" / "model.safetensors").is_file()


def test_reward_model_learns_the_preference(policy_dir, tmp_path):
    s = summary_of(run_cli("train", "configs/rm.yaml", f"policy.model_name_or_path={policy_dir}", f"output_dir={tmp_path}"))
    assert s["eval_before"]["accuracy"] < 0.8 and s["eval_after"]["accuracy"] >= 0.9, s
    assert (tmp_path / "reward_model" / "config.json").is_file()


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "hinge", "kto", "orpo", "simpo"])
def test_dpo_family_improves_held_out_preference(policy_dir, tmp_path, loss):
    stdout = run_cli("train", f"configs/{loss}.yaml", f"policy.model_name_or_path={policy_dir}", f"output_dir={tmp_path}")
    s = summary_of(stdout)
    before, after = s["eval_before"], s["eval_after"]
    assert after["reward_margin"] > before["reward_margin"] + 0.01, s
    if "accuracy" in after:
        assert after["accuracy"] >= 0.9, s
    # ORPO and SimPO need no reference model: no reference actor is created.
    actors = next(line for line in stdout.splitlines() if line.startswith("actors ready"))
    assert ("reference" in actors) == (loss not in ("orpo", "simpo")), actors


def test_reference_cached_or_on_the_fly_agree(policy_dir, tmp_path):
    a = summary_of(run_cli("train", "configs/dpo.yaml", f"policy.model_name_or_path={policy_dir}", f"output_dir={tmp_path / 'a'}",
                           "schedule.num_epochs=1", "preference.reference_mode=precompute"))
    b = summary_of(run_cli("train", "configs/dpo.yaml", f"policy.model_name_or_path={policy_dir}", f"output_dir={tmp_path / 'b'}",
                           "schedule.num_epochs=1", "preference.reference_mode=on_the_fly"))
    assert a["eval_after"] == pytest.approx(b["eval_after"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_rl_raises_reward_without_a_critic(policy_dir, tmp_path, estimator):
    stdout = run_cli("train", f"configs/{estimator}.yaml", f"policy.model_name_or_path={policy_dir}", f"output_dir={tmp_path}",
                     "schedule.num_steps=25", "schedule.save_every=0")
    actors = next(line for line in stdout.splitlines() if line.startswith("actors ready"))
    assert "critic" not in actors and "policy×1" in actors, actors
    s = summary_of(stdout)
    assert s["eval_after"] > s["eval_before"] + 0.1, s
    r = train_rewards(metrics(tmp_path))
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.05, r


def test_online_dpo_raises_reward_on_the_ppo_actors(policy_dir, tmp_path):
    stdout = run_cli("train", "configs/online_dpo.yaml", f"policy.model_name_or_path={policy_dir}", f"output_dir={tmp_path}",
                     "schedule.num_steps=25")
    actors = next(line for line in stdout.splitlines() if line.startswith("actors ready"))
    assert "critic" not in actors and "rollout×1" in actors and "reference×1" in actors, actors
    s = summary_of(stdout)
    assert s["eval_after"] > s["eval_before"] + 0.1, s
    rows = metrics(tmp_path)
    assert all(m["pairs/trained"] + m["pairs/untrained_remainder"] + m["pairs/ties"] == 16 for m in rows if "pairs/ties" in m)


def test_sft_rm_ppo_pipeline_runs_start_to_finish(policy_dir, tmp_path):
    import yaml

    pipe = yaml.safe_load(open("configs/pipeline_sft_rm_ppo.yaml"))
    pipe["output_dir"] = str(tmp_path)
    pipe["stages"][0]["overrides"] = {"policy.model_name_or_path": str(policy_dir), "schedule.num_epochs": 1}
    pipe["stages"][1]["overrides"]["schedule.num_epochs"] = 1
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(pipe))
    stdout = run_cli("train", str(cfg), "ppo.schedule.num_steps=8")
    assert "=== stage 3/3: ppo" in stdout
    for out in ("sft/policy", "rm/reward_model", "ppo/policy"):
        assert (tmp_path / out / "config.json").is_file(), out
    ppo = [line for line in stdout.split("--- ppo")[1].splitlines() if line.startswith("summary: ")][0]
    s = summary_of(ppo)
    assert s["eval_after"] > s["eval_before"], s  # the PPO stage optimised the RM trained in stage 2
