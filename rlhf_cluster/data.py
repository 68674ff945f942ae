"""Datasets: load rows from disk and turn them into token-id examples.

Files: JSONL, JSON (a list of objects, or ``{"data": [...]}``), Parquet, or a directory
written by ``datasets``' ``save_to_disk`` (a DatasetDict contributes its "train" split).

Shapes (each builder returns ``(examples, DataReport)``):

* prompts (RL rollouts)          ``build_prompt_examples``     -> ``PromptExample``
* supervised fine-tuning         ``build_sft_examples``        -> ``SFTExample``
* pairwise preferences (RM, DPO) ``build_preference_examples`` -> ``PreferenceExample``
* unpaired feedback (KTO)        ``build_feedback_examples``   -> ``FeedbackExample``

A prompt is a string or a list of chat messages ``{"role", "content"}``. With the chat
template on, a string becomes one user message and the template's generation prompt
opens the assistant turn. Responses are tokenized on their own and end with EOS.

Over-long prompts keep their *last* ``max_prompt_length`` tokens; over-long responses keep
their *first* ``max_response_length`` tokens (the EOS counts toward the limit, so a
truncated response loses it). ``truncation="error"`` raises instead. Every bad row raises
a ``DataError`` naming the file, the row and the problem: nothing is dropped silently.

Row numbers count from 1: the line number in the file for JSONL ("line 7", blank lines
skipped but counted), the position in the list otherwise ("row 7" is the seventh row). JSON and
JSONL files must be UTF-8 (a leading byte-order mark is accepted); any line ending works.
Token ids are plain lists of ints; collation into tensors happens elsewhere.
"""

from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
FORMATS = "JSONL (.jsonl), JSON (.json), Parquet (.parquet) or a datasets.save_to_disk directory"


class DataError(ValueError):
    """A data file or row that cannot be used; the message names file, row and fix."""


class Rows(list):
    """A list of row dicts that remembers its source and each row's number (1-based; default 1..n)."""

    def __init__(self, items, source: str = "<rows>", numbers: list[int] | None = None, unit: str = "row"):
        super().__init__(items)
        self.source, self.unit = source, unit
        self.numbers = list(numbers) if numbers is not None else list(range(1, len(self) + 1))


@dataclass(frozen=True)
class PromptExample:
    """prompt_text is the full (templated, untruncated) text; extra holds the row's other keys."""

    prompt_ids: list[int]
    prompt_text: str
    row: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SFTExample:
    """loss_mask is 1 on the response tokens (and its EOS), 0 on the prompt."""

    input_ids: list[int]
    loss_mask: list[int]
    row: int


@dataclass(frozen=True)
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None
    row: int


@dataclass(frozen=True)
class FeedbackExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    row: int


@dataclass
class DataReport:
    """What a builder did to a file: row count and how many prompts/responses it truncated.

    unit: how the file's rows are numbered in messages, "line" (JSONL) or "row"."""

    source: str
    rows: int
    prompts_truncated: int = 0
    responses_truncated: int = 0
    max_prompt_length: int | None = None
    max_response_length: int | None = None
    unit: str = "row"

    def summary(self) -> str:
        parts = [f"{self.rows} rows", _count(self.prompts_truncated, "prompt", self.max_prompt_length)]
        if self.max_response_length is not None:
            parts.append(_count(self.responses_truncated, "response", self.max_response_length))
        return f"{self.source}: " + ", ".join(parts)


def _count(n: int, what: str, limit: int | None) -> str:
    return f"{n} {what}s truncated" + (f" to {limit} tokens" if n else "")


# ----------------------------------------------------------------------------- loading


def load_rows(path: str | Path) -> Rows:
    """Read every row of a JSONL/JSON/Parquet file or a datasets directory as dicts."""
    p, src = Path(path), str(path)
    if not p.exists():
        raise DataError(f"{src}: no such file or directory")
    if p.is_dir():
        rows, numbers, unit = _load_dataset_dir(p, src), None, "row"
    else:
        suffix = p.suffix.lower()
        if suffix not in (".jsonl", ".json", ".parquet"):
            raise DataError(f"{src}: unsupported file type {suffix or '(no suffix)'!r}; use {FORMATS}")
        if suffix == ".parquet":
            rows, numbers, unit = _load_parquet(p, src), None, "row"
        else:
            text = _read_text(p, src)
            if suffix == ".jsonl":
                numbers, rows = _parse_jsonl(text, src)
                unit = "line"
            else:
                rows, numbers, unit = _parse_json(text, src), None, "row"
    if not rows:
        raise DataError(f"{src}: no rows (the file is empty)")
    return Rows(rows, src, numbers, unit)


