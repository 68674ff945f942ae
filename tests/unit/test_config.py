"""Config: YAML + dotted overrides, validated up front with messages that name the fix."""

from pathlib import Path

import pytest

from rlhf_cluster.config import ConfigError, config_tree, dump_config, load_config, parse_override, preflight

BASE = ["policy.model_name_or_path=/m/policy", "reward.function=rlhf_cluster.rewards:sentiment", "data.train_path=/d/p.jsonl"]
OFFLINE = BASE[:1] + BASE[2:]  # no reward: offline methods read none


def test_defaults_and_derived_paths():
    cfg = load_config(None, BASE)
    assert cfg.policy.zero_stage == 0  # auto: one rank needs no ZeRO
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
    again = load_config(None, [f"{k}={v}" for k, v in _flatten(config_tree(cfg)).items() if v is not None])
    assert again == cfg
    assert "preference" not in config_tree(cfg)  # PPO reads no preference field
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
        ("policy.zero_stage=2 policy.offload_params=true", "offload_params=true needs zero_stage=3"),
        ("algorithm.policy_loss_params.c=3", "vanilla has no parameter 'c' (vanilla takes none)"),
        ("algorithm.advantage_estimator=grpo", "set rollout.n_samples_per_prompt >= 2"),
        ("algorithm.mini_batch_size=5", "not a multiple of algorithm.mini_batch_size=5"),
        ("policy.micro_batch_size=32", "must be a multiple of policy.micro_batch_size"),
        ("reward.model_name_or_path=/m/rm", "the reward has one source"),
        ("reward.function=no_colon", "module:function"),
        ("algorithm.advantage_estimator=ppo2", "algorithm.advantage_estimator"),
    ],
)
def test_bad_values_name_field_and_fix(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*BASE, *override.split()])
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
        load_config(None, [*OFFLINE, "method=dpo", "preference.loss=dpoo"])
    register_advantage_estimator("test_groups", needs_critic=False, needs_groups=True, whiten=False)(lambda *a, **k: None)
    try:
        cfg = load_config(None, [*BASE, "algorithm.advantage_estimator=test_groups", "rollout.n_samples_per_prompt=2"])
        assert not cfg.needs_critic
        with pytest.raises(ConfigError, match="compares samples of one prompt"):
            load_config(None, [*BASE, "algorithm.advantage_estimator=test_groups"])
    finally:
        ADVANTAGE_ESTIMATORS.pop("test_groups")
    assert not load_config(None, [*OFFLINE, "method=dpo", "preference.loss=simpo"]).needs_reference
    assert load_config(None, [*OFFLINE, "method=dpo", "preference.loss=kto"]).needs_reference


