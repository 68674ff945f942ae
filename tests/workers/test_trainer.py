"""The policy trainer in this process: the PPO objective's on-policy and KL-in-loss paths on a real DeepSpeed engine."""

import pytest
import torch
from sync_check import random_batch

from rlhf_cluster.workers.trainer import PolicyTrainer

PPO = dict(objective="ppo", epochs=1, capture_grads=True, clip_eps_low=0.2, clip_eps_high=0.2, policy_loss="vanilla",
           policy_loss_params={}, loss_agg_mode="token_mean", entropy_coef=0.0)


def _trainer(model_dir):
    # One mini-batch of all 8 rows: an exactly on-policy update.
    return PolicyTrainer(model_path=str(model_dir), zero_stage=0, micro_batch_size=4, mini_batch_size=8,
                         learning_rate=1e-2, seed=0)


def test_on_policy_update_reuses_its_forward_and_matches_the_separate_old_logprob_pass(tiny_model_dir):
    """Without old log-probs the update takes its own forward's, detached: the same loss, gradients and step as
    an update given the old log-probs from a separate forward; the engine's log-probs give the mismatch stat."""
    exp = random_batch(seed=3)
    a, b = _trainer(tiny_model_dir), _trainer(tiny_model_dir)
    old = a.logprobs(exp)
    exp.rollout_logprobs = old + 0.01
    given = a.update(_with(exp, old_logprobs=old), **PPO)
    reused = b.update(_with(exp, rollout_logprobs=exp.rollout_logprobs), **PPO)
    assert reused["loss"] == pytest.approx(given["loss"], rel=1e-6, abs=1e-7)
    assert reused["grad_norm"] == pytest.approx(given["grad_norm"], rel=1e-5) and given["grad_norm"] > 0  # measured at ZeRO 0
    assert reused["ratio_mean"] == pytest.approx(1.0)
    assert reused["logprob_mismatch"] == pytest.approx(0.01, rel=1e-4)
    for name, g in given["grads"].items():
        assert torch.allclose(g, reused["grads"][name], rtol=1e-5, atol=1e-7), name
    assert torch.allclose(a.logprobs(exp), b.logprobs(exp), atol=1e-6)  # the same step was taken


def test_several_epochs_over_one_mini_batch_take_the_old_logprobs_from_the_first_forward(tiny_model_dir):
    """Two epochs of one mini-batch without old log-probs: the first epoch's forward (before any step) serves as
    π_θold for the second, so both optimizer steps match an update given them from a separate forward."""
    exp = random_batch(seed=5)
    a, b = _trainer(tiny_model_dir), _trainer(tiny_model_dir)
    old = a.logprobs(exp)
    two = {**PPO, "epochs": 2, "capture_grads": False}
    given = a.update(_with(exp, old_logprobs=old), **two)
    reused = b.update(_with(exp, rollout_logprobs=old), **two)
    assert given["optimizer_steps"] == reused["optimizer_steps"] == 2
    assert reused["loss"] == pytest.approx(given["loss"], rel=1e-5, abs=1e-7)
    assert reused["ratio_mean"] == pytest.approx(given["ratio_mean"], rel=1e-6) and given["ratio_mean"] != 1.0  # epoch 2 moved
    assert torch.allclose(a.logprobs(exp), b.logprobs(exp), atol=1e-5)  # the same two steps were taken
    assert not torch.allclose(a.logprobs(exp), old, atol=1e-3)


def test_an_update_without_old_logprobs_over_several_mini_batches_is_refused(tiny_model_dir):
    exp = random_batch(seed=6)
    t = PolicyTrainer(model_path=str(tiny_model_dir), zero_stage=0, micro_batch_size=4, mini_batch_size=4,
                      learning_rate=1e-2, seed=0)
    with pytest.raises(ValueError, match="one mini-batch"):
        t.update(_with(exp, rollout_logprobs=t.logprobs(exp)), **PPO)


