"""Per-GPU memory estimate and placement plan (``rlhf-cluster plan``), before anything starts.

From a validated config: where each role's actors land on a hypothetical cluster, how much
GPU memory each needs, and whether it fits — with the settings that would make it fit.
Pure: no Ray, no torch; ``role_layout`` decides the roles, these functions only count bytes.

Three kinds of numbers live here, and the docstrings say which is which:

* **Parameter counts** are exact (tests compare them with transformers models).
* **Model states** (weights, gradients, Adam moments, fp32 masters, DeepSpeed's flat buffers
  and buckets) follow what DeepSpeed 0.19.8 allocates with this repo's trainer setup (a torch
  AdamW passed as client optimizer, the ZeRO defaults our ``deepspeed_config`` leaves alone);
  the source lines are cited next to each term, and tests/workers/test_memory_estimate.py
  checks the step-time sum against the tensors a real engine holds.
* **Activations** and vLLM's profiling peak are estimates.

All byte counts are per GPU (per data-parallel rank, per scorer replica, per tensor-parallel
shard) unless a name says otherwise. Not counted: each process's CUDA context and NCCL buffers
(outside torch's allocator, a few hundred MiB per process) and allocator fragmentation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

GiB = 1 << 30

# DeepSpeed 0.19.8 defaults that rlhf_cluster.workers.trainer.deepspeed_config leaves in place.
REDUCE_BUCKET_SIZE = 500_000_000  # zero_optimization.reduce_bucket_size, elements (runtime/zero/config.py:113)
ALLREDUCE_BUCKET_SIZE = 500_000_000  # MEMORY_OPT_ALLREDUCE_SIZE, ZeRO-0's gradient all-reduce (runtime/engine.py:151)
SUB_GROUP_SIZE = 1_000_000_000  # zero_optimization.sub_group_size: ZeRO-3 steps the optimizer per sub-group (config.py:182)
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters: gathered ZeRO-3 weights kept resident (config.py:245)

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def dtype_bytes(name: str) -> int:
    """Bytes per element of a config dtype; "auto" is bf16 because this is a GPU plan."""
    return 2 if name == "auto" else _DTYPE_BYTES[name]


# ----------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """The numbers memory depends on, read from a Llama / Qwen2 / Mistral ``config.json``."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama with attention_bias=true
    o_bias: bool = False  # Llama with attention_bias=true (Qwen2's o_proj has none)
    mlp_bias: bool = False  # Llama with mlp_bias=true
    torch_dtype: str = "bfloat16"  # the checkpoint's dtype (informational: the run's dtype decides)

    @classmethod
    def from_config(cls, c: dict) -> ModelShape:
        kind = c.get("model_type")
        if kind not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"model_type {kind!r}: the memory plan knows llama, qwen2 and mistral configs")
        heads = c["num_attention_heads"]
        llama_bias = kind == "llama" and bool(c.get("attention_bias", False))
        return cls(
            hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], intermediate_size=c["intermediate_size"],
            vocab_size=c["vocab_size"], num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            # LlamaConfig, Qwen2Config and MistralConfig all default to untied embeddings.
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or llama_bias, o_bias=llama_bias,
            mlp_bias=kind == "llama" and bool(c.get("mlp_bias", False)),
            torch_dtype=str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelShape:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no config.json to read the model's shape from")
        return cls.from_config(json.loads(p.read_text()))


def param_numels(shape: ModelShape, head: str = "lm") -> list[int]:
    """Element count of every parameter tensor, in module order.

    head: "lm" (``*ForCausalLM``; its lm_head is the embedding when tied) or "scalar"
    (``*ForSequenceClassification`` with num_labels=1: a bias-free ``score`` Linear(H, 1)).
    """
    H, I, V = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    layer = [H * q, H * kv, H * kv, q * H, I * H, I * H, H * I, H, H]  # q k v o gate up down, two RMSNorms
    layer += [q, kv, kv] if shape.qkv_bias else []
    layer += [H] if shape.o_bias else []
    layer += [I, I, H] if shape.mlp_bias else []
    out = [V * H] + layer * shape.num_layers + [H]
    if head == "lm":
        return out if shape.tie_word_embeddings else out + [V * H]
    if head == "scalar":
        return out + [H]
    raise ValueError(f"head must be 'lm' or 'scalar', got {head!r}")


def num_params(shape: ModelShape, head: str = "lm") -> int:
    """Exact parameter count of the model transformers builds from this config."""
    return sum(param_numels(shape, head))


