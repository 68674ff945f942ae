"""Synthetic, learnable datasets for every stage, written from the bundled word lists.

    python -m rlhf_cluster.synthetic configs/data     # regenerates the shipped files

The preference is "positive beats negative": chosen and rejected answer the same prompt
with the same sentence shape and differ in their sentiment word, so a reward model or a
DPO-family method has a clear signal to learn; SFT responses are positive sentences.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from rlhf_cluster.rewards import NEGATIVE, POSITIVE

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the robot", "a small bird", "the old man",
            "my sister", "the city", "the garden", "a young girl", "the model", "this movie", "the book", "the weather",
            "the river", "your answer", "the music", "the food"]
QUESTIONS = ["What do you think about {}?", "Tell me about {}.", "Describe {}.", "How is {}?", "Write a line about {}.",
             "Say something about {}.", "Give an opinion on {}.", "Talk about {}."]
VERBS = ["is", "was", "looks", "seems", "feels", "sounds"]
ADVERBS = ["very", "quite", "really", "so", "truly", "always"]
EXTRA = ["in the morning", "after the rain", "at night", "for everyone", "with a smile", "every day"]


def _sentence(rng: random.Random, subject: str, word: str) -> str:
    return f"{subject} {rng.choice(VERBS)} {rng.choice(ADVERBS)} {word} {rng.choice(EXTRA)}."


def _prompt(rng: random.Random) -> tuple[str, str]:
    s = rng.choice(SUBJECTS)
    return rng.choice(QUESTIONS).format(s), s


def sft_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, s = _prompt(rng)
        rows.append({"prompt": p, "response": _sentence(rng, s, rng.choice(sorted(POSITIVE)))})
    return rows


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p, s = _prompt(rng)
        state = rng.getstate()
        chosen = _sentence(rng, s, rng.choice(sorted(POSITIVE)))
        rng.setstate(state)  # the same sentence shape, a different sentiment word
        rejected = _sentence(rng, s, rng.choice(sorted(NEGATIVE)))
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return rows


def feedback_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p, s = _prompt(rng)
        good = i % 2 == 0
        rows.append({"prompt": p, "completion": _sentence(rng, s, rng.choice(sorted(POSITIVE if good else NEGATIVE))),
                     "label": good})
    return rows


def larger_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    """"Which is larger, a or b?" prompts with their ``answer``: RL's verifiable reward checks it, SFT
    trains on it (``data.response_key: answer``)."""
    return [{"prompt": f"Which is larger, {a} or {b}?", "answer": str(max(a, b))} for a, b in pairs]


def larger_splits(seed: int = 7) -> dict[str, list[dict]]:
    """Pairs of different numbers below 20: 64 held out; the rest for RL, of which SFT sees 64 — enough
    to learn to answer with one number, not to answer right."""
    pairs = [(a, b) for a in range(20) for b in range(20) if a != b]
    random.Random(seed).shuffle(pairs)
    held, train = pairs[:64], pairs[64:]
    return {"larger_sft.jsonl": larger_rows(train[:64]), "larger_train.jsonl": larger_rows(train),
            "larger_eval.jsonl": larger_rows(held)}


def write_all(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "sft_train.jsonl": sft_rows(256, 1), "sft_eval.jsonl": sft_rows(32, 2),
        "prefs_train.jsonl": preference_rows(256, 3), "prefs_eval.jsonl": preference_rows(64, 4),
        "feedback_train.jsonl": feedback_rows(256, 5), "feedback_eval.jsonl": feedback_rows(64, 6),
        **larger_splits(),
    }
    paths = []
    for name, rows in files.items():
        p = out / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths


if __name__ == "__main__":
    for p in write_all(sys.argv[1] if len(sys.argv) > 1 else "configs/data"):
        print(p)
