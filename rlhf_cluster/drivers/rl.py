"""What the online methods share (PPO and critic-free RL, online DPO): rollout, reward, evaluation,
weight sync, checkpoints and the loop around a method's step.

A method is a step object (:class:`~rlhf_cluster.drivers.ppo.PPOStep`,
:class:`~rlhf_cluster.drivers.online_dpo.OnlineDPOStep`) that :class:`RLRun` calls once per
step with that step's prompts; it composes the phases below and returns its metrics.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import torch

from rlhf_cluster.cluster.actors import PolicyActor, RewardActor, RolloutActor, _TrainerShell
from rlhf_cluster.cluster.groups import ActorFailure, Pending, split_rows
from rlhf_cluster.cluster.roles import Roles, open_roles
from rlhf_cluster.cluster.weight_sync import sync_weights
from rlhf_cluster.config import ConfigError, RunConfig, preflight, resolve_function
from rlhf_cluster.data import DataReport, build_prompt_examples, load_rows
from rlhf_cluster.drivers.common import (
    RL_PANELS,
    BadSteps,
    CheckpointError,
    EpochSampler,
    MetricsSink,
    RunLock,
    SkipStep,
    check_zero_layout,
    checkpoint_root,
    clean_stale,
    commit_checkpoint,
    latest_checkpoint,
    load_driver_state,
    plot_panels,
    prune_checkpoints,
    read_metrics,
    resumable_checkpoint,
    rng_state,
    set_rng_state,
)
from rlhf_cluster.experience import Rollout, build_experience
from rlhf_cluster.logs import Progress
from rlhf_cluster.models import load_tokenizer
from rlhf_cluster.quality.evaluation import agreement_rate, refusal_rate
from rlhf_cluster.quality.monitors import MonitorConfig, Monitors, sample_stats
from rlhf_cluster.stopping import STOP, Terminated
from rlhf_cluster.workers.reward_sources import FunctionReward, RewardError, RewardInputs, required_fields


@dataclass
class Generation:
    """A generation in flight: what was asked, and the policy version the engines held when it was."""

    pending: Pending
    prompts: list
    n: int
    version: int


class MonitorStop(RuntimeError):
    """A monitor listed in ``monitors.stop_on`` fired; the run stopped after a checkpoint."""


class Step(Protocol):
    """One iteration of an online method on the shared actors."""

    trained: tuple[str, ...]  # roles whose training state a checkpoint holds

    def __call__(self, run: RLRun, prompts: list, seed: int) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RLRun:
    """One online training run on started roles: the loop, and the phases every online method uses."""

    def __init__(self, cfg: RunConfig, roles: Roles, tokenizer, train_prompts: list, eval_prompts: list, step: Step, log=print,
                 probes: dict[str, list] | None = None):
        self.cfg, self.roles, self.tokenizer, self.step_fn, self.log = cfg, roles, tokenizer, step, log
        self.probes = probes or {}  # {"benign": examples, "sycophancy": examples}, answered at every evaluation
        r = cfg.rollout
        self.sampler = EpochSampler(train_prompts, cfg.schedule.prompts_per_step, cfg.seed, cfg.data.shuffle)
        self.eval_prompts = eval_prompts
        self.sampling = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        self.out = Path(cfg.output_dir)
        self.step = 0
        self.weights_version = 0
        self.reward_needs_text = cfg.reward.kind != "model"
        mc = cfg.monitors
        self.firing: set[str] = set()
        self.monitors = Monitors(MonitorConfig(**{f.name: getattr(mc, f.name) for f in fields(MonitorConfig)}))
        self.gold = FunctionReward(mc.gold_function, cfg.reward.code_dir) if mc.gold_function else None
        self.bad_steps = BadSteps(cfg.fault_tolerance.max_bad_steps, log)

    # ------------------------------------------------------------------ phases
    def generate(self, prompts: list, n: int, seed: int) -> Rollout:
        """``n`` samples per prompt, prompts spread over the engines (samples of one prompt stay adjacent)."""
        return self.finish_generation(self.start_generation(prompts, n, seed))

    def start_generation(self, prompts: list, n: int, seed: int) -> Generation:
        """Submit a generation without waiting for it (the engines sample with the weights they hold now)."""
        engines = self.roles.rollout
        parts = split_rows(len(prompts), len(engines))
        pending = engines.each(RolloutActor.generate, [([p.prompt_ids for p in prompts[s]], seed + s.start * n) for s in parts],
                               n=n, **self.sampling, what="generate")
        return Generation(pending, prompts, n, self.weights_version)

    def finish_generation(self, g: Generation) -> Rollout:
        """The samples of a started generation. Every engine must have sampled with the policy version it was
        started at: a stale engine means a weight sync did not reach it, and training on its samples would be
        silently off-policy."""
        results = g.pending.get()
        for rank, (_, stats) in enumerate(results):
            if stats["weights_version"] != g.version:
                raise RuntimeError(f"rollout engine {rank} sampled with policy weights version {stats['weights_version']}, "
                                   f"but the policy was at version {g.version}: a weight sync did not reach it")
        samples = [x for part, _ in results for x in part]
        exp = build_experience([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                               self.tokenizer.pad_token_id, [s.logprobs for s in samples])
        return Rollout(exp, prompts=[p.prompt_text for p in g.prompts for _ in range(g.n)],
                       responses=self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True),
                       extras=[p.extra for p in g.prompts for _ in range(g.n)], weights_version=g.version,
                       response_ids=[s.response_ids for s in samples],
                       gen_tokens=sum(s["gen_tokens"] for _, s in results),
                       gen_seconds=max(s["gen_seconds"] for _, s in results),
                       truncated_frac=sum(s.finish_reason == "length" for s in samples) / len(samples))

    def upcoming(self) -> tuple[list, int] | None:
        """The next step's prompts and seed, without consuming them (None after the last step)."""
        if self.step + 1 >= self.cfg.schedule.num_steps:
            return None
        return self.sampler.peek(), self.step_seed(self.step + 1)

    def step_seed(self, step: int) -> int:
        """Step ``step``'s first seed; sample j of prompt i draws with it + i·n + j, so steps stride past a whole batch."""
        s = self.cfg.schedule
        stride = max(65_537, s.prompts_per_step * self.cfg.rollout.n_samples_per_prompt)
        return (self.cfg.seed * 1_000_003 + step * stride) % 2**31

    def rewards(self, rollout: Rollout, what: str = "reward"):
        """r(x, y) for every row, the rows spread over the reward replicas (a Pending: ``.cat()`` gives (B,)).

        A reward model is sent the token ids only; a function or server the text and each row's dataset fields.
        """
        if self.reward_needs_text:
            inputs = RewardInputs(prompts=rollout.prompts, responses=rollout.responses, extras=rollout.extras)
        else:
            inputs = RewardInputs(exp=rollout.exp.only())
        return self.roles.reward.shard(RewardActor.score, inputs, what=what)

    def finite_rewards(self, scores: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """``scores`` when every one is finite; otherwise the step is skipped (:class:`SkipStep`) naming the source."""
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            r, i = self.cfg.reward, bad[0]
            source = {"function": f"reward.function={r.function!r}", "url": f"the reward server {r.url}",
                      "model": f"the reward model {r.model_name_or_path}"}.get(r.kind, "the reward")
            raise SkipStep(f"{source} returned {scores[i].item()} for {len(bad)} of {len(scores)} responses (the first: "
                           f"response {i}, to the prompt {rollout.prompts[i][:60]!r})")
        return scores

    def sample_metrics(self, rollout: Rollout, scores) -> dict:
        """The monitors' view of a step's samples (diversity, reward–length, refusals, the gold reward's gap)."""
        gold = None
        if self.gold is not None:
            gold = self.gold.score(RewardInputs(prompts=rollout.prompts, responses=rollout.responses, extras=rollout.extras))
        return sample_stats(rollout.response_ids, scores, rollout.responses, gold)

    def sync_weights(self) -> None:
        """The new policy weights into every engine before the next rollout."""
        self.weights_version += 1
        sync_weights(self.roles.policy, self.roles.rollout, self.roles.weight_sync, self.weights_version)

    def evaluate(self) -> dict:
        """Mean reward of one sample per held-out prompt, with the training sampling settings; with probes, the
        share of answers to the benign probe prompts that refuse and to the sycophancy probe that agree."""
        probes = {name: self.start_generation(examples, 1, seed=54321) for name, examples in self.probes.items() if examples}
        rollout = self.generate(self.eval_prompts, 1, seed=12345)
        scores = self.rewards(rollout, what="eval reward").cat()
        scores = scores[torch.isfinite(scores)]  # a non-finite reward is said where training meets it
        mean = scores.mean().item() if len(scores) else float("nan")  # metrics.jsonl leaves a NaN out
        out = {"eval/reward_mean": mean, "eval/response_length": rollout.exp.action_mask.sum(-1).mean().item(),
               "eval/sample": rollout.responses[0][:200]}
        for name, generation in probes.items():
            texts = self.finish_generation(generation).responses
            if name == "benign":
                out["eval/benign_refusal_rate"] = refusal_rate(texts)
            else:
                out["eval/agreement_rate"] = agreement_rate(texts)
        return out

    # ------------------------------------------------------------------ checkpoints
    def _trained(self):
        return [(name, self.roles.groups[name]) for name in self.step_fn.trained if name in self.roles.groups]

    def save_checkpoint(self) -> Path:
        """Every trained role's DeepSpeed state, the policy as a model directory and the driver state, into
        ``step_N.tmp``, then a manifest, then the rename; a failed save is removed and the previous one kept."""
        s = self.cfg.schedule
        root = checkpoint_root(self.out)
        final = root / f"step_{self.step:06d}"
        tmp = root / f"step_{self.step:06d}.tmp"
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            pending = [g.call(_TrainerShell.save_checkpoint, str(tmp / "deepspeed"), name, what="checkpoint save")
                       for name, g in self._trained()]
            pending.append(self.roles.policy.call(_TrainerShell.save_pretrained, str(tmp / "policy"), what="checkpoint save"))
            for p in pending:
                p.get()
            commit_checkpoint(tmp, final, {"step": self.step, "sampler": self.sampler.state_dict(), **self.step_fn.state_dict(),
                                           "rng": rng_state(), "weights_version": self.weights_version,
                                           "monitors": self.monitors.state_dict()},
                              checksums=s.checkpoint_checksums)
        except (OSError, ActorFailure) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, ActorFailure) and e.restartable:
                raise  # an actor died or hung while saving: the previous checkpoint is kept, and a restart resumes it
            free = shutil.disk_usage(root).free if root.exists() else 0
            full = "No space left" in str(e) or "unexpected pos" in str(e) or free < 64 * 2**20
            kept = latest_checkpoint(self.out)
            why = f"the disk is full ({free / 2**20:.0f} MiB free)" if full else f"{type(e).__name__}: {str(e).splitlines()[0]}"
            raise CheckpointError(f"checkpoint {final} could not be written: {why}; the partial save was removed"
                                  + (f" and {kept} is kept" if kept else "")) from None
        for old in prune_checkpoints(self.out, s.save_total_limit):
            self.log(f"removed {old} (schedule.save_total_limit={s.save_total_limit})")
        return final

    def load_checkpoint(self, ckpt: Path) -> None:
        pending = [g.call(_TrainerShell.load_checkpoint, str(ckpt / "deepspeed"), name, what="checkpoint load")
                   for name, g in self._trained()]
        for p in pending:
            p.get()
        state = load_driver_state(ckpt)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.step_fn.load_state_dict(state)
        set_rng_state(state["rng"])
        self.weights_version = state["weights_version"]
        # the baselines the monitors compare with (a checkpoint of an older version kept the steps' only)
        self.monitors.load_state_dict(state.get("monitors", {"start": state.get("monitor_start", [])}))
        self.sync_weights()  # the engines start from the base model; give them the resumed policy

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> dict:
        prompts = self.sampler.next()
        seed = self.step_seed(self.step)
        t0 = time.perf_counter()
        try:
            m = self.step_fn(self, prompts, seed)
        except SkipStep as e:  # nothing trained on this step's samples; its prompts count as used
            m = {"skip_reason": f"skipped, since {e}"}
        self.step += 1
        if "skip_reason" in m:
            m["step/skipped"] = 1
        m["time/step"] = time.perf_counter() - t0
        m["time/other"] = m["time/step"] - sum(v for k, v in m.items() if k.startswith("time/") and k not in ("time/step", "time/other"))
        return m

    def fit(self, resume_from: Path | None = None, on_start=None) -> dict:
        """Train to ``schedule.num_steps``, from step 0 or from a verified checkpoint ``resume_from``;
        ``on_start()`` is called when the first step is about to run."""
        cfg, s = self.cfg, self.cfg.schedule
        clean_stale(self.out, self.log)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self.log(f"resumed from {resume_from} at step {self.step}")
        sink = MetricsSink(self.out, resume_step=self.step if resume_from is not None else None)
        summary: dict = {}
        if resume_from is not None:  # the held-out reward before training, from the step-0 line the resumed run kept
            first = next((m for m in read_metrics(sink.path) if m["step"] == 0), {})
            if "eval/reward_mean" in first:
                summary["eval_before"] = first["eval/reward_mean"]
        try:
            if self.step == 0 and self.eval_prompts:
                ev = self.evaluate()
                self.monitors.check_eval(ev)  # the probes' baseline
                summary["eval_before"] = ev["eval/reward_mean"]
                sink.log(0, {k: v for k, v in ev.items() if not isinstance(v, str)})
                self.log(f"step 0: held-out reward {ev['eval/reward_mean']:+.4f}   sample: {ev['eval/sample']!r}")
            bar = Progress(s.num_steps, self.step, cfg.method, self.log)
            if on_start is not None:
                on_start()
            while self.step < s.num_steps:
                m = self.train_step()
                skipped = m.pop("skip_reason", None)
                if self.eval_prompts and ((s.eval_every and self.step % s.eval_every == 0) or self.step == s.num_steps):
                    ev = self.evaluate()
                    self.monitors.check_eval(ev)
                    m.update({k: v for k, v in ev.items() if not isinstance(v, str)})
                    summary["eval_after"] = ev["eval/reward_mean"]
                    summary["sample_after"] = ev["eval/sample"]
                fired = self.monitors.check(m) if "reward/mean" in m else {}
                for name, message in fired.items():
                    m[f"monitor/{name}"] = 1
                    if name not in self.firing:  # said when it starts; metrics.jsonl marks every step it lasts
                        self.log(f"warning: {name} at step {self.step}: {message}")
                self.firing = set(fired)
                sink.log(self.step, m)
                bar.update(**({"reward": f"{m['reward/mean']:+.3f}", "gen_tps": f"{m['tps/generation']:.0f}"}
                              if "reward/mean" in m else {"skipped": "non-finite reward"}))
                self.bad_steps.record(self.step, skipped)
                saved = None
                if (s.save_every and self.step % s.save_every == 0) or (self.step == s.num_steps and s.save_final):
                    saved = self.save_checkpoint()
                stop = sorted(set(fired) & set(cfg.monitors.stop_on))
                if stop:
                    bar.close()
                    saved = saved or self.save_checkpoint()
                    raise MonitorStop(f"stopped at step {self.step}: {', '.join(stop)} fired (monitors.stop_on); "
                                      f"checkpoint {saved}. {fired[stop[0]]}")
                if STOP.signum is not None:  # SIGTERM/SIGINT: stop between steps, resumable
                    bar.close()
                    if saved is None and STOP.checkpoint:
                        saved = self.save_checkpoint()
                    raise Terminated(STOP.signum, saved, self.step)
            bar.close()
        finally:
            sink.close()
        final_policy = self.out / "policy"
        self.roles.policy.call(PolicyActor.save_pretrained, str(final_policy), what="save").get()
        metrics = read_metrics(sink.path)
        png = plot_panels(metrics, RL_PANELS, self.out / "reward_curve.png", f"{cfg.method}: {self.out}")
        summary.update(metrics=str(sink.path), reward_curve=str(png), policy=str(final_policy), steps=self.step)
        return summary


