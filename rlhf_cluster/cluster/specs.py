"""Typed start-up specs for each role's worker, built from the config in one place.

An actor shell's ``init`` takes one of these (never a ``**kwargs`` dict), and the worker it
builds takes plain arguments, so workers stay usable without Ray or configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainerSpec:
    """A DeepSpeed trainer rank (policy, critic, or a reward model in training)."""

    model_path: str
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    micro_batch_size: int = 4
    mini_batch_size: int = 16  # sequences (offline: examples) per optimizer step, all ranks together
    dtype: str = "auto"
    seed: int = 0

    def worker_kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScorerSpec:
    """A frozen model that only runs forward passes (the reference, or a reward model)."""

    model_path: str
    micro_batch_size: int = 8
    dtype: str = "auto"


@dataclass(frozen=True)
class RewardSpec:
    """The reward source (:mod:`rlhf_cluster.workers.reward_sources`): a scalar-head model, a Python
    function ``module:function``, or an HTTP reward server."""

    kind: str  # model | function | http
    model: ScorerSpec | None = None
    function: str | None = None
    code_dir: str | None = None  # where a user's reward module lives when it is not installed
    url: str | None = None
    timeout_s: float = 30.0
    max_retries: int = 3
    batch_size: int = 64  # rows per HTTP request
    api_key_env: str | None = None
    allow_nonfinite: bool = False  # training: NaN/inf pass to the driver, which skips that step

    @property
    def needs_text(self) -> bool:
        """Whether the source reads text (and dataset fields) rather than token ids."""
        return self.kind != "model"


@dataclass(frozen=True)
class EngineSpec:
    """One vLLM engine."""

    model_path: str
    seed: int = 0
    max_model_len: int = 1024
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gib: float | None = None  # None: sized for batch_rows sequences
    batch_rows: int = 256  # the most sequences one generate call holds at once
    enforce_eager: bool = True
    dtype: str = "auto"
    weight_transfer: str | None = None  # nccl / gloo broadcast backend; None: state dicts (object_store)

    def worker_kwargs(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if k != "model_path"}


# ----------------------------------------------------------------------------- the builder step


def trainer_spec(t, mini_batch_size: int, seed: int) -> TrainerSpec:
    """A TrainerConfig section unpacked into a trainer's spec."""
    return TrainerSpec(model_path=t.model_name_or_path, zero_stage=t.zero_stage, offload_optimizer=t.offload_optimizer,
                       offload_params=t.offload_params, gradient_checkpointing=t.gradient_checkpointing,
                       learning_rate=t.learning_rate, weight_decay=t.weight_decay, adam_betas=tuple(t.adam_betas),
                       max_grad_norm=t.max_grad_norm, warmup_steps=t.warmup_steps, micro_batch_size=t.micro_batch_size,
                       mini_batch_size=mini_batch_size, dtype=t.dtype, seed=seed)


def scorer_spec(s) -> ScorerSpec:
    return ScorerSpec(model_path=s.model_name_or_path, micro_batch_size=s.micro_batch_size, dtype=s.dtype)


def reward_spec(r, allow_nonfinite: bool = False) -> RewardSpec:
    if r.kind == "function":
        return RewardSpec("function", function=r.function, code_dir=r.code_dir, allow_nonfinite=allow_nonfinite)
    if r.kind == "http":
        return RewardSpec("http", url=r.url, timeout_s=r.timeout_s, max_retries=r.max_retries,
                          batch_size=r.request_batch_size, api_key_env=r.api_key_env, allow_nonfinite=allow_nonfinite)
    return RewardSpec("model", model=scorer_spec(r))


def engine_spec(cfg, index: int, weight_transfer: str | None) -> EngineSpec:
    r = cfg.rollout
    # prompts are split over the engines, their samples stay together: the busiest engine's share, in rows
    rows = max(-(-cfg.schedule.prompts_per_step // r.num_engines) * r.n_samples_per_prompt,
               -(-cfg.schedule.eval_prompts // r.num_engines))
    return EngineSpec(model_path=cfg.policy.model_name_or_path, seed=cfg.seed + index,
                      max_model_len=cfg.data.max_prompt_length + r.max_new_tokens, tensor_parallel_size=r.tensor_parallel_size,
                      gpu_memory_utilization=r.gpu_memory_utilization,
                      cpu_kv_cache_gib=None if r.cpu_kv_cache_gib == "auto" else r.cpu_kv_cache_gib,
                      batch_rows=rows, enforce_eager=r.enforce_eager, dtype=cfg.policy.dtype,
                      weight_transfer=weight_transfer)
