"""Tiny models built locally, offline and deterministically.

Everything here writes the ordinary Hugging Face directory format (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` with a chat
template), so the tests and the demo exercise the same loading code a user's
checkpoint goes through — in transformers, DeepSpeed and vLLM alike.

head_dim is 64 because vLLM's CPU attention kernels reject some head sizes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).parent / "assets" / "corpus.txt"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Jinja chat template: <|role|>content</s> per message; the generation prompt opens
# the assistant turn. The response therefore ends with EOS, which vLLM stops on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny Llama. head_dim = hidden_size / num_heads must be 64 for vLLM CPU."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    max_position_embeddings: int = 512


def build_tokenizer(out_dir: str | Path, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on the bundled corpus and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.read_text().splitlines()
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        padding_side="right",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def _llama_config(spec: TinySpec, tokenizer, **extra):
    from transformers import LlamaConfig

    if spec.hidden_size // spec.num_heads != 64:
        raise ValueError("tiny models need head_dim 64 (hidden_size / num_heads) for vLLM's CPU kernels")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **extra,
    )


def build_tiny_model(out_dir: str | Path, kind: str = "causal_lm", seed: int = 0, spec: TinySpec = TinySpec()) -> Path:
    """Write a tokenizer and a randomly initialised tiny Llama to ``out_dir``.

    kind: "causal_lm" (policy / reference) or "scalar" (reward / critic: the same
    backbone with a one-output ``score`` head, i.e. ``LlamaForSequenceClassification``).
    The same seed gives the same weights.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, spec.vocab_size)
    torch.manual_seed(seed)
    if kind == "causal_lm":
        model = LlamaForCausalLM(_llama_config(spec, tokenizer))
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(out)
    elif kind == "scalar":
        model = LlamaForSequenceClassification(_llama_config(spec, tokenizer, num_labels=1))
    else:
        raise ValueError(f"kind must be 'causal_lm' or 'scalar', got {kind!r}")
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build a tiny local model directory (offline).")
    p.add_argument("out_dir")
    p.add_argument("--kind", choices=["causal_lm", "scalar"], default="causal_lm")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_tiny_model(a.out_dir, a.kind, a.seed))


if __name__ == "__main__":
    main()
