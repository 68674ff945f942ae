"""Eval prompt files: this project's own JSONL, MT-Bench ``question.jsonl`` and AlpacaEval JSON, told apart by
their fields.

Read through :func:`rlhf_cluster.data.load_rows`, so the encodings, byte-order marks, line numbering and file
types (JSONL, JSON, Parquet, a ``datasets`` directory) are the training loader's, and every error names the file
and the line (JSONL) or row (the others). The format is decided by the first row and every row must fit it:

* ``prompt``: rlhf_cluster rows (``data.prompt_key``, "prompt" by default): a string, a list of strings (turns of
  a multi-turn conversation) or a list of chat messages ``{"role", "content"}``; ``id`` and ``category`` fields
  are read when present;
* ``mt_bench``: MT-Bench ``question.jsonl`` rows ``{"question_id", "category", "turns": [...]}`` (a ``reference``
  answer, where given, stays in ``extra``);
* ``alpaca_eval``: AlpacaEval's JSON list of ``{"instruction", "input"?, "output", "generator", "dataset"}``;
  a non-empty ``input`` is appended to the instruction after a blank line; ``dataset`` is also the category.

``prompt_key`` names the prompt field and skips detection (the ``prompt`` format, with that field).
Local files only: download a benchmark's file first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_cluster.data import ROLES, DataError, RowCursor, _show, load_rows

DEFAULT_PROMPT_KEY = "prompt"  # rlhf_cluster.data's (and data.prompt_key's) default

FORMATS = {
    "prompt": "rlhf_cluster rows with a 'prompt' field",
    "mt_bench": "MT-Bench question.jsonl rows with 'turns' (and 'question_id', 'category')",
    "alpaca_eval": "AlpacaEval JSON rows with 'instruction' (and optional 'input')",
}


@dataclass
class EvalPrompt:
    """One eval prompt. ``prompt`` is the first turn; ``turns`` every user turn in order (one for single-turn
    prompts; MT-Bench asks turn 2 after the model's answer to turn 1). ``messages``: the prompt as chat messages
    when the file gave it so (a system prompt, earlier turns): generate from these, ``prompt`` is then the first
    user message. ``id``: the file's id (``question_id``, ``id``) or else the row number. ``extra``: the row's
    other fields. ``row``: the line (JSONL) or row number in the file."""

    id: int | str
    prompt: str
    turns: list[str]
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    messages: list[dict] | None = None
    row: int = 0


def detect_format(row: dict) -> str | None:
    """The format a row's fields say (``prompt``, ``mt_bench`` or ``alpaca_eval``), or None."""
    if DEFAULT_PROMPT_KEY in row:
        return "prompt"
    if "turns" in row:
        return "mt_bench"
    if "instruction" in row:
        return "alpaca_eval"
    return None


def load_eval_prompts(path: str | Path, prompt_key: str | None = None) -> list[EvalPrompt]:
    """Every prompt of an eval file (formats above); a ``DataError`` naming file, row and fields for a bad one."""
    src = str(path)
    if "://" in src:
        raise DataError(f"{src}: eval prompts are read from local files only; download the file first")
    rows = load_rows(path)
    cur = RowCursor(rows)
    first = rows[0] if isinstance(rows[0], dict) else {}
    fmt = "prompt" if prompt_key is not None else detect_format(first)
    if fmt is None:
        cur.n = cur.numbers[0]
        raise cur.error(f"cannot tell the prompt format from the fields found ({_fields(first)}); expected "
                        + "; ".join(FORMATS.values()) + " (or pass prompt_key)")
    read = {"prompt": _project_row, "mt_bench": _mt_bench_row, "alpaca_eval": _alpaca_row}[fmt]
    key = prompt_key or DEFAULT_PROMPT_KEY
    out: list[EvalPrompt] = []
    seen: dict[Any, int] = {}
    for n, row in cur:
        p = read(cur, row, key)
        p.row = n
        if p.id in seen:
            raise cur.error(f"id {p.id!r} repeats the one at {cur.unit} {seen[p.id]}; eval prompt ids must be unique")
        seen[p.id] = n
        out.append(p)
    return out


def _project_row(cur: RowCursor, row: dict, key: str) -> EvalPrompt:
    value = _field(cur, row, key, "the prompt field (as detected, or prompt_key)")
    messages = None
    if isinstance(value, str):
        turns = [_text(cur, value, key)]
    elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        turns = [_text(cur, t, f"{key}[{i}]") for i, t in enumerate(value)]
    elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        messages = _messages(cur, value, key)
        turns = [m["content"] for m in messages if m["role"] == "user"]
    else:
        raise cur.error(f"{key!r} must be a string, a list of strings (turns) or a list of chat messages, got {_show(value)}")
    return EvalPrompt(_id(row, "id", cur), turns[0], turns, _category(row, "category"),
                      _rest(row, key, "id", "category"), messages)


def _mt_bench_row(cur: RowCursor, row: dict, key: str) -> EvalPrompt:
    value = _field(cur, row, "turns", "MT-Bench's turns (this file's first row has them)")
    if not isinstance(value, list) or not value:
        raise cur.error(f"'turns' must be a non-empty list of strings, got {_show(value)}")
    turns = [_text(cur, t, f"turns[{i}]") for i, t in enumerate(value)]
    return EvalPrompt(_id(row, "question_id", cur), turns[0], turns, _category(row, "category"),
                      _rest(row, "turns", "question_id", "category"))


def _alpaca_row(cur: RowCursor, row: dict, key: str) -> EvalPrompt:
    instruction = _text(cur, _field(cur, row, "instruction", "AlpacaEval's instruction (this file's first row has it)"),
                        "instruction")
    extra_input = row.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        raise cur.error(f"'input' must be a string, got {_show(extra_input)}")
    prompt = instruction + (f"\n\n{extra_input}" if extra_input and extra_input.strip() else "")
    category = _category(row, "category") or _category(row, "dataset")
    return EvalPrompt(_id(row, "id", cur), prompt, [prompt], category, _rest(row, "instruction", "input", "id", "category"))


def _field(cur: RowCursor, row: dict, key: str, what: str):
    value = row.get(key)
    if value is None:
        problem = f"{key!r} is null" if key in row else f"missing {key!r}"
        raise cur.error(f"{problem}, {what} (fields found: {_fields(row)})")
    return value


def _text(cur: RowCursor, value, key: str) -> str:
    if not isinstance(value, str):
        raise cur.error(f"{key!r} must be a string, got {_show(value)}")
    if not value.strip():
        raise cur.error(f"{key!r} is empty")
    return value


def _messages(cur: RowCursor, value: list, key: str) -> list[dict]:
    for i, m in enumerate(value):
        if "role" not in m or "content" not in m:
            raise cur.error(f"{key!r}[{i}] must be a {{'role', 'content'}} message, got {_show(m)}")
        if m["role"] not in ROLES:
            raise cur.error(f"{key!r}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise cur.error(f"{key!r}[{i}]['content'] must be a string, got {_show(m['content'])}")
    users = [m["content"] for m in value if m["role"] == "user"]
    if not users:
        raise cur.error(f"{key!r} has no user message")
    for i, m in enumerate(value):
        if m["role"] == "user" and not m["content"].strip():
            raise cur.error(f"{key!r}[{i}] is an empty user message")
    return value


def _id(row: dict, key: str, cur: RowCursor) -> int | str:
    value = row.get(key)
    if value is None:
        return cur.n
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise cur.error(f"{key!r} must be an int or a string, got {_show(value)}")
    return value


def _category(row: dict, key: str) -> str | None:
    value = row.get(key)
    return None if value is None else str(value)


def _rest(row: dict, *taken: str) -> dict:
    return {k: v for k, v in row.items() if k not in taken}


def _fields(row: dict) -> str:
    return ", ".join(map(str, row)) or "none"

