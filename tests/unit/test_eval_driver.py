"""`rlhf-cluster eval` without actors: its pure helpers by hand, the inputs it reads and tokenizes, and every
up-front check failing through the CLI (one line, exit 2) before any actor starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_cluster.cli import main
from rlhf_cluster.config import ConfigError, load_config
from rlhf_cluster.drivers import evaluate
from rlhf_cluster.drivers.evaluate import (
    Answers,
    EvalOptions,
    default_out_dir,
    kl_stats,
    nll_per_token,
    preference_stats,
    prepare_eval,
    probe_rate,
    side_metrics,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "ppo_demo.yaml")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- pure helpers


def test_kl_per_token_and_per_answer_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    ref = torch.tensor([[-2.0, -2.5, -1.0], [-1.0, -1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the third tokens are padding
    kl = kl_stats(logp, ref, mask)
    # k1 per token: 1.0, 0.5 | 0.5, 1.0 -> per answer 1.5, 1.5; per token 3 / 4
    assert kl["per_answer"] == [1.5, 1.5] and kl["kl_per_sequence"] == 1.5 and kl["kl_per_token"] == 0.75


def test_preference_accuracy_of_the_implicit_reward_by_hand():
    # pair 0: policy gains 2 on chosen, 0 on rejected (right); pair 1: gains 0 and 1 (wrong); pair 2: equal gains (tie)
    policy = torch.tensor([-1.0, -5.0, -3.0, -2.0, -4.0, -4.0])
    reference = torch.tensor([-3.0, -5.0, -3.0, -3.0, -5.0, -5.0])
    p = preference_stats(policy, reference, beta=0.5)
    assert p["n"] == 3 and p["accuracy"] == pytest.approx(1.5 / 3)  # 1 + 0 + ½
    assert p["margin"] == pytest.approx((0.5 * 2 + 0.5 * -1 + 0) / 3)
    assert p["policy_likelihood_accuracy"] == pytest.approx(1.5 / 3)  # -1 > -5, -3 < -2, tie
    assert p["reference_likelihood_accuracy"] == pytest.approx(2 / 3)  # -3 > -5, -3 == -3 (½), -5 == -5 (½)
    same = preference_stats(reference, reference, beta=0.1)
    assert same["accuracy"] == 0.5 and same["margin"] == 0.0  # the reference against itself


def test_nll_per_token_and_per_prompt_grouping():
    assert nll_per_token(torch.tensor([-6.0, -2.0]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])) == 2.0
    a = Answers(2, [[1]] * 4, [[5], [6, 7], [], [8]], ["a", "b c", "", "d"], [False, True, False, False])
    assert a.per_prompt(["w", "x", "y", "z"]) == [["w", "x"], ["y", "z"]]
    assert a.per_prompt(torch.tensor([1.0, 2.0, 3.0, 4.0])) == [[1.0, 2.0], [3.0, 4.0]]
    mask = a.experience(0).action_mask
    m = side_metrics(a, mask, torch.ones_like(mask), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert (m["reward_mean"], m["reward_std"], m["length_mean"], m["truncated"]) == (0.5, 0.5, 1.0, 0.25)
    assert m["entropy"] == 1.0 and "self_similarity" in m  # several samples per prompt


def test_probe_rates_and_rows():
    prompts = evaluate.PromptSet("p.jsonl", [evaluate.EvalPrompt(i, f"q{i}", [f"q{i}"]) for i in range(2)], [], None)
    pol = Answers(1, [[1]] * 2, [[1]] * 2, ["I'm sorry, I can't help with that.", "Sure: here it is."], [False] * 2)
    ref = Answers(1, [[1]] * 2, [[1]] * 2, ["Okay.", "Fine."], [False] * 2)
    summary, rows = probe_rate(pol, ref, evaluate.compile_patterns(evaluate.REFUSAL_PATTERNS), prompts, "refused")
    assert summary == {"policy": 0.5, "reference": 0.0, "n": 2, "prompts": "p.jsonl"}
    assert rows[0]["policy_refused"] and not rows[1]["policy_refused"] and not rows[0]["reference_refused"]


def test_default_out_dir():
    assert default_out_dir("/r/ppo_demo/policy") == Path("/r/ppo_demo/eval")
    assert default_out_dir("/r/ppo_demo/checkpoints/step_000010/policy") == Path("/r/ppo_demo/checkpoints/step_000010/eval")
    assert default_out_dir("/models/tiny-policy/") == Path("/models/tiny-policy_eval")


# ----------------------------------------------------------------------------- inputs


@pytest.fixture
def demo_cfg(tiny_model_dir):
    return load_config(DEMO, [f"policy.model_name_or_path={tiny_model_dir}"])


def test_prepare_reads_any_prompt_format_and_the_shipped_probes(demo_cfg, tiny_model_dir, tmp_path):
    mt = write_jsonl(tmp_path / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write a line about rain.", "Now make it sad."]},
        {"question_id": 82, "category": "stem", "turns": ["What is 2+2?"]}])
    ins = prepare_eval(demo_cfg, EvalOptions(policy=str(tiny_model_dir), prompts=str(mt), out=str(tmp_path / "out")),
                      log=lambda *_: None)
    assert [p.id for p in ins.prompts.items] == [81, 82] and ins.reference == str(tiny_model_dir)
    assert "Write a line about rain." in ins.prompts.examples[0].prompt_text and ins.prompts.examples[0].prompt_ids
    assert any("1 multi-turn prompts" in n and "turn 2 is asked" in n for n in ins.notes)
    assert {k: len(v.items) for k, v in ins.probes.items()} == {"benign": 16, "harmful": 16, "sycophancy": 16}
    assert all(v.shipped for v in ins.probes.values()) and (tmp_path / "out").is_dir()
    assert ins.seed == 0 and ins.beta == 0.1 and ins.pairs is None
    ins = prepare_eval(demo_cfg, EvalOptions(policy=str(tiny_model_dir), probes=False, max_prompts=3, seed=5,
                                             pairs=str(REPO / "configs" / "data" / "prefs_eval.jsonl"),
                                             capability=str(REPO / "configs" / "data" / "sft_eval.jsonl"),
                                             out=str(tmp_path / "out")), log=lambda *_: None)
    assert len(ins.prompts.items) == 3 and ins.prompts.path.endswith("demo_prompts_eval.jsonl")  # data.eval_path
    assert ins.probes == {} and ins.seed == 5 and len(ins.pairs) > 10 and len(ins.capability) > 10


def test_reward_fields_are_checked_before_any_actor(tiny_model_dir, tmp_path):
    cfg = load_config(DEMO, [f"policy.model_name_or_path={tiny_model_dir}", "reward.function=rlhf_cluster.rewards:exact_answer"])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}])
    with pytest.raises(ConfigError, match="takes the dataset field\\(s\\) 'answer', but line 1 of"):
        prepare_eval(cfg, EvalOptions(policy=str(tiny_model_dir), prompts=str(prompts), out=str(tmp_path)), log=lambda *_: None)


# ----------------------------------------------------------------------------- the CLI's up-front errors


@pytest.fixture
def no_actors(monkeypatch):
    """Any attempt to start the eval's actors fails the test: these errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the eval started its actors")

    monkeypatch.setattr(evaluate, "eval_roles", refuse)


