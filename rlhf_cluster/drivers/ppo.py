"""The PPO-family driver loop: rollout → scoring → advantages → updates → weight sync.

``PPORun.from_config`` is the one builder step that reads the config; below it everything
takes plain arguments. The four scoring calls run concurrently, and so do the two updates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from rlhf_cluster.algos.advantages import get_advantage_estimator
from rlhf_cluster.algos.core import kl_penalty, masked_mean, masked_whiten, token_level_rewards
from rlhf_cluster.algos.kl_controllers import AdaptiveKLController, FixedKLController
from rlhf_cluster.algos.ppo import explained_variance
from rlhf_cluster.cluster.actors import CriticActor, PolicyActor, ReferenceActor, RewardActor, RolloutActor
from rlhf_cluster.cluster.groups import ActorGroup, RoleSpec, check_capacity, cluster_has_gpus, init_ray
from rlhf_cluster.config import RunConfig, preflight
from rlhf_cluster.data import build_prompt_examples, load_rows
from rlhf_cluster.drivers.common import (
    MetricsSink,
    EpochSampler,
    checkpoint_root,
    commit_checkpoint,
    latest_checkpoint,
    load_driver_state,
    plot_curve,
    read_metrics,
    trainer_kwargs,
    rng_state,
    set_rng_state,
)
from rlhf_cluster.experience import Experience, build_experience
from rlhf_cluster.models import load_tokenizer


def _split(n: int, parts: int) -> list[slice]:
    """Contiguous, nearly equal slices of range(n)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


@dataclass
class Roles:
    policy: ActorGroup
    critic: ActorGroup | None
    reference: ActorGroup | None
    reward: ActorGroup
    rollout: ActorGroup
    weight_sync: str = "object_store"  # resolved backend: nccl, gloo or object_store

    def all(self) -> list[ActorGroup]:
        return [g for g in (self.policy, self.critic, self.reference, self.reward, self.rollout) if g is not None]

    def shutdown(self) -> None:
        for g in self.all():
            g.shutdown()


def start_roles(cfg: RunConfig) -> Roles:
    """Create every role's actors where the config places them and initialise their workers."""
    c = cfg.cluster
    use_gpu = c.device == "cuda" or (c.device == "auto" and cluster_has_gpus())
    r = cfg.rollout
    specs = {
        "policy": RoleSpec("policy", cfg.policy.num_nodes, cfg.policy.num_gpus_per_node),
        "critic": RoleSpec("critic", cfg.critic.num_nodes, cfg.critic.num_gpus_per_node),
        "reference": RoleSpec("reference", cfg.reference.num_nodes, cfg.reference.num_gpus_per_node),
        "reward": RoleSpec("reward", cfg.reward.num_nodes, cfg.reward.num_gpus_per_node,
                           gpus_per_actor=0.0 if cfg.reward.function else 1.0),
        "rollout": RoleSpec("rollout", 1, r.num_engines, gpus_per_actor=r.tensor_parallel_size),
    }
    if not cfg.needs_critic:
        specs.pop("critic")
    if not cfg.needs_reference:
        specs.pop("reference")
    colocated = set()
    if c.colocate_policy_reference and "reference" in specs:
        colocated.add("reference")
        specs["reference"] = RoleSpec("reference", cfg.policy.num_nodes, cfg.policy.num_gpus_per_node)
    if c.colocate_critic_reward and "critic" in specs and not cfg.reward.function:
        colocated.add("reward")
        specs["reward"] = RoleSpec("reward", cfg.critic.num_nodes, cfg.critic.num_gpus_per_node)
    check_capacity(list(specs.values()), use_gpu, colocated)
    weight_sync = r.weight_sync if r.weight_sync != "auto" else ("nccl" if use_gpu else "gloo")
    if weight_sync == "nccl" and not use_gpu:
        raise ValueError("rollout.weight_sync=nccl needs GPUs, and this cluster has none: use weight_sync=gloo (or auto)")

    kw = dict(use_gpu=use_gpu, cpus_per_actor=c.cpus_per_actor)
    policy = ActorGroup(specs["policy"], PolicyActor, gpu_fraction=0.75 if "reference" in colocated else 1.0, **kw)
    critic = None
    if "critic" in specs:
        critic = ActorGroup(specs["critic"], CriticActor, gpu_fraction=0.75 if "reward" in colocated else 1.0, **kw)
    reference = None
    if "reference" in specs:
        reference = ActorGroup(specs["reference"], ReferenceActor, pg=policy.pg if "reference" in colocated else None,
                               gpu_fraction=0.25 if "reference" in colocated else 1.0, **kw)
    reward = ActorGroup(specs["reward"], RewardActor, pg=critic.pg if "reward" in colocated else None,
                        gpu_fraction=0.25 if "reward" in colocated else 1.0, **kw)
    rollout = ActorGroup(specs["rollout"], RolloutActor, **kw)
    return Roles(policy, critic, reference, reward, rollout, weight_sync)


