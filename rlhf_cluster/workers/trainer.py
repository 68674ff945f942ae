"""DeepSpeed trainers: the policy (causal LM) and the critic (per-token values).

Plain classes: one instance is one data-parallel rank. They run in one process
without Ray (tests, single-GPU checks) or inside a Ray actor (cluster layer).
"""

from __future__ import annotations

import datetime
import math
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from rlhf_cluster.experience import Experience
from rlhf_cluster.models import (
    action_logprobs_and_entropy,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    pick_device,
    resolve_dtype,
    token_values,
)
from rlhf_cluster.workers import rendezvous
from rlhf_cluster.workers.objectives import OWN_LOGPROBS, get_objective


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient norm that reached the weights (an update step that could not be skipped)."""


@contextmanager
def _skipped_step(optimizer):
    """DeepSpeed's ``engine.step()`` without the optimizer's step: the weights and the optimizer state stay as they
    were, the gradients are cleared, and DeepSpeed counts the step as skipped (``skipped_steps``, no learning-rate
    step) exactly as it does for an fp16 overflow, so its counters stay consistent."""
    saved = {k: optimizer.__dict__[k] for k in ("step", "overflow") if k in optimizer.__dict__}
    optimizer.step = lambda *args, **kwargs: None
    optimizer.overflow = True
    try:
        yield
    finally:
        for k in ("step", "overflow"):
            if k in saved:
                setattr(optimizer, k, saved[k])
            else:
                delattr(optimizer, k)


NONFINITE_HINT = ("Usual causes: a learning rate too high for the model, rewards or advantages that are NaN or huge "
                  "(check the reward function), or fp16 overflow (use bf16 or fp32).")


RENDEZVOUS_TIMEOUT_S = 1800.0  # torch's default for the world group


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Join (or create) the default process group: nccl on GPU, gloo on CPU."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise RuntimeError(f"process group already has {dist.get_world_size()} ranks, asked for {world_size}")
        rendezvous.release(master_port)  # this process's group already exists (one process, several trainers)
        return
    _forget_deepspeed_groups()
    _skip_shm_comm_build()
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Our own store (on the address and socket rank 0 reserved), so the rendezvous listens only on the
    # cluster address; DeepSpeed then adopts the initialised group.
    store = rendezvous.store(master_addr, master_port, world_size, rank == 0, RENDEZVOUS_TIMEOUT_S)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world_size)


def _skip_shm_comm_build() -> None:
    """DeepSpeed's comm layer JIT-compiles its CPU shared-memory all-reduce (a C++ build, ~40 s of both cores on
    the 2-core machine, redone for every new install path) the first time a process joins a group. Only
    DeepSpeed-inference's tensor-parallel all-reduce uses it; training collectives go through torch.distributed.
    Marked incompatible, it is never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _restore_plain_linear() -> None:
    """ZeRO-3's zero.Init replaces torch.nn.functional.linear process-wide with DeepSpeed's memory-saving version and
    leaves it so ("this will persist unless manually reset"): every later forward in the process (other trainers,
    the scorers and vLLM engine of the local backend, later pipeline stages) ran through it, 1.5-1.8x slower in the
    test suite. The original goes back; ZeRO-3 gathers its parameters with its own module hooks and is correct on
    the plain linear (zero.Init's mem_efficient_linear=False)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit

    original = getattr(ZeroInit, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches its clone of the world group; after the default group was destroyed (in one process,
    a vLLM engine's shutdown does that) the cached one is dead and must not be reused."""
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


