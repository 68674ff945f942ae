"""Typed run configuration: YAML files plus dotted command-line overrides.

Everything is validated before any actor starts. An unknown key, a wrong type or an
impossible combination raises :class:`ConfigError` naming the field, the value and
the fix. Math never sees these objects: drivers unpack them into plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


def _registry(name: str) -> dict:
    """The registry that owns a choice: its keys are the valid names, its entries the metadata the config reads."""
    if name == "advantage_estimator":
        from rlhf_cluster.algos.advantages import ADVANTAGE_ESTIMATORS

        return ADVANTAGE_ESTIMATORS
    if name == "preference_loss":
        from rlhf_cluster.algos.preference import PREFERENCE_LOSSES

        return {**PREFERENCE_LOSSES, "kto": None}  # KTO: unpaired data, its own objective
    if name == "policy_loss":
        from rlhf_cluster.algos.ppo import POLICY_LOSSES

        return POLICY_LOSSES
    if name == "loss_agg_mode":
        from rlhf_cluster.algos.ppo import LOSS_AGG_MODES

        return LOSS_AGG_MODES
    from rlhf_cluster.algos.kl_controllers import KL_CONTROLLERS

    return KL_CONTROLLERS


def _registered(value: str, registry: str) -> str:
    names = sorted(_registry(registry))
    if value not in names:
        near = difflib.get_close_matches(value, names, n=1)
        raise ValueError(f"unknown {registry.replace('_', ' ')} {value!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                         + f" (registered: {', '.join(names)})")
    return value


def _params_class(registry: str, choice: str) -> type:
    """The frozen dataclass of ``choice``'s own parameters (KTO, outside the pairwise registry, has none)."""
    from rlhf_cluster.algos.core import NoParams

    entry = _registry(registry)[choice]
    return NoParams if entry is None else entry.params


def _params(values: dict, registry: str, choice: str) -> dict:
    """``values`` checked against ``choice``'s params dataclass (names, types, its __post_init__ ranges), with
    the omitted ones filled from its defaults: the plain keyword arguments the loss receives."""
    params = _params_class(registry, choice)
    allowed = [f.name for f in dataclasses.fields(params)]
    for key in values:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            raise ValueError(f"{choice} has no parameter {key!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                             + (f" ({choice} takes: {', '.join(allowed)})" if allowed else f" ({choice} takes none)"))
    try:
        return dataclasses.asdict(TypeAdapter(params).validate_python(values))
    except ValidationError as e:
        problems = [f"{choice} needs {err['loc'][0]} (it has no default)" if err["type"] == "missing"
                    else f"{choice}.{err['loc'][0]}: {err['msg']}" if err["loc"]
                    else f"{choice}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise ValueError("; ".join(problems)) from None


def _params_doc(registry: str) -> list[str]:
    """One line per registered choice: its parameters with types and defaults, and its params docstring."""
    lines, bare = [], []
    for name in sorted(_registry(registry)):
        params = _params_class(registry, name)
        fs = dataclasses.fields(params)
        if not fs:
            bare.append(name)
            continue
        shown = ", ".join(f"{f.name}: {getattr(f.type, '__name__', f.type)}"
                          + (f" = {_show(f.default)}" if f.default is not dataclasses.MISSING else " (required)") for f in fs)
        doc = (params.__doc__ or "").strip().splitlines()[0] if params.__doc__ else ""
        lines.append(f"{name}: {shown}" + (f" — {doc}" if doc else ""))
    return [*lines, f"{', '.join(bare)}: none"] if bare else lines


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    # Fields that moved, old name -> where to now: the unknown-field error says so instead of guessing.
    moved: ClassVar[dict[str, str]] = {}


# ----------------------------------------------------------------------------- roles


class TrainerConfig(_Strict):
    """A DeepSpeed-trained model (policy or critic): one Ray actor per data-parallel rank."""

    model_name_or_path: str | None = Field(None, description="Local Hugging Face model directory.")
    num_nodes: int = Field(1, ge=1, description="Nodes this role spans.")
    num_gpus_per_node: int = Field(1, ge=1, description="Data-parallel ranks per node (one GPU each on GPU clusters).")
    zero_stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto", description="DeepSpeed ZeRO stage. auto: 0 (a plain optimizer step, nothing to partition) for one "
        "rank without offload, 3 with offload_params, else 2.")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer-state offload to CPU (stage >= 1).")
    offload_params: bool = Field(False, description="ZeRO parameter offload to CPU (stage 3 only).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW's (β1, β2).")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, in optimizer steps.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per rank per forward/backward.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.num_gpus_per_node

    @model_validator(mode="after")
    def _zero_offload(self) -> TrainerConfig:
        if self.zero_stage == "auto":
            one = self.world_size == 1 and not (self.offload_optimizer or self.offload_params)
            self.zero_stage = 0 if one else (3 if self.offload_params else 2)
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params=true needs zero_stage=3 (got zero_stage={self.zero_stage}); "
                             "set zero_stage=3 or offload_params=false")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer=true needs zero_stage >= 1; set zero_stage=1, 2 or 3")
        return self


