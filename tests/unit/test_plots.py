"""The figures a run writes: what each method is judged by, training series as lines, held-out ones as points."""

import matplotlib.pyplot as plt

from rlhf_cluster.drivers.common import RL_PANELS, offline_panels, panel_figure, plot_panels


def test_rl_panels_show_reward_with_its_spread_kl_and_length_and_evals_as_points(tmp_path):
    metrics = [{"step": 0, "eval/reward_mean": 0.1}]
    metrics += [{"step": s, "reward/mean": 0.1 * s, "reward/std": 0.05, "kl/ref_per_token": 0.01 * s,
                 "response/length_mean": 10 + s} for s in range(1, 6)]
    metrics[-1]["eval/reward_mean"] = 0.6
    fig = panel_figure(metrics, RL_PANELS, "ppo")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["reward", "KL to the reference, per token", "response length (tokens)"]  # no entropy logged
    reward = fig.axes[0]
    styles = {line.get_label(): line.get_linestyle() for line in reward.get_lines()}
    assert styles == {"reward/mean": "-", "eval/reward_mean (held-out)": "None"}  # two evals are two points, no line
    eval_line = [line for line in reward.get_lines() if line.get_label().startswith("eval/")][0]
    assert list(eval_line.get_xdata()) == [0, 5] and list(eval_line.get_ydata()) == [0.1, 0.6]
    assert len(reward.collections) == 1  # the ± reward/std band
    plt.close(fig)
    assert plot_panels(metrics, RL_PANELS, tmp_path / "r.png", "ppo").stat().st_size > 1000


def test_dpo_family_panels_put_held_out_accuracy_and_margin_next_to_the_loss():
    panels = offline_panels(("accuracy", "reward_margin", "loss"))
    assert panels == [("loss", ("train/loss", "eval/loss")), ("accuracy", ("train/accuracy", "eval/accuracy")),
                      ("reward_margin", ("train/reward_margin", "eval/reward_margin"))]
    metrics = [{"step": 0, "eval/loss": 0.69, "eval/accuracy": 0.5, "eval/reward_margin": 0.0}]
    metrics += [{"step": s, "train/loss": 0.7 - 0.1 * s, "train/accuracy": 0.5 + 0.1 * s, "train/reward_margin": 0.1 * s}
                for s in (1, 2)]
    metrics[-1].update({"eval/loss": 0.5, "eval/accuracy": 0.75, "eval/reward_margin": 0.3})
    fig = panel_figure(metrics, panels, "pairwise")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "reward_margin"]
    for ax in fig.axes:
        assert sorted(line.get_linestyle() for line in ax.get_lines()) == ["-", "None"]
    plt.close(fig)
