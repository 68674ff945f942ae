"""Built-in rule-based rewards: ``fn(prompts: list[str], responses: list[str], **fields) -> list[float]``.

Point ``reward.function`` at any function of this shape (``package.module:function``); further
named parameters receive those dataset columns, one value per row (a verifiable reward reads the
ground truth this way). These are the ones the demo, the examples and the tests use.
"""

from __future__ import annotations

import re

# The word lists the bundled tokenizer corpus was written from (rlhf_cluster/assets/corpus.txt).
POSITIVE = frozenset("good great happy kind nice bright calm warm lovely wonderful excellent brilliant gentle "
                     "cheerful sweet fine glad amazing perfect joyful".split())
NEGATIVE = frozenset("bad sad awful cold dark angry poor terrible boring ugly rude weak tired broken wrong dull "
                     "grim harsh sick lost".split())
_WORD = re.compile(r"[a-z]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """(#positive words − #negative words) / #words, in [−1, 1]; 0 for a response with no words.

    The demo's task: say nice things. A random tiny model hits a positive word a few
    per cent of the time, so the signal is there from the first step.
    """
    out = []
    for r in responses:
        words = _WORD.findall(r.lower())
        if not words:
            out.append(0.0)
            continue
        out.append((sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)) / len(words))
    return out


def response_length(prompts: list[str], responses: list[str]) -> list[float]:
    """Number of characters: a trivially learnable reward for smoke tests."""
    return [float(len(r)) for r in responses]


def exact_answer(prompts: list[str], responses: list[str], answer: list) -> list[float]:
    """1.0 when the first number in the response equals the row's ``answer`` field, else 0.0.

    A verifiable reward: the dataset carries the ground truth (``{"prompt": "3+4=", "answer": "7"}``).
    """
    out = []
    for r, want in zip(responses, answer):
        m = _NUMBER.search(r)
        out.append(float(m is not None and float(m.group()) == float(want)))
    return out
