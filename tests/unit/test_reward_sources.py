"""Reward sources: a function gets the dataset fields it names; an HTTP server is posted batches with a
timeout and retries (a real server started here); every bad answer is named, never accepted."""

from __future__ import annotations

import time

import pytest
import torch
from reward_server import RewardServer

from rlhf_cluster.config import ConfigError, RunConfig, preflight
from rlhf_cluster.rewards import exact_answer
from rlhf_cluster.workers.reward_sources import (
    FunctionReward,
    HttpReward,
    RewardError,
    RewardInputs,
    as_rewards,
    required_fields,
)


def inputs(responses, extras=None):
    return RewardInputs(prompts=[f"p{i}" for i in range(len(responses))], responses=list(responses), extras=extras)


# ----------------------------------------------------------------------------- functions


def test_exact_answer_reads_the_first_number():
    assert exact_answer(["", "", "", "", ""], ["7", " 7 apples", "it is 12, not 7", "seven", "7.0"],
                        answer=["7", "7", "7", "7", 7]) == [1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.fixture
def reward_module(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def by_answer(prompts, responses, answer):\n"
        "    return [float(r == a) for r, a in zip(responses, answer)]\n"
        "def every_field(prompts, responses, **fields):\n"
        "    return [float(len(fields)) + (fields['bonus'][i] or 0) for i in range(len(responses))]\n"
        "def with_default(prompts, responses, weight=None):\n"
        "    return [2.0] * len(responses) if weight is None else [float(w) for w in weight]\n"
        "def plain(prompts, responses):\n"
        "    return [1.0] * len(responses)\n"
        "def returns_dict(prompts, responses):\n"
        "    return {r: 1.0 for r in responses}\n"
        "def returns_bools(prompts, responses):\n"
        "    return [True for r in responses]\n"
        "def one_arg(responses):\n"
        "    return [0.0] * len(responses)\n")
    return tmp_path


def test_function_gets_the_dataset_fields_it_names(reward_module):
    fn = FunctionReward("my_rewards:by_answer", str(reward_module))
    got = fn.score(inputs(["4", "5"], [{"answer": "4", "other": 1}, {"answer": "4", "other": 2}]))
    assert got.tolist() == [1.0, 0.0]
    assert required_fields(fn.fn) == ["answer"]


def test_kwargs_function_gets_every_field_missing_ones_as_none(reward_module):
    fn = FunctionReward("my_rewards:every_field", str(reward_module))
    got = fn.score(inputs(["a", "b"], [{"answer": "4", "bonus": 10}, {"answer": "5"}]))
    assert got.tolist() == [12.0, 2.0]  # two fields (answer, bonus); row 2 has no bonus -> None


def test_optional_parameter_keeps_its_default_and_plain_functions_still_work(reward_module):
    assert FunctionReward("my_rewards:with_default", str(reward_module)).score(inputs(["a"], [{}])).tolist() == [2.0]
    assert FunctionReward("my_rewards:with_default", str(reward_module)).score(inputs(["a"], [{"weight": 3.0}])).tolist() == [3.0]
    assert FunctionReward("my_rewards:plain", str(reward_module)).score(inputs(["a", "b"])).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("name, message", [("returns_dict", "got dict"), ("returns_bools", "not True/False")])
def test_function_output_that_is_not_numbers_is_named(reward_module, name, message):
    with pytest.raises(RewardError, match=rf"reward function my_rewards:{name}.*{message}"):
        FunctionReward(f"my_rewards:{name}", str(reward_module)).score(inputs(["a", "b"]))


@pytest.mark.parametrize("out, message", [
    ("abc", "got str"), ([1.0], "returned 1 values for 2"), ([1.0, float("nan")], "non-finite reward \\(nan\\) for response 1"),
    ([1.0, "2"], "returned str '2' for response 1"), (5.0, "got float"),
])
def test_as_rewards_refuses_anything_but_one_number_per_row(out, message):
    with pytest.raises(RewardError, match=message):
        as_rewards(out, 2, "src")


def test_as_rewards_accepts_lists_tuples_arrays_and_tensors():
    import numpy as np

    for out in ([1, 2.5], (1, 2.5), np.array([1, 2.5]), torch.tensor([1, 2.5])):
        assert as_rewards(out, 2, "src").tolist() == [1.0, 2.5]


def test_non_finite_rewards_pass_only_for_training_where_the_driver_skips_their_step():
    out = as_rewards([1.0, float("nan"), float("inf")], 3, "src", allow_nonfinite=True)
    assert out[0] == 1.0 and out[1].isnan() and out[2].isinf()


def test_function_with_one_parameter_is_refused_before_any_actor(reward_module, tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "x"}\n')
    cfg = RunConfig(policy={"model_name_or_path": str(tiny_model_dir)}, data={"train_path": str(data)},
                    reward={"function": "my_rewards:one_arg", "code_dir": str(reward_module)})
    with pytest.raises(ConfigError, match=r"my_rewards:one_arg.*fn\(prompts, responses, \*\*fields\)"):
        preflight(cfg)


def test_missing_dataset_field_is_named_with_its_row(reward_module, tiny_model_dir, tmp_path):
    from rlhf_cluster.drivers.rl import load_prompts
    from rlhf_cluster.models import load_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "solution": "4"}\n')  # row 2, line 3
    cfg = RunConfig(policy={"model_name_or_path": str(tiny_model_dir)}, data={"train_path": str(data)},
                    reward={"function": "my_rewards:by_answer", "code_dir": str(reward_module)})
    with pytest.raises(ConfigError, match=r"'answer'.*line 3 of .*d.jsonl has none.*'solution'"):
        load_prompts(cfg, load_tokenizer(str(tiny_model_dir)), log=lambda _: None)


