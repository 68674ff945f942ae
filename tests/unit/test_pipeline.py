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


def test_a_bad_row_in_a_later_stage_is_found_before_the_first_stage_runs(tmp_path, tiny_model_dir):
    from rlhf_cluster.data import DataError
    from rlhf_cluster.pipeline import run_pipeline

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "a", "chosen": "good", "rejected": "bad"}\n{"prompt": "b", "chosen": "nice"}\n')
    tree = {"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "sft", "config": os.path.abspath("configs/sft.yaml"), "overrides": {"policy.model_name_or_path": str(tiny_model_dir)}},
        {"name": "dpo", "config": os.path.abspath("configs/dpo.yaml"),
         "overrides": {"policy.model_name_or_path": "${sft.policy}", "data.train_path": str(prefs)}}]}
    stages = load_pipeline(_write(tmp_path, tree))
    ran = []
    with pytest.raises(DataError, match=r"line 2 of .*prefs.jsonl: missing key 'rejected'"):
        run_pipeline(stages, ran.append, log=lambda _: None)
    assert ran == []  # no stage started


def test_one_example_and_no_eval_file_is_a_named_error(tmp_path, tiny_model_dir):
    from rlhf_cluster.config import load_config
    from rlhf_cluster.drivers.offline import load_stage_data, stage_for
    from rlhf_cluster.models import load_tokenizer

    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "a", "response": "b"}\n')
    cfg = load_config("configs/sft.yaml", [f"policy.model_name_or_path={tiny_model_dir}", f"data.train_path={one}",
                                           "data.eval_path=null"])
    with pytest.raises(ConfigError, match=r"one.jsonl has 1 example\(s\).*add rows or set data.eval_path"):
        load_stage_data(cfg, stage_for(cfg), load_tokenizer(str(tiny_model_dir)), log=lambda _: None)


def test_a_strict_data_report_stops_the_pipeline_before_the_first_stage_through_the_cli(tmp_path, tiny_model_dir):
    """`data_report: {strict: true}`: the report on each offline stage's file runs first; a flagged file (here
    preference pairs whose chosen answer is always the longer one, with the eval file a copy of the training file)
    is one line naming the stage, the flags and the report, exit 2, and no stage has started."""
    import json

    from cli_here import cli

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"question {i} about topic {i % 7}",
                                         "chosen": f"a long and careful answer number {i} with detail",
                                         "rejected": f"short {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    tree = {"output_dir": str(out), "data_report": {"strict": True}, "stages": [
        {"name": "dpo", "config": os.path.abspath("configs/dpo.yaml"),
         "overrides": {"policy.model_name_or_path": str(tiny_model_dir), "data.train_path": str(prefs),
                       "data.eval_path": str(prefs)}}]}
    p = cli("train", str(_write(tmp_path, tree)))
    assert p.returncode == 2, p.stderr[-2000:]
    report = out / "data_report" / "dpo" / "report.md"
    assert p.stderr.startswith(f"error: the data report flagged stage 'dpo' ({prefs}): ") and len(p.stderr.splitlines()) == 1
    assert "length_bias" in p.stderr and "contamination" in p.stderr and f"(see {report})" in p.stderr, p.stderr
    assert "set data_report: {strict: false} in the pipeline to train on it anyway" in p.stderr
    assert report.is_file() and "=== data report" in p.stdout
    assert not (out / "dpo").exists()  # the stage never started


def test_data_report_settings_are_checked(tmp_path):
    from rlhf_cluster.pipeline import load_data_report

    base = {"output_dir": str(tmp_path), "stages": [{"name": "a", "config": "configs/sft.yaml"}]}
    assert load_data_report(_write(tmp_path, base)) is None
    spec = load_data_report(_write(tmp_path, {**base, "data_report": True}))
    assert spec.strict and spec.out_dir == tmp_path / "data_report"
    assert not load_data_report(_write(tmp_path, {**base, "data_report": {"strict": False}})).strict
    with pytest.raises(ConfigError, match=r"data_report must be true or a mapping \{strict: true\|false\}"):
        load_data_report(_write(tmp_path, {**base, "data_report": {"stict": True}}))
