"""Loading models from local Hugging Face directories, and their forward passes.

Sequence layout used everywhere (the *experience* layout): each row is
``[left-padded prompt (P) | right-padded response (A)]``, so every per-action tensor
is ``(B, A)`` and lines up across the policy, reference and critic.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_cluster.algos.core import logprobs_from_logits

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def check_model_dir(path: str | Path) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{str(p)!r} is not a local Hugging Face model directory (no config.json)")
    return p


# AutoTokenizer's own answer for a Llama-family directory whose tokenizer_config names the generic tokenizers-library
# class (Llama 3 and its fine-tunes, the tiny models built here) is that class, TokenizersBackend. Reaching it through
# AutoTokenizer imports transformers' model registry and generation code (~6 s on 2 cores, on the critical path of
# every run's start), so such a directory loads it directly; anything else goes through AutoTokenizer.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _generic_llama_tokenizer(p: Path) -> bool:
    import json

    try:
        tok_cfg = json.loads((p / "tokenizer_config.json").read_text())
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    return (tok_cfg.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES and "auto_map" not in tok_cfg
            and model_type == "llama" and (p / "tokenizer.json").is_file())


def load_tokenizer(path: str | Path):
    p = check_model_dir(path)
    if _generic_llama_tokenizer(p):
        from transformers import TokenizersBackend as Tokenizer
    else:
        from transformers import AutoTokenizer as Tokenizer
    tok = Tokenizer.from_pretrained(str(p))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM (policy or reference) from a local directory."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(check_model_dir(path)), dtype=dtype)


def load_scalar_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The backbone with a one-output ``score`` head (reward model or critic).

    A causal-LM directory loads too (its backbone, with a freshly initialised head):
    the usual way to start a critic or a reward model from an SFT policy.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(check_model_dir(path)), num_labels=1, dtype=dtype)
    if not hasattr(model, "score"):
        raise ValueError(f"{path}: scalar models need a 'score' head (Llama/Qwen/Mistral-style); got {type(model).__name__}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting only real tokens, so left padding does not shift RoPE."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Move each row's leading padding to its end: ``(ids, mask, lead)`` with ``lead`` the pads moved.

    Rows of the experience layout start with padding, and a causal model then has query
    rows that attend to nothing. On CUDA the fused SDPA kernels turn those rows into
    non-finite gradients in bf16 (an H200 run: every step skipped as overflow), while the
    forward looks fine. With all padding at the end every query sees at least one real
    token; real tokens keep their positions (``position_ids`` counts real tokens only).
    """
    L = attention_mask.shape[1]
    lead = (attention_mask.long().cumsum(-1) == 0).sum(-1)
    idx = (torch.arange(L, device=attention_mask.device)[None, :] + lead[:, None]) % L
    return input_ids.gather(1, idx), attention_mask.gather(1, idx), lead


def _from_aligned(positions: torch.Tensor, lead: torch.Tensor, length: int) -> torch.Tensor:
    """Where original positions (B, K) sit in the left-aligned rows."""
    return (positions - lead[:, None]) % length


def action_logprobs_and_entropy(model, input_ids, attention_mask, num_actions: int, with_entropy: bool = False,
                                entropy_grad: bool = True):
    """log π(a_t|s_t) for the last ``num_actions`` tokens: (B, A), and optionally entropy (B, A), with a gradient
    unless ``entropy_grad`` is False (measured only: no backward through the softmax over the vocabulary)."""
    from rlhf_cluster.algos.core import entropy_from_logits

    ids, mask, lead = left_align(input_ids, attention_mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    B, L = input_ids.shape
    # The logits that predict the last A tokens sit at original positions L-A-1 .. L-2.
    where = _from_aligned(torch.arange(L - num_actions - 1, L - 1, device=ids.device).expand(B, -1), lead, L)
    logits = out.logits.gather(1, where[..., None].expand(-1, -1, out.logits.shape[-1])).float()
    logp = logprobs_from_logits(logits, input_ids[:, -num_actions:])
    if not with_entropy:
        return logp, None
    if entropy_grad:
        return logp, entropy_from_logits(logits)
    with torch.no_grad():
        return logp, entropy_from_logits(logits.detach())


def _score_per_token(model, input_ids, attention_mask) -> torch.Tensor:
    """The scalar head on every position: (B, L).

    Runs the model's own forward (through the DeepSpeed engine when ``model`` is one, so
    ZeRO-3 gathers the head's weights) and captures the head's per-token output with a hook:
    the model's pooled ``logits`` assume right padding, and we need every position anyway.
    """
    module = getattr(model, "module", model)  # a DeepSpeedEngine wraps the HF model in .module
    captured = []
    handle = module.score.register_forward_hook(lambda _m, _i, out: captured.append(out))
    ids, mask, lead = left_align(input_ids, attention_mask)
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    finally:
        handle.remove()
    B, L = input_ids.shape
    aligned = captured[0].squeeze(-1).float()
    return aligned.gather(1, _from_aligned(torch.arange(L, device=ids.device).expand(B, -1), lead, L))


def token_values(model, input_ids, attention_mask, num_actions: int) -> torch.Tensor:
    """Critic values V(s_t) at the states that emit the last ``num_actions`` tokens: (B, A)."""
    return _score_per_token(model, input_ids, attention_mask)[:, -num_actions - 1 : -1]


def sequence_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """Reward r(x, y): the score head at each row's last real token: (B,)."""
    per_token = _score_per_token(model, input_ids, attention_mask)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)  # index of the last 1 in each row
    return per_token[torch.arange(per_token.shape[0], device=per_token.device), last]