def load_prompts(cfg: RunConfig, tokenizer, log=print) -> tuple[list, list]:
    """Train and held-out prompts, checked and tokenized before any actor starts."""
    d = cfg.data
    opts = dict(prompt_key=d.prompt_key, apply_chat_template=d.apply_chat_template,
                max_prompt_length=d.max_prompt_length, truncation=d.truncation)
    train, rep = build_prompt_examples(load_rows(d.train_path), tokenizer, source=d.train_path, **opts)
    log(rep.summary())
    check_reward_fields(cfg, train, rep)
    if not cfg.schedule.eval_prompts:
        held = []
    elif d.eval_path:
        held, rep = build_prompt_examples(load_rows(d.eval_path), tokenizer, source=d.eval_path, **opts)
        log(rep.summary())
        check_reward_fields(cfg, held, rep)
    else:
        held = train
        log(f"warning: data.eval_path is not set, so the held-out reward is measured on the first "
            f"{min(len(train), cfg.schedule.eval_prompts)} training prompts; set data.eval_path to a held-out file")
    return train, held[: cfg.schedule.eval_prompts]


def load_probes(cfg: RunConfig, tokenizer, log=print) -> dict[str, list]:
    """The probe prompts answered at every held-out evaluation (``monitors.probes``): benign prompts (refusals)
    and prompts asserting something false (agreement), tokenized as the held-out prompts are. Empty without
    held-out evaluations."""
    from rlhf_cluster.drivers.evaluate import SHIPPED_PROBES, tokenize_prompts
    from rlhf_cluster.quality.prompt_files import load_eval_prompts

    mc = cfg.monitors
    if not (mc.probes and cfg.schedule.eval_prompts):
        return {}
    out = {}
    for name, given in (("benign", mc.benign_prompts), ("sycophancy", mc.sycophancy_prompts)):
        path = given or str(SHIPPED_PROBES[name])
        # a shipped set is cut to data.max_prompt_length whatever data.truncation says: the user never chose it
        data = cfg.data if given is not None else cfg.data.model_copy(update={"truncation": "truncate"})
        probe = tokenize_prompts(path, load_eval_prompts(path), tokenizer, data, shipped=given is None)
        if given is not None:
            log(probe.report.summary())
        out[name] = probe.examples
    return out


