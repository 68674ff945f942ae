"""Typed batch records passed between the driver and the workers."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Experience:
    """One rollout batch in the experience layout ``[left-padded prompt | right-padded response]``.

    B sequences, P prompt slots, A response slots. Optional fields are filled phase by phase.
    """

    input_ids: torch.Tensor  # (B, P+A) token ids
    attention_mask: torch.Tensor  # (B, P+A) 1 on real tokens
    action_mask: torch.Tensor  # (B, A) 1 on response tokens
    rollout_logprobs: torch.Tensor | None = None  # (B, A) log π_vllm(a_t|s_t) from the engine
    old_logprobs: torch.Tensor | None = None  # (B, A) log π_old(a_t|s_t) from the policy trainer
    ref_logprobs: torch.Tensor | None = None  # (B, A) log π_ref(a_t|s_t)
    values: torch.Tensor | None = None  # (B, A) V(s_t)
    scores: torch.Tensor | None = None  # (B,) r(x, y)
    token_rewards: torch.Tensor | None = None  # (B, A) r_t = −β·KL_t (+ r at the last token)
    advantages: torch.Tensor | None = None  # (B, A) A_t
    returns: torch.Tensor | None = None  # (B, A) R_t

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_actions(self) -> int:
        return self.action_mask.shape[1]

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def only(self, *names: str) -> Experience:
        """The token ids and masks plus the named fields, the rest left out: what one role reads, so
        nothing else is serialised to it (a scorer needs no advantages, the critic no log-probs)."""
        return Experience(self.input_ids, self.attention_mask, self.action_mask, **{n: getattr(self, n) for n in names})

    def select(self, idx: torch.Tensor | slice) -> Experience:
        """Rows ``idx`` of every tensor field."""
        return replace(self, **{f.name: (v[idx] if (v := getattr(self, f.name)) is not None else None) for f in fields(self)})

    def to(self, device) -> Experience:
        return replace(self, **{f.name: (v.to(device) if (v := getattr(self, f.name)) is not None else None) for f in fields(self)})

    @staticmethod
    def cat(parts: list[Experience]) -> Experience:
        out = {}
        for f in fields(Experience):
            vals = [getattr(p, f.name) for p in parts]
            out[f.name] = None if any(v is None for v in vals) else torch.cat(vals)
        return Experience(**out)


@dataclass
class Rollout:
    """One step's samples as the engines returned them: the batch (with the engine's log-probs), each
    row's prompt text, decoded response and dataset fields, and the policy version that sampled it."""

    exp: Experience
    prompts: list[str]
    responses: list[str]
    extras: list[dict]
    weights_version: int
    response_ids: list[list[int]]
    gen_tokens: int
    truncated_frac: float
    gen_seconds: float = 0.0  # the slowest engine's own generation time (the wall wait can be ~0 off-policy)


def build_experience(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                     rollout_logprobs: list[list[float]] | None = None) -> Experience:
    """Pack prompts (left-padded) and responses (right-padded) into the experience layout."""
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    A = max(1, max(len(r) for r in response_ids))
    ids = torch.full((B, P + A), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + A), dtype=torch.long)
    amask = torch.zeros((B, A), dtype=torch.float32)
    lps = torch.zeros((B, A), dtype=torch.float32) if rollout_logprobs is not None else None
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        attn[i, P - len(p) : P] = 1
        if r:
            ids[i, P : P + len(r)] = torch.tensor(r)
            attn[i, P : P + len(r)] = 1
            amask[i, : len(r)] = 1
            if lps is not None:
                lps[i, : len(r)] = torch.tensor(rollout_logprobs[i], dtype=torch.float32)
    return Experience(input_ids=ids, attention_mask=attn, action_mask=amask, rollout_logprobs=lps)


def _rows(idx, n: int) -> torch.Tensor:
    return torch.arange(n)[idx] if isinstance(idx, slice) else torch.as_tensor(idx)


@dataclass
class PairBatch:
    """B preference pairs: ``seqs`` rows 2i (chosen) and 2i+1 (rejected), one shared width."""

    seqs: Experience  # (2B, P+A)
    margin: torch.Tensor | None = None  # (B,) optional preference margin m
    ref_logps: torch.Tensor | None = None  # (2B,) Σ_t log π_ref(a_t|s_t) of each response

    @property
    def batch_size(self) -> int:
        return self.seqs.batch_size // 2

    def num_tokens(self) -> int:
        return int(self.seqs.attention_mask.sum())

    def select(self, idx) -> PairBatch:
        rows = _rows(idx, self.batch_size)
        seq_rows = torch.stack([2 * rows, 2 * rows + 1], -1).flatten()
        return PairBatch(self.seqs.select(seq_rows), None if self.margin is None else self.margin[rows],
                         None if self.ref_logps is None else self.ref_logps[seq_rows])

    def to(self, device) -> PairBatch:
        return PairBatch(self.seqs.to(device), None if self.margin is None else self.margin.to(device),
                         None if self.ref_logps is None else self.ref_logps.to(device))


@dataclass
class FeedbackBatch:
    """B unpaired examples (KTO) and B mismatched prompt–completion pairs for the KL reference point."""

    seqs: Experience  # (B, P+A) prompt x_i + completion y_i
    kl_seqs: Experience  # (B, P'+A') prompt x_i + completion y_j (j ≠ i)
    desirable: torch.Tensor  # (B,) bool
    ref_logps: torch.Tensor | None = None  # (B,) Σ log π_ref(y_i|x_i)
    kl_ref_logps: torch.Tensor | None = None  # (B,) Σ log π_ref(y_j|x_i)

    @property
    def batch_size(self) -> int:
        return self.seqs.batch_size

    def num_tokens(self) -> int:
        return int(self.seqs.attention_mask.sum() + self.kl_seqs.attention_mask.sum())

    def select(self, idx) -> FeedbackBatch:
        rows = _rows(idx, self.batch_size)
        opt = lambda t: None if t is None else t[rows]
        return FeedbackBatch(self.seqs.select(rows), self.kl_seqs.select(rows), self.desirable[rows],
                             opt(self.ref_logps), opt(self.kl_ref_logps))

    def to(self, device) -> FeedbackBatch:
        opt = lambda t: None if t is None else t.to(device)
        return FeedbackBatch(self.seqs.to(device), self.kl_seqs.to(device), self.desirable.to(device),
                             opt(self.ref_logps), opt(self.kl_ref_logps))