def test_loss_params_are_checked_against_the_chosen_loss():
    """Each loss's own parameters: unknown names list the allowed ones, types and ranges are checked, defaults filled."""
    dpo = [*OFFLINE, "method=dpo"]
    cfg = load_config(None, [*dpo, "preference.loss=cdpo", "preference.loss_params.label_smoothing=0.2"])
    assert cfg.preference.loss_params == {"label_smoothing": 0.2}
    assert load_config(None, [*dpo, "preference.loss=simpo"]).preference.loss_params == {"gamma": 0.5}
    assert load_config(None, dpo).preference.loss_params == {}
    cfg = load_config(None, [*BASE, "algorithm.policy_loss=dual_clip"])
    assert cfg.algorithm.policy_loss_params == {"c": 3.0} and cfg.algorithm.loss_agg_mode == "token_mean"
    for override, expected in [
        ("preference.loss_params.label_smothing=0.1",
         "preference.loss_params: cdpo has no parameter 'label_smothing'; did you mean 'label_smoothing'? "
         "(cdpo takes: label_smoothing)"),
        ("preference.loss_params.label_smoothing=0.5", "cdpo: label_smoothing must be > 0 and < 0.5"),
        ("preference.loss_params.label_smoothing=0", "cdpo: label_smoothing must be > 0 and < 0.5 (0 is plain dpo)"),
        ("preference.loss_params.label_smoothing=lots", "cdpo.label_smoothing: Input should be a valid number"),
        ("preference.loss_params=null", "preference.loss_params: Input should be a valid dictionary"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [*dpo, "preference.loss=cdpo", override])
        assert expected in str(e.value), (override, str(e.value))
    with pytest.raises(ConfigError, match="cdpo needs label_smoothing"):
        load_config(None, [*dpo, "preference.loss=cdpo"])
    with pytest.raises(ConfigError, match="simpo: gamma must be >= 0"):
        load_config(None, [*dpo, "preference.loss=simpo", "preference.loss_params.gamma=-1"])
    with pytest.raises(ConfigError, match=r"kto has no parameter 'gamma' \(kto takes none\)"):
        load_config(None, [*dpo, "preference.loss=kto", "preference.loss_params.gamma=1"])
    with pytest.raises(ConfigError, match="dual_clip: c must be > 1"):
        load_config(None, [*BASE, "algorithm.policy_loss=dual_clip", "algorithm.policy_loss_params.c=1"])


def test_policy_loss_and_aggregation_come_from_their_registries():
    with pytest.raises(ConfigError, match="unknown policy loss 'dualclip'; did you mean 'dual_clip'"):
        load_config(None, [*BASE, "algorithm.policy_loss=dualclip"])
    with pytest.raises(ConfigError, match="unknown loss agg mode 'seq_mean_token_sums'; did you mean 'seq_mean_token_sum'"):
        load_config(None, [*BASE, "algorithm.loss_agg_mode=seq_mean_token_sums"])
    cfg = load_config(None, [*BASE, "algorithm.loss_agg_mode=seq_mean_token_mean"])
    assert cfg.algorithm.loss_agg_mode == "seq_mean_token_mean" and cfg.algorithm.policy_loss == "vanilla"


@pytest.mark.parametrize("old, hint", [
    ("preference.label_smoothing=0.1", "preference.label_smoothing moved to preference.loss_params.label_smoothing (cdpo)"),
    ("preference.simpo_gamma=0.5", "preference.simpo_gamma moved to preference.loss_params.gamma (simpo)"),
    ("algorithm.dual_clip=3.0", "algorithm.dual_clip moved to algorithm.policy_loss: dual_clip with "
                                "algorithm.policy_loss_params: {c: ...}"),
])
def test_old_field_names_say_where_they_moved(old, hint, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*BASE, old])
    assert hint in str(e.value)
    section, field = old.split("=")[0].split(".")
    (tmp_path / "old.yaml").write_text(f"{section}:\n  {field}: {old.split('=')[1]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "old.yaml", BASE)
    assert hint in str(e.value)


def test_a_loss_registered_in_one_place_is_a_config_choice_with_its_params(tmp_path):
    """One file (the registered loss), one YAML, one test: the config validates the new loss's own parameters."""
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F

    from rlhf_cluster.algos.preference import PREFERENCE_LOSSES, get_preference_loss, register_preference_loss

    @dataclass(frozen=True)
    class MarginParams:
        """margin m: subtracted from βh, >= 0."""

        margin: float = 1.0

        def __post_init__(self):
            if self.margin < 0:
                raise ValueError(f"margin must be >= 0, got {self.margin}")

    @register_preference_loss("test_margin_dpo", needs_reference=True, params=MarginParams)
    def margin_dpo(*, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, ref_chosen_logps, ref_rejected_logps,
                   beta, margin):
        c, r = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        return -F.logsigmoid(beta * (c - r) - margin), (beta * c).detach(), (beta * r).detach()

    try:
        (tmp_path / "margin.yaml").write_text("method: dpo\npreference:\n  loss: test_margin_dpo\n"
                                              "  loss_params:\n    margin: 0.25\n")
        cfg = load_config(tmp_path / "margin.yaml", OFFLINE)
        assert cfg.preference.loss_params == {"margin": 0.25} and cfg.needs_reference
        assert load_config(None, [*OFFLINE, "method=dpo", "preference.loss=test_margin_dpo"]).preference.loss_params == {
            "margin": 1.0}
        with pytest.raises(ConfigError, match="test_margin_dpo: margin must be >= 0"):
            load_config(tmp_path / "margin.yaml", ["preference.loss_params.margin=-1", *BASE])
        with pytest.raises(ConfigError, match=r"no parameter 'gamma' \(test_margin_dpo takes: margin\)"):
            load_config(tmp_path / "margin.yaml", ["preference.loss_params.gamma=1", *BASE])
        one = torch.tensor([1.0])
        losses, _, _ = get_preference_loss(cfg.preference.loss).fn(
            chosen_logps=-one, rejected_logps=-2 * one, chosen_lengths=one, rejected_lengths=one, ref_chosen_logps=-one,
            ref_rejected_logps=-one, beta=cfg.preference.beta, **cfg.preference.loss_params)
        assert losses.item() == pytest.approx(-F.logsigmoid(torch.tensor(0.1 * 1.0 - 0.25)).item())
    finally:
        PREFERENCE_LOSSES.pop("test_margin_dpo")


def test_explain_lists_each_losss_own_parameters():
    from rlhf_cluster.config import explain

    out = explain(load_config(None, [*OFFLINE, "method=dpo", "preference.loss=cdpo", "preference.loss_params.label_smoothing=0.1"]))
    assert "preference.loss_params: {label_smoothing: 0.1}   (default {})" in out
    assert "cdpo: label_smoothing: float (required)" in out and "simpo: gamma: float = 0.5" in out
    assert "dpo, hinge, ipo, kto, orpo: none" in out
    assert "algorithm.policy_loss: vanilla   (default vanilla)   one of: dual_clip, vanilla" in out
    assert "dual_clip: c: float = 3.0" in out
    assert "algorithm.loss_agg_mode: token_mean   (default token_mean)   one of: seq_mean_token_mean" in out


@pytest.mark.parametrize("method, field, message", [
    ("dpo", "schedule.num_steps=100", r"schedule.num_steps is not used by method=dpo \(it reads only schedule.num_epochs\)"),
    ("sft", "rollout.temperature=0.5", r"rollout.temperature is not used by method=sft \(it has no rollout\)"),
    ("ppo", "preference.beta=0.5", r"preference.beta is not used by method=ppo \(it has no preference\)"),
    ("online_dpo", "preference.reference_mode=on_the_fly", r"it reads only preference.beta, preference.loss, preference.loss_params"),
    ("online_dpo", "algorithm.kl_coef=0.1", r"algorithm.kl_coef is not used by method=online_dpo"),
])
def test_a_setting_the_method_never_reads_is_refused(method, field, message):
    base = BASE if method in ("ppo", "online_dpo") else OFFLINE
    extra = ["rollout.n_samples_per_prompt=2", "algorithm.mini_batch_size=16"] if method == "online_dpo" else []
    load_config(None, [*base, f"method={method}", *extra])  # valid without it
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*base, f"method={method}", *extra, field])