def init_roles(roles: Roles, cfg: RunConfig) -> None:
    """Load every model. Trainers form their process groups; all roles load concurrently."""
    pending = []
    for group, tcfg in ((roles.policy, cfg.policy), (roles.critic, cfg.critic)):
        if group is not None:
            pending.append((group, group.start_trainers(**trainer_kwargs(tcfg, cfg.algorithm.mini_batch_size, cfg.seed))))
    ref = cfg.reference
    if roles.reference is not None:
        pending.append((roles.reference, [x.init.remote(ref.model_name_or_path, micro_batch_size=ref.micro_batch_size,
                                                        dtype=ref.dtype) for x in roles.reference.actors]))
    rw = cfg.reward
    pending.append((roles.reward, [x.init.remote(model_path=rw.model_name_or_path, function=rw.function,
                                                 **({} if rw.function else {"micro_batch_size": rw.micro_batch_size, "dtype": rw.dtype}))
                                   for x in roles.reward.actors]))
    r = cfg.rollout
    pending.append((roles.rollout, [x.init.remote(cfg.policy.model_name_or_path, seed=cfg.seed + i,
                                                  max_model_len=cfg.data.max_prompt_length + r.max_new_tokens,
                                                  tensor_parallel_size=r.tensor_parallel_size,
                                                  gpu_memory_utilization=r.gpu_memory_utilization,
                                                  cpu_kv_cache_gib=r.cpu_kv_cache_gib, enforce_eager=r.enforce_eager,
                                                  dtype=cfg.policy.dtype,
                                                  weight_transfer=None if roles.weight_sync == "object_store" else roles.weight_sync)
                                    for i, x in enumerate(roles.rollout.actors)]))
    for group, refs in pending:
        group.get(refs, "init")
    if roles.weight_sync != "object_store":
        connect_weight_sync(roles.policy, roles.rollout, roles.weight_sync, r.tensor_parallel_size,
                            int(r.weight_sync_bucket_mb * 2**20))


def connect_weight_sync(policy: ActorGroup, rollout: ActorGroup, backend: str, tensor_parallel_size: int,
                        bucket_bytes: int) -> None:
    """Policy rank 0 and every engine worker form one broadcast group (vLLM's weight-transfer protocol)."""
    addr, port = ray.get(policy.actors[0].free_port.remote())
    policy.get([x.init_weight_transfer.remote(backend, rollout.actors, tensor_parallel_size, addr, port, bucket_bytes)
                for x in policy.actors], "weight-transfer setup")


def sync_weights(policy: ActorGroup, rollout: ActorGroup, backend: str, version: int) -> None:
    """Policy weights into every engine: a broadcast (nccl/gloo, after :func:`connect_weight_sync`) or,
    with ``object_store``, rank 0's exported state dict through Ray (every rank exports: ZeRO-3 gathers)."""
    if backend != "object_store":
        policy.get([x.send_weights.remote(version) for x in policy.actors], "weight sync")
        return
    export = [x.export_state_dict.remote() for x in policy.actors]
    loads = [e.load_weights.remote(export[0], version) for e in rollout.actors]
    policy.get(export[1:], "weight export")
    rollout.get(loads, "weight load")


