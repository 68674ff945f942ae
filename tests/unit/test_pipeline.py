"""Pipeline configs: references between stages resolve, and mistakes are named before anything runs."""

import os

import pytest
import yaml

from rlhf_cluster.config import ConfigError
from rlhf_cluster.pipeline import is_pipeline, load_pipeline


def _write(tmp_path, tree):
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_shipped_pipeline_resolves_stage_outputs():
    stages = load_pipeline("configs/pipeline_sft_rm_ppo.yaml", ["ppo.schedule.num_steps=3"])
    sft, rm, ppo = stages
    A = os.path.abspath  # every path is absolute before anything reaches an actor
    assert sft.config.output_dir == A("runs/pipeline_sft_rm_ppo/sft")
    assert rm.config.policy.model_name_or_path == A("runs/pipeline_sft_rm_ppo/sft/policy")
    assert ppo.config.reward.model_name_or_path == A("runs/pipeline_sft_rm_ppo/rm/reward_model")
    assert ppo.config.critic.model_name_or_path == A("runs/pipeline_sft_rm_ppo/rm/reward_model")
    assert ppo.config.reference.model_name_or_path == A("runs/pipeline_sft_rm_ppo/sft/policy")
    assert ppo.config.schedule.num_steps == 3
    assert is_pipeline("configs/pipeline_sft_dpo.yaml") and not is_pipeline("configs/dpo.yaml")
    dpo = load_pipeline("configs/pipeline_sft_dpo.yaml")[1].config
    assert dpo.reference.model_name_or_path == A("runs/pipeline_sft_dpo/sft/policy")


def test_pipeline_errors_are_named(tmp_path):
    base = {"stages": [{"name": "sft", "config": "configs/sft.yaml"}]}
    with pytest.raises(ConfigError, match=r"names no earlier stage"):
        load_pipeline(_write(tmp_path, {"stages": [{"name": "rm", "config": "configs/rm.yaml",
                                                      "overrides": {"policy.model_name_or_path": "${sft.policy}"}}]}))
    with pytest.raises(ConfigError, match=r"must start with a stage name \(sft\)"):
        load_pipeline(_write(tmp_path, base), ["schedule.num_steps=3"])
    with pytest.raises(ConfigError, match=r"unknown field 'policy.zero_stge'"):
        load_pipeline(_write(tmp_path, base), ["sft.policy.zero_stge=3"])
    with pytest.raises(ConfigError, match=r"stage 'sft' has unknown keys \['overides'\]"):
        load_pipeline(_write(tmp_path, {"stages": [{"name": "sft", "config": "configs/sft.yaml", "overides": {}}]}))
    with pytest.raises(ConfigError, match="writes \\['reward_model'\\], not 'policy'"):
        load_pipeline(_write(tmp_path, {"stages": [{"name": "rm", "config": "configs/rm.yaml"},
                                                     {"name": "d", "config": "configs/dpo.yaml",
                                                      "overrides": {"policy.model_name_or_path": "${rm.policy}"}}]}))