def _read_text(p: Path, src: str) -> str:
    """The file as UTF-8 text with a leading BOM dropped and every line ending (CRLF, CR) made \\n."""
    data = p.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{src}: UTF-16 text (it starts with a UTF-16 byte-order mark); re-save the file as UTF-8")
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # name the line and column, as an editor shows them; everything before e.start decoded fine
        before = data[: e.start].decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        line, col = before.count("\n") + 1, len(before) - before.rfind("\n")
        raise DataError(f"line {line} of {src}: not UTF-8 (byte 0x{data[e.start]:02x} at column {col}); "
                        "re-save the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _parse_jsonl(text: str, src: str) -> tuple[list[int], list[dict]]:
    numbers, rows = [], []
    # split on \n only: str.splitlines also breaks at U+2028, U+0085 and others, which JSON strings may hold raw
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"line {n} of {src}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"line {n} of {src}: expected a JSON object, got {type(obj).__name__}")
        numbers.append(n)
        rows.append(obj)
    return numbers, rows


def _parse_json(text: str, src: str) -> list[dict]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; if it holds one object per line, rename it to .jsonl" if e.msg == "Extra data" else ""
        raise DataError(f"{src}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){hint}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{src}: a JSON object must hold exactly one list of rows (like {{\"data\": [...]}}); "
                f"found {len(lists)} list-valued keys among: {', '.join(data) or 'none'}"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{src}: expected a JSON list of objects, got {type(data).__name__}")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"row {i + 1} of {src}: expected a JSON object, got {type(obj).__name__}")
    return data


def _load_parquet(p: Path, src: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{src}: not a readable Parquet file ({e})") from None


def _load_dataset_dir(p: Path, src: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise DataError(f"{src}: a directory, but not one written by datasets' save_to_disk; use {FORMATS}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{src}: DatasetDict has no 'train' split (splits: {', '.join(ds)}); save the split you want as train")
        ds = ds["train"]
    return ds.to_list()


# ----------------------------------------------------------------------------- building


class RowCursor:
    """Walks rows remembering which one it is at, so every error names the file and the row (or line)."""

    fix_where = ""  # appended to "set data.OPTION" in a missing-column error

    def __init__(self, rows, source: str | None = None):
        self.rows = rows
        self.source = source or getattr(rows, "source", "<rows>")
        self.unit = getattr(rows, "unit", "row")
        numbers = getattr(rows, "numbers", None)
        self.numbers = list(numbers) if numbers is not None and len(numbers) == len(rows) else list(range(1, len(rows) + 1))
        self.n = None

    def __iter__(self):
        for n, row in zip(self.numbers, self.rows):
            self.n = n
            if not isinstance(row, dict):
                raise self.error(f"expected a dict, got {type(row).__name__}")
            yield n, row

    def error(self, msg: str) -> DataError:
        return DataError(f"{self.unit} {self.n} of {self.source}: {msg}")

    def get(self, row: dict, key: str, option: str):
        value = row.get(key)
        if value is None:
            problem = f"{key!r} is null" if key in row else f"missing key {key!r}"
            raise self.error(f"{problem} (keys present: {', '.join(map(str, row)) or 'none'}); "
                             f"rename the column or set data.{option}{self.fix_where}")
        return value


class _Builder(RowCursor):
    """Shared row checks, tokenization and truncation for the four builders."""

    def __init__(self, rows, tokenizer, source, apply_chat_template, max_prompt_length,
                 max_response_length=None, truncation="truncate", response=False):
        if truncation not in ("truncate", "error"):
            raise ValueError(f"truncation must be 'truncate' or 'error', got {truncation!r}")
        limits = {"max_prompt_length": max_prompt_length, **({"max_response_length": max_response_length} if response else {})}
        for name, limit in limits.items():
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"{name} must be a positive int, got {limit!r}")
        super().__init__(rows, source)
        self.tok, self.chat, self.truncation = tokenizer, apply_chat_template, truncation
        self.max_prompt, self.max_response = max_prompt_length, max_response_length
        self.report = DataReport(self.source, len(rows), 0, 0, max_prompt_length, max_response_length if response else None,
                                 self.unit)
        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{self.source}: the tokenizer has no chat template; set data.apply_chat_template=false")
        self.eos = tokenizer.eos_token_id
        if response and self.eos is None:
            raise DataError(f"{self.source}: the tokenizer has no EOS token, which every response must end with")

    def nonempty(self, text: str, key: str) -> str:
        if not text.strip():
            raise self.error(f"{key!r} is empty")
        return text

    def messages(self, value: list, key: str) -> list[dict]:
        if not value:
            raise self.error(f"{key!r} is an empty list of messages")
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and "role" in m and "content" in m):
                raise self.error(f"{key!r}[{i}] must be a {{'role', 'content'}} dict, got {_show(m)}")
            if m["role"] not in ROLES:
                raise self.error(f"{key!r}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise self.error(f"{key!r}[{i}]['content'] must be a string, got {type(m['content']).__name__}")
        if not any(m["content"].strip() for m in value):
            raise self.error(f"{key!r} is empty (every message has empty content)")
        return value

    def reply(self, msgs: list[dict], key: str) -> str:
        if msgs[-1]["role"] != "assistant":
            raise self.error(f"the last message of {key!r} is from {msgs[-1]['role']!r}; it must be the assistant's reply")
        return self.nonempty(msgs[-1]["content"], f"{key}[-1]['content']")

    # -- tokens
    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def template(self, msgs: list[dict]) -> str:
        return self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def prompt(self, row: dict, key: str) -> tuple[str, list[int]]:
        """(full prompt text, possibly left-truncated ids) of a string or chat-message prompt."""
        value = self.get(row, key, "prompt_key")
        if isinstance(value, str):
            self.nonempty(value, key)
            text = self.template([{"role": "user", "content": value}]) if self.chat else value
        elif isinstance(value, list):
            if not self.chat:
                raise self.error(f"{key!r} is a list of chat messages but apply_chat_template is off; "
                                 "set data.apply_chat_template=true or give plain-string prompts")
            text = self.template(self.messages(value, key))
        else:
            raise self.error(f"{key!r} must be a string or a list of chat messages, got {_show(value)}")
        return text, self.clip_prompt(self.encode(text))

    def response(self, row: dict, key: str, option: str) -> str:
        value = self.get(row, key, option)
        if isinstance(value, str):
            return self.nonempty(value, key)
        if isinstance(value, list):
            return self.reply(self.messages(value, key), key)
        raise self.error(f"{key!r} must be a string or a list of chat messages, got {_show(value)}")

    def clip_prompt(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_prompt:
            return ids
        self.too_long("prompt", len(ids), "max_prompt_length", self.max_prompt)
        self.report.prompts_truncated += 1
        return ids[-self.max_prompt:]

    def response_ids(self, text: str) -> list[int]:
        ids = self.encode(text) + [self.eos]
        if len(ids) <= self.max_response:
            return ids
        self.too_long("response", len(ids), "max_response_length", self.max_response)
        self.report.responses_truncated += 1
        return ids[: self.max_response]

    def too_long(self, what: str, n: int, option: str, limit: int) -> None:
        if self.truncation == "error":
            raise self.error(f"{what} is {n} tokens, over {option}={limit}; "
                             f"raise data.{option} or set data.truncation=truncate")


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def build_prompt_examples(rows, tokenizer, *, source: str | None = None, prompt_key: str = "prompt",
                          apply_chat_template: bool = True, max_prompt_length: int,
                          truncation: str = "truncate") -> tuple[list[PromptExample], DataReport]:
    """RL prompts; each row's other keys are kept in ``extra`` (e.g. ground truth for rewards)."""
    b = _Builder(rows, tokenizer, source, apply_chat_template, max_prompt_length, None, truncation)
    out = []
    for n, row in b:
        text, ids = b.prompt(row, prompt_key)
        out.append(PromptExample(ids, text, n, {k: v for k, v in row.items() if k != prompt_key}))
    return out, b.report


def build_sft_examples(rows, tokenizer, *, source: str | None = None, prompt_key: str = "prompt",
                       response_key: str = "response", messages_key: str = "messages",
                       apply_chat_template: bool = True, max_prompt_length: int, max_response_length: int,
                       truncation: str = "truncate") -> tuple[list[SFTExample], DataReport]:
    """Supervised rows: prompt/response pairs, or a messages list trained on its last assistant reply."""
    b = _Builder(rows, tokenizer, source, apply_chat_template, max_prompt_length, max_response_length, truncation, True)
    out = []
    for n, row in b:
        has_msgs, has_resp = row.get(messages_key) is not None, row.get(response_key) is not None
        if has_msgs and has_resp:
            raise b.error(f"has both {messages_key!r} and {response_key!r}; keep one form per row")
        if has_msgs:
            value = row[messages_key]
            if not isinstance(value, list):
                raise b.error(f"{messages_key!r} must be a list of chat messages, got {_show(value)}")
            if not apply_chat_template:
                raise b.error(f"{messages_key!r} needs the chat template; set data.apply_chat_template=true")
            msgs = b.messages(value, messages_key)
            reply = b.reply(msgs, messages_key)
            if len(msgs) < 2:
                raise b.error(f"{messages_key!r} has only the assistant reply; it needs at least one message before it")
            prompt_ids = b.clip_prompt(b.encode(b.template(msgs[:-1])))
        elif prompt_key in row or response_key in row:
            prompt_ids = b.prompt(row, prompt_key)[1]
            reply = b.response(row, response_key, "response_key")
        else:
            raise b.error(f"missing keys: give {prompt_key!r} and {response_key!r}, or {messages_key!r} "
                          f"(keys present: {', '.join(map(str, row)) or 'none'}); rename the columns or set "
                          "data.prompt_key / data.response_key / data.messages_key")
        response_ids = b.response_ids(reply)
        out.append(SFTExample(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids), n))
    return out, b.report


def build_preference_examples(rows, tokenizer, *, source: str | None = None, prompt_key: str = "prompt",
                              chosen_key: str = "chosen", rejected_key: str = "rejected", margin_key: str = "margin",
                              apply_chat_template: bool = True, max_prompt_length: int, max_response_length: int,
                              truncation: str = "truncate") -> tuple[list[PreferenceExample], DataReport]:
    """Pairwise preferences. chosen/rejected: strings, or message lists whose last (assistant)
    message is the reply (earlier messages are ignored: the prompt comes from ``prompt_key``)."""
    b = _Builder(rows, tokenizer, source, apply_chat_template, max_prompt_length, max_response_length, truncation, True)
    out = []
    for n, row in b:
        prompt_ids = b.prompt(row, prompt_key)[1]
        chosen = b.response(row, chosen_key, "chosen_key")
        rejected = b.response(row, rejected_key, "rejected_key")
        if chosen == rejected:
            raise b.error(f"{chosen_key!r} and {rejected_key!r} are identical, so there is nothing to learn; fix or remove the row")
        margin = row.get(margin_key)
        if margin is not None:
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise b.error(f"{margin_key!r} must be a finite number, got {_show(margin)}")
            margin = float(margin)
        out.append(PreferenceExample(prompt_ids, b.response_ids(chosen), b.response_ids(rejected), margin, n))
    return out, b.report


def build_feedback_examples(rows, tokenizer, *, source: str | None = None, prompt_key: str = "prompt",
                            completion_key: str = "completion", label_key: str = "label",
                            apply_chat_template: bool = True, max_prompt_length: int, max_response_length: int,
                            truncation: str = "truncate") -> tuple[list[FeedbackExample], DataReport]:
    """Unpaired feedback (KTO): a completion labelled desirable (true/1) or not (false/0)."""
    b = _Builder(rows, tokenizer, source, apply_chat_template, max_prompt_length, max_response_length, truncation, True)
    out = []
    for n, row in b:
        prompt_ids = b.prompt(row, prompt_key)[1]
        completion = b.response(row, completion_key, "completion_key")
        label = b.get(row, label_key, "label_key")
        if not isinstance(label, bool) and not (type(label) is int and label in (0, 1)):
            raise b.error(f"{label_key!r} must be a bool (or 0/1), got {_show(label)}")
        out.append(FeedbackExample(prompt_ids, b.response_ids(completion), bool(label), n))
    return out, b.report


def preference_to_feedback(examples: list[PreferenceExample]) -> list[FeedbackExample]:
    """Split each pair into a desirable (chosen) and an undesirable (rejected) example."""
    out = []
    for e in examples:
        out.append(FeedbackExample(list(e.prompt_ids), list(e.chosen_ids), True, e.row))
        out.append(FeedbackExample(list(e.prompt_ids), list(e.rejected_ids), False, e.row))
    return out


BUILDERS = {
    "prompt": build_prompt_examples,
    "sft": build_sft_examples,
    "preference": build_preference_examples,
    "feedback": build_feedback_examples,
}


def load_examples(kind: str, path: str | Path, tokenizer, **options) -> tuple[list, DataReport]:
    """``load_rows(path)`` then the builder for ``kind`` (prompt, sft, preference, feedback)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(BUILDERS)}")
    return BUILDERS[kind](load_rows(path), tokenizer, source=str(path), **options)