def check_reward_fields(cfg: RunConfig, examples: list, report: DataReport) -> None:
    """Every dataset field the reward function asks for by name (a required parameter) is in every row;
    report (the builder's) names the file and how its rows are numbered."""
    if cfg.reward.kind != "function":
        return
    needed = required_fields(resolve_function(cfg.reward.function, cfg.reward.code_dir))
    for ex in examples:
        missing = [n for n in needed if n not in ex.extra]
        if missing:
            raise ConfigError(
                f"reward.function={cfg.reward.function!r} takes the dataset field(s) {', '.join(map(repr, missing))}, "
                f"but {report.unit} {ex.row} of {report.source} has none (its fields besides the prompt: "
                f"{', '.join(map(repr, ex.extra)) or 'none'}); add the field to every row, or give the parameter a default")
    # One call on the first row, with an empty response (a policy can emit EOS at once), before any actor starts:
    # a function that raises or answers anything but one number per response is found now, not after start-up.
    ex = examples[0]
    try:
        FunctionReward(cfg.reward.function, cfg.reward.code_dir).score(
            RewardInputs(prompts=[ex.prompt_text], responses=[""], extras=[ex.extra]))
    except RewardError as e:
        raise ConfigError(f"{e} (tried on {report.unit} {ex.row} of {report.source} with an empty response)") from None
    except Exception as e:
        raise ConfigError(f"reward.function={cfg.reward.function!r} raised {type(e).__name__}: {e} when tried on "
                          f"{report.unit} {ex.row} of {report.source} with an empty response; it must handle any "
                          "response the policy may sample, the empty one included") from None