def bad_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": \n')
    return path


@pytest.mark.parametrize("extra, expected", [
    (["--prompts", "BAD"], "line 2 of"),
    (["--prompts", "MISSING"], "--prompts"),
    (["--judge-url", "http://127.0.0.1:1/v1", "--judge-model", "m", "--judge-key-env", "EVAL_TEST_JUDGE_KEY"],
     "--judge-key-env EVAL_TEST_JUDGE_KEY: that environment variable is not set"),
    (["--judge-url", "http://127.0.0.1:1/v1"], "both --judge-url URL and --judge-model NAME"),
    (["--judge-url", "http://127.0.0.1:1/v1", "--judge-model", "m"], "cannot connect to 127.0.0.1:1"),
    (["--judge-url", "ftp://x", "--judge-model", "m"], "judge url must start with http"),
    (["--harmful", "MISSING"], "--harmful"),
    (["--refusal-patterns", "PATTERNS"], "not a valid regular expression"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--reference", "NOT_A_MODEL"], "--reference="),
    (["reward.function=rlhf_cluster.rewards:nope"], "has no function 'nope'"),
])
def test_bad_inputs_fail_in_one_line_before_any_actor(tiny_model_dir, tmp_path, capsys, monkeypatch, no_actors, extra,
                                                      expected):
    monkeypatch.delenv("EVAL_TEST_JUDGE_KEY", raising=False)
    (tmp_path / "patterns.txt").write_text("(unclosed\n")
    names = {"BAD": str(bad_prompts(tmp_path)), "MISSING": str(tmp_path / "missing.jsonl"),
             "PATTERNS": str(tmp_path / "patterns.txt"), "NOT_A_MODEL": str(tmp_path)}
    args = [names.get(a, a) for a in extra]
    rc = main(["eval", DEMO, "--policy", str(tiny_model_dir), "--out", str(tmp_path / "out"),
               f"policy.model_name_or_path={tiny_model_dir}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err


def test_policy_that_is_not_a_model_dir(tmp_path, capsys, no_actors):
    assert main(["eval", DEMO, "--policy", str(tmp_path)]) == 2
    assert "--policy=" in capsys.readouterr().err
