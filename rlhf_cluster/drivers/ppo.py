"""The PPO family: rollout → scoring → advantages → updates → weight sync.

One :class:`PPOStep` per step; the estimator registry decides GAE (with a critic) or a
critic-free estimator (GRPO, RLOO, REINFORCE++). The four scoring calls run concurrently,
and so do the two updates. The loop, evaluation and checkpoints are
:class:`~rlhf_cluster.drivers.rl.RLRun`'s.
"""

from __future__ import annotations

import time

import torch

from rlhf_cluster.algos.advantages import get_advantage_estimator
from rlhf_cluster.algos.core import kl_penalty, masked_mean, masked_whiten, token_level_rewards
from rlhf_cluster.algos.kl_controllers import KL_CONTROLLERS
from rlhf_cluster.algos.ppo import explained_variance
from rlhf_cluster.cluster.actors import CriticActor, PolicyActor, ReferenceActor
from rlhf_cluster.cluster.groups import mean_stats, train_tokens_per_second
from rlhf_cluster.config import RunConfig
from rlhf_cluster.drivers.common import skip_reason
from rlhf_cluster.drivers.rl import Generation, RLRun, run_rl
from rlhf_cluster.experience import Experience, Rollout


class PPOStep:
    """generate → score (reward ∥ reference ∥ old log-probs ∥ values) → advantages → update policy ∥ critic → sync."""

    trained = ("policy", "critic")

    def __init__(self, cfg: RunConfig):
        a = cfg.algorithm
        self.a, self.n = a, cfg.rollout.n_samples_per_prompt
        self.estimator = get_advantage_estimator(a.advantage_estimator)
        ctl = KL_CONTROLLERS[a.kl_controller]
        self.kl_ctl = ctl(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_controller == "adaptive" else ctl(a.kl_coef)
        self.coef = self.kl_ctl.value
        self.kl_in_loss = a.uses_kl and a.kl_penalty == "loss"
        self.kl_in_reward = a.uses_kl and a.kl_penalty == "reward"
        # One mini-batch per epoch: the update's first forward runs before any optimizer step, so it gives the old
        # log-probs (for every epoch), unless the KL in the reward needs them before the advantages.
        self.off_policy = a.off_policy_steps == 1
        self.reuse_old = (cfg.schedule.prompts_per_step * self.n == a.mini_batch_size
                          and not self.kl_in_reward and not self.off_policy)
        self.ahead: Generation | None = None  # off_policy_steps=1: the next step's samples, in flight

    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    # ------------------------------------------------------------------ phases
    def score(self, run: RLRun, rollout: Rollout) -> Experience:
        """Reward, reference log-probs, old log-probs and values, concurrently (the roles split the CPUs); each role
        gets only the token ids (or, for a text reward, only the text). Old log-probs are skipped when the update
        is on-policy, reference log-probs when there is no KL term."""
        R, exp = run.roles, rollout.exp
        seqs = exp.only()
        with R.sharing("reference", "critic", *(() if self.reuse_old else ("policy",)),
                       *(() if run.reward_needs_text else ("reward",))):
            ref = R.reference.shard(ReferenceActor.logprobs, seqs, what="reference log-probs") if R.reference else None
            rew = run.rewards(rollout)
            old = None if self.reuse_old else R.policy.shard(PolicyActor.logprobs, seqs, what="old log-probs")
            val = R.critic.shard(CriticActor.values, seqs, what="values") if R.critic else None
        exp.scores = rew.cat()
        if ref is not None:
            exp.ref_logprobs = ref.cat()
        if old is not None:
            exp.old_logprobs = old.cat()
        if val is not None:
            exp.values = val.cat() * exp.action_mask
        return exp

    @staticmethod
    def logprob_mismatch(exp: Experience) -> dict:
        """|log π_trainer − log π_engine| on the sampled tokens: the policy that trains and the engine that
        sampled must agree (up to numerics) once weights are synced; a jump means a broken sync or sampler.
        (On-policy updates measure it in the update's own forward instead.)"""
        if exp.old_logprobs is None:
            return {}
        diff = (exp.old_logprobs - exp.rollout_logprobs).abs() * exp.action_mask
        return {"rollout/logprob_mismatch": (diff.sum() / exp.action_mask.sum().clamp(min=1)).item(),
                "rollout/logprob_mismatch_max": diff.max().item()}

    def advantages(self, exp: Experience) -> dict:
        """Per-token rewards (with the KL penalty when it goes in the reward), then the configured estimator."""
        a, mask = self.a, exp.action_mask
        self.coef = self.kl_ctl.value  # this step's β, in the reward or the loss (the controller then moves on)
        stats: dict = {"kl/coef": self.coef}
        kl = torch.zeros_like(mask, dtype=torch.float32)
        if exp.ref_logprobs is not None:  # measured on the sampled tokens whatever the placement
            behaviour = exp.old_logprobs if exp.old_logprobs is not None else exp.rollout_logprobs
            kl = kl_penalty(behaviour, exp.ref_logprobs, a.kl_estimator) * mask
            kl_seq = kl.sum(-1).mean().item()
            stats.update({"kl/ref_per_token": masked_mean(kl, mask).item(), "kl/ref_per_seq": kl_seq})
            self.kl_ctl.update(kl_seq, exp.batch_size)
        exp.token_rewards = token_level_rewards(exp.scores, kl, mask, self.coef if self.kl_in_reward else 0.0)
        adv, ret = self.estimator.fn(exp.token_rewards, mask, values=exp.values, group_size=self.n, gamma=a.gamma, lam=a.lam,
                                     std_eps=a.group_std_eps)
        exp.advantages = masked_whiten(adv, mask) if self.estimator.whiten else adv
        exp.returns = ret
        if exp.values is not None:
            stats["critic/explained_var"] = explained_variance(exp.values, ret, mask).item()
            stats["critic/values_mean"] = masked_mean(exp.values, mask).item()
        return stats

    def importance_weights(self, run: RLRun, exp: Experience, rollout: Rollout) -> dict:
        """Off-policy steps: the samples came from the engine's older weights, so each token's advantage is
        weighted by the truncated importance ratio min(π_θ/π_engine, tis_cap) (TIS; the clipped surrogate is
        linear in the advantage, so this is the per-token loss weighted)."""
        mask = exp.action_mask
        w = ((exp.old_logprobs - exp.rollout_logprobs) * mask).exp().clamp(max=self.a.tis_cap)
        exp.advantages = exp.advantages * w
        return {"rollout/staleness": float(run.weights_version - rollout.weights_version),
                "rollout/tis_weight_mean": masked_mean(w, mask).item(),
                "rollout/tis_capped_frac": masked_mean((w >= self.a.tis_cap).float(), mask).item()}

    def update(self, run: RLRun, exp: Experience) -> dict:
        """Policy and critic updates, concurrently, each rank on its contiguous shard (inside the caller's
        ``roles.sharing`` block, which says what else runs meanwhile)."""
        a, R = self.a, run.roles
        policy_rows = exp.only("advantages", "rollout_logprobs" if self.reuse_old else "old_logprobs",
                               *(("ref_logprobs",) if self.kl_in_loss else ()))
        p = R.policy.shard(PolicyActor.update, policy_rows, objective="ppo",
                           epochs=a.ppo_epochs, clip_eps_low=a.clip_eps_low, clip_eps_high=a.clip_eps_high,
                           policy_loss=a.policy_loss, policy_loss_params=a.policy_loss_params,
                           loss_agg_mode=a.loss_agg_mode, entropy_coef=a.entropy_coef,
                           kl_coef=self.coef if self.kl_in_loss else 0.0, kl_estimator=a.kl_estimator,
                           what="policy update")
        c = R.critic.shard(CriticActor.update, exp.only("values", "returns"), objective="value", epochs=a.ppo_epochs,
                           value_clip=a.value_clip, what="critic update") if R.critic else None
        p_stats = p.get()
        out = {**mean_stats(p_stats, "actor/"), "tps/train_policy": train_tokens_per_second(p_stats),
               "actor/old_logprobs_reused": float(self.reuse_old)}
        skipped = [skip_reason(p_stats, "policy")]
        if "actor/logprob_mismatch" in out:
            out["rollout/logprob_mismatch"] = out.pop("actor/logprob_mismatch")
        if c is not None:
            c_stats = c.get()
            out.update({**mean_stats(c_stats, "critic/"), "tps/train_critic": train_tokens_per_second(c_stats)})
            skipped.append(skip_reason(c_stats, "critic"))
        if any(skipped):
            out["skip_reason"] = "; ".join(r for r in skipped if r)
        return out

    # ------------------------------------------------------------------ one step
    def __call__(self, run: RLRun, prompts: list, seed: int) -> dict:
        t = time.perf_counter()
        ahead, self.ahead = self.ahead, None  # off-policy: sampled during the previous step's update
        if ahead is not None and any(a is not b for a, b in zip(ahead.prompts, prompts, strict=True)):
            raise RuntimeError("the samples generated ahead are for other prompts than this step's")
        rollout = run.finish_generation(ahead) if ahead is not None else run.generate(prompts, self.n, seed)
        t_gen = time.perf_counter() - t

        t = time.perf_counter()
        exp = self.score(run, rollout)
        run.finite_rewards(exp.scores, rollout)  # NaN/inf: the step is skipped, nothing trained on it
        t_score = time.perf_counter() - t

        t = time.perf_counter()
        adv_stats = self.advantages(exp)
        if self.off_policy:
            adv_stats.update(self.importance_weights(run, exp, rollout))
        t_adv = time.perf_counter() - t

        t = time.perf_counter()
        nxt = run.upcoming() if self.off_policy else None
        with run.roles.sharing("policy", "critic", *(("rollout",) if nxt else ())):
            if nxt is not None:  # the engines sample the next step (with the weights they hold) while the trainers update
                self.ahead = run.start_generation(nxt[0], self.n, nxt[1])
            upd_stats = self.update(run, exp)
        t_train = time.perf_counter() - t

        t = time.perf_counter()
        run.sync_weights()
        t_sync = time.perf_counter() - t

        return {
            "reward/mean": exp.scores.mean().item(),
            "reward/std": exp.scores.std().item() if exp.batch_size > 1 else 0.0,
            **adv_stats,
            **self.logprob_mismatch(exp),
            **run.sample_metrics(rollout, exp.scores),
            **upd_stats,
            "response/length_mean": exp.action_mask.sum(-1).mean().item(),
            "response/truncated_frac": rollout.truncated_frac,
            "time/generation": t_gen,
            "time/scoring": t_score,
            "time/advantages": t_adv,
            "time/training": t_train,
            "time/sync": t_sync,
            "tps/generation": rollout.gen_tokens / max(rollout.gen_seconds, 1e-9),  # the engines' rate, not the wait
            "tps/scoring": int(exp.attention_mask.sum()) / max(t_score, 1e-9),
            "tokens/generated": rollout.gen_tokens,
        }


def run_ppo(cfg: RunConfig, resume: bool = False, log=print) -> dict:
    """PPO and critic-free RL on the configured roles. Returns a summary dict."""
    return run_rl(cfg, PPOStep(cfg), resume=resume, log=log)
