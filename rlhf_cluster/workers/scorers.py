"""Frozen scorers: the reference model's log-probs. Reward sources are in :mod:`rlhf_cluster.workers.reward_sources`."""

from __future__ import annotations

import torch

from rlhf_cluster.experience import Experience
from rlhf_cluster.models import (
    action_logprobs_and_entropy,
    load_causal_lm,
    pick_device,
    resolve_dtype,
)


class FrozenModel:
    """A model that only runs forward passes, in micro-batches, on this process's device."""

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


class ReferenceScorer(FrozenModel):
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

    @torch.no_grad()
    def logprobs_and_entropy(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """log π(a_t|s_t) and the entropy of π(·|s_t) at every response position: (B, A) each (an eval's KL and
        entropy from one forward)."""
        parts = [action_logprobs_and_entropy(self.model, m.input_ids, m.attention_mask, exp.num_actions, with_entropy=True,
                                             entropy_grad=False) for m in self._micro_batches(exp)]
        return torch.cat([lp.cpu() for lp, _ in parts]), torch.cat([h.cpu() for _, h in parts])