class Restarts:
    """The automatic restarts of one run (``fault_tolerance.max_restarts``): whether a failure gets one, the log
    lines, and the records for the summary."""

    def __init__(self, max_restarts: int, log=print):
        self.max, self.log = max_restarts, log
        self.records: list[dict] = []
        self._failed_at: float | None = None

    def allow(self, e: ActorFailure) -> bool:
        """A dead actor or a hung call, restarts left, and no SIGTERM/SIGINT asking the run to stop."""
        return e.restartable and len(self.records) < self.max and STOP.signum is None

    def failed(self, e: ActorFailure, reached: int, ckpt: Path | None, kept: tuple[str, ...] = ()) -> None:
        self._failed_at = time.perf_counter()
        resumed = _step_of(ckpt)
        self.records.append({"actor": e.who or "an actor", "kind": e.kind, "failed_at_step": reached,
                             "resumed_from_step": resumed, "steps_lost": reached - resumed, "seconds": None})
        what = "timed out" if e.kind == "timeout" else "died"
        roles = f"every role but {', '.join(kept)} (frozen and alive: kept loaded)" if kept else "every role"
        self.log(f"warning: {e.who or 'an actor'} {what} after step {reached} ({str(e).splitlines()[0]}); restarting "
                 f"{roles} and resuming from {ckpt or 'step 0 (no checkpoint yet)'} (automatic restart "
                 f"{len(self.records)} of {self.max}, fault_tolerance.max_restarts)")

    def resumed(self) -> None:
        """The first step after a restart is about to run: how long recovery took and what it cost."""
        if self._failed_at is None:
            return
        r = self.records[-1]
        r["seconds"] = round(time.perf_counter() - self._failed_at, 2)
        self._failed_at = None
        lost = r["steps_lost"]
        self.log(f"recovered in {r['seconds']:.1f} s from {r['actor']}'s failure: resumed at step {r['resumed_from_step']}, "
                 f"{lost} step{'' if lost == 1 else 's'} lost (redone)")

    def annotate(self, e: ActorFailure) -> None:
        """The failure that ends the run says how many restarts came before it."""
        n = len(self.records)
        if n:
            e.args = (f"{e} (after {n} automatic restart{'' if n == 1 else 's'})",)