class ScorerConfig(_Strict):
    """A frozen model that only runs forward passes (reference or reward model)."""

    model_name_or_path: str | None = Field(None, description="Local Hugging Face model directory.")
    num_nodes: int = Field(1, ge=1, description="Nodes this role spans.")
    num_gpus_per_node: int = Field(1, ge=1, description="Replicas per node; the batch is split across replicas.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.num_gpus_per_node


class RewardConfig(ScorerConfig):
    """Where r(x, y) comes from: a scalar-head model, a Python function, or an HTTP reward server."""

    kind: Literal["model", "function", "http"] | None = Field(
        None, description="The reward source. model: a scalar-head model at model_name_or_path (reads token ids). "
        "function: a Python function (rule-based or verifiable rewards). http: a reward server at url. "
        "null: whichever of model_name_or_path / function / url is set.")
    function: str | None = Field(
        None,
        description="'module:function' called as fn(prompts: list[str], responses: list[str], **fields) -> list[float]; "
        "further named parameters get those dataset columns (one value per row: a ground-truth answer, tests), "
        "**kwargs gets every column. A module not installed as a package may sit next to the config file or in the "
        "working directory; it is shipped to every actor.",
    )
    code_dir: str | None = Field(
        None, description="Directory holding reward.function's module when it is not an installed package (found next to "
        "the config or in the working directory when null). Only that module is shipped to the actors.")
    url: str | None = Field(
        None, description="http: the reward server. It gets POST {\"prompts\": [...], \"responses\": [...], "
        "\"extras\": [{dataset row's other fields}, ...]} and answers {\"rewards\": [one number per row]}.")
    timeout_s: float = Field(30.0, gt=0, description="http: seconds to wait for each request.")
    max_retries: int = Field(3, ge=0, description="http: retries of a request that timed out, could not connect or got "
                             "429/5xx (exponential backoff from 0.5 s).")
    request_batch_size: int = Field(64, ge=1, description="http: rows per request.")
    api_key_env: str | None = Field(None, description="http: environment variable (on the reward actor's node) whose "
                                    "value is sent as 'Authorization: Bearer <value>'.")

    @model_validator(mode="after")
    def _one_source(self) -> RewardConfig:
        field = {"model": "model_name_or_path", "function": "function", "http": "url"}
        given = [k for k, v in (("model", self.model_name_or_path), ("function", self.function), ("http", self.url))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"the reward has one source; set only one of reward.{', reward.'.join(field[k] for k in given)}")
        if self.kind is None and given:
            self.kind = given[0]
        if self.kind is not None and given and self.kind != given[0]:
            raise ValueError(f"reward.kind={self.kind} needs reward.{field[self.kind]}, but reward.{field[given[0]]} is set")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"reward.function must look like 'package.module:function', got {self.function!r}")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"reward.url must start with http:// or https://, got {self.url!r}")
        return self


class RolloutConfig(_Strict):
    """vLLM generation engines."""

    num_engines: int = Field(1, ge=1, description="vLLM engines; prompts are spread across them.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine.")
    n_samples_per_prompt: int = Field(1, ge=1, description="Responses sampled per prompt.")
    max_new_tokens: int = Field(64, ge=1, description="Response token limit when sampling.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (the policy's log-probs assume 1.0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1 disables it.")
    top_k: int = Field(-1, description="-1 disables top-k.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM's share of GPU memory.")
    cpu_kv_cache_gib: Literal["auto"] | Annotated[float, Field(gt=0)] = Field(
        "auto", description="KV-cache size per engine on CPU, GiB. auto: what one rollout (or evaluation) batch needs "
        "at once, in vLLM's 128-token blocks (a few MiB for a tiny model, where vLLM alone reserves 1 GiB).")
    enforce_eager: bool = Field(True, description="Skip CUDA-graph capture (faster start, slower decode).")
    weight_sync: Literal["auto", "nccl", "gloo", "object_store"] = Field(
        "auto", description="How new policy weights reach the engines: vLLM's weight-transfer protocol over nccl (GPU) or "
        "gloo (CPU, or GPUs without a fast interconnect) broadcast groups, or object_store (rank 0's state dict through "
        "Ray's object store, then vLLM's reload_weights). auto: nccl on GPU clusters, gloo otherwise.")
    weight_sync_bucket_mb: float = Field(64.0, gt=0, description="Broadcast bucket size for nccl/gloo weight sync.")


class DataConfig(_Strict):
    train_path: str | None = Field(None, description="JSONL, JSON, Parquet file or a datasets.save_to_disk directory.")
    eval_path: str | None = Field(None, description="Held-out data in the same format.")
    prompt_key: str = Field("prompt", description="Column holding the prompt (a string or chat messages).")
    response_key: str = Field("response", description="SFT: column holding the response.")
    messages_key: str = Field("messages", description="SFT: column holding a whole chat (loss on the last assistant turn).")
    chosen_key: str = Field("chosen", description="Preferences: the preferred response.")
    rejected_key: str = Field("rejected", description="Preferences: the dispreferred response.")
    margin_key: str = Field("margin", description="Preferences: optional margin (reward-model training).")
    completion_key: str = Field("completion", description="Unpaired feedback (KTO): the completion.")
    label_key: str = Field("label", description="Unpaired feedback (KTO): true if desirable.")
    apply_chat_template: bool = Field(True, description="Wrap prompts with the tokenizer's chat template.")
    max_prompt_length: int = Field(128, ge=1, description="Prompt token limit.")
    max_response_length: int = Field(128, ge=1, description="Response token limit (supervised data).")
    truncation: Literal["truncate", "error"] = Field(
        "truncate", description="Over-long rows: 'truncate' (prompts keep their end, responses their start; counts reported) or 'error'."
    )
    shuffle: bool = Field(True, description="Shuffle the training rows each epoch (seeded).")


