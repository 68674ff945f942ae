"""Online (iterative) DPO on the PPO actors: sample k, rank by the reward, pair best and worst.

Each iteration:
    prompts → vLLM samples k responses each → reward scores them
    → pair the best and the worst response of every prompt (ties carry no preference: counted, not trained on)
    → reference log-probs of the pairs → DPO-family update of the policy → weight sync to the engines
The rollout, reward, reference and policy actors, the sampler, checkpoints and evaluation
are those of :class:`~rlhf_cluster.drivers.ppo.PPORun`; only the step differs.
"""

from __future__ import annotations

import time

import torch

from rlhf_cluster.config import RunConfig
from rlhf_cluster.drivers.ppo import PPORun, _split, run_ppo
from rlhf_cluster.experience import PairBatch, build_experience


class OnlineDPORun(PPORun):
    def make_pairs(self, exp, scores: torch.Tensor, k: int) -> tuple[PairBatch | None, dict]:
        """Best vs worst of each prompt's k samples, trimmed to whole mini-batches (the rest reported)."""
        B = scores.shape[0] // k
        grouped = scores.view(B, k)
        best, worst = grouped.argmax(-1), grouped.argmin(-1)
        keep = (grouped.max(-1).values > grouped.min(-1).values).nonzero().flatten()
        mini = self.cfg.algorithm.mini_batch_size
        usable = (len(keep) // mini) * mini
        stats = {"pairs/ties": B - len(keep), "pairs/trained": usable, "pairs/untrained_remainder": len(keep) - usable,
                 "pairs/score_gap": (grouped.max(-1).values - grouped.min(-1).values)[keep].mean().item() if len(keep) else 0.0}
        if usable == 0:
            return None, stats
        keep = keep[:usable]
        rows = torch.stack([keep * k + best[keep], keep * k + worst[keep]], -1).flatten()  # chosen, rejected interleaved
        sel = exp.select(rows)
        P = exp.input_ids.shape[1] - exp.num_actions
        prompts = [ids[m.bool()].tolist() for ids, m in zip(sel.input_ids[:, :P], sel.attention_mask[:, :P])]
        responses = [ids[m.bool()].tolist() for ids, m in zip(sel.input_ids[:, P:], sel.action_mask)]
        return PairBatch(build_experience(prompts, responses, self.tokenizer.pad_token_id)), stats

    def reference_logps(self, pairs: PairBatch) -> torch.Tensor:
        R = self.roles
        parts = _split(pairs.seqs.batch_size, len(R.reference))
        return torch.cat(R.reference.get([a.sequence_logps.remote(pairs.seqs.select(s)) for a, s in zip(R.reference.actors, parts)],
                                         "reference log-probs"))

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        cfg, p = self.cfg, self.cfg.preference
        k = cfg.rollout.n_samples_per_prompt
        prompts = self.sampler.next()
        seed = (cfg.seed * 1_000_003 + self.step * 65_537) % 2**31

        t = time.perf_counter()
        exp, prompt_texts, responses, gen_stats = self.generate(prompts, k, seed)
        t_gen = time.perf_counter() - t

        t = time.perf_counter()
        R = self.roles
        parts = _split(exp.batch_size, len(R.reward))
        scores = torch.cat(R.reward.get([a.score.remote(exp.select(s), prompt_texts[s], responses[s])
                                         for a, s in zip(R.reward.actors, parts)], "reward"))
        pairs, pair_stats = self.make_pairs(exp, scores, k)
        if pairs is not None and R.reference is not None:
            pairs.ref_logps = self.reference_logps(pairs)
        t_score = time.perf_counter() - t

        t = time.perf_counter()
        upd: dict = {}
        if pairs is not None:
            shards = [pairs.select(s) for s in _split(pairs.batch_size, len(R.policy))]
            stats = R.policy.get([a.update.remote(sh, "pairwise", epochs=p.steps_per_iteration, loss=p.loss, beta=p.beta,
                                                  label_smoothing=p.label_smoothing, simpo_gamma=p.simpo_gamma)
                                  for a, sh in zip(R.policy.actors, shards)], "policy update")
            upd = {f"actor/{key}": sum(s[key] for s in stats) / len(stats) for key in stats[0]
                   if key not in ("train_tokens", "train_seconds")}
            upd["tps/train_policy"] = sum(s["train_tokens"] for s in stats) / max(max(s["train_seconds"] for s in stats), 1e-9)
        t_train = time.perf_counter() - t

        t = time.perf_counter()
        if pairs is not None:
            self.sync_weights()
        t_sync = time.perf_counter() - t

        self.step += 1
        step_time = time.perf_counter() - t0
        return {
            "reward/mean": scores.mean().item(), "reward/std": scores.std().item(), **pair_stats, **upd,
            "response/length_mean": exp.action_mask.sum(-1).mean().item(),
            "time/generation": t_gen, "time/scoring": t_score, "time/training": t_train, "time/sync": t_sync,
            "time/other": step_time - (t_gen + t_score + t_train + t_sync), "time/step": step_time,
            "tps/generation": gen_stats["gen_tokens"] / max(t_gen, 1e-9),
        }


def run_online_dpo(cfg: RunConfig, resume: bool = False, log=print) -> dict:
    return run_ppo(cfg, resume=resume, log=log, run_cls=OnlineDPORun)
