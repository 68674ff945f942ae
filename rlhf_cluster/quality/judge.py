"""An LLM judge: which of two answers to a prompt is better, asked of any OpenAI-compatible chat endpoint.

``POST {url}/chat/completions`` with ``{"model", "messages", "temperature": 0, "max_tokens"}``; the verdict is
read from ``choices[0].message.content``: the last ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie) in it.

Judges favour a position (usually the first answer: Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench
and Chatbot Arena"), so :func:`judge_pairwise` asks about every prompt twice, once with the policy's answer as
Assistant A and once as Assistant B, and keeps a verdict only when both orders agree; orders that disagree make
the prompt a tie. A judge that always picks A therefore yields ties, never wins.

HTTP in the style of the reward server client (``rlhf_cluster.workers.reward_sources.HttpReward``): urllib, a
timeout per request, retries with exponential backoff on timeouts, refused connections, 429 and 5xx, none on
other 4xx or an answer that is not the expected JSON; every error names the URL. A prompt whose request still
fails is recorded as an error with its message and the run goes on, so one bad prompt costs one prompt.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

from rlhf_cluster.http_post import post_json

SYSTEM_PROMPT = (
    "You compare two AI assistants' answers to the same user request and decide which one serves the user "
    "better. Weigh whether each answer is correct, actually does what was asked, is complete where it matters, "
    "and is clear. Neither the order the answers are shown in nor their length is a reason to prefer one; a "
    "confident wrong answer is worse than a careful correct one. Give a short justification, then finish with "
    "one verdict on a line of its own: [[A]] when Assistant A's answer is better, [[B]] when Assistant B's is "
    "better, [[C]] when neither is better than the other."
)
USER_TEMPLATE = (
    "<request>\n{question}\n</request>\n\n"
    "<assistant_a>\n{answer_a}\n</assistant_a>\n\n"
    "<assistant_b>\n{answer_b}\n</assistant_b>\n\n"
    "Which answer is better? End with [[A]], [[B]] or [[C]]."
)

ORDERS = ("policy_first", "policy_second")  # policy's answer as Assistant A, then as Assistant B
OUTCOMES = ("policy", "reference", "tie", "invalid", "error")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
_SIDE = {"policy_first": {"A": "policy", "B": "reference", "C": "tie"},
         "policy_second": {"A": "reference", "B": "policy", "C": "tie"}}
ERROR_EXAMPLES = 3  # error messages kept in the summary


class JudgeError(RuntimeError):
    """A judge request that failed (after its retries) or answered something unreadable; names the URL."""


@dataclass
class JudgeConfig:
    """Where the judge is and how to ask it.

    ``url``: the API base (``http://host:8000/v1``; ``/chat/completions`` is appended unless already there).
    ``api_key_env``: an environment variable whose value is sent as ``Authorization: Bearer`` (read when the
    judging starts; unset is an error naming it). ``max_retries``: extra attempts after a timeout, refused
    connection, 429 or 5xx, waiting ``backoff_s``, then twice that, ... ``concurrency``: requests in flight."""

    url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 2
    max_tokens: int = 1024
    concurrency: int = 4
    backoff_s: float = 0.5

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must start with http:// or https://, got {self.url!r}")
        if not self.model:
            raise ValueError("judge model must be named (the 'model' field of each request)")
        if self.max_retries < 0:
            raise ValueError(f"judge max_retries must be >= 0, got {self.max_retries}")
        for name in ("timeout_s", "max_tokens", "concurrency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"judge {name} must be > 0, got {getattr(self, name)}")

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"


class JudgeClient:
    """One chat-completions endpoint; :meth:`complete` returns the message text or raises JudgeError."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg, self.endpoint = cfg, cfg.endpoint
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise JudgeError(f"judge {self.endpoint}: environment variable {cfg.api_key_env} (api_key_env) is not set")
            self.headers["Authorization"] = f"Bearer {key}"

    def complete(self, messages: list[dict]) -> str:
        cfg = self.cfg
        body = json.dumps({"model": cfg.model, "messages": messages, "temperature": 0, "max_tokens": cfg.max_tokens}).encode()
        raw = post_json(self.endpoint, body, self.headers, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                        backoff_s=cfg.backoff_s, what=f"judge {self.endpoint}", error=JudgeError,
                        hint="raise the judge's timeout_s / max_retries, or check the server")
        return self._content(raw)

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {self.endpoint} must answer a chat completion "
                             f"({{\"choices\": [{{\"message\": {{\"content\": ...}}}}]}}), got "
                             f"{raw[:120].decode(errors='replace')!r}") from None
        if content is None:  # e.g. a reasoning model that spent max_tokens before answering: no verdict
            return ""
        if not isinstance(content, str):
            raise JudgeError(f"judge {self.endpoint}: message content is {type(content).__name__}, not text")
        return content


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    """The chat messages asking which of two answers to ``question`` is better."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)}]


def conversation_request(turns: Sequence[str]) -> str:
    """A multi-turn prompt (MT-Bench's ``turns``) as the judge's request: every user turn, numbered."""
    return (f"(A conversation of {len(turns)} user turns. Each assistant's whole side of it is shown; judge the "
            f"conversation, the reply to the last turn above all.)\n"
            + "\n".join(f"[turn {k + 1}] {t}" for k, t in enumerate(turns)))


def conversation_answer(turns: Sequence[str], replies: Sequence[str]) -> str:
    """One assistant's side of a multi-turn exchange as one answer for the judge: each turn, then its reply."""
    return "\n\n".join(f"[turn {k + 1}] user: {t}\nassistant: {a}" for k, (t, a) in enumerate(zip(turns, replies)))


def parse_verdict(text: str) -> str:
    """"A", "B" or "C" (tie): the last ``[[A]]``/``[[B]]``/``[[C]]`` in the judge's text; "invalid" when none."""
    found = _VERDICT.findall(text or "")
    return found[-1].upper() if found else "invalid"


@dataclass
class JudgeRecord:
    """One prompt's judgement. ``outcome``: "policy" / "reference" (better in both orders), "tie" (both say tie,
    or the orders disagree), "invalid" (an order's text held no verdict), "error" (an order's request failed;
    ``error`` says why). ``verdicts`` / ``texts``: each order's raw verdict token ("A", "B", "C", "invalid"; None
    when its request failed) and the judge's full text, keyed by ``ORDERS``. ``consistent``: both orders named
    the same winner (None unless both gave a verdict)."""

    index: int
    id: Any
    prompt: str
    outcome: str
    verdicts: dict[str, str | None]
    texts: dict[str, str | None]
    consistent: bool | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class JudgeResult:
    """Every prompt's :class:`JudgeRecord` (in prompt order) and the counts over them."""

    records: list[JudgeRecord] = field(default_factory=list)
    model: str = ""
    url: str = ""

    @property
    def counts(self) -> dict[str, int]:
        """Prompts per outcome: ``policy_wins``, ``reference_wins``, ``ties``, ``invalid``, ``errors`` (sum: n)."""
        names = dict(zip(OUTCOMES, ("policy_wins", "reference_wins", "ties", "invalid", "errors")))
        out = dict.fromkeys(names.values(), 0)
        for r in self.records:
            out[names[r.outcome]] += 1
        return out

    @property
    def win_rate(self) -> float | None:
        """(policy wins + ties / 2) over the prompts with a verdict (invalid and failed ones left out)."""
        c = self.counts
        judged = c["policy_wins"] + c["reference_wins"] + c["ties"]
        return (c["policy_wins"] + c["ties"] / 2) / judged if judged else None

    @property
    def position_consistency(self) -> float | None:
        """Share of the prompts with a verdict from both orders where the two name the same winner (or both tie)."""
        both = [r.consistent for r in self.records if r.consistent is not None]
        return sum(both) / len(both) if both else None

    @property
    def position_a_share(self) -> float | None:
        """Of the single-order verdicts naming a winner, the share that named Assistant A: about 0.5 for an
        unbiased judge whatever the models' quality (each prompt puts the policy first once), 1.0 for one that
        always picks the first answer."""
        picks = [v for r in self.records for v in r.verdicts.values() if v in ("A", "B")]
        return picks.count("A") / len(picks) if picks else None

    def summary(self) -> dict:
        """The ``judge`` entry of an eval result (see ``evaluation.format_eval_markdown``)."""
        errors = [f"{r.id}: {r.error}" for r in self.records if r.error][:ERROR_EXAMPLES]
        return {"model": self.model, "url": self.url, "n": len(self.records), **self.counts, "win_rate": self.win_rate,
                "position_consistency": self.position_consistency, "position_a_share": self.position_a_share,
                "error_examples": errors}


def judge_pairwise(prompts: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str], cfg: JudgeConfig,
                   on_verdict: Callable[[JudgeRecord], Any] | None = None, ids: Sequence | None = None) -> JudgeResult:
    """Judge the policy's answers (``answers_a``) against the reference's (``answers_b``), prompt by prompt.

    Each prompt is asked in both orders (``ORDERS``), up to ``cfg.concurrency`` requests at a time. The two
    verdicts combine into the prompt's outcome: the same winner in both orders -> that side; a tie in both ->
    tie; orders that disagree -> tie (position bias cancels out); an order without a parseable verdict ->
    "invalid"; an order whose request failed after its retries -> "error", with the message. Nothing raises
    for one prompt: the run goes on. ``on_verdict(record)`` is called (on the calling thread) as each prompt
    finishes, in finishing order, so a caller can append it to a file; ``ids`` label the records (default: the
    prompt's index). A missing API key variable raises JudgeError before any request.
    """
    n = len(prompts)
    if len(answers_a) != n or len(answers_b) != n or (ids is not None and len(ids) != n):
        raise ValueError(f"judge_pairwise needs one answer per prompt: {n} prompts, {len(answers_a)} policy answers, "
                         f"{len(answers_b)} reference answers" + (f", {len(ids)} ids" if ids is not None else ""))
    client = JudgeClient(cfg)
    result = JudgeResult(model=cfg.model, url=client.endpoint)
    if n == 0:
        return result

    def ask(i: int, order: str) -> tuple[str | None, str | None]:
        a, b = (answers_a[i], answers_b[i]) if order == "policy_first" else (answers_b[i], answers_a[i])
        try:
            return client.complete(judge_messages(prompts[i], a, b)), None
        except JudgeError as e:
            return None, str(e)

    done: dict[int, dict[str, tuple[str | None, str | None]]] = {}
    records: list[JudgeRecord | None] = [None] * n
    pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="judge")
    try:
        pending = {pool.submit(ask, i, order): (i, order) for i in range(n) for order in ORDERS}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i, order = pending.pop(fut)
                done.setdefault(i, {})[order] = fut.result()
                if len(done[i]) == len(ORDERS):
                    records[i] = _record(i, ids[i] if ids is not None else i, prompts[i], done.pop(i))
                    if on_verdict is not None:
                        on_verdict(records[i])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on an exception (on_verdict's, Ctrl-C): stop asking
    result.records = [r for r in records if r is not None]
    return result


def _record(i: int, id_: Any, prompt: str, answers: dict[str, tuple[str | None, str | None]]) -> JudgeRecord:
    texts = {o: answers[o][0] for o in ORDERS}
    errors = {o: answers[o][1] for o in ORDERS if answers[o][1] is not None}
    verdicts = {o: None if o in errors else parse_verdict(texts[o]) for o in ORDERS}
    if errors:
        return JudgeRecord(i, id_, prompt, "error", verdicts, texts,
                           error="; ".join(f"{o}: {msg}" for o, msg in errors.items()))
    sides = [_SIDE[o].get(verdicts[o]) for o in ORDERS]
    if None in sides:
        return JudgeRecord(i, id_, prompt, "invalid", verdicts, texts)
    consistent = sides[0] == sides[1]
    return JudgeRecord(i, id_, prompt, sides[0] if consistent else "tie", verdicts, texts, consistent)