# ----------------------------------------------------------------------------- http


@pytest.fixture
def server():
    s = RewardServer()
    yield s
    s.close()


def test_http_posts_text_and_extras_in_batches(server):
    src = HttpReward(server.url + "/len", batch_size=2)
    got = src.score(inputs(["a", "bb", "ccc"], [{"bonus": 10}, {}, {"bonus": 1}]))
    assert got.tolist() == [11.0, 2.0, 4.0]
    assert [len(body["responses"]) for _, body, _ in server.requests] == [2, 1]
    assert server.requests[0][1]["prompts"] == ["p0", "p1"] and server.requests[0][1]["extras"] == [{"bonus": 10}, {}]


def test_http_retries_busy_answers_then_succeeds(server):
    src = HttpReward(server.url + "/flaky", max_retries=2, backoff_s=0.01)
    assert src.score(inputs(["abc"])).tolist() == [3.0]
    assert len(server.requests) == 3


def test_http_gives_up_naming_the_url_and_the_last_failure(server):
    src = HttpReward(server.url + "/down", max_retries=1, backoff_s=0.01)
    with pytest.raises(RewardError, match=rf"reward server {server.url}/down: HTTP 500 boom \(after 2 attempts"):
        src.score(inputs(["a"]))


def test_http_timeout_is_named(server):
    src = HttpReward(server.url + "/slow", timeout_s=0.3, max_retries=0)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"/slow: no answer within 0.3 s"):
        src.score(inputs(["a"]))
    assert time.perf_counter() - t0 < 1.5


def test_http_client_errors_and_bad_bodies_are_not_retried(server, monkeypatch):
    with pytest.raises(RewardError, match=r"/auth answered HTTP 401: who are you"):
        HttpReward(server.url + "/auth", max_retries=3).score(inputs(["a"]))
    assert len(server.requests) == 1
    with pytest.raises(RewardError, match=r"/bad must answer JSON .*<html>"):
        HttpReward(server.url + "/bad").score(inputs(["a"]))
    monkeypatch.setenv("MY_REWARD_KEY", "s3cret")
    assert HttpReward(server.url + "/auth", api_key_env="MY_REWARD_KEY").score(inputs(["ab"])).tolist() == [2.0]
    with pytest.raises(RewardError, match="NOPE_KEY"):
        HttpReward(server.url + "/auth", api_key_env="NOPE_KEY")


def test_unreachable_reward_server_is_refused_before_any_actor(tiny_model_dir, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        data = tmp_path / "d.jsonl"
        data.write_text('{"prompt": "x"}\n')
        cfg = RunConfig(policy={"model_name_or_path": str(tiny_model_dir)}, data={"train_path": str(data)},
                        reward={"url": f"http://127.0.0.1:{port}/score"})
        assert cfg.reward.kind == "http"
        with pytest.raises(ConfigError, match=rf"reward.url='http://127.0.0.1:{port}/score': cannot connect"):
            preflight(cfg)


@pytest.mark.parametrize("reward, message", [
    ({"function": "a:b", "url": "http://x"}, "set only one of reward.function, reward.url"),
    ({"kind": "http", "function": "a:b"}, "reward.kind=http needs reward.url, but reward.function is set"),
    ({"url": "localhost:8000"}, "must start with http"),
])
def test_reward_source_config_errors(reward, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        RunConfig(policy={"model_name_or_path": "m"}, data={"train_path": "d"}, reward=reward)


def test_no_reward_source_names_all_three(tmp_path):
    with pytest.raises(ValueError, match="reward.model_name_or_path.*reward.function.*reward.url"):
        RunConfig(policy={"model_name_or_path": "m"}, data={"train_path": "d"})


@pytest.mark.parametrize("name, message", [
    ("as_dict", r"reward function tried_rewards:as_dict must return one number per response .*got dict \(tried on line 1 "),
    ("crashes", r"tried_rewards:crashes' raised IndexError: .* when tried on line 1 of .*d.jsonl with an empty response"),
])
def test_the_reward_function_is_tried_on_one_row_before_any_actor(tiny_model_dir, tmp_path, name, message):
    from rlhf_cluster.drivers.rl import load_prompts
    from rlhf_cluster.models import load_tokenizer

    (tmp_path / "tried_rewards.py").write_text(
        "def as_dict(prompts, responses):\n    return {r: 1.0 for r in responses}\n"
        "def crashes(prompts, responses):\n    return [float(r[0] == 'a') for r in responses]\n")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1="}\n')
    cfg = RunConfig(policy={"model_name_or_path": str(tiny_model_dir)}, data={"train_path": str(data)},
                    reward={"function": f"tried_rewards:{name}", "code_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=message):
        load_prompts(cfg, load_tokenizer(str(tiny_model_dir)), log=lambda _: None)
