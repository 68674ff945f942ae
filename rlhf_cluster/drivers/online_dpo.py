"""Online (iterative) DPO on the PPO actors: sample k, rank by the reward, pair best and worst.

Each iteration:
    prompts → vLLM samples k responses each → reward scores them
    → pair the best and the worst response of every prompt (ties carry no preference: counted, not trained on)
    → reference log-probs of the pairs → DPO-family update of the policy → weight sync to the engines
Rollout, reward, evaluation, checkpoints and the loop are :class:`~rlhf_cluster.drivers.rl.RLRun`'s;
only the step differs from PPO.
"""

from __future__ import annotations

import time

import torch

from rlhf_cluster.cluster.actors import PolicyActor, ReferenceActor
from rlhf_cluster.cluster.groups import mean_stats, train_tokens_per_second
from rlhf_cluster.config import RunConfig
from rlhf_cluster.drivers.common import skip_reason
from rlhf_cluster.drivers.rl import RLRun, run_rl
from rlhf_cluster.experience import Experience, PairBatch


def make_pairs(exp: Experience, scores: torch.Tensor, k: int, mini_batch_size: int) -> tuple[PairBatch | None, dict]:
    """Best vs worst of each prompt's k samples, trimmed to whole mini-batches (the rest reported).

    exp: (B·k, ...) rows grouped by prompt; scores: (B·k,). Returns the pairs (chosen/rejected
    rows interleaved, the experience layout kept) or None when no prompt has a preference.
    """
    B = scores.shape[0] // k
    grouped = scores.view(B, k)
    best, worst = grouped.argmax(-1), grouped.argmin(-1)
    keep = (grouped.max(-1).values > grouped.min(-1).values).nonzero().flatten()
    usable = (len(keep) // mini_batch_size) * mini_batch_size
    stats = {"pairs/ties": B - len(keep), "pairs/trained": usable, "pairs/untrained_remainder": len(keep) - usable,
             "pairs/score_gap": (grouped.max(-1).values - grouped.min(-1).values)[keep].mean().item() if len(keep) else 0.0}
    if usable == 0:
        return None, stats
    keep = keep[:usable]
    rows = torch.stack([keep * k + best[keep], keep * k + worst[keep]], -1).flatten()  # chosen, rejected interleaved
    sel = exp.select(rows)
    return PairBatch(Experience(input_ids=sel.input_ids, attention_mask=sel.attention_mask, action_mask=sel.action_mask)), stats


class OnlineDPOStep:
    trained = ("policy",)

    def __init__(self, cfg: RunConfig):
        self.p, self.k, self.mini = cfg.preference, cfg.rollout.n_samples_per_prompt, cfg.algorithm.mini_batch_size

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(self, run: RLRun, prompts: list, seed: int) -> dict:
        p, R = self.p, run.roles
        t = time.perf_counter()
        rollout = run.generate(prompts, self.k, seed)
        exp = rollout.exp
        t_gen = time.perf_counter() - t

        t = time.perf_counter()
        scores = run.finite_rewards(run.rewards(rollout).cat(), rollout)  # NaN/inf: the step is skipped
        pairs, pair_stats = make_pairs(exp, scores, self.k, self.mini)
        if pairs is not None and R.reference is not None:
            pairs.ref_logps = R.reference.shard(ReferenceActor.sequence_logps, pairs.seqs, what="reference log-probs").cat()
        t_score = time.perf_counter() - t

        t = time.perf_counter()
        upd: dict = {}
        if pairs is not None:
            stats = R.policy.shard(PolicyActor.update, pairs, objective="pairwise", epochs=p.steps_per_iteration, loss=p.loss,
                                   beta=p.beta, loss_params=p.loss_params,
                                   what="policy update").get()
            upd = {**mean_stats(stats, "actor/"), "tps/train_policy": train_tokens_per_second(stats)}
            reason = skip_reason(stats, "policy")
            if reason:
                upd["skip_reason"] = reason
        t_train = time.perf_counter() - t

        t = time.perf_counter()
        if pairs is not None:
            run.sync_weights()
        t_sync = time.perf_counter() - t

        return {
            "reward/mean": scores.mean().item(), "reward/std": scores.std().item(), **pair_stats, **upd,
            **run.sample_metrics(rollout, scores),
            "response/length_mean": exp.action_mask.sum(-1).mean().item(),
            "time/generation": t_gen, "time/scoring": t_score, "time/training": t_train, "time/sync": t_sync,
            "tps/generation": rollout.gen_tokens / max(rollout.gen_seconds, 1e-9),
        }


def run_online_dpo(cfg: RunConfig, resume: bool = False, log=print) -> dict:
    return run_rl(cfg, OnlineDPOStep(cfg), resume=resume, log=log)