def test_kl_in_the_loss_adds_beta_times_the_kl_term(tiny_model_dir):
    exp = random_batch(seed=4)
    t = _trainer(tiny_model_dir)
    old = t.logprobs(exp)
    ref = old - 0.3 * torch.rand(old.shape, generator=torch.Generator().manual_seed(0))
    hp = {k: v for k, v in PPO.items() if k not in ("objective", "epochs", "capture_grads")}
    free = t.evaluate(_with(exp, old_logprobs=old), "ppo", **hp)
    with_kl = t.evaluate(_with(exp, old_logprobs=old, ref_logprobs=ref), "ppo", kl_coef=0.5, kl_estimator="k3", **hp)
    assert with_kl["kl_loss"] > 0
    assert with_kl["loss"] == pytest.approx(free["loss"] + 0.5 * with_kl["kl_loss"], rel=1e-5)


def _with(exp, **fields):
    """The ids, masks and advantages, plus ``fields``: what the driver sends the policy."""
    out = exp.only("advantages")
    for k, v in fields.items():
        setattr(out, k, v)
    return out


def _trainer_at(model_dir, zero_stage):
    return PolicyTrainer(model_path=str(model_dir), zero_stage=zero_stage, micro_batch_size=4, mini_batch_size=8,
                         learning_rate=1e-2, seed=0)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_non_finite_loss_skips_the_step_and_the_next_update_is_as_if_it_never_happened(tiny_model_dir, zero_stage):
    """A NaN advantage (e.g. a reward function that returned NaN) makes the loss NaN: the optimizer step is skipped
    on every rank (stage 0 by the trainer's own check, ZeRO by DeepSpeed's), the weights, Adam's moments and the
    learning-rate schedule stay as they were, so a clean update afterwards equals a fresh trainer's first one."""
    exp, clean = random_batch(seed=5), random_batch(seed=7)
    t = _trainer_at(tiny_model_dir, zero_stage)
    before = t.logprobs(exp)
    bad = _with(exp, rollout_logprobs=before)
    bad.advantages[3, 2] = float("nan")
    out = t.update(bad, **PPO)
    assert out["skipped_steps"] == out["optimizer_steps"] == 1
    assert "the ppo loss is nan (micro-batch 1 of 2)" in out["skip_reason"]
    assert torch.equal(t.logprobs(exp), before)
    old = t.logprobs(clean)
    ours = t.update(_with(clean, rollout_logprobs=old), **{**PPO, "capture_grads": False})
    assert ours["skipped_steps"] == 0
    fresh = _trainer_at(tiny_model_dir, zero_stage)
    theirs = fresh.update(_with(clean, rollout_logprobs=old), **{**PPO, "capture_grads": False})
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    torch.testing.assert_close(t.logprobs(clean), fresh.logprobs(clean), rtol=1e-5, atol=1e-5)


def test_a_non_finite_gradient_skips_the_step(tiny_model_dir):
    """A finite loss whose gradient is NaN (here forced by a hook): at ZeRO stage 0 DeepSpeed measures no norm and
    its clipping lets NaN through, so the trainer measures the norm itself and skips the optimizer step."""
    exp = random_batch(seed=6)
    t = _trainer(tiny_model_dir)
    before = t.logprobs(exp)
    next(t.engine.module.parameters()).register_hook(lambda g: g * float("nan"))
    out = t.update(_with(exp, rollout_logprobs=before), **PPO)
    assert out["skipped_steps"] == 1 and "the gradient norm is not finite" in out["skip_reason"]
    assert "grad_norm" not in out and torch.isfinite(torch.tensor(out["loss"]))
    assert torch.equal(t.logprobs(exp), before)


def test_a_trainer_built_while_a_zero3_trainer_lives_loads_its_model_whole(tiny_model_dir):
    """transformers keeps the last ZeRO-3 config process-wide; a ZeRO-2 trainer built after a ZeRO-3 one in the same
    process (one process, several trainers or pipeline stages) must not load its model partitioned."""
    linear = torch.nn.functional.linear
    z3 = _trainer_at(tiny_model_dir, 3)
    assert all(hasattr(p, "ds_id") for p in z3.engine.module.parameters())  # partitioned as it loaded
    assert torch.nn.functional.linear is linear  # zero.Init's process-wide linear was put back
    z2 = _trainer_at(tiny_model_dir, 2)
    assert not any(hasattr(p, "ds_id") for p in z2.engine.module.parameters())
    assert all(p.numel() > 0 for p in z2.engine.module.parameters())
    assert z2.logprobs(random_batch(seed=5)).shape == random_batch(seed=5).action_mask.shape