def zero3_partition_numel(numels: list[int], dp: int) -> int:
    """Elements of one ZeRO-3 rank's partition: each tensor padded to a multiple of dp, then split
    (deepspeed/runtime/zero/partition_parameters.py:1690-1696 _aligned_size, :1816-1817)."""
    return sum(-(-n // dp) for n in numels)


# ----------------------------------------------------------------------------- trainer model states


@dataclass(frozen=True)
class ModelStates:
    """Bytes one trainer rank holds for its model at the two moments that can peak.

    *At the step*: inside the inner torch AdamW step, when gradients, optimizer state and fp32
    masters coexist and activations are gone. *In backward*: while activations are alive and
    gradients are being produced and reduced. The persistent part (``params``, ``optimizer``)
    is in both. GPU unless named ``host``.
    """

    params: int  # weights as held: all of them, or this rank's partition under ZeRO-3
    optimizer: int  # Adam exp_avg + exp_avg_sq (+ its step counters) + fp32 master weights
    grads_at_step: int  # gradients resident when AdamW steps
    buffers_at_step: int  # fixed-size buffers resident at the step (ZeRO-3's reduce bucket, offload staging)
    temp_at_step: int  # transient on top at the step: flatten copies, AdamW's sqrt(v) temporary
    grads_in_backward: int  # gradient storage while backward runs
    buffers_in_backward: int  # reduce bucket, ZeRO-3's gathered weights, offload staging
    host: int  # host RAM with offload (pinned when GPUs are present), including CPU AdamW's temporaries

    @property
    def at_step(self) -> int:
        """What the engine's tensors add up to inside the step (the test measures this)."""
        return self.params + self.optimizer + self.grads_at_step + self.buffers_at_step

    def peak(self, activations: int) -> tuple[int, str]:
        """(GPU bytes at the larger of the two moments, which moment).

        Backward counts the forward's activations and backward's gradients as coexisting: an
        upper bound, since activations are freed as gradients appear.
        """
        step = self.grads_at_step + self.buffers_at_step + self.temp_at_step
        backward = self.grads_in_backward + self.buffers_in_backward + activations
        return self.params + self.optimizer + max(step, backward), ("step" if step > backward else "backward")


def model_states(num_params: int, *, zero_stage: int, dp: int, dtype_bytes: int, offload_optimizer: bool = False,
                 offload_params: bool = False, num_tensors: int = 1, largest_tensor: int = 0,
                 zero3_partition: int | None = None, grad_accum_steps: int = 1,
                 reduce_bucket_size: int = REDUCE_BUCKET_SIZE, allreduce_bucket_size: int = ALLREDUCE_BUCKET_SIZE,
                 sub_group_size: int = SUB_GROUP_SIZE, max_live_parameters: int = MAX_LIVE_PARAMETERS) -> ModelStates:
    """What DeepSpeed 0.19.8 allocates per rank for this repo's trainer (torch AdamW as client optimizer).

    P = num_params, d = dtype_bytes (4 fp32, 2 bf16/fp16), N = dp, B = reduce_bucket_size,
    n = largest_tensor, Pn = ⌈P/2N⌉·2 (ZeRO-1/2 partition), Pz = zero3_partition (default ⌈P/N⌉),
    S = min(Pz, sub_group_size). Source lines are in deepspeed/runtime/ and torch/optim/adam.py.

    ZeRO-0 (engine.py:2313-2321: no ZeRO wrapper; fp32 steps torch AdamW directly, bf16/fp16
    get FP16_UnfusedOptimizer): params dP; fp32 masters 4P (fp16/unfused_optimizer.py:78) unless d=4;
    Adam 8P; grads dP, plus fp32 copies 4P made for every tensor before the step
    (unfused_optimizer.py:217-222) unless d=4. The all-reduce flattens ≤ min(P, 5e8+n)
    elements (engine.py:3796, :3828-3839) and AdamW's foreach path makes one 4P sqrt(v) temporary (adam.py:790).

    ZeRO-1/2 (zero/stage_1_and_2.py): dP flat weights, padded to 2N (:441, :505-515); an fp32
    master partition 4Pn cloned even at fp32 (:560-561); Adam 8Pn; at the step a 4Pn fp32
    gradient partition (:3118, :3126) and, transiently, 4Pn more (the flatten of the partition's
    gradients :3114-3117, or AdamW's sqrt(v)). In backward: a reduce bucket dB allocated on each
    backward's first gradient hook (:3266), and a dPn contiguous partition (:2192). ZeRO-2
    reduces as gradients appear, so one tensor's full gradient dn is in flight; with
    accumulation the previous micro-steps' partition stays referenced (:1039-1047). ZeRO-1's
    hooks do not reduce (:2290); the engine reduces after backward (engine.py:3092), so every
    gradient dP is alive.

    ZeRO-3 (zero/stage3.py): dPz weight partition (:972); fp32 master 4Pz — a clone even at
    fp32, because the "same dtype and device, alias it" test (:1162-1163) compares a
    torch.device with a string, which torch 2.13 calls unequal; Adam 8Pz; a dPz gradient
    partition buffer (:791) and a dB reduce bucket kept for the whole run (:782). The step
    flattens one sub-group at a time into a 4S fp32 gradient (:2686). Until the first step the
    masters' .grad is a 4S zero buffer (:1306); gathered weights take up to
    d·min(P, stage3_max_live_parameters) during forward and backward.

    Offload moves masters, Adam state and fp32 gradients to host RAM (stage_1_and_2.py:278
    device='cpu', :567 a d·Pn staging copy, :653-662 one-tensor staging buffers; stage3.py:333,
    :1338), where torch AdamW runs its single-tensor path with two 4-byte temporaries
    (adam.py:544); offload_params keeps ZeRO-3's partition in host RAM (stage3.py:907).
    """
    P, d, N, B, n = num_params, dtype_bytes, dp, reduce_bucket_size, largest_tensor
    if zero_stage == 0:
        step_counters = 4 * num_tensors  # torch AdamW keeps a float32 `step` tensor per parameter
        masters, fp32_grads = (0, 0) if d == 4 else (4 * P, 4 * P)
        return ModelStates(
            params=d * P, optimizer=masters + 8 * P + step_counters, grads_at_step=d * P + fp32_grads,
            buffers_at_step=0, temp_at_step=max(d * min(P, allreduce_bucket_size + n), 4 * P),
            grads_in_backward=d * P, buffers_in_backward=0, host=0)
    if zero_stage in (1, 2):
        Pn = -(-P // (2 * N)) * 2
        flat = d * Pn * N  # the model's weights are views into this one padded buffer
        if zero_stage == 2:  # offload copies each reduced gradient straight to host: no GPU partition
            backward = d * n if offload_optimizer else d * Pn * (2 if grad_accum_steps > 1 else 1) + d * n
        else:
            backward = d * P + (0 if offload_optimizer else d * Pn)
        if offload_optimizer:
            # masters, their fp32 grads and Adam (16Pn) + step counter; d·Pn staging; d·n staging; CPU
            # accumulation buffers with gradient accumulation (:1824); AdamW's two temporaries (8Pn).
            host = 16 * Pn + 4 + d * Pn + d * n + (d * Pn if grad_accum_steps > 1 else 0) + 8 * Pn
            return ModelStates(params=flat, optimizer=0, grads_at_step=0, buffers_at_step=d * n, temp_at_step=0,
                               grads_in_backward=backward, buffers_in_backward=d * B + d * n, host=host)
        return ModelStates(params=flat, optimizer=12 * Pn + 4, grads_at_step=4 * Pn, buffers_at_step=0,
                           temp_at_step=4 * Pn, grads_in_backward=backward, buffers_in_backward=d * B, host=0)
    if zero_stage != 3:
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    Pz = zero3_partition if zero3_partition is not None else -(-P // N)
    S = min(Pz, sub_group_size)
    step_counters = 4 * -(-Pz // sub_group_size)
    gathered = d * min(P, max_live_parameters)
    host = d * Pz if offload_params else 0
    params = 0 if offload_params else d * Pz
    if offload_optimizer:
        # masters, fp32 grads, Adam; the gradient partition lives on the optimizer's device; AdamW temps
        host += 16 * Pz + step_counters + d * Pz + 8 * S
        return ModelStates(params=params, optimizer=0, grads_at_step=0, buffers_at_step=d * B, temp_at_step=0,
                           grads_in_backward=d * n, buffers_in_backward=d * B + gathered, host=host)
    return ModelStates(params=params, optimizer=12 * Pz + step_counters, grads_at_step=d * Pz + 4 * S,
                       buffers_at_step=d * B, temp_at_step=4 * S, grads_in_backward=d * Pz + 4 * S + d * n,
                       buffers_in_backward=d * B + gathered, host=host)


# ----------------------------------------------------------------------------- activations (estimates)


def _mask_bytes(batch: int, seq_len: int) -> int:
    # With padding, transformers hands SDPA one (B, 1, L, L) bool causal+padding mask per forward.
    return batch * seq_len * seq_len


def activation_bytes(shape: ModelShape, *, batch: int, seq_len: int, response_len: int, dtype_bytes: int,
                     checkpointing: bool, head: str = "lm") -> int:
    """Estimated bytes autograd keeps for one training micro-batch of ``batch × seq_len`` tokens.

    Per layer and token, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models", §4.1), re-counted for a Llama-style layer (no dropout masks,
    RMSNorm, SwiGLU, GQA) and with their 5·a·s/h attention-score term dropped, since SDPA's
    fused kernels keep no s×s scores. With d the activation dtype's bytes, q = heads·head_dim:

      2·(4H + dH)  two RMSNorms: transformers upcasts the input to fp32 and keeps it, and the
                   normalised output in d feeds the next matmuls;
      5·d·q        SDPA keeps query, key and value (key/value repeated to all heads: the
                   padding mask rules out SDPA's own GQA) and its output; o_proj keeps a re-laid copy;
      4·d·I        SiLU keeps gate, the product keeps silu(gate) and up, down_proj keeps the product.

    Gradient checkpointing (transformers' per-layer, non-reentrant) keeps only each layer's input
    dH, plus one layer's full set while backward recomputes it. Added terms: the final norm, the
    SDPA mask (B·L² bool), and the head. For a causal LM the head is usually the largest term for
    small models: B·L·V·d full-sequence logits (later their gradient, the same size), and on the
    A response positions B·A·V·(16 + d): the fp32 upcast and softmax (entropy bonus) kept for
    backward, two fp32 gradient temporaries and the d-typed gradient. A scalar head keeps B·L·(d + 4).
    """
    H, I, d = shape.hidden_size, shape.intermediate_size, dtype_bytes
    norm = 4 * H + d * H
    layer = 2 * norm + 5 * d * shape.num_heads * shape.head_dim + 4 * d * I
    stack = shape.num_layers * d * H + layer if checkpointing else shape.num_layers * layer
    tokens = batch * seq_len
    if head == "lm":
        out = batch * shape.vocab_size * (seq_len * d + response_len * (16 + d))
    else:
        out = tokens * (d + 4)
    return tokens * (stack + norm) + _mask_bytes(batch, seq_len) + out


def forward_bytes(shape: ModelShape, *, batch: int, seq_len: int, response_len: int, dtype_bytes: int,
                  head: str = "lm") -> int:
    """Estimated peak of one no-grad forward (a frozen reference or reward model), beyond its weights.

    Without autograd only one layer's tensors live at a time; the MLP is the largest: per token the
    residual stream and norm output 2·dH, RMSNorm's fp32 upcast 4H, and gate, up and silu(gate)
    3·dI together. Plus the SDPA mask, and the head: a causal LM's B·L·V·d logits plus, on the A
    response positions, the gathered logits, their fp32 upcast and logsumexp's fp32 exp
    temporary, B·A·V·(d + 8); a scalar head B·L·(d + 4).
    """
    H, I, d = shape.hidden_size, shape.intermediate_size, dtype_bytes
    tokens = batch * seq_len
    layer = d * (2 * H + 3 * I) + 4 * H
    if head == "lm":
        out = batch * shape.vocab_size * (seq_len * d + response_len * (d + 8))
    else:
        out = tokens * (d + 4)
    return tokens * layer + _mask_bytes(batch, seq_len) + out


# ----------------------------------------------------------------------------- vLLM engines


def vllm_batch_defaults(gpu_memory_gib: float) -> tuple[int, int]:
    """vLLM 0.32's LLM-class defaults (max_num_batched_tokens, max_num_seqs) by GPU size
    (vllm/engine/arg_utils.py:2923-2952: H100/H200-class ≥ 70 GiB get the larger ones; an
    80 GiB A100 gets the smaller ones, which this plan cannot tell apart)."""
    return (16384, 1024) if gpu_memory_gib >= 70 else (8192, 256)


@dataclass(frozen=True)
class EngineMemory:
    """One vLLM engine's share of one of its GPUs."""

    budget: int  # gpu_memory_utilization × GPU memory: what vLLM reserves
    weights: int
    activations: int  # profiling-run peak, an estimate
    kv_bytes_per_token: int

    @property
    def kv_cache(self) -> int:
        return max(0, self.budget - self.weights - self.activations)

    @property
    def kv_tokens(self) -> int:
        return self.kv_cache // self.kv_bytes_per_token


def engine_memory(shape: ModelShape, *, gpu_bytes: int, gpu_memory_utilization: float, tensor_parallel_size: int,
                  dtype_bytes: int, max_num_batched_tokens: int, max_num_seqs: int) -> EngineMemory:
    """vLLM reserves ``utilization × GPU memory``; the KV cache gets what weights and the profiling
    run's peak leave (vllm/v1/worker/gpu_worker.py determine_available_memory).

    Weights: P·d / tp (vocabulary and projections are sharded; norms are small). KV per token:
    2 (K and V) × layers × kv_heads × head_dim × d / tp, with at least one KV head per GPU
    (vLLM replicates heads when tp > kv_heads). Profiling peak (estimate): T = max_num_batched_tokens
    tokens through the MLP, T·d·(3I/tp + 2H) (gate_up, its activation, residual and hidden),
    and the dummy sampler run over max_num_seqs rows of vocabulary logits, S·V·(d + 12): logits,
    their fp32 copy, the probabilities and the exponential noise vLLM samples with.
    """
    tp, d = tensor_parallel_size, dtype_bytes
    H, I, V = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    act = max_num_batched_tokens * d * (3 * I // tp + 2 * H) + max_num_seqs * V * (d + 12)
    kv_heads = max(1, shape.num_kv_heads // tp)
    return EngineMemory(budget=int(gpu_memory_utilization * gpu_bytes),
                        weights=num_params(shape, "lm") * d // tp, activations=act,
                        kv_bytes_per_token=2 * shape.num_layers * kv_heads * shape.head_dim * d)


# ----------------------------------------------------------------------------- placement


GPU = tuple[int, int]  # (node, gpu index on that node)


def place(specs: dict, nodes: int, gpus_per_node: int) -> tuple[dict[str, list[tuple[GPU, ...]]], list[str]]:
    """Simulate Ray placing each role's placement group, in start order.

    A role is one bundle of ``per_node × gpus_per_actor`` GPUs per node; multi-node roles need
    distinct nodes (STRICT_SPREAD), single-node ones PACK onto one (see cluster/groups.py).
    Nodes are tried in order and GPUs handed out lowest-first. Rank i sits in bundle
    i // per_node; a colocated guest's rank i shares its host rank i's GPUs; a role that asks
    for no GPU (a rule reward) gets none. Returns each role's GPUs per rank, and the roles
    that found no room, each as a sentence.
    """
    free = [list(range(gpus_per_node)) for _ in range(nodes)]
    out: dict[str, list[tuple[GPU, ...]]] = {}
    problems: list[str] = []
    for name, s in specs.items():
        if s.host is not None:
            continue
        if s.gpus_per_actor == 0:
            out[name] = [()] * s.size
            continue
        per_actor = math.ceil(s.gpus_per_actor)
        bundle = s.per_node * per_actor
        if bundle > gpus_per_node:
            problems.append(f"{name}: one node must hold {s.per_node} × {per_actor} = {bundle} GPUs, nodes have "
                            f"{gpus_per_node}; spread it over more nodes or use fewer GPUs per node")
            continue
        if s.num_nodes > nodes:
            problems.append(f"{name}: spans {s.num_nodes} nodes (one bundle each, STRICT_SPREAD), the cluster has {nodes}")
            continue
        chosen = [i for i in range(nodes) if len(free[i]) >= bundle][: s.num_nodes]
        if len(chosen) < s.num_nodes:
            left = sum(len(f) for f in free)
            problems.append(f"{name}: needs {s.num_nodes} node(s) with {bundle} free GPUs each; after the roles "
                            f"before it, {left} GPUs are left ({', '.join(f'n{i}: {len(f)}' for i, f in enumerate(free))})")
            continue
        ranks: list[tuple[GPU, ...]] = []
        for node in chosen:
            taken, free[node] = free[node][:bundle], free[node][bundle:]
            ranks += [tuple((node, g) for g in taken[j * per_actor:(j + 1) * per_actor]) for j in range(s.per_node)]
        out[name] = ranks
    for name, s in specs.items():
        if s.host is not None and s.host in out:
            out[name] = out[s.host][: s.size]
    return out, problems


# ----------------------------------------------------------------------------- per-role estimates


@dataclass(frozen=True)
class TrainerSetup:
    """A trainer role, as flat numbers (the builder step unpacks the config into this)."""

    zero_stage: int
    dp: int
    offload_optimizer: bool
    offload_params: bool
    gradient_checkpointing: bool
    micro_batch_size: int
    mini_batch_size: int
    rows_per_example: int  # 2 for pairwise objectives (chosen + rejected rows)
    seq_len: int
    response_len: int
    dtype_bytes: int
    head: str


@dataclass(frozen=True)
class ScorerSetup:
    """A frozen reference or reward-model replica, as flat numbers."""

    micro_batch_size: int
    seq_len: int
    response_len: int
    dtype_bytes: int
    head: str


@dataclass(frozen=True)
class EngineSetup:
    """One vLLM engine, as flat numbers."""

    tensor_parallel_size: int
    gpu_memory_utilization: float
    dtype_bytes: int
    max_model_len: int
    gpu_bytes: int
    max_num_batched_tokens: int
    max_num_seqs: int


@dataclass(frozen=True)
class RoleRow:
    """One role's estimate per GPU it uses, and where its ranks sit."""

    role: str
    ranks: int
    gpus: tuple[tuple[GPU, ...], ...]  # per rank; () for a role without GPUs
    params: int  # parameter count
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    buffers: int = 0
    activations: int = 0
    kv_cache: int = 0
    host: int = 0
    phase: str = ""  # trainers: the moment that peaks ("backward" or "step")
    note: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.buffers + self.activations + self.kv_cache


def trainer_row(role: str, shape: ModelShape, t: TrainerSetup) -> RoleRow:
    numels = param_numels(shape, t.head)
    P = sum(numels)
    gas = max(1, t.mini_batch_size // (t.micro_batch_size * t.dp))
    ms = model_states(P, zero_stage=t.zero_stage, dp=t.dp, dtype_bytes=t.dtype_bytes, offload_optimizer=t.offload_optimizer,
                      offload_params=t.offload_params, num_tensors=len(numels), largest_tensor=max(numels),
                      zero3_partition=zero3_partition_numel(numels, t.dp), grad_accum_steps=gas)
    act = activation_bytes(shape, batch=t.micro_batch_size * t.rows_per_example, seq_len=t.seq_len,
                           response_len=t.response_len, dtype_bytes=t.dtype_bytes, checkpointing=t.gradient_checkpointing,
                           head=t.head)
    _, phase = ms.peak(act)
    if phase == "step":
        grads, buffers, act_shown = ms.grads_at_step, ms.buffers_at_step + ms.temp_at_step, 0
    else:
        grads, buffers, act_shown = ms.grads_in_backward, ms.buffers_in_backward, act
    return RoleRow(role, t.dp, (), P, weights=ms.params, grads=grads, optimizer=ms.optimizer, buffers=buffers,
                   activations=act_shown, host=ms.host, phase=phase,
                   note=f"ZeRO-{t.zero_stage}" + (" +offload-opt" if t.offload_optimizer else "")
                   + (" +offload-params" if t.offload_params else "") + (" +ckpt" if t.gradient_checkpointing else ""))


def scorer_row(role: str, shape: ModelShape, s: ScorerSetup, ranks: int) -> RoleRow:
    P = num_params(shape, s.head)
    act = forward_bytes(shape, batch=s.micro_batch_size, seq_len=s.seq_len, response_len=s.response_len,
                        dtype_bytes=s.dtype_bytes, head=s.head)
    return RoleRow(role, ranks, (), P, weights=P * s.dtype_bytes, activations=act, phase="forward", note="frozen")


def engine_row(shape: ModelShape, e: EngineSetup, engines: int) -> tuple[RoleRow, EngineMemory]:
    m = engine_memory(shape, gpu_bytes=e.gpu_bytes, gpu_memory_utilization=e.gpu_memory_utilization,
                      tensor_parallel_size=e.tensor_parallel_size, dtype_bytes=e.dtype_bytes,
                      max_num_batched_tokens=e.max_num_batched_tokens, max_num_seqs=e.max_num_seqs)
    # vLLM takes its whole budget whatever the split; an over-full budget shows as weights + activations.
    row = RoleRow("rollout", engines, (), num_params(shape, "lm"), weights=m.weights, activations=m.activations,
                  kv_cache=m.kv_cache, phase="vllm",
                  note=f"tp={e.tensor_parallel_size} KV {m.kv_tokens:,} tok (max_model_len {e.max_model_len:,})")
    return row, m


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Fix:
    """One setting change and the GPU memory the plan computes with it."""

    override: str  # as `rlhf-cluster plan` / `train` take it, e.g. "policy.zero_stage=3"
    need: int  # bytes on the GPU in question (rollout: KV tokens it leaves room for)
    fits: bool
    detail: str = ""


@dataclass(frozen=True)
class Problem:
    role: str
    message: str
    fixes: tuple[Fix, ...] = ()

    def __str__(self) -> str:
        return self.message


@dataclass
class Plan:
    """Where each role goes, what each GPU holds, and the verdict."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    rows: list[RoleRow]
    gpu_load: dict[GPU, list[tuple[str, int]]]  # per GPU: (role, bytes) of everything placed there
    issues: list[Problem] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [p.message for p in self.issues]

    @property
    def fits(self) -> bool:
        return not self.issues

    def format(self) -> str:
        g = lambda b: f"{b / GiB:.1f}"
        head = ["role", "ranks", "placement", "params", "weights", "grads", "optim", "buffers", "activ", "KV",
                "total/GPU", "host", "peak at"]
        table = [head]
        for r in self.rows:
            table.append([r.role, str(r.ranks), _placement_text(r.gpus), f"{r.params / 1e9:.2f}B", g(r.weights), g(r.grads),
                          g(r.optimizer), g(r.buffers), g(r.activations), g(r.kv_cache), g(r.total), g(r.host),
                          f"{r.phase} {r.note}".strip()])
        widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
        lines = [f"cluster: {self.nodes} node(s) × {self.gpus_per_node} GPUs × {self.gpu_memory_gib:g} GiB; "
                 "memory in GiB per GPU (grads/buffers/activ: at the peak moment)"]
        for row in table:
            cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells) + "  " + row[-1])
        shared = {gpu: load for gpu, load in self.gpu_load.items() if len(load) > 1}
        seen: set = set()
        for gpu, load in sorted(shared.items()):
            key = tuple(role for role, _ in load)
            if key in seen:
                continue
            seen.add(key)
            parts = " + ".join(f"{role} {g(b)}" for role, b in load)
            lines.append(f"shared GPU n{gpu[0]}:{gpu[1]} (and alike): {parts} = {g(sum(b for _, b in load))} GiB")
        busiest = max(self.gpu_load.items(), key=lambda kv: sum(b for _, b in kv[1]), default=None)
        if self.fits:
            top = (f"; fullest GPU n{busiest[0][0]}:{busiest[0][1]} at {g(sum(b for _, b in busiest[1]))} GiB"
                   if busiest else "")
            lines.append(f"verdict: FITS — every GPU within {self.gpu_memory_gib:g} GiB{top}")
        else:
            lines.append(f"verdict: DOES NOT FIT — {len(self.issues)} problem(s):")
            lines += [f"  - {p.message}" for p in self.issues]
        return "\n".join(lines)


def _placement_text(gpus: tuple[tuple[GPU, ...], ...]) -> str:
    flat = sorted({gpu for rank in gpus for gpu in rank})
    if not flat:
        return "cpu" if gpus else "-"
    by_node: dict[int, list[int]] = {}
    for node, i in flat:
        by_node.setdefault(node, []).append(i)
    parts = []
    for node, idx in by_node.items():
        contiguous = idx == list(range(idx[0], idx[-1] + 1))
        parts.append(f"n{node}:{idx[0]}-{idx[-1]}" if contiguous and len(idx) > 1 else f"n{node}:" + ",".join(map(str, idx)))
    return " ".join(parts)


def build_plan(cfg, *, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
               model_shapes: dict[str, ModelShape] | None = None) -> Plan:
    """The plan for ``cfg`` on ``nodes × gpus_per_node`` GPUs of ``gpu_memory_gib`` each.

    The builder step: reads the config once into flat setups, then only counts. Shapes come
    from each role's model_name_or_path/config.json unless ``model_shapes`` names them by role
    (policy, critic, reference, reward; the rollout and an RM-stage ``reward_model`` use policy's).
    Dtype "auto" is bf16: this is a GPU plan.
    """
    from rlhf_cluster.cluster.layout import gpu_demand, role_layout

    specs = role_layout(cfg)
    gpu_bytes = int(gpu_memory_gib * GiB)
    given = model_shapes or {}

    def shape(role: str, path: str | None) -> ModelShape:
        key = "policy" if role in ("rollout", "reward_model") else role
        return given[key] if key in given else ModelShape.from_dir(path)

    online = cfg.method in ("ppo", "online_dpo")
    d = cfg.data
    seq_len = d.max_prompt_length + (cfg.rollout.max_new_tokens if online else d.max_response_length)
    response_len = cfg.rollout.max_new_tokens if online else d.max_response_length
    pairwise = cfg.method in ("dpo", "rm", "online_dpo")

    def trainer_setup(role: str) -> TrainerSetup:
        t = cfg.critic if role == "critic" else cfg.policy
        return TrainerSetup(zero_stage=t.zero_stage, dp=t.world_size, offload_optimizer=t.offload_optimizer,
                            offload_params=t.offload_params, gradient_checkpointing=t.gradient_checkpointing,
                            micro_batch_size=t.micro_batch_size, mini_batch_size=cfg.algorithm.mini_batch_size,
                            rows_per_example=2 if pairwise and role != "critic" else 1, seq_len=seq_len,
                            response_len=response_len, dtype_bytes=dtype_bytes(t.dtype),
                            head="scalar" if role in ("critic", "reward_model") else "lm")

    def scorer_setup(role: str) -> ScorerSetup:
        s = cfg.reward if role == "reward" else cfg.reference
        return ScorerSetup(micro_batch_size=s.micro_batch_size, seq_len=seq_len, response_len=response_len,
                           dtype_bytes=dtype_bytes(s.dtype), head="scalar" if role == "reward" else "lm")

    tokens, seqs = vllm_batch_defaults(gpu_memory_gib)
    r = cfg.rollout
    engine = EngineSetup(tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                         dtype_bytes=dtype_bytes(cfg.policy.dtype), max_model_len=d.max_prompt_length + r.max_new_tokens,
                         gpu_bytes=gpu_bytes, max_num_batched_tokens=tokens, max_num_seqs=seqs)

    shapes: dict[str, ModelShape] = {}
    setups: dict[str, object] = {}
    rows: dict[str, RoleRow] = {}
    engine_mem = None
    for name, spec in specs.items():
        if name == "reward" and cfg.reward.kind != "model":
            rows[name] = RoleRow(name, spec.size, (), 0, note=f"function {cfg.reward.function}" if cfg.reward.function
                                 else f"server {cfg.reward.url}")
            continue
        path = {"critic": cfg.critic.model_name_or_path, "reference": cfg.reference.model_name_or_path,
                "reward": cfg.reward.model_name_or_path}.get(name, cfg.policy.model_name_or_path)
        shapes[name] = shape(name, path)
        if name in ("policy", "critic", "reward_model"):
            setups[name] = trainer_setup(name)
            rows[name] = trainer_row(name, shapes[name], setups[name])
        elif name in ("reference", "reward"):
            setups[name] = scorer_setup(name)
            rows[name] = scorer_row(name, shapes[name], setups[name], spec.size)
        else:
            setups[name] = engine
            rows[name], engine_mem = engine_row(shapes[name], engine, r.num_engines)

    placement, placement_problems = place(specs, nodes, gpus_per_node)
    rows = {name: replace(row, gpus=tuple(placement.get(name, ()))) for name, row in rows.items()}
    issues: list[Problem] = []
    demand, have = gpu_demand(specs), nodes * gpus_per_node
    if demand > have:
        need = ", ".join(f"{n} {s.size * s.gpus_per_actor:g}" for n, s in specs.items() if s.host is None and s.gpus_per_actor)
        issues.append(Problem("cluster", f"cluster: the roles need {demand:g} GPUs ({need}), the cluster has {have} "
                                         f"({nodes} × {gpus_per_node}); add nodes, shrink roles, or colocate "
                                         "(cluster.colocate_policy_reference / colocate_critic_reward)"))
    issues += [Problem(p.split(":")[0], p) for p in placement_problems]

    load: dict[GPU, list[tuple[str, int]]] = {}
    for name, row in rows.items():
        for rank in row.gpus:
            for gpu in rank:
                load.setdefault(gpu, []).append((name, row.total))

    ctx = _FixContext(cfg, specs, shapes, setups, rows, gpu_bytes, nodes, gpus_per_node, have)
    groups: dict[tuple, list[GPU]] = {}
    for gpu, items in load.items():
        # A GPU that only an engine uses is judged by its KV room (below): vLLM takes its budget either way.
        if sum(b for _, b in items) > gpu_bytes and [role for role, _ in items] != ["rollout"]:
            groups.setdefault(tuple(items), []).append(gpu)
    for items, gpus in groups.items():
        issues.append(ctx.memory_problem(items, sorted(gpus)))
    if engine_mem is not None and placement.get("rollout") and engine_mem.kv_tokens < engine.max_model_len:
        issues.append(ctx.kv_problem(engine_mem, engine))
    return Plan(nodes, gpus_per_node, gpu_memory_gib, list(rows.values()), load, issues)


@dataclass
class _FixContext:
    """Recomputes a GPU's memory under candidate setting changes, for the problems' suggestions."""

    cfg: object
    specs: dict
    shapes: dict[str, ModelShape]
    setups: dict[str, object]
    rows: dict[str, RoleRow]
    gpu_bytes: int
    nodes: int
    gpus_per_node: int
    cluster_gpus: int

    def _candidates(self, role: str, others: int) -> list[tuple[str, RoleRow]]:
        """(override, the role's row with it) for each setting change worth trying; ``others``: what
        the roles sharing the GPU keep."""
        s, shape = self.setups[role], self.shapes[role]
        section = "policy" if role == "reward_model" else role
        out: list[tuple[str, RoleRow]] = []
        if isinstance(s, TrainerSetup):
            def row(**kw) -> RoleRow:
                return trainer_row(role, shape, replace(s, **kw))

            out += [(f"{section}.zero_stage={z}", row(zero_stage=z)) for z in range(s.zero_stage + 1, 4)]
            if not s.offload_optimizer:
                label = f"{section}.offload_optimizer=true" if s.zero_stage else f"{section}.zero_stage=1 {section}.offload_optimizer=true"
                out.append((label, row(zero_stage=max(1, s.zero_stage), offload_optimizer=True)))
            if not s.offload_params:
                out.append((f"{section}.zero_stage=3 {section}.offload_optimizer=true {section}.offload_params=true",
                            row(zero_stage=3, offload_optimizer=True, offload_params=True)))
            if not s.gradient_checkpointing:
                out.append((f"{section}.gradient_checkpointing=true", row(gradient_checkpointing=True)))
            t = self.cfg.policy if section == "policy" else self.cfg.critic
            if s.zero_stage and t.num_gpus_per_node < self.gpus_per_node:
                out.append((f"{section}.num_gpus_per_node={self.gpus_per_node}", row(dp=t.num_nodes * self.gpus_per_node)))
            if s.zero_stage and 2 * t.num_nodes <= self.nodes:
                out.append((f"{section}.num_nodes={2 * t.num_nodes}", row(dp=2 * t.num_nodes * t.num_gpus_per_node)))
            out += self._smaller_micro(section, s.micro_batch_size, others, lambda m: row(micro_batch_size=m))
        elif isinstance(s, ScorerSetup):
            out += self._smaller_micro(section, s.micro_batch_size, others,
                                       lambda m: scorer_row(role, shape, replace(s, micro_batch_size=m), 1))
        return [(o, r) for o, r in out if r.total < self.rows[role].total]

    def _smaller_micro(self, section: str, micro: int, others: int, row_with) -> list[tuple[str, RoleRow]]:
        """The largest halved micro_batch_size that fits next to ``others``, else the smallest tried.
        Halving keeps algorithm.mini_batch_size a multiple of micro_batch_size × ranks."""
        best = None
        while micro % 2 == 0:
            micro //= 2
            best = row_with(micro), micro
            if others + best[0].total <= self.gpu_bytes:
                break
        return [(f"{section}.micro_batch_size={best[1]}", best[0])] if best else []

    def _free_gpus(self) -> int:
        return max(0, int(self.cluster_gpus - sum(s.size * s.gpus_per_actor for s in self.specs.values() if s.host is None)))

    def _extra_gpus(self, role: str, override: str) -> int:
        """GPUs a scale-out change adds (the role's whole new size minus its current one)."""
        key, _, value = override.partition("=")
        if key.endswith(".num_gpus_per_node"):
            return (int(value) - self.specs[role].per_node) * self.specs[role].num_nodes
        if key.endswith(".num_nodes"):
            return (int(value) - self.specs[role].num_nodes) * self.specs[role].per_node
        return 0

    def memory_problem(self, items: tuple[tuple[str, int], ...], gpus: list[GPU]) -> Problem:
        total = sum(b for _, b in items)
        roles = [role for role, _ in items]
        fixes: list[Fix] = []
        room = self._free_gpus()
        for role, old in items:
            for override, row in self._candidates(role, total - old):
                need = total - old + row.total
                extra = self._extra_gpus(role, override)
                detail = f", host RAM {row.host / GiB:.0f} GiB per rank" if row.host else ""
                detail += f", takes {extra} more GPUs ({room} free)" if extra else ""
                fixes.append(Fix(override, need, need <= self.gpu_bytes and extra <= room, detail))
        guests = [role for role in roles if self.specs[role].host is not None and self.specs[role].host in roles]
        for guest in guests:
            flag = "cluster.colocate_policy_reference" if guest == "reference" else "cluster.colocate_critic_reward"
            alone = max(b for role, b in items if role != guest)
            extra = self.specs[guest].size
            fixes.append(Fix(f"{flag}=false", alone, alone <= self.gpu_bytes and room >= extra,
                             f", takes {extra} more GPUs ({room} free)"))
        fixes.sort(key=lambda f: (not f.fits, f.need))
        who = " + ".join(roles) + (" (colocated)" if len(roles) > 1 else "")
        where = _placement_text((tuple(gpus),))
        short = (total - self.gpu_bytes) / GiB
        ok = [f"{f.override} → {f.need / GiB:.1f} GiB{f.detail}" for f in fixes if f.fits]
        not_ok = [f"{f.override} → {f.need / GiB:.1f} GiB{f.detail}" for f in fixes if not f.fits]
        msg = (f"{who}: needs {total / GiB:.1f} GiB per GPU on {where}, has {self.gpu_bytes / GiB:g} GiB "
               f"(short {short:.1f} GiB)")
        msg += "; fits with: " + "; ".join(ok) if ok else "; no single change found that fits"
        whole = [role for role in roles if isinstance(self.setups.get(role), ScorerSetup) and self.rows[role].weights > self.gpu_bytes]
        msg += "".join(f" ({role}'s weights alone are {self.rows[role].weights / GiB:.1f} GiB: a scorer replica holds the "
                       "whole model)" for role in whole)
        if not_ok:
            msg += "; not enough alone: " + "; ".join(not_ok[:4])
        return Problem(roles[0], msg, tuple(fixes))

    def kv_problem(self, m: EngineMemory, e: EngineSetup) -> Problem:
        """vLLM refuses to start when its KV cache cannot hold one max_model_len sequence."""
        shape, spec = self.shapes["rollout"], self.specs["rollout"]
        need = m.weights + m.activations + e.max_model_len * m.kv_bytes_per_token
        fixes: list[Fix] = []
        util = math.ceil(need / e.gpu_bytes * 100) / 100
        if util <= 1.0:
            fixes.append(Fix(f"rollout.gpu_memory_utilization={util:.2f}", e.max_model_len, True,
                             f" ({util * e.gpu_bytes / GiB:.1f} GiB reserved)"))
        room = self._free_gpus()
        tp = e.tensor_parallel_size * 2
        while tp <= self.gpus_per_node:
            tokens = engine_memory(shape, gpu_bytes=e.gpu_bytes, gpu_memory_utilization=e.gpu_memory_utilization,
                                   tensor_parallel_size=tp, dtype_bytes=e.dtype_bytes,
                                   max_num_batched_tokens=e.max_num_batched_tokens, max_num_seqs=e.max_num_seqs).kv_tokens
            extra = spec.size * (tp - e.tensor_parallel_size)
            fixes.append(Fix(f"rollout.tensor_parallel_size={tp}", tokens, tokens >= e.max_model_len and extra <= room,
                             f" ({tokens:,} tokens; takes {extra} more GPUs, {room} free)"))
            tp *= 2
        fixes.sort(key=lambda f: (not f.fits, -f.need))
        used = m.weights + m.activations
        over = (f"weights {m.weights / GiB:.1f} GiB + activations {m.activations / GiB:.1f} GiB"
                + (" already exceed" if used > m.budget else " leave too little of"))
        msg = (f"rollout: KV cache holds {m.kv_tokens:,} tokens per GPU on {_placement_text(self.rows['rollout'].gpus)}, "
               f"fewer than max_model_len {e.max_model_len:,} (data.max_prompt_length + rollout.max_new_tokens): {over} "
               f"its budget of {e.gpu_memory_utilization:g} × {e.gpu_bytes / GiB:g} GiB (short {(need - m.budget) / GiB:.1f} GiB)"
               "; fixes: " + "; ".join(f"{f.override}{f.detail}" + ("" if f.fits else " [not enough]") for f in fixes))
        return Problem("rollout", msg, tuple(fixes))

