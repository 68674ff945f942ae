"""Offline stages on the same actors: SFT, reward-model training, the DPO family and KTO.

A stage is the shared loop below plus its objective (see ``workers/objectives.py``):

    for each mini-batch of examples:            # epochs of shuffled data, nothing dropped
        [reference log-probs, cached or on the fly]
        trainer ranks update on their shards    # one optimizer step
    evaluate on held-out data before, every epoch, and at the end

``OfflineStage`` rows hold what differs per method; ``run_offline`` is the builder step
that reads the config.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cluster.cluster.actors import ReferenceActor, _TrainerShell
from rlhf_cluster.cluster.groups import RoleGroup, mean_stats
from rlhf_cluster.cluster.roles import open_roles
from rlhf_cluster.config import ConfigError, RunConfig, preflight
from rlhf_cluster.data import (
    FeedbackExample,
    PreferenceExample,
    SFTExample,
    build_feedback_examples,
    build_preference_examples,
    build_sft_examples,
    load_rows,
    preference_to_feedback,
)
from rlhf_cluster.drivers.common import (
    BadSteps,
    EpochSampler,
    MetricsSink,
    RunLock,
    offline_panels,
    plot_panels,
    read_metrics,
    skip_reason,
)
from rlhf_cluster.experience import Experience, FeedbackBatch, PairBatch, build_experience
from rlhf_cluster.logs import Progress
from rlhf_cluster.models import load_tokenizer
from rlhf_cluster.stopping import STOP, Terminated

# ----------------------------------------------------------------------------- collation


def collate_sft(examples: list[SFTExample], pad_id: int) -> Experience:
    """Prompt = the tokens before the loss mask starts; the response (loss on it) = the rest."""
    prompts, responses = [], []
    for ex in examples:
        k = ex.loss_mask.index(1) if 1 in ex.loss_mask else len(ex.input_ids)
        prompts.append(ex.input_ids[:k])
        responses.append(ex.input_ids[k:])
    return build_experience(prompts, responses, pad_id)


def collate_pairs(examples: list[PreferenceExample], pad_id: int) -> PairBatch:
    """Rows 2i / 2i+1 are the chosen / rejected response to prompt i."""
    prompts = [ex.prompt_ids for ex in examples for _ in range(2)]
    responses = [r for ex in examples for r in (ex.chosen_ids, ex.rejected_ids)]
    margins = [ex.margin for ex in examples]
    margin = None if all(m is None for m in margins) else torch.tensor([m or 0.0 for m in margins], dtype=torch.float32)
    return PairBatch(build_experience(prompts, responses, pad_id), margin)


def collate_feedback(examples: list[tuple[FeedbackExample, FeedbackExample]], pad_id: int) -> FeedbackBatch:
    """Each item is (example, partner): the partner's completion after the example's prompt is
    the mismatched pair KTO estimates its KL reference point from."""
    seqs = build_experience([e.prompt_ids for e, _ in examples], [e.completion_ids for e, _ in examples], pad_id)
    kl = build_experience([e.prompt_ids for e, _ in examples], [p.completion_ids for _, p in examples], pad_id)
    return FeedbackBatch(seqs, kl, torch.tensor([e.desirable for e, _ in examples]))


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class OfflineStage:
    name: str
    objective: str
    collate: Callable
    output: str  # sub-directory of output_dir holding the trained model
    headline: tuple[str, ...]  # eval metrics reported before/after


SFT = OfflineStage("sft", "sft", collate_sft, "policy", ("loss",))
RM = OfflineStage("rm", "bradley_terry", collate_pairs, "reward_model", ("accuracy", "margin_mean", "loss"))
DPO = OfflineStage("dpo", "pairwise", collate_pairs, "policy", ("accuracy", "reward_margin", "loss"))
KTO = OfflineStage("dpo", "kto", collate_feedback, "policy", ("reward_margin", "chosen_rewards_mean", "rejected_rewards_mean", "loss"))


def stage_for(cfg: RunConfig) -> OfflineStage:
    if cfg.method == "sft":
        return SFT
    if cfg.method == "rm":
        return RM
    return KTO if cfg.preference.loss == "kto" else DPO


def load_stage_data(cfg: RunConfig, stage: OfflineStage, tokenizer, log=print) -> tuple[list, list]:
    """Examples for the stage's shape, checked before any actor starts; held-out data from
    data.eval_path, or else the last 10 % of the training rows (said in the log)."""
    d = cfg.data
    common = dict(apply_chat_template=d.apply_chat_template, max_prompt_length=d.max_prompt_length,
                  max_response_length=d.max_response_length, truncation=d.truncation, prompt_key=d.prompt_key)

    def build(path):
        rows = load_rows(path)
        if stage is SFT:
            ex, rep = build_sft_examples(rows, tokenizer, source=path, response_key=d.response_key,
                                         messages_key=d.messages_key, **common)
        elif stage is KTO and not (rows and d.chosen_key in rows[0]):
            ex, rep = build_feedback_examples(rows, tokenizer, source=path, completion_key=d.completion_key,
                                              label_key=d.label_key, **common)
        else:
            ex, rep = build_preference_examples(rows, tokenizer, source=path, chosen_key=d.chosen_key,
                                                rejected_key=d.rejected_key, margin_key=d.margin_key, **common)
            if stage is KTO:  # paired data: each pair gives one desirable and one undesirable example
                ex = preference_to_feedback(ex)
        log(rep.summary())
        return ex

    train = build(d.train_path)
    if d.eval_path:
        held = build(d.eval_path)
    else:
        n = max(1, len(train) // 10)
        if len(train) < 2:
            raise ConfigError(f"{d.train_path} has {len(train)} example(s): with no data.eval_path one is held out for "
                              "evaluation, so at least 2 are needed; add rows or set data.eval_path")
        train, held = train[:-n], train[-n:]
        log(f"no data.eval_path: holding out the last {n} of {len(train) + n} training examples for evaluation")
    if stage is KTO:  # fixed partners: example i's mismatched completion comes from example i+1
        train = [(e, train[(i + 1) % len(train)]) for i, e in enumerate(train)]
        held = [(e, held[(i + 1) % len(held)]) for i, e in enumerate(held)]
    return train, held


# ----------------------------------------------------------------------------- the run


class OfflineRun:
    def __init__(self, cfg: RunConfig, stage: OfflineStage, trainer: RoleGroup, reference: RoleGroup | None,
                 pad_id: int, train: list, held: list, log=print):
        self.cfg, self.stage, self.trainer, self.reference, self.pad_id, self.log = cfg, stage, trainer, reference, pad_id, log
        self.train, self.held = train, held
        p = cfg.preference
        self.hparams = {
            "sft": {}, "bradley_terry": {},
            "pairwise": dict(loss=p.loss, beta=p.beta, loss_params=p.loss_params),
            "kto": dict(beta=p.beta, desirable_weight=p.kto_desirable_weight, undesirable_weight=p.kto_undesirable_weight),
        }[stage.objective]
        self.batch = cfg.algorithm.mini_batch_size
        self.sampler = EpochSampler(list(range(len(train))), self.batch, cfg.seed, cfg.data.shuffle)
        self.ref_cache: dict[int, torch.Tensor] = {}

    def _with_reference(self, batch, ids: list[int] | None):
        """Fill the batch's reference log-probs: from the cache (by example id) or computed now."""
        if self.reference is None:
            return batch
        if ids is not None and all(i in self.ref_cache for i in ids):
            vals = [self.ref_cache[i] for i in ids]
        else:
            vals = self._reference_logps(batch)
        if isinstance(batch, PairBatch):
            batch.ref_logps = torch.cat(vals) if ids is not None else vals
        else:
            both = torch.stack(vals) if ids is not None else vals
            batch.ref_logps, batch.kl_ref_logps = both[:, 0], both[:, 1]
        return batch

    def _reference_logps(self, batch):
        """Per example: PairBatch → (2,) [chosen, rejected]; FeedbackBatch → (2,) [own, mismatched]."""
        seqs = [batch.seqs] if isinstance(batch, PairBatch) else [batch.seqs, batch.kl_seqs]
        outs = [self.reference.shard(ReferenceActor.sequence_logps, x, what="reference log-probs").cat() for x in seqs]
        if isinstance(batch, PairBatch):
            return outs[0]  # (2B,) interleaved
        return torch.stack(outs, -1)  # (B, 2)

    def precompute_reference(self) -> None:
        """Reference log-probs for every training example, once (the default: the reference actor idles after)."""
        t = time.perf_counter()
        chunk = 64
        for start in range(0, len(self.train), chunk):
            ids = list(range(start, min(start + chunk, len(self.train))))
            batch = self.stage.collate([self.train[i] for i in ids], self.pad_id)
            vals = self._reference_logps(batch)
            for j, i in enumerate(ids):
                self.ref_cache[i] = vals[2 * j : 2 * j + 2] if isinstance(batch, PairBatch) else vals[j]
        self.log(f"reference log-probs for {len(self.train)} examples cached in {time.perf_counter() - t:.1f} s")

    def evaluate(self) -> dict:
        """Held-out loss and stats. Every rank evaluates the whole set (ZeRO-3 ranks must run in lockstep)."""
        out: dict[str, float] = {}
        total = 0
        for start in range(0, len(self.held), 64):
            batch = self._with_reference(self.stage.collate(self.held[start : start + 64], self.pad_id), None)
            stats = self.trainer.call(_TrainerShell.evaluate, batch, self.stage.objective, **self.hparams, what="evaluate").get()[0]
            n = batch.batch_size
            for k, v in stats.items():
                out[k] = out.get(k, 0.0) + v * n
            total += n
        return {f"eval/{k}": v / total for k, v in out.items()}

    def train_step(self) -> dict:
        """Collate (and, on the fly, the reference forward), then the update; ``time/step`` counts all of it."""
        t0 = time.perf_counter()
        ids = self.sampler.next()
        batch = self._with_reference(self.stage.collate([self.train[i] for i in ids], self.pad_id),
                                     ids if self.ref_cache else None)
        t = time.perf_counter()
        stats = self.trainer.shard(_TrainerShell.update, batch, objective=self.stage.objective, epochs=1, **self.hparams,
                                   what="update").get()
        secs = time.perf_counter() - t
        m = mean_stats(stats, "train/")
        reason = skip_reason(stats, self.stage.objective)
        if reason:
            m["skip_reason"], m["step/skipped"] = reason, 1
        m["tps/train"] = sum(s["train_tokens"] for s in stats) / max(secs, 1e-9)
        m["time/prepare"] = t - t0  # collation and the on-the-fly reference forward
        m["time/training"] = secs
        m["time/step"] = time.perf_counter() - t0
        m["epoch"] = self.sampler.epoch + self.sampler.index / len(self.train)
        return m

    def fit(self) -> dict:
        cfg = self.cfg
        steps = math.ceil(cfg.schedule.num_epochs * len(self.train) / self.batch)
        steps_per_epoch = max(1, round(len(self.train) / self.batch))
        out = Path(cfg.output_dir)
        sink = MetricsSink(out)
        summary: dict = {"steps": steps}
        try:
            if self.reference is not None and cfg.preference.reference_mode == "precompute":
                self.precompute_reference()
            before = self.evaluate()
            sink.log(0, before)
            summary["eval_before"] = {k: before[f"eval/{k}"] for k in self.stage.headline if f"eval/{k}" in before}
            self.log("step 0: held-out " + "  ".join(f"{k} {v:+.4f}" for k, v in summary["eval_before"].items()))
            bar = Progress(steps, 0, self.stage.objective, self.log)
            bad = BadSteps(cfg.fault_tolerance.max_bad_steps, self.log)
            for step in range(1, steps + 1):
                m = self.train_step()
                skipped = m.pop("skip_reason", None)
                if step % steps_per_epoch == 0 or step == steps:
                    m.update(self.evaluate())
                sink.log(step, m)
                bar.update(**({"loss": f"{m['train/loss']:.4f}"} if "train/loss" in m else {"skipped": "non-finite"}))
                bad.record(step, skipped)
                if STOP.signum is not None:  # SIGTERM/SIGINT: stop between steps (offline stages restart from inputs)
                    bar.close()
                    raise Terminated(STOP.signum, None, step)
            bar.close()
            after = read_metrics(sink.path)[-1]
            summary["eval_after"] = {k: after[f"eval/{k}"] for k in self.stage.headline if f"eval/{k}" in after}
        finally:
            sink.close()
        model_dir = out / self.stage.output
        self.trainer.call(_TrainerShell.save_pretrained, str(model_dir), what="save").get()
        png = plot_panels(read_metrics(sink.path), offline_panels(self.stage.headline), out / "loss_curve.png",
                          f"{self.stage.objective}: {out}")
        summary.update(metrics=str(sink.path), curve=str(png), model=str(model_dir))
        return summary


def run_offline(cfg: RunConfig, log=print) -> dict:
    """SFT, reward-model training or the offline DPO family: validate, start actors, train, save."""
    preflight(cfg)
    stage = stage_for(cfg)
    tokenizer = load_tokenizer(cfg.policy.model_name_or_path)
    train, held = load_stage_data(cfg, stage, tokenizer, log)
    if stage is KTO and cfg.algorithm.mini_batch_size < 2:
        raise ConfigError("KTO estimates its reference point from the batch: set algorithm.mini_batch_size >= 2")
    with RunLock(cfg.output_dir), open_roles(cfg, log) as roles:
        summary = OfflineRun(cfg, stage, roles.trainer, roles.reference, tokenizer.pad_token_id, train, held, log).fit()
        summary.update(roles.save_diagnostics(Path(cfg.output_dir), log))
        return summary