class AlgorithmConfig(_Strict):
    """PPO-family settings (the math's hyper-parameters)."""

    advantage_estimator: str = Field(
        "gae", description="A registered estimator (rlhf_cluster.algos.advantages): gae (with a critic), or critic-free: "
        "grpo, rloo (n_samples_per_prompt >= 2), reinforce_pp.", json_schema_extra={"registry": "advantage_estimator"})
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    group_std_eps: float = Field(
        1e-6, gt=0, description="grpo's ε in Â = (R - mean) / (std + ε) over each prompt's group. A larger value damps "
        "near-constant groups, whose tiny reward spread (often only the KL penalty's) would otherwise be scaled up to "
        "full-size advantages; TRL uses 1e-4. Other estimators ignore it.")
    clip_eps_low: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip below 1.")
    clip_eps_high: float = Field(0.2, gt=0, description="PPO ratio clip above 1.")
    policy_loss: str = Field("vanilla", description="A registered per-token policy loss (rlhf_cluster.algos.ppo): vanilla "
                             "(the clipped surrogate) or dual_clip (also bounds the loss at -cÂ for Â < 0).",
                             json_schema_extra={"registry": "policy_loss"})
    policy_loss_params: dict[str, Any] = Field(
        default_factory=dict, validate_default=True, description="policy_loss's own parameters, checked against its "
        "params dataclass; omitted ones take their defaults.", json_schema_extra={"params_of": "policy_loss"})
    loss_agg_mode: str = Field(
        "token_mean", description="How per-token policy losses become one: token_mean (every token weighs the same), "
        "seq_mean_token_sum (per-sequence sums, averaged over sequences), seq_mean_token_mean (per-sequence means, "
        "averaged over sequences).", json_schema_extra={"registry": "loss_agg_mode"})
    value_clip: float | None = Field(0.2, description="Critic value clip ε, or null for an unclipped loss.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    mini_batch_size: int = Field(
        16, ge=1, description="Sequences (offline stages: examples or pairs) per optimizer step, all ranks together. "
        "RL: when it holds the whole step (prompts_per_step × n_samples_per_prompt) and the KL is not in the reward, "
        "the update's first forward gives the old log-probs (metrics: actor/old_logprobs_reused) and the separate "
        "old-log-prob forward is skipped.")
    kl_penalty: Literal["auto", "reward", "loss"] = Field(
        "auto", description="Where β·KL(π‖π_ref) goes. reward: subtracted from each token's reward before the advantages "
        "(Ziegler et al. 2019; InstructGPT). loss: added to the policy loss, aggregated like it (the GRPO paper, Shao "
        "et al. 2024). auto: loss for grpo, reward otherwise.")
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = Field(
        "auto", description="Per-token KL(π‖π_ref) estimator (Schulman's k1/k2/k3). auto: k1 in the reward, k3 in "
        "the loss (k1's gradient there is zero in expectation).")
    kl_coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty (initial value if adaptive). 0 with "
                           "the fixed controller: no KL term, and no reference model is started.")
    kl_controller: str = Field("fixed", description="Fixed β, or adaptive toward kl_target (Ziegler et al. 2019).",
                               json_schema_extra={"registry": "kl_controller"})
    kl_target: float = Field(6.0, gt=0, description="Adaptive controller's target KL.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive controller's horizon.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    off_policy_steps: int = Field(
        0, ge=0, le=1, description="0: every step trains on samples of its own weights. 1: the engines sample step "
        "k+1 while the trainers update on step k, so samples are one policy version old; the update corrects with "
        "truncated importance sampling (each token's advantage times min(π_θ/π_engine, tis_cap), π_engine the "
        "engine's log-probs). Pays off when generation and training have their own devices; a resumed run samples "
        "its first step afresh.")
    tis_cap: float = Field(2.0, ge=1, description="off_policy_steps: the cap C of the truncated importance weight.")

    moved: ClassVar[dict[str, str]] = {
        "dual_clip": "algorithm.policy_loss: dual_clip with algorithm.policy_loss_params: {c: ...} (c > 1, default 3.0)"}

    @field_validator("advantage_estimator")
    @classmethod
    def _estimator(cls, v: str) -> str:
        return _registered(v, "advantage_estimator")

    @model_validator(mode="after")
    def _kl_defaults(self):
        """Resolve the method-dependent defaults, so a dumped config says what ran."""
        if self.kl_penalty == "auto":
            self.kl_penalty = "loss" if self.advantage_estimator == "grpo" else "reward"
        if self.kl_estimator == "auto":
            self.kl_estimator = "k3" if self.kl_penalty == "loss" else "k1"
        if self.kl_penalty == "loss" and self.kl_estimator == "k1" and self.uses_kl:
            raise ValueError("kl_estimator=k1 in the loss has a zero gradient in expectation, so it would not hold the "
                             "policy near the reference: use kl_estimator=k3 (or k2), or kl_penalty=reward")
        return self

    @property
    def uses_kl(self) -> bool:
        """Whether any KL term (and so the reference model) is needed."""
        return self.kl_coef > 0 or self.kl_controller != "fixed"

    @field_validator("policy_loss")
    @classmethod
    def _policy_loss(cls, v: str) -> str:
        return _registered(v, "policy_loss")

    @field_validator("policy_loss_params")
    @classmethod
    def _policy_loss_params(cls, v: dict, info: ValidationInfo) -> dict:
        return _params(v, "policy_loss", info.data["policy_loss"]) if "policy_loss" in info.data else v

    @field_validator("loss_agg_mode")
    @classmethod
    def _loss_agg_mode(cls, v: str) -> str:
        return _registered(v, "loss_agg_mode")

    @field_validator("kl_controller")
    @classmethod
    def _kl_controller(cls, v: str) -> str:
        return _registered(v, "kl_controller")


class PreferenceConfig(_Strict):
    """The DPO family (offline and online) and KTO."""

    loss: str = Field("dpo", description="A registered pairwise loss (rlhf_cluster.algos.preference: dpo, cdpo, ipo, "
                      "hinge, orpo, simpo — orpo and simpo need no reference model) or kto (unpaired data).",
                      json_schema_extra={"registry": "preference_loss"})
    beta: float = Field(0.1, gt=0, description="β (ORPO: the weight λ of the odds-ratio term).")
    loss_params: dict[str, Any] = Field(
        default_factory=dict, validate_default=True, description="The loss's own parameters, checked against its params "
        "dataclass; omitted ones take their defaults.", json_schema_extra={"params_of": "preference_loss"})
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO's λ_D.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO's λ_U.")
    reference_mode: Literal["precompute", "on_the_fly"] = Field(
        "precompute", description="Reference log-probs: computed once before training and cached, or every batch.")
    steps_per_iteration: int = Field(1, ge=1, description="Online DPO: passes over each iteration's fresh pairs.")

    moved: ClassVar[dict[str, str]] = {"label_smoothing": "preference.loss_params.label_smoothing (cdpo)",
                                       "simpo_gamma": "preference.loss_params.gamma (simpo)"}

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        return _registered(v, "preference_loss")

    @field_validator("loss_params")
    @classmethod
    def _loss_params(cls, v: dict, info: ValidationInfo) -> dict:
        return _params(v, "preference_loss", info.data["loss"]) if "loss" in info.data else v

    @property
    def needs_reference(self) -> bool:
        return self.loss == "kto" or _registry("preference_loss")[self.loss].needs_reference


