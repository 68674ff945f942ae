"""Frozen scorers: the reference model's log-probs and the reward (model or function)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_cluster.experience import Experience
from rlhf_cluster.models import (
    action_logprobs_and_entropy,
    load_causal_lm,
    load_scalar_model,
    pick_device,
    resolve_dtype,
    sequence_scores,
)


class _FrozenModel:
    def __init__(self, model, micro_batch_size: int):
        self.device = pick_device()
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.micro_batch_size = micro_batch_size

    def _micro_batches(self, exp: Experience):
        for i in range(0, exp.batch_size, self.micro_batch_size):
            yield exp.select(slice(i, i + self.micro_batch_size)).to(self.device)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the weights (e.g. a pipeline stage hands over a new reference)."""
        self.model.load_state_dict(state)


class ReferenceScorer(_FrozenModel):
    """π_ref: per-token log-probs of the sampled responses."""

    def __init__(self, model_path: str, *, micro_batch_size: int = 8, dtype: str = "auto"):
        super().__init__(load_causal_lm(model_path, resolve_dtype(dtype, pick_device())), micro_batch_size)

    @torch.no_grad()
    def logprobs(self, exp: Experience) -> torch.Tensor:
        """log π_ref(a_t|s_t): (B, A)."""
        return torch.cat([action_logprobs_and_entropy(self.model, m.input_ids, m.attention_mask, exp.num_actions)[0].cpu()
                          for m in self._micro_batches(exp)])

    def sequence_logps(self, exp: Experience) -> torch.Tensor:
        """Σ_t log π_ref(a_t|s_t) over each response: (B,) — what the DPO family compares against."""
        return (self.logprobs(exp) * exp.action_mask).sum(-1)


class RewardModelScorer(_FrozenModel):
    """r(x, y) from a scalar-head model, read at each sequence's last real token."""

    def __init__(self, model_path: str, *, micro_batch_size: int = 8, dtype: str = "auto"):
        super().__init__(load_scalar_model(model_path, resolve_dtype(dtype, pick_device())), micro_batch_size)

    @torch.no_grad()
    def score(self, exp: Experience, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """(B,) rewards. ``prompts``/``responses`` are unused: the model reads token ids."""
        return torch.cat([sequence_scores(self.model, m.input_ids, m.attention_mask).cpu() for m in self._micro_batches(exp)])


class FunctionRewardScorer:
    """r(x, y) from a user function ``fn(prompts: list[str], responses: list[str]) -> list[float]``."""

    def __init__(self, spec: str, code_dir: str | None = None):
        from rlhf_cluster.config import resolve_function

        self.spec = spec
        self.fn: Callable = resolve_function(spec, code_dir)

    def score(self, exp: Experience, prompts: list[str], responses: list[str]) -> torch.Tensor:
        out = self.fn(prompts, responses)
        scores = torch.as_tensor(list(out), dtype=torch.float32)
        if scores.shape != (len(responses),):
            raise ValueError(f"reward function {self.spec} returned {tuple(scores.shape)} values for {len(responses)} responses")
        if not torch.isfinite(scores).all():
            raise ValueError(f"reward function {self.spec} returned non-finite rewards: {scores.tolist()}")
        return scores