def deepspeed_config(*, zero_stage: int, offload_optimizer: bool, offload_params: bool, micro_batch_size: int,
                     mini_batch_size: int, world_size: int, max_grad_norm: float, dtype: torch.dtype) -> dict:
    """The DeepSpeed config dict for one trainer. mini_batch_size is global (all ranks)."""
    gas = mini_batch_size // (micro_batch_size * world_size)
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=0)
    return {
        "train_batch_size": mini_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        # bf16 under ZeRO: a non-finite gradient skips the step (as fp16 overflow does) instead of reaching the weights.
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True},
        "fp16": {"enabled": dtype == torch.float16},
        # We pass a torch AdamW: DeepSpeed's fused CPU Adam needs a compiled op that CPU wheels lack.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class _DeepSpeedTrainer:
    """What the policy and the critic share: the engine, the mini-batch loop, saving and loading."""

    def __init__(self, *, model_path: str, rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1",
                 master_port: int = 29500, zero_stage: int = 2, offload_optimizer: bool = False,
                 offload_params: bool = False, gradient_checkpointing: bool = False, learning_rate: float = 1e-6,
                 weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.9, 0.95), max_grad_norm: float = 1.0,
                 warmup_steps: int = 0, micro_batch_size: int = 4, mini_batch_size: int = 16, dtype: str = "auto",
                 seed: int = 0):
        import deepspeed

        self.rank, self.world_size = rank, world_size
        self.model_path = model_path
        self.micro_batch_size = micro_batch_size
        self.mini_batch_size = mini_batch_size
        self.seed = seed
        if mini_batch_size % (micro_batch_size * world_size):
            raise ValueError(f"mini_batch_size {mini_batch_size} is not a multiple of micro_batch_size × ranks "
                             f"= {micro_batch_size} × {world_size}")
        init_distributed(rank, world_size, master_addr, master_port)
        torch.manual_seed(seed)  # same initial head on every rank
        self.device = pick_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.zero_stage = zero_stage
        self.ds_config = deepspeed_config(
            zero_stage=zero_stage, offload_optimizer=offload_optimizer, offload_params=offload_params,
            micro_batch_size=micro_batch_size, mini_batch_size=mini_batch_size, world_size=world_size,
            max_grad_norm=max_grad_norm, dtype=self.dtype)
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        if zero_stage == 3:
            # Lets from_pretrained partition weights as they load instead of materialising them on every rank.
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        else:
            # transformers keeps the last HfDeepSpeedConfig process-wide: while a ZeRO-3 trainer built earlier in this
            # process lives (one process, several trainers or stages), this model would otherwise load partitioned.
            unset_hf_deepspeed_config()
        model = self._load_model(model_path, self.dtype)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=tuple(adam_betas), weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched, config=self.ds_config)
        if zero_stage == 3:
            _restore_plain_linear()
        _uncount_state_materialising_step(self.engine)
        self.tokenizer = load_tokenizer(model_path) if rank == 0 else None
        self.update_count = 0

    # --- subclasses -----------------------------------------------------------------
    def _load_model(self, path: str, dtype: torch.dtype):
        raise NotImplementedError

    # --- shared loop ----------------------------------------------------------------
    def _micro_batches(self, batch):
        for i in range(0, batch.batch_size, self.micro_batch_size):
            yield batch.select(slice(i, i + self.micro_batch_size)).to(self.device)

    def update(self, batch, objective: str, epochs: int = 1, capture_grads: bool = False, **hparams) -> dict:
        """Train on this rank's shard: shuffled mini-batches, ``epochs`` times, one optimizer step each.

        ``objective`` names an entry of :data:`OBJECTIVES` (ppo, value, sft, pairwise, kto,
        bradley_terry); ``hparams`` are its keyword arguments. Returns the mean of each stat,
        plus the first mini-batch's full gradients when ``capture_grads`` (for the tests
        that compare data-parallel layouts).
        """
        fn = get_objective(objective)
        per_rank = self.mini_batch_size // self.world_size
        if batch.batch_size % per_rank:
            raise ValueError(f"rank shard of {batch.batch_size} examples is not a multiple of the per-rank mini-batch {per_rank}")
        if objective == "ppo" and batch.old_logprobs is None and batch.batch_size != per_rank:
            raise ValueError(f"a ppo update without old log-probs takes them from its first forward, which needs the "
                             f"rank's {batch.batch_size} rows in one mini-batch (per-rank mini-batch: {per_rank})")
        own: list[torch.Tensor] = []  # the first epoch's own log-probs, when the batch came without old ones
        self.engine.train()
        sums: dict[str, float] = {}
        n = 0
        grads = None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.update_count)
        norm = 0.0
        t0 = time.perf_counter()
        tokens = 0
        steps, skipped, scale_skips, why = 0, 0, 0, ""
        skipped_by_deepspeed = self.engine.skipped_steps
        for _ in range(epochs):
            order = torch.randperm(batch.batch_size, generator=gen)
            for start in range(0, batch.batch_size, per_rank):
                micros = list(self._micro_batches(batch.select(order[start : start + per_rank])))
                bad_loss = ""
                for j, micro in enumerate(micros):
                    loss, stats = fn(self.engine, micro, **hparams)
                    if OWN_LOGPROBS in stats:
                        own.append(stats.pop(OWN_LOGPROBS))
                    if torch.isfinite(loss):
                        for k, v in {"loss": loss.detach(), **stats}.items():
                            sums[k] = sums.get(k, 0.0) + float(v)
                        n += 1
                    elif not bad_loss:
                        bad_loss = f"the {objective} loss is {loss.item()} (micro-batch {j + 1} of {len(micros)})"
                    # A non-finite loss still goes through backward: its non-finite gradient is what makes this
                    # optimizer step skipped below (or by DeepSpeed), on every rank alike, so no rank waits on another.
                    self.engine.backward(loss)
                    if capture_grads and grads is None and j == len(micros) - 1:
                        grads = self._full_grads()
                    skip = False
                    if j == len(micros) - 1 and self.zero_stage == 0:
                        # Without ZeRO, DeepSpeed steps a plain torch optimizer and measures no gradient norm
                        # (its clipping lets NaN through): measure it here, before the step applies anything.
                        norm = self._grad_norm()
                        # fp16's own optimizer wrapper handles an overflowing gradient (and lowers its loss scale)
                        skip = bool(bad_loss) or (not math.isfinite(norm) and self.dtype != torch.float16)
                        if self.world_size > 1:  # a non-finite loss is one rank's: every rank must skip alike
                            import torch.distributed as dist

                            flag = torch.tensor([float(skip)], device=self.device)
                            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                            skip = bool(flag.item())
                    if skip:
                        with _skipped_step(self.engine.optimizer):  # DeepSpeed counts it skipped, keeps the lr
                            self.engine.step()
                    else:
                        self.engine.step()
                    tokens += micro.num_tokens()
                steps += 1
                if self.engine.skipped_steps - skipped_by_deepspeed > skipped + scale_skips:  # this step was skipped
                    if self.dtype == torch.float16 and not bad_loss:
                        scale_skips += 1  # fp16's loss scale finding its level: DeepSpeed's routine, not a fault
                    else:
                        skipped += 1
                        why = why or bad_loss or ("the gradient norm is not finite" if self.zero_stage or not math.isfinite(norm)
                                                  else "another rank's loss is not finite")
                elif bad_loss:  # ZeRO without a gradient-norm check (no clipping) applied it
                    raise NonFiniteError(f"{bad_loss} in {objective} update {self.update_count + 1}, and the "
                                         "optimizer step was applied, so the weights are no longer valid: resume "
                                         f"from the last checkpoint. {NONFINITE_HINT}")
            if own and epochs > 1:  # one mini-batch, stepped once: its forward was π_θold for every later epoch
                old = torch.empty_like(batch.action_mask, dtype=own[0].dtype)
                old[order] = torch.cat(own).to(old.device)
                batch, own = replace(batch, old_logprobs=old), []
        self.update_count += 1
        out = {k: v / n for k, v in sums.items()} if n else {}
        out["skipped_steps"] = skipped
        out["optimizer_steps"] = steps
        if scale_skips:
            out["loss_scale_skips"] = scale_skips
        if skipped:
            out["skip_reason"] = (f"{skipped} of {steps} optimizer steps of {objective} update {self.update_count} "
                                  f"skipped, the first because {why}")
        measured = self.engine.get_global_grad_norm()
        grad_norm = float(measured if measured is not None else (norm if self.zero_stage == 0 else 0.0))
        if math.isfinite(grad_norm):
            out["grad_norm"] = grad_norm
        elif not skipped:
            raise NonFiniteError(f"the gradient norm of {objective} update {self.update_count} is {grad_norm}, so the "
                                 f"weights are no longer valid: resume from the last checkpoint. {NONFINITE_HINT}")
        out["lr"] = float(self.engine.get_lr()[0])
        out["train_tokens"] = tokens
        out["train_seconds"] = time.perf_counter() - t0
        if capture_grads:
            out["grads"] = grads
        return out

    @torch.no_grad()
    def evaluate(self, batch, objective: str, **hparams) -> dict:
        """The objective's loss and stats on held-out data (no update), averaged over examples."""
        fn = get_objective(objective)
        self.engine.eval()
        sums: dict[str, float] = {}
        for micro in self._micro_batches(batch):
            loss, stats = fn(self.engine, micro, **hparams)
            stats.pop(OWN_LOGPROBS, None)
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * micro.batch_size
        return {k: v / batch.batch_size for k, v in sums.items()}

    def _grad_norm(self) -> float:
        """The global L2 norm of this rank's accumulated gradients (ZeRO stage 0: they are whole on every rank)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0

    def _full_grads(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        return {name: safe_get_full_grad(p).detach().float().cpu().clone() for name, p in self.engine.module.named_parameters()}

    # --- weights --------------------------------------------------------------------
    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on CPU, gathered across ZeRO-3 partitions. Every rank must call; rank 0 gets them."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        out = {}
        if self.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.rank == 0:
                    out = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        elif self.rank == 0:
            out = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return out if self.rank == 0 else None

    def save_pretrained(self, out_dir: str | Path) -> None:
        """A Hugging Face directory (weights, config, tokenizer) that every loader here accepts."""
        state = self.export_state_dict()
        if self.rank == 0:
            out = Path(out_dir)
            tmp = out.with_name(out.name + ".tmp")
            self.engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            _replace_dir(tmp, out)

    def save_checkpoint(self, ckpt_dir: str | Path, tag: str) -> None:
        """Optimizer, scheduler and ZeRO partitions, for resuming. Every rank must call."""
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"update_count": self.update_count})

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str) -> None:
        load_as_data(self.engine)
        _, client = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {ckpt_dir}")
        self.update_count = client.get("update_count", 0)


# The non-tensor objects DeepSpeed writes into its checkpoint files (ZeRO 0-3, fp32/bf16/fp16).
CHECKPOINT_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds an object a data-only load refuses (it could run code when unpickled)."""