class ScheduleConfig(_Strict):
    num_steps: int = Field(10, ge=1, description="RL steps (rollout + update); online-DPO iterations.")
    num_epochs: int = Field(1, ge=1, description="Offline stages (sft, rm, dpo): passes over the training data.")
    prompts_per_step: int = Field(16, ge=1, description="Prompts per rollout.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    save_total_limit: int = Field(3, ge=0, description="Keep the newest N checkpoints, deleting older ones (0: keep all).")
    checkpoint_checksums: bool = Field(True, description="Record each checkpoint file's sha256 in its manifest and check "
                                       "it on --resume (off: sizes only, for very large checkpoints).")
    eval_every: int = Field(0, ge=0, description="Evaluate on data.eval_path every N steps (0: start and end only).")
    eval_prompts: int = Field(32, ge=0, description="Held-out prompts per evaluation (online methods: 0 skips every "
                              "held-out evaluation, the one before training and the one after it included).")
    save_final: bool = Field(True, description="Online methods: checkpoint after the last step (the final policy "
                             "directory is written either way); off for throughput runs that never resume.")


class MonitorsConfig(_Strict):
    """In-loop failure-mode monitors of the online methods (rlhf_cluster.quality.monitors); each compares a step
    with the mean of the run's first ``warmup`` steps and logs a named warning (and ``monitor/NAME: 1`` in
    metrics.jsonl) when it fires."""

    warmup: int = Field(3, ge=1, description="Steps whose mean is each monitor's baseline.")
    collapse_fraction: float = Field(0.5, gt=0, lt=1, description="mode_collapse: distinct-2 of the samples or the "
                                     "policy entropy below this fraction of its start.")
    max_kl_per_token: float = Field(1.0, gt=0, description="kl_blowup: KL(π‖π_ref) per token above this.")
    max_length_corr: float = Field(0.8, gt=0, le=1, description="length_hacking: reward–length correlation above this...")
    length_growth: float = Field(1.5, gt=1, description="...while the mean response length grew by this factor.")
    gold_function: str | None = Field(
        None, description="A second reward, 'package.module:function' like reward.function (found the same way), that "
        "the training reward stands in for: scored on every step's samples (gold/mean, gold/gap) and read by "
        "reward_hacking. Not trained on.")
    hacking_rise: float = Field(0.1, gt=0, description="reward_hacking: the reward rose this much over its start "
                                "(in its own units) while the gold reward rose less than a quarter of that.")
    refusal_rise: float = Field(0.2, gt=0, le=1, description="over_refusal: the share of samples that refuse, or of "
                                "answers to the benign probe prompts that refuse, rose this much over its start.")
    agreement_rise: float = Field(0.2, gt=0, le=1, description="sycophancy: the share of answers to the sycophancy "
                                  "probe that open by agreeing rose this much over the evaluation before training.")
    probes: bool = Field(True, description="At every held-out evaluation (before training, every schedule.eval_every "
                         "steps, after the last) also answer the benign and sycophancy probe prompts, one answer each "
                         "(eval/benign_refusal_rate, eval/agreement_rate), which over_refusal and sycophancy read. Off "
                         "with schedule.eval_prompts: 0.")
    benign_prompts: str | None = Field(None, description="Benign probe prompts (any format `rlhf-cluster eval` reads); "
                                       "default: the shipped configs/data/eval_benign.jsonl.")
    sycophancy_prompts: str | None = Field(None, description="Prompts asserting something false (any format `rlhf-cluster "
                                           "eval` reads); default: the shipped configs/data/eval_sycophancy.jsonl.")
    stop_on: list[Literal["mode_collapse", "kl_blowup", "length_hacking", "reward_hacking", "over_refusal",
                          "sycophancy"]] = Field(
        default_factory=list, description="Monitors that stop the run (after a checkpoint) when they fire.")


class FaultToleranceConfig(_Strict):
    """Automatic recovery of the online methods (ppo, online_dpo) from a dead actor or a hung call, and the steps
    skipped for non-finite values (every method)."""

    max_restarts: int = Field(
        1, ge=0, description="How often a run restarts itself after an actor died (its process killed, out of memory, "
        "its node lost) or a call ran past cluster.call_timeout_s: every role is shut down and started again (the frozen reference and "
        "reward, when alive and not the one that failed, stay loaded), and training resumes from the newest checkpoint "
        "that verifies (step 0 if there is none), so the steps since that "
        "checkpoint are redone. An error raised inside an actor (a bad model file, a reward function that raises) would "
        "happen again and is not retried. 0: stop at the first failure. Applies with cluster.backend=ray; with "
        "backend=local every role is in the driver's process and there is nothing to restart.")
    max_bad_steps: int = Field(
        3, ge=1, description="A step whose rewards are not finite (NaN or inf from the reward) or whose loss or "
        "gradient norm is not finite is skipped (a skipped optimizer step leaves the weights, optimizer state and "
        "learning-rate schedule as they were; a skipped reward trains on nothing) and said in the log and "
        "metrics.jsonl (step/skipped); after this many skipped steps in a row the run stops, naming the last "
        "cause. Every method, offline stages included.")


class ClusterConfig(_Strict):
    backend: Literal["ray", "local"] = Field(
        "ray", description="ray: every role in Ray actors (a local Ray by default, or the cluster at 'address'). local: "
        "every role as a plain object in this one process, no Ray — one rank per role, for debugging the loop.")
    address: str | None = Field(None, description="Existing Ray cluster: its GCS 'HOST:PORT', 'auto' on a cluster node, "
                                "or 'ray://HOST:10001' (Ray Client); null starts a local one.")
    connect_timeout_s: float = Field(30.0, gt=0, description="Give up reaching the cluster at 'address' after this long.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for the local Ray (default: all).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the cluster has GPUs.")
    cpus_per_actor: float = Field(0.01, gt=0, description="CPU resource each actor reserves (CPU clusters).")
    threads_per_actor: Literal["auto"] | int = Field(
        "auto", description="torch threads per actor. auto: on a CPU cluster the actors a phase runs at once split "
        "their node's CPUs and an actor working alone gets them all (Ray alone would give each actor 1); on GPUs, "
        "as Ray starts them. A number: every actor always uses that many.")
    call_timeout_s: float | None = Field(
        3600.0, gt=0, description="Stop the run, naming the role, rank and phase, when one actor call (a generation, a "
        "reward, an update, a checkpoint save) takes longer than this; null waits forever. Ray backend only.")
    phase_timeouts_s: dict[Literal["init", "generate", "score", "update", "sync", "checkpoint"], float] = Field(
        default_factory=dict, description="A limit per phase, in place of call_timeout_s for its calls, e.g. "
        "{generate: 600, checkpoint: 7200}: init (loading the models), generate, score (reward, reference and old "
        "log-probs, values), update, sync (the weight sync), checkpoint (saving and loading). The error names the "
        "setting that applied.")
    memory_check: bool = Field(True, description="GPU clusters: before any actor starts, estimate each GPU's memory "
                               "(`rlhf-cluster plan`) and refuse a config that cannot fit.")
    gpu_memory_gib: float | None = Field(None, gt=0, description="Memory of each GPU for that check (default: read from "
                                         "the cluster's GPUs).")
    colocate_policy_reference: bool = Field(False, description="Reference replicas share the policy ranks' GPUs.")
    colocate_critic_reward: bool = Field(False, description="Reward replicas share the critic ranks' GPUs.")

    @field_validator("phase_timeouts_s")
    @classmethod
    def _phase_timeouts(cls, v):
        bad = {k: t for k, t in v.items() if not t > 0}
        if bad:
            raise ValueError(f"phase_timeouts_s must be positive seconds, got {bad}")
        return v

    @field_validator("threads_per_actor")
    @classmethod
    def _threads(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("threads_per_actor must be 'auto' or a number >= 1")
        return v


# ----------------------------------------------------------------------------- run


_OFFLINE = {"seed", "output_dir", "method", "policy", "data", "cluster", "algorithm.mini_batch_size", "schedule.num_epochs",
            "fault_tolerance.max_bad_steps"}
_ONLINE_SCHEDULE = {f"schedule.{f}" for f in ("num_steps", "prompts_per_step", "save_every", "save_final", "save_total_limit",
                                                "checkpoint_checksums", "eval_every", "eval_prompts")}
# What each driver loop reads: whole sections, or single fields as "section.field".
METHOD_READS: dict[str, set[str]] = {
    "ppo": {"seed", "output_dir", "method", "policy", "critic", "reference", "reward", "rollout", "data", "algorithm",
            "cluster", "monitors", "fault_tolerance", *_ONLINE_SCHEDULE},
    "online_dpo": {"seed", "output_dir", "method", "policy", "reference", "reward", "rollout", "data", "cluster", "monitors",
                   "fault_tolerance", "algorithm.mini_batch_size", *_ONLINE_SCHEDULE,
                   *(f"preference.{f}" for f in ("loss", "beta", "loss_params", "steps_per_iteration"))},
    "dpo": {*_OFFLINE, "reference", *(f"preference.{f}" for f in ("loss", "beta", "loss_params", "kto_desirable_weight",
                                                                  "kto_undesirable_weight", "reference_mode"))},
    "sft": _OFFLINE,
    "rm": _OFFLINE,
}


class RunConfig(_Strict):
    method: Literal["ppo", "sft", "rm", "dpo", "online_dpo"] = Field(
        "ppo", description="Which driver loop runs: ppo (and critic-free RL), sft, rm (reward model), dpo (offline "
        "DPO family and KTO), online_dpo.")
    seed: int = Field(0, description="Seeds data order, sampling and initialisation; a run is reproducible from it.")
    output_dir: str = Field("runs/default", description="Checkpoints, metrics.jsonl, TensorBoard, plots.")
    policy: TrainerConfig = Field(default_factory=lambda: TrainerConfig())
    critic: TrainerConfig = Field(default_factory=lambda: TrainerConfig(learning_rate=1e-5))
    reference: ScorerConfig = Field(default_factory=ScorerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    monitors: MonitorsConfig = Field(default_factory=MonitorsConfig)
    fault_tolerance: FaultToleranceConfig = Field(default_factory=FaultToleranceConfig)

    @model_validator(mode="after")
    def _fields_the_method_reads(self) -> RunConfig:
        """A setting the chosen method never reads is refused rather than silently ignored."""
        reads = METHOD_READS[self.method]
        for section, info in type(self).model_fields.items():
            value = getattr(self, section)
            if section in reads or not isinstance(value, BaseModel):
                continue
            default = info.get_default(call_default_factory=True)
            for name in sorted(value.model_fields_set):
                if f"{section}.{name}" not in reads and getattr(value, name) != getattr(default, name):
                    used = sorted(r.partition(".")[2] for r in reads if r.startswith(f"{section}."))
                    what = f"it reads only {', '.join(f'{section}.{u}' for u in used)}" if used else f"it has no {section}"
                    raise ValueError(f"{section}.{name} is not used by method={self.method} ({what}); remove it")
        return self

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        if self.policy.model_name_or_path is None:
            raise ValueError("policy.model_name_or_path is required: point it at a local Hugging Face model directory")
        if self.data.train_path is None:
            raise ValueError("data.train_path is required: a JSONL/JSON/Parquet file or a datasets directory")
        if self.reference.model_name_or_path is None and self.needs_reference:
            self.reference.model_name_or_path = self.policy.model_name_or_path
        rl = self.method in ("ppo", "online_dpo")
        if rl and self.reward.kind is None:
            raise ValueError("the reward needs a source: set reward.model_name_or_path (a reward model), "
                             "reward.function='module:function', or reward.url (a reward server)")
        if self.critic.model_name_or_path is None and self.needs_critic:
            # The usual initialisation: the critic starts from the reward model (or the policy).
            self.critic.model_name_or_path = self.reward.model_name_or_path or self.policy.model_name_or_path
        a, r, s = self.algorithm, self.rollout, self.schedule
        if self.method == "ppo" and _registry("advantage_estimator")[a.advantage_estimator].needs_groups \
                and r.n_samples_per_prompt < 2:
            raise ValueError(
                f"algorithm.advantage_estimator={a.advantage_estimator} compares samples of one prompt: "
                f"set rollout.n_samples_per_prompt >= 2 (got {r.n_samples_per_prompt})"
            )
        if self.method == "online_dpo":
            if r.n_samples_per_prompt < 2:
                raise ValueError(f"online_dpo pairs the best and worst of several samples: set rollout.n_samples_per_prompt >= 2 "
                                 f"(got {r.n_samples_per_prompt})")
            if self.preference.loss == "kto":
                raise ValueError("online_dpo builds pairs; use a pairwise preference.loss (dpo, cdpo, ipo, hinge, orpo, simpo), not kto")
        if self.method == "ppo":
            batch = s.prompts_per_step * r.n_samples_per_prompt
            if batch % a.mini_batch_size:
                raise ValueError(
                    f"schedule.prompts_per_step × rollout.n_samples_per_prompt = {batch} sequences per step is not a multiple "
                    f"of algorithm.mini_batch_size={a.mini_batch_size}; pick a mini_batch_size that divides {batch}"
                )
        if self.cluster.backend == "local":
            if self.cluster.address is not None:
                raise ValueError("cluster.backend=local runs in this process: drop cluster.address (or use backend=ray)")
            big = [f"{role}: {getattr(self, role).world_size} ranks" for role in ("policy", "critic", "reference", "reward")
                   if getattr(self, role).world_size > 1]
            if r.num_engines > 1 or r.tensor_parallel_size > 1:
                big.append(f"rollout: {r.num_engines} engines × tensor_parallel_size {r.tensor_parallel_size}")
            if big:
                raise ValueError(f"cluster.backend=local runs one rank per role; these ask for more: {'; '.join(big)}. "
                                 "Use backend=ray, or set them to 1")
        if r.weight_sync == "nccl" and self.cluster.device == "cpu":
            raise ValueError("rollout.weight_sync=nccl needs GPUs but cluster.device=cpu: use weight_sync=gloo (or auto)")
        if self.method == "online_dpo" and s.prompts_per_step % a.mini_batch_size:
            raise ValueError(f"online_dpo makes one pair per prompt: schedule.prompts_per_step={s.prompts_per_step} must be a "
                             f"multiple of algorithm.mini_batch_size={a.mini_batch_size}")
        for role in ("policy", "critic") if self.needs_critic else ("policy",):
            t: TrainerConfig = getattr(self, role)
            if a.mini_batch_size % (t.micro_batch_size * t.world_size):
                raise ValueError(
                    f"algorithm.mini_batch_size={a.mini_batch_size} must be a multiple of {role}.micro_batch_size × ranks "
                    f"= {t.micro_batch_size} × {t.world_size}; change one of them"
                )
        return self

    @property
    def needs_reference(self) -> bool:
        if self.method == "ppo":
            return self.algorithm.uses_kl
        return self.method in ("dpo", "online_dpo") and self.preference.needs_reference

    @property
    def needs_critic(self) -> bool:
        return self.method == "ppo" and _registry("advantage_estimator")[self.algorithm.advantage_estimator].needs_critic


# ----------------------------------------------------------------------------- loading


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``'policy.zero_stage=3'`` -> ``('policy.zero_stage', 3)`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value, e.g. policy.zero_stage=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write e.g. policy.zero_stage=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value ({e.__class__.__name__})") from None
    return key, value


def _known_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        out.append(prefix + name)
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_known_fields(ann, prefix + name + "."))
    return out


def _moved(model: type[BaseModel], loc: tuple) -> str | None:
    """Where the field at ``loc`` went, if the section that owned it lists it in ``moved``."""
    for part in loc[:-1]:
        f = model.model_fields.get(str(part))
        if f is None or not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)):
            return None
        model = f.annotation
    return getattr(model, "moved", {}).get(str(loc[-1]))


def _format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    known = _known_fields(model)
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden" and (moved := _moved(model, e["loc"])):
            lines.append(f"{loc} moved to {moved}")
        elif e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(loc, known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else "; run `rlhf-cluster config` to list the fields"
            lines.append(f"unknown field '{loc}'{hint}")
        elif loc:
            lines.append(f"{loc}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
        else:
            lines.append(e["msg"].removeprefix("Value error, "))
    return "invalid config:\n  " + "\n  ".join(lines)


def _read_tree(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML file as a dict; ``base: other.yaml`` (relative to the file) is loaded first and overlaid."""
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.resolve() in seen:
        raise ConfigError(f"config file {str(p)!r}: 'base' chain loops back to itself")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections at the top level")
    base = tree.pop("base", None)
    if base is None:
        return tree
    return _deep_merge(_read_tree(p.parent / base, (*seen, p.resolve())), tree)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


SHIPPED = Path(__file__).parent / "configs"


def find_config(arg: str | Path) -> Path:
    """A config file path, or the name of a shipped config (``ppo_demo``, ``grpo.yaml``) installed with the package."""
    p = Path(arg)
    if p.exists():
        return p
    for cand in (SHIPPED / p.name, SHIPPED / f"{p.name}.yaml"):
        if p.parent == Path(".") and cand.is_file():
            return cand
    names = ", ".join(sorted(f.stem for f in SHIPPED.glob("*.yaml")))
    raise ConfigError(f"config file {str(arg)!r} does not exist (nor is it a shipped config: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Merge a YAML file (optional; it may name a ``base`` file it extends) with dotted overrides, and validate.

    Relative paths are resolved against the working directory here, once: actors run in
    directories of their own (on other machines, too), so nothing relative may reach them.
    """
    tree: dict = _read_tree(Path(path)) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = build_config(tree)
    config_dir = Path(path).parent if path is not None else None
    return absolute_paths(cfg, Path.cwd(), config_dir)


PATH_FIELDS = ("output_dir", "policy.model_name_or_path", "critic.model_name_or_path", "reference.model_name_or_path",
               "reward.model_name_or_path", "reward.code_dir", "data.train_path", "data.eval_path",
               "monitors.benign_prompts", "monitors.sycophancy_prompts")


def absolute_path(value: str, base: Path) -> str:
    """``value`` (``~`` expanded) as an absolute path, relative ones taken from ``base``."""
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def resolve_path(dotted: str, value: str, base: Path, config_dir: Path | None = None) -> str:
    """Path field ``dotted`` made absolute against ``base``; an input that is not there but is next to the
    config file (a shipped config's ``data/...``) is taken from there."""
    path = absolute_path(value, base)
    if dotted != "output_dir" and config_dir is not None and not os.path.exists(path):
        beside = absolute_path(value, config_dir)
        return beside if os.path.exists(beside) else path
    return path


def absolute_paths(cfg: RunConfig, base: Path, config_dir: Path | None = None) -> RunConfig:
    """Every path field made absolute against ``base`` (the working directory); an input that is not
    there but is next to the config file (a shipped config's ``data/...``) is taken from there. A local
    reward module's directory is found and recorded."""
    for dotted in PATH_FIELDS:
        section, _, name = dotted.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        value = getattr(owner, name)
        if value is not None:
            setattr(owner, name, resolve_path(dotted, value, base, config_dir))
    if cfg.reward.function and cfg.reward.code_dir is None:
        found = find_local_module(cfg.reward.function.partition(":")[0], [d for d in (config_dir, base) if d is not None])
        if found is not None:
            cfg.reward.code_dir = os.path.abspath(found.parent)
    return cfg


def find_local_module(module: str, search: list[Path]) -> Path | None:
    """The file or package directory of ``module``'s top-level package in one of ``search`` — a user's
    ``my_reward.py`` next to the config — unless an installed package of that name would be imported instead."""
    top = module.split(".")[0]
    for d in search:
        for cand in (Path(d) / f"{top}.py", Path(d) / top):
            if cand.is_file() or (cand / "__init__.py").is_file():
                origin = _installed_origin(top)
                if origin is not None and not Path(origin).resolve().is_relative_to(Path(d).resolve()):
                    return None  # installed (e.g. rlhf_cluster itself): every node has it
                return cand
    return None


def _installed_origin(top: str) -> str | None:
    """Where ``import top`` would load from without the working directory on sys.path (editable installs too)."""
    import sys

    saved = sys.path[:]
    sys.path[:] = [p for p in saved if p not in ("", ".", os.getcwd())]
    try:  # ask the finders themselves: importlib.util.find_spec would answer from sys.modules
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(top, None) if find else None
            if spec is not None:
                return spec.origin or next(iter(spec.submodule_search_locations or []), None)
    except (ImportError, ValueError):
        return None
    finally:
        sys.path[:] = saved
    return None


def build_config(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, RunConfig)) from None


def config_tree(cfg: RunConfig) -> dict:
    """The config as plain data, with only the fields its method reads (so it loads back as the same config)."""
    reads = METHOD_READS[cfg.method]
    out: dict = {}
    for key, value in cfg.model_dump(mode="json").items():
        if key in reads:
            out[key] = value
        elif isinstance(value, dict):
            kept = {k: v for k, v in value.items() if f"{key}.{k}" in reads}
            if kept:
                out[key] = kept
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_tree(cfg), sort_keys=False)


def explain(cfg: RunConfig | None = None) -> str:
    """Every field with its value (``cfg``) or default, its allowed values and its meaning."""
    import typing

    lines: list[str] = []

    def walk(model: type[BaseModel], value, prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                doc = (ann.__doc__ or "").strip().splitlines()[0] if ann.__doc__ else ""
                lines.append(f"\n[{prefix}{name}]" + (f"  {doc}" if doc else ""))
                walk(ann, getattr(value, name) if value is not None else None, f"{prefix}{name}.")
                continue
            default = f.get_default(call_default_factory=True)
            head = f"{prefix}{name}: " + (f"{_show(getattr(value, name))}   (default {_show(default)})" if value is not None
                                          else _show(default))
            args = typing.get_args(ann)
            literal = [a for a in args if typing.get_origin(a) is Literal] or ([ann] if typing.get_origin(ann) is Literal else [])
            registry = (f.json_schema_extra or {}).get("registry") if isinstance(f.json_schema_extra, dict) else None
            if literal:
                head += "   one of: " + ", ".join(_show(v) for v in typing.get_args(literal[0]))
            elif registry:
                head += "   one of: " + ", ".join(sorted(_registry(registry)))
            lines.append(head)
            if f.description:
                lines.append(f"    {f.description}")
            params_of = (f.json_schema_extra or {}).get("params_of") if isinstance(f.json_schema_extra, dict) else None
            if params_of:
                lines.extend(f"      {line}" for line in _params_doc(params_of))

    walk(RunConfig, cfg, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _show(v) -> str:
    return "null" if v is None else (yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
                                     if not isinstance(v, str) else v)


# ----------------------------------------------------------------------------- preflight


def _check_model_dir(field: str, path: str | None, produced: frozenset[str] = frozenset()) -> None:
    if path is None or path in produced:
        return
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"{field}={path!r} is not a local Hugging Face model directory (no config.json there); "
            "models load from disk only — build a tiny one with `rlhf-cluster build-tiny DIR`"
        )


def resolve_function(spec: str, code_dir: str | None = None):
    """Import ``'package.module:function'`` (from ``code_dir`` first, when given) and return the callable."""
    import sys

    mod_name, _, fn_name = spec.partition(":")
    added = bool(code_dir) and code_dir not in sys.path
    if added:
        sys.path.insert(0, code_dir)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"reward.function={spec!r}: cannot import module {mod_name!r} ({e})") from None
    except Exception as e:
        raise ConfigError(f"reward.function={spec!r}: importing {mod_name!r} raised {type(e).__name__}: {e}") from None
    finally:
        if added:
            sys.path.remove(code_dir)
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"reward.function={spec!r}: module {mod_name!r} has no function {fn_name!r}")
    return fn


def preflight(cfg: RunConfig, produced: frozenset[str] = frozenset()) -> None:
    """Checks that need the file system: run before any actor starts.

    ``produced``: model directories an earlier pipeline stage will write (not there yet).
    """
    _check_model_dir("policy.model_name_or_path", cfg.policy.model_name_or_path, produced)
    if cfg.needs_reference:
        _check_model_dir("reference.model_name_or_path", cfg.reference.model_name_or_path, produced)
    if cfg.method in ("ppo", "online_dpo"):
        _check_model_dir("reward.model_name_or_path", cfg.reward.model_name_or_path, produced)
    if cfg.needs_critic:
        _check_model_dir("critic.model_name_or_path", cfg.critic.model_name_or_path, produced)
    for field in ("train_path", "eval_path"):
        path = getattr(cfg.data, field)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"data.{field}={path!r} does not exist")
    for field in ("benign_prompts", "sycophancy_prompts"):
        path = getattr(cfg.monitors, field)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"monitors.{field}={path!r} does not exist (a prompt file, or leave it unset for the shipped one)")
    _check_output_dir_room(cfg, produced)
    if cfg.method in ("ppo", "online_dpo"):
        _check_reward_source(cfg.reward)
        if cfg.monitors.gold_function:
            try:
                resolve_function(cfg.monitors.gold_function, cfg.reward.code_dir)
            except ConfigError as e:
                raise ConfigError(f"monitors.gold_function: {e}") from None


def count_params(model_dir: str | Path) -> int | None:
    """Parameters of a model directory, read from its safetensors headers (no weights loaded); None without them."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                size = 1
                for d in shape:
                    size *= d
                n += size
    return n


def checkpoint_bytes(cfg: RunConfig, produced: frozenset[str] = frozenset()) -> int | None:
    """A lower bound on what one save of this run writes: per trained role its weights plus Adam's two fp32
    moments (and fp32 master weights below fp32), plus the policy as a model directory; offline stages write
    the trained model alone. ``auto`` dtypes count as bf16. None when a model's size cannot be read yet."""
    online = cfg.method in ("ppo", "online_dpo") and bool(cfg.schedule.save_every or cfg.schedule.save_final)
    roles = [cfg.policy] + ([cfg.critic] if online and cfg.needs_critic else [])
    total = 0
    for i, t in enumerate(roles):
        path = t.model_name_or_path or cfg.policy.model_name_or_path  # a critic without one starts from the policy
        if path in produced or not Path(path).is_dir():
            return None
        n = count_params(path)
        if n is None:
            return None
        d = {"fp32": 4, "bf16": 2, "fp16": 2, "auto": 2}[t.dtype]
        total += n * d if not online else n * (d + 8 + (4 if d < 4 else 0)) + (n * d if i == 0 else 0)
    return total


def _check_output_dir_room(cfg: RunConfig, produced: frozenset[str]) -> None:
    """output_dir (or the folder it will be made in) writable, with room for one save of this run."""
    import shutil

    out = Path(os.path.abspath(cfg.output_dir))
    base = out
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        where = "" if base == out else f" (it would be made in {base})"
        raise ConfigError(f"output_dir={cfg.output_dir!r} is not writable{where}: choose a folder you can write to")
    if (out / "checkpoints").exists():
        return  # a run continued or replaced: its own checkpoints are what a save would reuse or free
    need = checkpoint_bytes(cfg, produced)
    free = shutil.disk_usage(base).free
    if need is not None and need > free:
        what = "a checkpoint" if cfg.method in ("ppo", "online_dpo") else "the trained model"
        raise ConfigError(f"output_dir={cfg.output_dir!r}: {what} of this run needs about {need / 2**30:.2f} GiB and "
                          f"{base} has {free / 2**30:.2f} GiB free: free some space or choose another output_dir")


def _check_reward_source(r: RewardConfig) -> None:
    """A reward function that imports and has the right shape; a reward server that accepts connections."""
    if r.kind == "function":
        from rlhf_cluster.workers.reward_sources import function_fields

        try:
            function_fields(resolve_function(r.function, r.code_dir))
        except TypeError as e:
            raise ConfigError(f"reward.function={r.function!r} {e}") from None
    elif r.kind == "http":
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(r.url)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            socket.create_connection((u.hostname, port), timeout=min(r.timeout_s, 10.0)).close()
        except OSError as e:
            raise ConfigError(f"reward.url={r.url!r}: cannot connect to {u.hostname}:{port} ({e.strerror or e}); "
                              "start the reward server first, or fix the URL") from None
