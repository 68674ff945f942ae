"""A tiny reward model that has learned the sentiment reward, for PPO-with-a-model-reward tests.

Fitted by plain regression (MSE on the score head) to ``rlhf_cluster.rewards.sentiment`` on
token soups like the ones a random tiny policy emits, mixed with sentiment words. Issue 4's
reward-model stage replaces this with Bradley–Terry training on preferences.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from rlhf_cluster.models import load_scalar_model, load_tokenizer, sequence_scores
from rlhf_cluster.rewards import NEGATIVE, POSITIVE, sentiment
from rlhf_cluster.tiny import build_tiny_model

NEUTRAL = "the cat dog my friend teacher city garden book is was looks very quite today and".split()


def _texts(tok, n: int, rng: random.Random) -> list[str]:
    vocab = len(tok)
    out = []
    for _ in range(n):
        parts = []
        p_pos, p_neg = rng.random() * 0.6, rng.random() * 0.3
        for _ in range(rng.randint(2, 12)):
            u = rng.random()
            if u < p_pos:
                parts.append(" " + rng.choice(sorted(POSITIVE)))
            elif u < p_pos + p_neg:
                parts.append(" " + rng.choice(sorted(NEGATIVE)))
            elif u < 0.8:
                parts.append(tok.decode([rng.randrange(7, vocab)]))
            else:
                parts.append(" " + rng.choice(NEUTRAL))
        out.append("".join(parts))
    return out


def build_sentiment_reward_model(out_dir: Path, steps: int = 150, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    path = build_tiny_model(out_dir, kind="scalar", seed=seed)
    tok = load_tokenizer(path)
    model = load_scalar_model(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about the cat."}], add_generation_prompt=True, tokenize=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        texts = _texts(tok, 32, rng)
        target = torch.tensor(sentiment([""] * len(texts), texts))
        enc = tok([prompt + t + tok.eos_token for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
        loss = torch.nn.functional.mse_loss(sequence_scores(model, enc.input_ids, enc.attention_mask), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    return path