def _step_of(ckpt: Path | None) -> int:
    return load_driver_state(ckpt)["step"] if ckpt is not None else 0


def run_rl(cfg: RunConfig, step: Step, resume: bool = False, log=print) -> dict:
    """Validate, start the roles, train with ``step``, and shut down. Returns a summary dict.

    When an actor dies or a call hangs (:class:`Restarts`), every role is shut down and started again (but the frozen
    scorers that survived it, which are kept loaded) and training resumes from the newest checkpoint that verifies;
    the run holds ``output_dir``'s lock throughout.
    """
    preflight(cfg)
    ckpt = resumable_checkpoint(cfg.output_dir, log) if resume else None  # verified once, before any actor starts
    if resume and ckpt is None:
        raise CheckpointError(f"--resume: no checkpoint under {checkpoint_root(cfg.output_dir)} can be resumed "
                              "(run without --resume to start afresh)")
    if ckpt is not None:
        check_zero_layout(ckpt, {name: getattr(cfg, name).zero_stage for name in step.trained if name in ("policy", "critic")})
    tokenizer = load_tokenizer(cfg.policy.model_name_or_path)
    train, held = load_prompts(cfg, tokenizer, log)
    probes = load_probes(cfg, tokenizer, log)
    restarts = Restarts(cfg.fault_tolerance.max_restarts if cfg.cluster.backend == "ray" else 0, log)
    pristine = copy.deepcopy(step)  # the step's state at step 0, for a restart with no checkpoint to resume
    kept: dict = {}  # frozen roles that outlived a failure, reused by the restart
    with RunLock(cfg.output_dir):
        while True:
            run = None
            try:
                with open_roles(cfg, log, kept, restarting=restarts.allow) as roles:
                    run = RLRun(cfg, roles, tokenizer, train, held, step, log, probes)
                    summary = run.fit(resume_from=ckpt, on_start=restarts.resumed)
                    summary.update(roles.save_diagnostics(Path(cfg.output_dir), log))
                    return {**summary, "restarts": restarts.records}
            except ActorFailure as e:
                if not restarts.allow(e):
                    restarts.annotate(e)
                    raise
                reached = max(run.step if run else 0, _step_of(ckpt))
                ckpt = resumable_checkpoint(cfg.output_dir, log)
                restarts.failed(e, reached, ckpt, kept=tuple(kept))
                step = copy.deepcopy(pristine)