def load_as_data(engine) -> None:
    """Make DeepSpeed read its checkpoint files as tensors and plain data only.

    DeepSpeed's loader unpickles with ``weights_only=False``, so a crafted file in a checkpoint
    directory would run code on ``--resume``. Its own few classes (``CHECKPOINT_GLOBALS``) are
    allowed by name; anything else is refused, naming the file and the object.
    """
    import importlib
    import pickle

    allowed = []
    for dotted in CHECKPOINT_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # not in this DeepSpeed version
            pass

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0]
            raise UnsafeCheckpointError(f"{path}: refused to load ({first}); checkpoints load as tensors and plain "
                                        "data only — was this file written by rlhf_cluster?") from None

    engine.checkpoint_engine.load = load


def _uncount_state_materialising_step(engine) -> None:
    """Undo the step count of the optimizer step DeepSpeed takes on zero gradients at start-up.

    Without ZeRO (stage 0) a bf16/fp16 model gets DeepSpeed's unfused half-precision wrapper,
    which creates the optimizer state by stepping once on zero gradients. The moments stay zero,
    but Adam counts the step, so its bias correction runs one step ahead and the first real
    updates are ~0.73x the learning rate (seen on an H200: Adam's step = optimizer steps + 1).
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        for state in engine.optimizer.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished directory into place so a crash never leaves half a checkpoint under ``out``."""
    import shutil

    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


class PolicyTrainer(_DeepSpeedTrainer):
    """π_θ, a causal LM in training: PPO, SFT, the DPO family and KTO are objectives of ``update``."""

    def _load_model(self, path, dtype):
        return load_causal_lm(path, dtype)

    @torch.no_grad()
    def logprobs(self, exp: Experience) -> torch.Tensor:
        """log π_θ(a_t|s_t): (B, A) for this rank's shard."""
        self.engine.eval()
        out = [action_logprobs_and_entropy(self.engine, m.input_ids, m.attention_mask, exp.num_actions)[0].cpu()
               for m in self._micro_batches(exp)]
        return torch.cat(out)


class CriticTrainer(_DeepSpeedTrainer):
    """A scalar-head model in training: the critic V_φ (objective "value") or a reward model ("bradley_terry")."""

    def _load_model(self, path, dtype):
        return load_scalar_model(path, dtype)

    @torch.no_grad()
    def values(self, exp: Experience) -> torch.Tensor:
        """V_φ(s_t): (B, A) for this rank's shard."""
        self.engine.eval()
        return torch.cat([token_values(self.engine, m.input_ids, m.attention_mask, exp.num_actions).cpu()
                          for m in self._micro_batches(exp)])
