"""Config: YAML + dotted overrides, validated up front with messages that name the fix."""

import pytest

from rlhf_cluster.config import ConfigError, dump_config, load_config, parse_override, preflight

BASE = ["policy.model_name_or_path=/m/policy", "reward.function=rlhf_cluster.rewards:sentiment", "data.train_path=/d/p.jsonl"]


def test_defaults_and_derived_paths():
    cfg = load_config(None, BASE)
    assert cfg.policy.zero_stage == 2
    assert cfg.reference.model_name_or_path == "/m/policy"  # reference defaults to the policy
    assert cfg.critic.model_name_or_path == "/m/policy"  # no reward model: the critic starts from the policy
    assert cfg.needs_critic


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("policy:\n  model_name_or_path: /m/a\n  zero_stage: 2\nreward:\n  model_name_or_path: /m/rm\n"
                 "data:\n  train_path: x.jsonl\n")
    cfg = load_config(p, ["policy.zero_stage=3", "policy.offload_params=true", "rollout.temperature=0.7"])
    assert cfg.policy.zero_stage == 3 and cfg.policy.offload_params is True
    assert cfg.rollout.temperature == 0.7
    assert cfg.critic.model_name_or_path == "/m/rm"  # critic starts from the reward model
    again = load_config(None, [f"{k}={v}" for k, v in _flatten(cfg.model_dump(mode="json")).items() if v is not None])
    assert again == cfg
    assert "zero_stage: 3" in dump_config(cfg)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = "[" + ", ".join(map(str, v)) + "]" if isinstance(v, list) else v
    return out


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=x:y") == ("a.b", "x:y")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("policy.zero_stge=3", "unknown field 'policy.zero_stge'; did you mean 'policy.zero_stage'?"),
        ("policy.zero_stage=5", "policy.zero_stage"),
        ("policy.learning_rate=fast", "policy.learning_rate"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("policy.offload_params=true", "offload_params=true needs zero_stage=3"),
        ("algorithm.dual_clip=0.5", "dual_clip must be > 1"),
        ("algorithm.advantage_estimator=grpo", "set rollout.n_samples_per_prompt >= 2"),
        ("algorithm.mini_batch_size=5", "not a multiple of algorithm.mini_batch_size=5"),
        ("policy.micro_batch_size=32", "must be a multiple of policy.micro_batch_size"),
        ("reward.model_name_or_path=/m/rm", "not both"),
        ("reward.function=no_colon", "module:function"),
        ("algorithm.advantage_estimator=ppo2", "algorithm.advantage_estimator"),
    ],
)
def test_bad_values_name_field_and_fix(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*BASE, override])
    assert expected in str(e.value)


def test_missing_required_fields():
    with pytest.raises(ConfigError, match="policy.model_name_or_path is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="the reward needs a source"):
        load_config(None, ["policy.model_name_or_path=/m", "data.train_path=x"])


def test_override_syntax_errors(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_config(None, ["policy.zero_stage"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, [*BASE, "seed=1", "seed.x=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_preflight_checks_files(tmp_path):
    cfg = load_config(None, BASE)
    with pytest.raises(ConfigError, match="not a local Hugging Face model directory"):
        preflight(cfg)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cfg = load_config(None, [f"policy.model_name_or_path={tmp_path/'m'}", "reward.function=nosuchmod:f",
                             "data.train_path=" + str(tmp_path / "m" / "config.json")])
    with pytest.raises(ConfigError, match="cannot import module 'nosuchmod'"):
        preflight(cfg)
    cfg = load_config(None, [f"policy.model_name_or_path={tmp_path/'m'}", "reward.function=rlhf_cluster.config:nope",
                             "data.train_path=/no/such.jsonl"])
    with pytest.raises(ConfigError, match="data.train_path='/no/such.jsonl' does not exist"):
        preflight(cfg)


def test_every_shipped_config_validates():
    from pathlib import Path

    from rlhf_cluster.pipeline import is_pipeline, load_pipeline

    configs = sorted(Path("configs").glob("*.yaml"))
    assert len(configs) >= 15
    for p in configs:
        stages = load_pipeline(p) if is_pipeline(p) else [load_config(p)]
        assert stages, p


def test_base_file_is_extended(tmp_path):
    (tmp_path / "a.yaml").write_text("policy:\n  model_name_or_path: /m\n  zero_stage: 3\nreward:\n  function: x:y\n"
                                     "data:\n  train_path: t\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\npolicy:\n  learning_rate: 0.5\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.policy.zero_stage == 3 and cfg.policy.learning_rate == 0.5 and cfg.policy.model_name_or_path == "/m"
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "c.yaml")


def test_choices_and_their_rules_come_from_the_registries():
    """A registered estimator is a valid config value at once, and its metadata decides the critic and the groups."""
    from rlhf_cluster.algos.advantages import ADVANTAGE_ESTIMATORS, register_advantage_estimator

    with pytest.raises(ConfigError, match="unknown advantage estimator 'grp'; did you mean 'grpo'"):
        load_config(None, [*BASE, "algorithm.advantage_estimator=grp"])
    with pytest.raises(ConfigError, match="unknown preference loss 'dpoo'; did you mean 'dpo'"):
        load_config(None, [*BASE, "method=dpo", "preference.loss=dpoo"])
    register_advantage_estimator("test_groups", needs_critic=False, needs_groups=True, whiten=False)(lambda *a, **k: None)
    try:
        cfg = load_config(None, [*BASE, "algorithm.advantage_estimator=test_groups", "rollout.n_samples_per_prompt=2"])
        assert not cfg.needs_critic
        with pytest.raises(ConfigError, match="compares samples of one prompt"):
            load_config(None, [*BASE, "algorithm.advantage_estimator=test_groups"])
    finally:
        ADVANTAGE_ESTIMATORS.pop("test_groups")
    assert not load_config(None, [*BASE, "method=dpo", "preference.loss=simpo"]).needs_reference
    assert load_config(None, [*BASE, "method=dpo", "preference.loss=kto"]).needs_reference
