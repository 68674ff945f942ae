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