@pytest.mark.parametrize("name", sorted(p.stem for p in Path("configs").glob("*.yaml") if "pipeline" not in p.stem))
def test_a_dumped_config_loads_back_as_the_same_config(name, tmp_path):
    cfg = load_config(f"configs/{name}.yaml")
    (tmp_path / "dumped.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "dumped.yaml") == cfg


def test_shipped_configs_by_name_from_any_directory(tmp_path, monkeypatch):
    from rlhf_cluster.config import SHIPPED, find_config

    monkeypatch.chdir(tmp_path)
    assert find_config("ppo_demo") == find_config("ppo_demo.yaml") == SHIPPED / "ppo_demo.yaml"
    cfg = load_config(find_config("ppo_demo"))
    assert cfg.data.train_path == str(SHIPPED / "data" / "demo_prompts.jsonl")  # data ships next to the config
    assert cfg.policy.model_name_or_path == str(tmp_path / "runs" / "models" / "tiny-policy")  # models: the cwd
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo_prompts.jsonl").write_text('{"prompt": "mine"}\n')
    assert load_config(find_config("ppo_demo")).data.train_path == str(tmp_path / "data" / "demo_prompts.jsonl")  # cwd wins
    with pytest.raises(ConfigError, match=r"'ppo_dmo' does not exist \(nor is it a shipped config: cdpo, dpo, grpo"):
        find_config("ppo_dmo")


def test_kl_placement_estimator_and_zero_stage_defaults_resolve_per_method():
    """GRPO puts k3 KL in the loss (the paper's), PPO k1 KL in the reward; one rank trains without ZeRO; no KL, no reference."""
    from rlhf_cluster.cluster.layout import role_layout

    grpo, ppo = load_config("configs/grpo.yaml").algorithm, load_config("configs/ppo_demo.yaml").algorithm
    assert (grpo.kl_penalty, grpo.kl_estimator, ppo.kl_penalty, ppo.kl_estimator) == ("loss", "k3", "reward", "k1")
    chosen = load_config("configs/grpo.yaml", ["algorithm.kl_penalty=reward"]).algorithm
    assert (chosen.kl_penalty, chosen.kl_estimator) == ("reward", "k1")
    cfg = load_config("configs/ppo_demo.yaml")
    assert (cfg.policy.zero_stage, cfg.critic.zero_stage) == (0, 0)
    assert load_config("configs/ppo_demo.yaml", ["policy.num_gpus_per_node=2"]).policy.zero_stage == 2
    assert load_config("configs/ppo_demo.yaml", ["policy.offload_optimizer=true"]).policy.zero_stage == 2
    assert "reference" in role_layout(cfg)
    assert "reference" not in role_layout(load_config("configs/grpo.yaml", ["algorithm.kl_coef=0"]))
    assert "reference" in role_layout(load_config("configs/grpo.yaml", ["algorithm.kl_coef=0", "algorithm.kl_controller=adaptive"]))


def test_thread_shares_split_each_nodes_cpus_among_the_ranks_that_run_at_once():
    from rlhf_cluster.cluster.threads import shares

    nodes = {"policy": ["a", "b"], "critic": ["a", "b"], "reference": ["a"], "rollout": ["b", "b"]}
    cpus = {"a": 8, "b": 6}
    assert shares(nodes, cpus, ["policy"]) == {"policy": [8, 6]}
    assert shares(nodes, cpus, ["rollout"]) == {"rollout": [3, 3]}
    assert shares(nodes, cpus, ["policy", "critic", "reference", "absent"]) == {
        "policy": [2, 3], "critic": [2, 3], "reference": [2]}
    assert shares({"a": ["x"] * 5}, {"x": 2}, ["a"]) == {"a": [1] * 5}  # never below one thread
