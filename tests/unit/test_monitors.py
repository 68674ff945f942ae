"""In-loop monitors: the statistics by hand, and each failure mode firing (and not) on made-up step metrics."""

import pytest
import torch

from rlhf_cluster.quality.monitors import MonitorConfig, Monitors, distinct_n, pearson, sample_stats


def test_statistics_by_hand():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == 4 / 6
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 3 / 4  # (1,2) twice, (2,3), (2,4)
    assert distinct_n([[1], []], 2) == 1.0
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert pearson(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])) == 0.0
    s = sample_stats([[5, 6], [5, 6, 7, 8]], torch.tensor([0.0, 1.0]))
    assert s["reward/length_corr"] == pytest.approx(1.0) and s["response/distinct_2"] == 3 / 4


def run(monitors, steps):
    return [monitors.check(m) for m in steps]


def healthy(**over):
    return {"response/distinct_2": 0.9, "actor/entropy": 5.0, "kl/ref_per_token": 0.05, "response/length_mean": 10.0,
            "reward/length_corr": 0.1, **over}


def test_a_healthy_run_fires_nothing():
    assert all(f == {} for f in run(Monitors(), [healthy()] * 10))


def test_mode_collapse_fires_when_diversity_halves():
    fired = run(Monitors(MonitorConfig(warmup=2)), [healthy(), healthy(), healthy(**{"response/distinct_2": 0.5}),
                                                    healthy(**{"response/distinct_2": 0.4})])
    assert fired[2] == {} and "mode_collapse" in fired[3] and "0.400 fell below 0.5 of its start (0.900)" in fired[3]["mode_collapse"]


def test_kl_blowup_and_length_hacking():
    fired = run(Monitors(MonitorConfig(warmup=1)), [healthy(), healthy(**{"kl/ref_per_token": 2.0}),
                                                    healthy(**{"reward/length_corr": 0.95, "response/length_mean": 12.0}),
                                                    healthy(**{"reward/length_corr": 0.95, "response/length_mean": 20.0})])
    assert set(fired[1]) == {"kl_blowup"}
    assert fired[2] == {}  # correlated, but the length has not grown enough
    assert set(fired[3]) == {"length_hacking"} and "grew from 10.0 to 20.0 tokens" in fired[3]["length_hacking"]


def test_gold_gap_and_refusal_rate_by_hand():
    s = sample_stats([[5], [6], [7], [8]], torch.tensor([1.0, 1.0, 0.0, 0.0]),
                     texts=["I'm sorry, but I can't help with that.", "Sure, here it is.", "I cannot do that.", "ok"],
                     gold=torch.tensor([0.5, 0.0, 0.0, 0.0]))
    assert s["gold/mean"] == pytest.approx(0.125) and s["gold/gap"] == pytest.approx(0.5 - 0.125)
    assert s["response/refusal_rate"] == 0.5


def test_reward_hacking_fires_when_the_proxy_rises_and_the_gold_does_not():
    def step(proxy, gold):
        return healthy(**{"reward/mean": proxy, "gold/mean": gold})

    fired = run(Monitors(MonitorConfig(warmup=1, hacking_rise=0.1)),
                [step(0.0, 0.0), step(0.3, 0.2), step(0.3, 0.05), step(0.05, -0.5)])
    assert fired[1] == {}  # the gold followed the proxy
    assert set(fired[2]) == {"reward_hacking"} and "rose +0.300" in fired[2]["reward_hacking"] and "+0.050" in fired[2]["reward_hacking"]
    assert fired[3] == {}  # the proxy has not risen enough to call it hacking
    assert run(Monitors(MonitorConfig(warmup=1)), [healthy(**{"reward/mean": 0.0}), healthy(**{"reward/mean": 1.0})]) == [{}, {}]


def test_over_refusal_fires_when_refusals_rise():
    fired = run(Monitors(MonitorConfig(warmup=1, refusal_rise=0.2)),
                [healthy(**{"response/refusal_rate": 0.05}), healthy(**{"response/refusal_rate": 0.15}),
                 healthy(**{"response/refusal_rate": 0.40})])
    assert fired[1] == {} and set(fired[2]) == {"over_refusal"} and "40% of the samples refuse, +35%" in fired[2]["over_refusal"]


def test_probe_monitors_compare_each_evaluation_with_the_one_before_training_and_hold_until_the_next():
    mon = Monitors(MonitorConfig(warmup=1, refusal_rise=0.2, agreement_rise=0.2))
    assert mon.check_eval({"eval/benign_refusal_rate": 0.0, "eval/agreement_rate": 0.125}) == {}  # the baseline
    assert mon.check(healthy()) == {}
    assert mon.check_eval({"eval/benign_refusal_rate": 0.1875, "eval/agreement_rate": 0.3125}) == {}  # +0.19 each
    fired = mon.check_eval({"eval/benign_refusal_rate": 0.25, "eval/agreement_rate": 0.5})
    assert set(fired) == {"over_refusal", "sycophancy"}
    assert "50% of the answers to prompts asserting something false open by agreeing, 12% before" in fired["sycophancy"]
    assert "25% of the answers to benign probe prompts refuse, 0% before" in fired["over_refusal"]
    assert set(mon.check(healthy())) == {"over_refusal", "sycophancy"}  # the steps until the next evaluation
    assert mon.check_eval({"eval/benign_refusal_rate": 0.0, "eval/agreement_rate": 0.125}) == {}
    assert mon.check(healthy()) == {}
    again = Monitors(MonitorConfig(warmup=1))
    again.load_state_dict(mon.state_dict())  # a resumed run keeps the baseline of the evaluation before training
    assert set(again.check_eval({"eval/benign_refusal_rate": 0.5})) == {"over_refusal"}