class PPORun:
    """One PPO-family training run on started actors."""

    def __init__(self, cfg: RunConfig, roles: Roles, tokenizer, train_prompts: list, eval_prompts: list, log=print):
        self.cfg, self.roles, self.tokenizer, self.log = cfg, roles, tokenizer, log
        a, r = cfg.algorithm, cfg.rollout
        self.estimator = get_advantage_estimator(a.advantage_estimator)
        self.kl_ctl = (AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_controller == "adaptive"
                       else FixedKLController(a.kl_coef))
        self.sampler = EpochSampler(train_prompts, cfg.schedule.prompts_per_step, cfg.seed, cfg.data.shuffle)
        self.eval_prompts = eval_prompts
        self.sampling = dict(n=r.n_samples_per_prompt, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                             top_p=r.top_p, top_k=r.top_k)
        self.out = Path(cfg.output_dir)
        self.step = 0
        self.weights_version = 0

    # ------------------------------------------------------------------ phases
    def generate(self, prompts: list, n: int, seed: int) -> tuple[Experience, list[str], list[str], dict]:
        """Spread prompts over the engines; samples of one prompt stay adjacent."""
        engines = self.roles.rollout
        parts = _split(len(prompts), len(engines))
        refs = [e.generate.remote([p.prompt_ids for p in prompts[s]], **{**self.sampling, "n": n}, seed=seed + s.start)
                for e, s in zip(engines.actors, parts)]
        results = engines.get(refs, "generate")
        samples = [x for part, _ in results for x in part]
        stats = {"gen_tokens": sum(s["gen_tokens"] for _, s in results)}
        exp = build_experience([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                               self.tokenizer.pad_token_id, [s.logprobs for s in samples])
        texts = [p.prompt_text for p in prompts for _ in range(n)]
        responses = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        stats["truncated_frac"] = sum(s.finish_reason == "length" for s in samples) / len(samples)
        return exp, texts, responses, stats

    def score(self, exp: Experience, prompts: list[str], responses: list[str]) -> Experience:
        """Reward, reference log-probs, old log-probs and values, all four concurrently."""
        R = self.roles
        B = exp.batch_size
        by_rank = lambda g: _split(B, len(g))  # noqa: E731
        ref_refs = [a.logprobs.remote(exp.select(s)) for a, s in zip(R.reference.actors, by_rank(R.reference))]
        rew_refs = [a.score.remote(exp.select(s), prompts[s], responses[s]) for a, s in zip(R.reward.actors, by_rank(R.reward))]
        old_refs = [a.logprobs.remote(x) for a, x in zip(R.policy.actors, exp.chunk(len(R.policy)))]
        val_refs = [a.values.remote(x) for a, x in zip(R.critic.actors, exp.chunk(len(R.critic)))] if R.critic else []
        exp.ref_logprobs = torch.cat(R.reference.get(ref_refs, "reference log-probs"))
        exp.scores = torch.cat(R.reward.get(rew_refs, "reward"))
        exp.old_logprobs = torch.cat(R.policy.get(old_refs, "old log-probs"))
        if R.critic:
            exp.values = torch.cat(R.critic.get(val_refs, "values")) * exp.action_mask
        return exp

    def compute_advantages(self, exp: Experience) -> dict:
        """Per-token rewards with the KL penalty, then the configured estimator (GAE by default)."""
        a, mask = self.cfg.algorithm, exp.action_mask
        kl = kl_penalty(exp.old_logprobs, exp.ref_logprobs, a.kl_estimator) * mask
        exp.token_rewards = token_level_rewards(exp.scores, kl, mask, self.kl_ctl.value)
        adv, ret = self.estimator.fn(exp.token_rewards, mask, values=exp.values, group_size=self.cfg.rollout.n_samples_per_prompt,
                                     gamma=a.gamma, lam=a.lam)
        exp.advantages = masked_whiten(adv, mask) if self.estimator.whiten else adv
        exp.returns = ret
        kl_seq = (kl.sum(-1)).mean().item()
        stats = {"kl/ref_per_token": masked_mean(kl, mask).item(), "kl/ref_per_seq": kl_seq, "kl/coef": self.kl_ctl.value}
        if exp.values is not None:
            stats["critic/explained_var"] = explained_variance(exp.values, ret, mask).item()
            stats["critic/values_mean"] = masked_mean(exp.values, mask).item()
        self.kl_ctl.update(kl_seq, exp.batch_size)
        return stats

    def update(self, exp: Experience) -> dict:
        """Policy and critic updates, concurrently, each rank on its contiguous shard."""
        a, R = self.cfg.algorithm, self.roles
        p_refs = [x.update.remote(s, "ppo", epochs=a.ppo_epochs, clip_eps_low=a.clip_eps_low, clip_eps_high=a.clip_eps_high,
                                  dual_clip=a.dual_clip, entropy_coef=a.entropy_coef)
                  for x, s in zip(R.policy.actors, exp.chunk(len(R.policy)))]
        c_refs = [x.update.remote(s, "value", epochs=a.ppo_epochs, value_clip=a.value_clip)
                  for x, s in zip(R.critic.actors, exp.chunk(len(R.critic)))] if R.critic else []
        p_stats = R.policy.get(p_refs, "policy update")
        out = {f"actor/{k}": sum(s[k] for s in p_stats) / len(p_stats) for k in p_stats[0] if k not in ("train_tokens", "train_seconds")}
        out["tps/train_policy"] = sum(s["train_tokens"] for s in p_stats) / max(max(s["train_seconds"] for s in p_stats), 1e-9)
        if c_refs:
            c_stats = R.critic.get(c_refs, "critic update")
            out.update({f"critic/{k}": sum(s[k] for s in c_stats) / len(c_stats) for k in c_stats[0] if k not in ("train_tokens", "train_seconds")})
            out["tps/train_critic"] = sum(s["train_tokens"] for s in c_stats) / max(max(s["train_seconds"] for s in c_stats), 1e-9)
        return out

    def sync_weights(self) -> None:
        """The new policy weights into every engine before the next rollout."""
        self.weights_version += 1
        sync_weights(self.roles.policy, self.roles.rollout, self.roles.weight_sync, self.weights_version)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        prompts = self.sampler.next()
        seed = (self.cfg.seed * 1_000_003 + self.step * 65_537) % 2**31  # prompt i of the step samples with seed + i

        t = time.perf_counter()
        exp, prompt_texts, responses, gen_stats = self.generate(prompts, self.cfg.rollout.n_samples_per_prompt, seed)
        t_gen = time.perf_counter() - t

        t = time.perf_counter()
        exp = self.score(exp, prompt_texts, responses)
        t_score = time.perf_counter() - t

        t = time.perf_counter()
        adv_stats = self.compute_advantages(exp)
        t_adv = time.perf_counter() - t

        t = time.perf_counter()
        upd_stats = self.update(exp)
        t_train = time.perf_counter() - t

        t = time.perf_counter()
        self.sync_weights()
        t_sync = time.perf_counter() - t

        self.step += 1
        step_time = time.perf_counter() - t0
        mask = exp.action_mask
        seq_tokens = int(exp.attention_mask.sum())
        return {
            "reward/mean": exp.scores.mean().item(),
            "reward/std": exp.scores.std().item() if exp.batch_size > 1 else 0.0,
            **adv_stats,
            **upd_stats,
            "response/length_mean": mask.sum(-1).mean().item(),
            "response/truncated_frac": gen_stats["truncated_frac"],
            "time/generation": t_gen,
            "time/scoring": t_score,
            "time/advantages": t_adv,
            "time/training": t_train,
            "time/sync": t_sync,
            "time/other": step_time - (t_gen + t_score + t_adv + t_train + t_sync),
            "time/step": step_time,
            "tps/generation": gen_stats["gen_tokens"] / max(t_gen, 1e-9),
            "tps/scoring": seq_tokens / max(t_score, 1e-9),
            "tokens/generated": gen_stats["gen_tokens"],
        }

    def evaluate(self) -> dict:
        """Mean reward of one sample per held-out prompt, with the training sampling settings."""
        exp, prompt_texts, responses, _ = self.generate(self.eval_prompts, 1, seed=12345)
        refs = [a.score.remote(exp.select(s), prompt_texts[s], responses[s])
                for a, s in zip(self.roles.reward.actors, _split(exp.batch_size, len(self.roles.reward)))]
        scores = torch.cat(self.roles.reward.get(refs, "eval reward"))
        return {"eval/reward_mean": scores.mean().item(), "eval/response_length": exp.action_mask.sum(-1).mean().item(),
                "eval/sample": responses[0][:200]}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        root = checkpoint_root(self.out)
        final = root / f"step_{self.step:06d}"
        tmp = root / f"step_{self.step:06d}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        R = self.roles
        refs = [x.save_checkpoint.remote(str(tmp / "deepspeed"), "policy") for x in R.policy.actors]
        refs += [x.save_pretrained.remote(str(tmp / "policy")) for x in R.policy.actors]
        if R.critic:
            refs += [x.save_checkpoint.remote(str(tmp / "deepspeed"), "critic") for x in R.critic.actors]
        ray.get(refs)
        commit_checkpoint(tmp, final, {
            "step": self.step, "sampler": self.sampler.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
            "rng": rng_state(), "weights_version": self.weights_version,
        })
        return final

    def load_checkpoint(self, ckpt: Path) -> None:
        R = self.roles
        refs = [x.load_checkpoint.remote(str(ckpt / "deepspeed"), "policy") for x in R.policy.actors]
        if R.critic:
            refs += [x.load_checkpoint.remote(str(ckpt / "deepspeed"), "critic") for x in R.critic.actors]
        R.policy.get(refs, "checkpoint load")
        state = load_driver_state(ckpt)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        set_rng_state(state["rng"])
        self.weights_version = state["weights_version"]
        self.sync_weights()  # the engines start from the base model; give them the resumed policy

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> dict:
        cfg, s = self.cfg, self.cfg.schedule
        if resume:
            ckpt = latest_checkpoint(self.out)
            if ckpt is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {checkpoint_root(self.out)}")
            self.load_checkpoint(ckpt)
            self.log(f"resumed from {ckpt} at step {self.step}")
        sink = MetricsSink(self.out, append=resume)
        summary: dict = {}
        try:
            if self.step == 0:
                ev = self.evaluate()
                summary["eval_before"] = ev["eval/reward_mean"]
                sink.log(0, {k: v for k, v in ev.items() if not isinstance(v, str)})
                self.log(f"step 0: held-out reward {ev['eval/reward_mean']:+.4f}   sample: {ev['eval/sample']!r}")
            from tqdm import tqdm

            bar = tqdm(total=s.num_steps, initial=self.step, desc=cfg.method, dynamic_ncols=True, mininterval=0)
            while self.step < s.num_steps:
                m = self.train_step()
                if (s.eval_every and self.step % s.eval_every == 0) or self.step == s.num_steps:
                    ev = self.evaluate()
                    m.update({k: v for k, v in ev.items() if not isinstance(v, str)})
                    summary["eval_after"] = ev["eval/reward_mean"]
                    summary["sample_after"] = ev["eval/sample"]
                sink.log(self.step, m)
                bar.set_postfix(reward=f"{m['reward/mean']:+.3f}", gen_tps=f"{m['tps/generation']:.0f}")
                bar.update(1)
                if (s.save_every and self.step % s.save_every == 0) or self.step == s.num_steps:
                    self.save_checkpoint()
            bar.close()
        finally:
            sink.close()
        final_policy = self.out / "policy"
        ray.get([x.save_pretrained.remote(str(final_policy)) for x in self.roles.policy.actors])
        metrics = read_metrics(sink.path)
        png = plot_curve(metrics, ["reward/mean", "eval/reward_mean"], self.out / "reward_curve.png", f"{cfg.method} reward")
        summary.update(metrics=str(sink.path), reward_curve=str(png), policy=str(final_policy), steps=self.step)
        return summary


def load_prompts(cfg: RunConfig, tokenizer, log=print) -> tuple[list, list]:
    """Train and held-out prompts, checked and tokenized before any actor starts."""
    d = cfg.data
    opts = dict(prompt_key=d.prompt_key, apply_chat_template=d.apply_chat_template,
                max_prompt_length=d.max_prompt_length, truncation=d.truncation)
    train, rep = build_prompt_examples(load_rows(d.train_path), tokenizer, source=d.train_path, **opts)
    log(rep.summary())
    if d.eval_path:
        held, rep = build_prompt_examples(load_rows(d.eval_path), tokenizer, source=d.eval_path, **opts)
        log(rep.summary())
    else:
        held = train
    return train, held[: cfg.schedule.eval_prompts]


def run_ppo(cfg: RunConfig, resume: bool = False, log=print, run_cls: type | None = None) -> dict:
    """Validate, start the roles on Ray, train, and shut down. Returns a summary dict.

    ``run_cls`` swaps the loop (online DPO subclasses :class:`PPORun`) on the same actors.
    """
    preflight(cfg)
    tokenizer = load_tokenizer(cfg.policy.model_name_or_path)
    train, held = load_prompts(cfg, tokenizer, log)
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
    roles = start_roles(cfg)
    try:
        t = time.perf_counter()
        init_roles(roles, cfg)
        log(f"actors ready in {time.perf_counter() - t:.1f} s: " + ", ".join(f"{g.role}×{len(g)}" for g in roles.all()))
        run = (run_cls or PPORun)(cfg, roles, tokenizer, train, held, log)
        summary = run.fit(resume=resume)
        summary["timeline"] = str(save_timeline(roles, Path(cfg.output_dir) / "timeline.json"))
        return summary
    finally:
        roles.shutdown()


def save_timeline(roles: Roles, path: Path) -> Path:
    """Every actor's recorded calls as ``{"policy/0": [[name, start, end], ...], ...}`` (wall-clock seconds)."""
    import json

    spans = {}
    for g in roles.all():
        for rank, s in enumerate(g.spans()):
            spans[f"{g.role}/{rank}"] = s
    path.write_text(json.dumps(spans))
    return path
