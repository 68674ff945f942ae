"""The model-free parts of `rlhf-cluster eval`: win rate and its bootstrap, diversity, refusal and agreement rates,
eval prompt files in three formats, the LLM judge against a real loopback server, and the Markdown report."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from judge_server import JudgeServer

from rlhf_cluster.data import DataError
from rlhf_cluster.quality.evaluation import (
    agreement_rate,
    distinct,
    format_eval_markdown,
    refusal_rate,
    self_similarity,
    win_rate,
)
from rlhf_cluster.quality.judge import (
    JudgeConfig,
    JudgeError,
    conversation_answer,
    conversation_request,
    judge_messages,
    judge_pairwise,
    parse_verdict,
)
from rlhf_cluster.quality.prompt_files import load_eval_prompts

# ----------------------------------------------------------------------------- win rate


def test_win_rate_by_hand():
    # diffs: +2 win, 0 tie, -2 loss, 0 tie
    w = win_rate([3, 1, 2, 5], [1, 1, 4, 5])
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (1, 2, 1, 4)
    assert (w["win_rate"], w["tie_rate"], w["loss_rate"]) == (0.25, 0.5, 0.25)
    assert w["win_rate_ties_half"] == 0.5  # (1 + 2/2) / 4
    assert (w["policy_mean"], w["reference_mean"]) == (2.75, 2.75)


def test_tie_tolerance_makes_close_scores_ties():
    # diffs 0.5 (= tolerance: a tie), 1.0 (a win), -0.25 (a tie)
    w = win_rate([1.0, 2.0, 0.0], [0.5, 1.0, 0.25], tie_tolerance=0.5)
    assert (w["wins"], w["ties"], w["losses"]) == (1, 2, 0)
    assert w["win_rate_ties_half"] == pytest.approx(2 / 3)
    assert win_rate([1.0, 2.0, 0.0], [0.5, 1.0, 0.25])["wins"] == 2


def test_all_ties_and_identical_inputs_are_one_half_with_a_degenerate_interval():
    w = win_rate([0.3] * 7, [0.3] * 7)
    assert (w["ties"], w["win_rate"], w["win_rate_ties_half"]) == (7, 0.0, 0.5)
    assert w["ci_low"] == w["ci_high"] == 0.5
    scores = [0.1, -2.0, 3.5, 0.0]
    assert win_rate(scores, list(scores))["win_rate_ties_half"] == 0.5
    everything = win_rate([2, 3], [1, 1])
    assert everything["win_rate_ties_half"] == everything["ci_low"] == everything["ci_high"] == 1.0


def test_bootstrap_interval_contains_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(7)
    pol, ref = rng.normal(0.3, 1, 40).tolist(), rng.normal(0, 1, 40).tolist()
    w = win_rate(pol, ref, seed=3)
    assert 0 <= w["ci_low"] <= w["win_rate_ties_half"] <= w["ci_high"] <= 1
    assert w["ci_low"] < w["ci_high"]
    assert win_rate(pol, ref, seed=3) == w
    assert win_rate(pol, ref, n_boot=0)["ci_low"] is None


def test_bootstrap_matches_resampling_prompt_indices():
    """Drawing the outcome counts from a multinomial is the same distribution as resampling prompts."""
    outcomes = np.array([1.0] * 5 + [0.5] * 2 + [0.0] * 3)  # 5 wins, 2 ties, 3 losses
    w = win_rate([1] * 5 + [0] * 2 + [-1] * 3, [0] * 10, n_boot=20000)
    idx = np.random.default_rng(11).integers(0, 10, size=(20000, 10))
    lo, hi = np.percentile(outcomes[idx].mean(axis=1), [2.5, 97.5])
    assert w["win_rate_ties_half"] == 0.6
    assert abs(w["ci_low"] - lo) <= 0.05 + 1e-9 and abs(w["ci_high"] - hi) <= 0.05 + 1e-9  # one grid step (1/20)


def test_several_samples_per_prompt_compare_means():
    # prompt 0: mean 2 vs 2 (tie); prompt 1: 0 vs mean 1 (loss); prompt 2: mean 1.5 vs 1 (win)
    w = win_rate([[1, 3], [0], [1, 2]], [2, [1, 1], [1.0]])
    assert (w["wins"], w["ties"], w["losses"]) == (1, 1, 1)
    assert w["policy_mean"] == pytest.approx((2 + 0 + 1.5) / 3)


@pytest.mark.parametrize("pol, ref, message", [
    ([1, 2, 3], [1, 2], "index 2 has no reference_scores"),
    ([1], [1, 2], "index 1 has no policy_scores"),
    ([1, float("nan")], [1, 2], r"policy_scores\[1\] is nan"),
    ([1, 2], [[1, math.inf], 2], r"reference_scores\[0\]\[1\] is inf"),
    ([[], 1], [1, 2], r"policy_scores\[0\] is an empty list"),
    ([True], [1], r"policy_scores\[0\] is bool.*not True/False"),
    (["0.5"], [1], r"policy_scores\[0\] is str"),
    ([], [], "no scores"),
])
def test_win_rate_refuses_bad_scores_naming_the_index(pol, ref, message):
    with pytest.raises(ValueError, match=message):
        win_rate(pol, ref)


# ----------------------------------------------------------------------------- diversity, refusal, agreement


def test_self_similarity_by_hand():
    # 3-grams: {abc, bcd} and {abc, bce} share 1 of 3; "x y z" shares nothing: (1/3 + 0 + 0) / 3
    assert self_similarity(["a b c d", "A b, c e!", "x y z"]) == pytest.approx(1 / 9)
    assert self_similarity(["same words here", "Same words here."]) == 1.0
    assert self_similarity(["hi", "hi"]) == 1.0  # shorter than n: one shingle each
    assert self_similarity(["a b", "b c"], n=1) == pytest.approx(1 / 3)
    assert self_similarity(["only one"]) == 0.0 and self_similarity([]) == 0.0


def test_distinct_by_hand():
    # words a b a b: unigrams 2 distinct of 4; bigrams (a b) (b a) (a b): 2 of 3
    d = distinct(["a b", "a b"])
    assert d == {"distinct_1": 0.5, "distinct_2": 0.5}  # bigrams do not cross texts: (a b) twice
    d = distinct(["a b a b"])
    assert d == {"distinct_1": 0.5, "distinct_2": pytest.approx(2 / 3)}


def test_refusal_rate():
    responses = ["I'm sorry, but I can't help with that.", "As an AI, I will not do this.",
                 "Sure! Here is a recipe for bread.", "The capital of France is Paris."]
    assert refusal_rate(responses) == 0.5
    assert refusal_rate(responses, patterns=[r"\bparis\b"]) == 0.25
    assert refusal_rate([]) is None


@pytest.mark.parametrize("text", [
    "You're right, the Great Wall is visible from space.", "Yes, that's how it works.", "Yes! Exactly so.",
    "That's correct: 7 is even.", "Indeed, the moon is made of cheese.", "Exactly. Good catch.",
    "Actually, you are absolutely right.", "I agree with you completely.", "  Absolutely, well said.",
    "YOU ARE CORRECT.", "Well, that is true.",
])
def test_agreement_patterns_match_agreement(text):
    assert agreement_rate([text]) == 1.0


@pytest.mark.parametrize("text", [
    "I don't agree: the Great Wall is not visible from space.", "That's not correct; 7 is odd.",
    "No, that is not correct.", "You're not right about this.", "I don't think you're right.",
    "Actually, that is a common misconception.", "Absolutely not.", "Yes and no: it depends.",
    "Yesterday it rained.", "It is not true that the moon is made of cheese.", "I disagree.",
    "Correct me if I'm wrong, but no.", "The answer you gave is not right; it is 4.",
])
def test_agreement_patterns_do_not_match_disagreement(text):
    assert agreement_rate([text]) == 0.0


# ----------------------------------------------------------------------------- prompt files


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_project_jsonl_prompts(tmp_path):
    f = jsonl(tmp_path / "eval.jsonl", [
        {"prompt": "What is 2+2?", "answer": "4"},
        {"prompt": "Name a color.", "id": "c1", "category": "easy"},
        {"prompt": ["Hi there.", "And now a follow-up?"]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]},
    ])
    p = load_eval_prompts(f)
    assert [x.id for x in p] == [1, "c1", 3, 4]  # the line number when there is no id
    assert (p[0].prompt, p[0].turns, p[0].category, p[0].extra, p[0].row) == ("What is 2+2?", ["What is 2+2?"], None,
                                                                              {"answer": "4"}, 1)
    assert p[1].category == "easy" and p[1].extra == {}
    assert p[2].turns == ["Hi there.", "And now a follow-up?"] and p[2].prompt == "Hi there."
    assert p[3].prompt == "Why is the sky blue?" and p[3].messages[0]["role"] == "system"


def test_mt_bench_question_jsonl(tmp_path):
    f = jsonl(tmp_path / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write a blog post about Hawaii.", "Rewrite it in rhymes."]},
        {"question_id": 111, "category": "math", "turns": ["What is 3*7?", "And 3*8?"], "reference": ["21", "24"]},
    ])
    p = load_eval_prompts(f)
    assert [(x.id, x.category, len(x.turns)) for x in p] == [(81, "writing", 2), (111, "math", 2)]
    assert p[0].prompt == "Write a blog post about Hawaii."
    assert p[1].extra == {"reference": ["21", "24"]}


def test_alpaca_eval_json(tmp_path):
    f = write(tmp_path / "alpaca_eval.json", json.dumps([
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour",
         "generator": "gpt4", "dataset": "helpful_base"},
        {"instruction": "Tell me a joke.", "input": "", "output": "...", "generator": "gpt4", "dataset": "koala"},
    ]))
    p = load_eval_prompts(f)
    assert p[0].prompt == "Translate to French.\n\nGood morning" and p[0].turns == [p[0].prompt]
    assert p[1].prompt == "Tell me a joke."  # an empty input adds nothing
    assert p[0].extra == {"output": "Bonjour", "generator": "gpt4", "dataset": "helpful_base"}
    assert (p[0].category, p[0].id, p[1].id) == ("helpful_base", 1, 2)


def test_prompt_key_overrides_detection_and_bom_is_accepted(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "Why?", "prompt": "ignored"}).encode() + b"\r\n")
    p = load_eval_prompts(f, prompt_key="question")
    assert p[0].prompt == "Why?" and p[0].extra == {"prompt": "ignored"}


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", '{"prompt": "ok"}\n\n{"prompt": "  "}\n', r"line 3 of .*a\.jsonl: 'prompt' is empty"),
    ("b.jsonl", '{"prompt": "ok"}\n{"text": "hi", "id": 2}\n',
     r"line 2 of .*b\.jsonl: missing 'prompt'.*fields found: text, id"),
    ("c.jsonl", '{"text": "hi", "label": 1}\n',
     r"line 1 of .*c\.jsonl: cannot tell the prompt format from the fields found \(text, label\)"),
    ("d.jsonl", '{"question_id": 1, "turns": ["a"]}\n{"question_id": 2, "turns": []}\n',
     r"line 2 of .*d\.jsonl: 'turns' must be a non-empty list"),
    ("e.jsonl", '{"question_id": 1, "turns": ["a", ""]}\n', r"line 1 of .*e\.jsonl: 'turns\[1\]' is empty"),
    ("f.json", '[{"instruction": "x"}, {"instruction": 5}]', r"row 2 of .*f\.json: 'instruction' must be a string, got int 5"),
    ("g.json", '[{"instruction": "x"}, {"output": "y"}]', r"row 2 of .*g\.json: missing 'instruction'.*fields found: output"),
    ("h.jsonl", '{"prompt": "a", "id": 7}\n{"prompt": "b", "id": 7}\n', r"line 2 of .*h\.jsonl: id 7 repeats the one at line 1"),
    ("i.jsonl", '{"prompt": 12}\n', r"line 1 of .*i\.jsonl: 'prompt' must be a string, a list of strings"),
    ("j.jsonl", '{"prompt": [{"role": "bot", "content": "x"}]}\n', r"'prompt'\[0\] has role 'bot'"),
    ("k.jsonl", '{"prompt": "ok"}\nnot json\n', r"line 2 of .*k\.jsonl: not valid JSON"),
    ("l.jsonl", "", r"l\.jsonl: no rows"),
])
def test_bad_prompt_files_name_file_row_and_fields(tmp_path, name, content, message):
    with pytest.raises(DataError, match=message):
        load_eval_prompts(write(tmp_path / name, content))


def test_prompt_files_are_local_only(tmp_path):
    with pytest.raises(DataError, match="local files only"):
        load_eval_prompts("https://example.com/question.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_eval_prompts(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- judge


@pytest.fixture
def judge():
    s = JudgeServer(slow_s=1.0)
    yield s
    s.close()


def config(server, **kw) -> JudgeConfig:
    return JudgeConfig(**{"url": server.url + "/v1", "model": "judge-model", "timeout_s": 5.0, "max_retries": 1,
                          "backoff_s": 0.01, "max_tokens": 64, **kw})


def test_parse_verdict():
    assert parse_verdict("reasoning...\n[[A]]") == "A"
    assert parse_verdict("A is [[B]]-level? No. Final: [[ c ]]") == "C"  # the last one counts
    assert parse_verdict("I prefer A.") == "invalid" and parse_verdict("") == "invalid"


def test_judge_asks_both_orders_and_combines_verdicts(judge):
    # the server prefers the longer answer: prompt 0 policy longer, 1 reference longer, 2 same length
    prompts = ["Explain tides.", "Name a prime.", "Say hi."]
    policy = ["The moon's gravity pulls the oceans.", "2", "hi there"]
    reference = ["Gravity.", "Two is the smallest prime number.", "hello you"]
    seen = []
    res = judge_pairwise(prompts, policy, reference, config(judge), on_verdict=seen.append)
    assert [r.outcome for r in res.records] == ["policy", "reference", "tie"]
    assert res.records[0].verdicts == {"policy_first": "A", "policy_second": "B"}
    assert "[[A]]" in res.records[0].texts["policy_first"]
    assert res.counts == {"policy_wins": 1, "reference_wins": 1, "ties": 1, "invalid": 0, "errors": 0}
    assert res.win_rate == 0.5 and res.position_consistency == 1.0 and res.position_a_share == 0.5
    assert sorted(r.index for r in seen) == [0, 1, 2]
    for q, p, r in zip(prompts, policy, reference):
        assert sorted(judge.asked(q)) == sorted([(p, r), (r, p)])  # each order once
    path, body, headers = judge.requests[0]
    assert path == "/v1/chat/completions" and "Authorization" not in headers
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-model", 0, 64)
    assert body["messages"] == judge_messages(*parse_request(body))


def parse_request(body):
    from judge_server import parse

    parts = parse(body)
    return parts["request"], parts["assistant_a"], parts["assistant_b"]


def test_a_position_biased_judge_yields_ties():
    server = JudgeServer(biased=True)
    try:
        res = judge_pairwise(["q1", "q2"], ["long long answer", "x"], ["short", "y y y"],
                             JudgeConfig(url=server.url + "/chat/completions", model="m", backoff_s=0.01))
    finally:
        server.close()
    assert [r.outcome for r in res.records] == ["tie", "tie"]
    assert res.win_rate == 0.5 and res.position_consistency == 0.0 and res.position_a_share == 1.0
    assert server.requests[0][0] == "/chat/completions"


def test_failing_slow_and_unparseable_prompts_are_recorded_while_the_rest_keep_their_verdicts(judge):
    prompts = ["ok one", "FAIL here", "SLOW here", "REJECT here", "GARBLE here", "FLAKY here", "ok two"]
    policy = ["a b c", "a b c", "a b c", "a b c", "a b c", "a b c", "a"]
    reference = ["a", "a", "a", "a", "a", "a", "a b c"]
    lines = []
    t0 = time.monotonic()
    res = judge_pairwise(prompts, policy, reference, config(judge, timeout_s=0.3, concurrency=8),
                         on_verdict=lambda r: lines.append(json.dumps(r.as_dict())))
    assert time.monotonic() - t0 < 4
    out = {r.prompt: r for r in res.records}
    assert [r.outcome for r in res.records] == ["policy", "error", "error", "error", "invalid", "policy", "reference"]
    assert "HTTP 500 judge crashed (after 2 attempts" in out["FAIL here"].error and judge.url in out["FAIL here"].error
    assert "no answer within 0.3 s (after 2 attempts" in out["SLOW here"].error
    assert "answered HTTP 400: context length exceeded" in out["REJECT here"].error
    assert out["GARBLE here"].verdicts == {"policy_first": "invalid", "policy_second": "invalid"}
    assert len(judge.asked("FAIL here")) == 4 and len(judge.asked("REJECT here")) == 2  # retried; 4xx not
    assert len(judge.asked("FLAKY here")) == 4  # a 503 then an answer, in each order
    assert res.counts == {"policy_wins": 2, "reference_wins": 1, "ties": 0, "invalid": 1, "errors": 3}
    assert res.win_rate == pytest.approx(2 / 3)
    assert len(lines) == 7 and {json.loads(x)["prompt"] for x in lines} == set(prompts)  # every prompt streamed
    summary = res.summary()
    assert summary["errors"] == 3 and len(summary["error_examples"]) == 3


def test_judge_api_key(judge, monkeypatch):
    judge.api_key = "s3cret"
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(JudgeError, match="environment variable JUDGE_TEST_KEY .* is not set"):
        judge_pairwise(["q"], ["a"], ["b"], config(judge, api_key_env="JUDGE_TEST_KEY"))
    assert judge.requests == []  # refused before any request
    monkeypatch.setenv("JUDGE_TEST_KEY", "s3cret")
    res = judge_pairwise(["q"], ["a a"], ["b"], config(judge, api_key_env="JUDGE_TEST_KEY"))
    assert res.records[0].outcome == "policy"
    assert judge.requests[0][2]["Authorization"] == "Bearer s3cret"
    monkeypatch.setenv("JUDGE_TEST_KEY", "wrong")
    res = judge_pairwise(["q"], ["a a"], ["b"], config(judge, api_key_env="JUDGE_TEST_KEY"))
    assert res.records[0].outcome == "error" and "HTTP 401" in res.records[0].error


def test_unreachable_judge_and_bad_arguments():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = judge_pairwise(["q"], ["a"], ["b"], JudgeConfig(url=f"http://127.0.0.1:{port}", model="m", max_retries=0))
    assert res.records[0].outcome == "error" and "cannot connect" in res.records[0].error
    assert f"127.0.0.1:{port}/chat/completions" in res.records[0].error
    with pytest.raises(ValueError, match="one answer per prompt"):
        judge_pairwise(["q", "r"], ["a"], ["b", "c"], JudgeConfig(url="http://x", model="m"))
    with pytest.raises(ValueError, match="must start with http"):
        JudgeConfig(url="localhost:8000", model="m")


# ----------------------------------------------------------------------------- Markdown


def test_markdown_report_holds_the_numbers():
    w = win_rate([3, 1, 2, 5], [1, 1, 4, 5])
    result = {
        "policy": "runs/ppo/final", "reference": "tiny-ref", "prompts": "eval.jsonl", "n_prompts": 4,
        "samples_per_prompt": 1, "scored_by": "reward model runs/rm", "win_rate": w,
        "metrics": {"policy": {"reward_mean": 2.75, "length_mean": 42.0, "kl_per_token": 0.0123, "custom": 7},
                    "reference": {"reward_mean": 2.5, "length_mean": 40.0}},
        "refusal": {"policy": 0.9, "reference": 0.75, "n": 20},
        "sycophancy": {"policy": 0.1, "reference": 0.25, "n": 12, "prompts": "false_claims.jsonl"},
        "judge": {"model": "judge-model", "url": "http://j/v1/chat/completions", "n": 4, "policy_wins": 2,
                  "reference_wins": 1, "ties": 1, "invalid": 0, "errors": 0, "win_rate": 0.625,
                  "position_consistency": 0.75, "position_a_share": 0.6},
        "samples": [{"id": 1, "prompt": "What is 2+2?", "policy": "4 | four\nfinal", "reference": "five",
                     "policy_score": 3.0, "reference_score": 1.0}],
    }
    md = format_eval_markdown(result)
    assert md.startswith("# Eval: runs/ppo/final vs tiny-ref\n")
    assert "**50.0%** with ties counted ½, 95% CI [" in md
    assert f"[{100 * w['ci_low']:.1f}%, {100 * w['ci_high']:.1f}%]" in md
    assert "| policy wins | 1 | 25.0% |" in md and "| ties | 2 | 50.0% |" in md and "| reference wins | 1 | 25.0% |" in md
    assert "| reward, mean | 2.750 | 2.500 | +0.250 |" in md
    assert "| KL to reference, per token | 0.0123 | – | – |" in md and "| custom | 7 | – | – |" in md
    assert "| policy | 90.0% |" in md and "| reference | 25.0% |" in md and "of false_claims.jsonl" in md
    assert "`judge-model`" in md and "**62.5%**" in md and "position consistency (both orders agree): 75.0%" in md
    assert "verdicts naming the first answer: 60.0%" in md
    assert "| **1** What is 2+2? | 4 \\| four<br>final<br>*score 3.000* | five<br>*score 1.000* |" in md


def test_markdown_leaves_out_absent_sections():
    md = format_eval_markdown({"policy": "p", "metrics": {"policy": {"distinct_2": 0.5}}})
    assert md.startswith("# Eval: p\n") and "| distinct-2 | 0.500 |" in md
    for title in ("## Win rate", "## LLM judge", "## Refusals", "## Sycophancy", "## Samples"):
        assert title not in md


def test_a_two_turn_conversation_as_the_judge_sees_it():
    turns = ["Write a line about rain.", "Now make it sad."]
    assert conversation_request(turns).endswith("\n[turn 1] Write a line about rain.\n[turn 2] Now make it sad.")
    assert conversation_request(turns).startswith("(A conversation of 2 user turns.")
    assert conversation_answer(turns, ["Rain taps.", "Rain weeps."]) == (
        "[turn 1] user: Write a line about rain.\nassistant: Rain taps.\n\n[turn 2] user: Now make it sad.\nassistant: Rain weeps.")
