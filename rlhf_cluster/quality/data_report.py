"""Preference-data report: is this file good enough to train on? (``rlhf-cluster data report``)

Reads pairwise (prompt/chosen/rejected), unpaired feedback (prompt/completion/label, as in KTO) and SFT
(prompt/response or messages) files through :func:`rlhf_cluster.data.load_rows`, so every format and its
row-numbered errors are the training path's own. Pure Python: no Ray, no actors, no GPU (transformers only
loads a tokenizer when a config names one); a few thousand rows take seconds.

Three layers, as elsewhere in the project:

* statistics, pure functions of lists of strings and numbers (``length_bias``, ``fleiss_kappa``,
  ``cohen_kappa``, ``distinct_n``, ``jaccard``, ``near_duplicate_pairs``, ``bigram_overlap`` ...), each
  testable by hand;
* :func:`build_report` turns rows into one dict: a section per check and ``flags``, each flag naming the
  value, the threshold it crossed and a handful of row numbers to look at;
* :func:`run_report` is the one step from file paths and a config to flat arguments, and
  :func:`write_report` writes ``report.md``, ``report.json`` and ``report.png``.

Text is compared as words: lower-cased ``\\w+`` runs, so case, punctuation and spacing never make two texts
differ. Lengths are tokens when a tokenizer is given (counted as ``rlhf_cluster.data`` counts them: the
templated prompt, the response plus its EOS), whitespace words otherwise.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from rlhf_cluster.data import DataError, RowCursor, load_rows

SHOW_ROWS = 5  # row numbers listed per flag
EXAMPLES = 10  # examples (duplicate groups, openings, ...) kept per section
MAX_CANDIDATES = 100  # near-duplicate comparisons per row: keeps the search linear on adversarial data
VOTE_KEYS = ("votes", "labels")  # a list of per-annotator labels for the row

KINDS = {"pairwise": "pairwise preferences", "feedback": "unpaired feedback (KTO)", "sft": "supervised (SFT)"}
ENDORSED = {"pairwise": "chosen", "sft": "response", "feedback": "completion"}  # the answer a row teaches

# Requests a safety-tuned model should decline. Deliberately short and crude: a coverage signal, not a
# classifier; --harmful-patterns FILE replaces it (one regular expression per line, case-insensitive).
HARMFUL_PATTERNS = (
    r"\b(make|build|assemble|synthesi[sz]e|cook)\b.{0,40}\b(bomb|explosives?|nerve agent|bioweapon|chemical weapon|meth(amphetamine)?)\b",
    r"\b(kill|murder|poison|hurt|stab|shoot)\b.{0,30}\b(someone|somebody|people|a person|my (wife|husband|boss|neighbou?r|family))\b",
    r"\b(hack|break) into\b",
    r"\b(steal|shoplift|launder)\w*\b",
    r"\b(malware|ransomware|keylogger|phishing)\b",
    r"\b(suicide|self[- ]harm|kill myself)\b",
    r"\b(credit card|social security) numbers?\b",
    r"\bwithout (them|anyone|her|him) (knowing|noticing)\b",
    r"\b(illegal|unregistered|untraceable) (guns?|firearms?|weapons?|drugs)\b",
    r"\b(evade|avoid) (the )?(police|taxes)\b",
)

# Openings of a refusal; --refusal-patterns FILE replaces them.
REFUSAL_PATTERNS = (
    r"\b(I|we) (can['’]?t|cannot|won['’]t|will not|am not able to|['’]m not able to|am unable to|['’]m unable to)\b",
    r"\b(I['’]m|I am) sorry\b",
    r"\bsorry, but\b",
    r"\bas an AI\b",
    r"\bI (must|have to) (decline|refuse)\b",
    r"\bnot something I can help\b",
)


@dataclass(frozen=True)
class Thresholds:
    """When each check raises its flag (the value is compared with the field named here)."""

    empty: int = 0
    """Rows with an empty prompt or response; training stops at the first (rlhf_cluster.data refuses them)."""
    identical: int = 0
    """Pairs whose chosen and rejected are the same words: nothing to learn."""
    truncated_share: float = 0.05
    """Share of rows whose prompt or a response is over the configured length."""
    duplicate_share: float = 0.0
    """Share of rows that repeat an earlier row word for word."""
    near_duplicate_share: float = 0.05
    """Share of rows whose text is a near duplicate (``jaccard`` below) of an earlier, different row."""
    jaccard: float = 0.8
    """Two texts are near duplicates at this Jaccard similarity of their word shingles, or above."""
    shingle: int = 3
    """Words per shingle (a text shorter than this is one shingle)."""
    contamination_share: float = 0.0
    """Share of training rows whose prompt is also (exactly or nearly) an eval prompt."""
    length_rule_accuracy: float = 0.65
    """Accuracy of "the longer answer wins" (ties a coin toss): a reward model can reach it from length alone."""
    agreement: float = 0.70
    """Raw annotator agreement (share of annotator pairs that agree, averaged over rows) below this flags."""
    opening_share: float = 0.30
    """Share of distinct prompts that start with the most common first three words."""
    refusal_share: float = 0.8
    """Share of harmful-looking prompts whose endorsed answer refuses, below which the check flags."""
    deploy_coverage: float = 0.5
    """Share of the deploy prompts' word pairs (2-grams) seen in the training prompts, below which it flags."""

    def __post_init__(self):
        if not 0 < self.jaccard <= 1:
            raise ValueError(f"jaccard must be in (0, 1], got {self.jaccard}")
        if self.shingle < 1:
            raise ValueError(f"shingle must be >= 1, got {self.shingle}")


@dataclass(frozen=True)
class Columns:
    """Column names; ``run_report`` fills them from a config's data section (``data.prompt_key`` ...)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    response: str = "response"
    messages: str = "messages"
    completion: str = "completion"
    label: str = "label"


@dataclass(frozen=True)
class Flag:
    """A check that fired: ``value`` crossed ``threshold`` (``op`` says which way); ``rows`` are examples."""

    name: str
    what: str
    value: float
    op: str
    threshold: float
    rows: list[int]
    unit: str = "line"
    source: str | None = None
    """The file the rows are in, when it is not the reported file (the deploy file)."""

    def line(self) -> str:
        where = (f" ({self.unit}{'s' if len(self.rows) > 1 else ''} {', '.join(map(str, self.rows))}"
                 + (f" of {self.source}" if self.source else "") + ")")
        return f"{self.name}: {self.what} = {_num(self.value)} {self.op} {_num(self.threshold)}" + (where if self.rows else "")


# ----------------------------------------------------------------------------- statistics (pure)

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word runs: case, punctuation and spacing never make two texts differ."""
    return _WORD.findall(text.lower())


def ngrams(ws: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (Li et al. 2016, "A Diversity-Promoting Objective")."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def opening(text: str, k: int = 3) -> str:
    """The first ``k`` words."""
    return " ".join(words(text)[:k])


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    """The text's word n-grams; a text of fewer than n words is one shingle, an empty one none."""
    ws = words(text)
    if not ws:
        return set()
    return set(ngrams(ws, n)) if len(ws) >= n else {tuple(ws)}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; 0 for two empty sets (empty texts are the empty check's business)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


class NearDuplicates(NamedTuple):
    pairs: list[tuple[int, int, float]]
    """(i, j, J) with J >= the threshold."""
    capped: list[int]
    """Query sets whose candidates ran past ``max_candidates``: their matches may be incomplete."""


def near_duplicate_pairs(sets: Sequence[set], threshold: float, against: Sequence[set] | None = None,
                         first_only: bool = False, max_candidates: int | None = None) -> NearDuplicates:
    """Pairs of sets whose Jaccard similarity is ``threshold`` or more.

    Within ``sets``: every ``(i, j, J)`` with i < j. With ``against``: every ``(i, j, J)`` pairing
    ``sets[i]`` with ``against[j]``. ``first_only``: stop at each query set's first match (i.e. "has a
    near duplicate", which keeps a cluster of k near-copies at O(k) comparisons instead of k²).

    Prefix filtering (Bayardo et al. 2007, "Scaling up all pairs similarity search"): with every set's
    elements in one global order, rarest first, two sets with J >= t share an element among the first
    ``|s| - ceil(t |s|) + 1`` of each (because |a ∩ b| >= t max(|a|, |b|)), so only sets that meet in an
    inverted index of those prefixes are compared, and a pair whose sizes differ by more than J allows is
    skipped. Exact, and near-linear on real text, where rare shingles keep the buckets small. Many sets
    that are alike but just under the threshold share common shingles in their prefixes and make it
    quadratic; ``max_candidates`` bounds the comparisons per query set and reports the ones it cut short.
    """
    freq = Counter(g for s in (*sets, *(against or ())) for g in s)

    def prefix(s: set) -> list:
        return sorted(s, key=lambda g: (freq[g], g))[: len(s) - math.ceil(threshold * len(s) - 1e-9) + 1]

    others = sets if against is None else against
    index: dict[Any, list[int]] = defaultdict(list)
    for j, s in enumerate(against or ()):
        for g in prefix(s):
            index[g].append(j)
    out, capped = [], []
    for i, s in enumerate(sets):
        if not s:
            continue
        p = prefix(s)
        seen: set[int] = set()
        for j in (j for g in p for j in index[g]):
            o = others[j]
            if j in seen or min(len(o), len(s)) < threshold * max(len(o), len(s)) - 1e-9:
                continue
            if max_candidates is not None and len(seen) >= max_candidates:
                capped.append(i)
                break
            seen.add(j)
            sim = jaccard(o, s)
            if sim >= threshold:
                out.append((j, i, sim) if against is None else (i, j, sim))
                if first_only:
                    break
        if against is None:
            for g in p:
                index[g].append(i)
    return NearDuplicates(sorted(out), capped)


def length_bias(chosen: Sequence[int], rejected: Sequence[int]) -> dict:
    """How well "the longer answer wins" predicts the preference (Singhal et al. 2023, "A Long Way to Go").

    ``longer_wins_accuracy`` is over the pairs whose lengths differ; ``length_rule_accuracy`` over all
    pairs with ties scored as a coin toss (½): what a reward model that only measures length would reach.
    """
    n = len(chosen)
    longer = sum(c > r for c, r in zip(chosen, rejected))
    shorter = sum(c < r for c, r in zip(chosen, rejected))
    ties = n - longer - shorter
    return {
        "pairs": n,
        "chosen_longer": longer,
        "rejected_longer": shorter,
        "ties": ties,
        "chosen_longer_share": longer / n if n else None,
        "tie_share": ties / n if n else None,
        "longer_wins_accuracy": longer / (longer + shorter) if longer + shorter else None,
        "length_rule_accuracy": (longer + ties / 2) / n if n else None,
        "mean_chosen_length": sum(chosen) / n if n else None,
        "mean_rejected_length": sum(rejected) / n if n else None,
    }


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' κ (Fleiss 1971) from ``counts[i][j]``: annotators who put item i in category j.

    P_i = (Σ_j n_ij² - n_i) / (n_i (n_i - 1)), P̄ = mean P_i, p_j = Σ_i n_ij / Σ_i n_i, P̄_e = Σ_j p_j²,
    κ = (P̄ - P̄_e) / (1 - P̄_e). Items may have different numbers of annotators (n_i); items with fewer
    than two are skipped. None when undefined (no items, or every label in one category).
    """
    items = [row for row in counts if sum(row) >= 2]
    if not items:
        return None
    p_bar = sum(_item_agreement(row) for row in items) / len(items)
    total = sum(sum(row) for row in items)
    p_e = sum((sum(row[j] for row in items) / total) ** 2 for j in range(len(items[0])))
    return (p_bar - p_e) / (1 - p_e) if p_e < 1 else None


def _item_agreement(row: Sequence[int]) -> float:
    """P_i: the share of the item's annotator pairs that agree."""
    n = sum(row)
    return (sum(c * c for c in row) - n) / (n * (n - 1))


def cohen_kappa(a: Sequence, b: Sequence) -> float | None:
    """Cohen's κ (Cohen 1960) of two annotators' labels over the same items: (p_o - p_e) / (1 - p_e).

    None when undefined (no items, or both annotators always give the same single label)."""
    n = len(a)
    if n == 0 or len(b) != n:
        return None
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return (p_o - p_e) / (1 - p_e) if p_e < 1 else None


def agreement(votes: Sequence[Sequence]) -> dict:
    """Annotator agreement over items that carry two or more labels each.

    ``raw_agreement`` is P̄ of Fleiss (the share of annotator pairs that agree, averaged over items);
    ``cohen_kappa`` is given when every item has exactly two labels (list position = annotator)."""
    items = [list(v) for v in votes if len(v) >= 2]
    if not items:
        return {"items": 0}
    categories = sorted({x for v in items for x in v}, key=repr)
    counts = [[v.count(c) for c in categories] for v in items]
    two = all(len(v) == 2 for v in items)
    return {
        "items": len(items),
        "annotators_per_item": sorted(set(len(v) for v in items)),
        "categories": categories,
        "raw_agreement": sum(_item_agreement(c) for c in counts) / len(counts),
        "unanimous_share": sum(len(set(v)) == 1 for v in items) / len(items),
        "fleiss_kappa": fleiss_kappa(counts),
        "cohen_kappa": cohen_kappa([v[0] for v in items], [v[1] for v in items]) if two else None,
    }


def bigram_overlap(train: Sequence[str], deploy: Sequence[str]) -> dict:
    """How much of the deploy prompts' wording the training prompts cover.

    ``coverage``: share of the deploy prompts' 2-gram occurrences whose 2-gram occurs in some training
    prompt; ``jaccard``: of the two sets of distinct 2-grams; ``word_coverage``: the same as coverage for
    single words. ``per_prompt``: each deploy prompt's coverage (None below two words)."""
    seen2 = {g for t in train for g in ngrams(words(t), 2)}
    seen1 = {w for t in train for w in words(t)}
    per_prompt, hit, total, deploy2, hit1, total1 = [], 0, 0, set(), 0, 0
    for t in deploy:
        ws = words(t)
        grams = ngrams(ws, 2)
        k = sum(g in seen2 for g in grams)
        per_prompt.append(k / len(grams) if grams else None)
        hit, total = hit + k, total + len(grams)
        hit1, total1 = hit1 + sum(w in seen1 for w in ws), total1 + len(ws)
        deploy2.update(grams)
    return {
        "coverage": hit / total if total else None,
        "jaccard": jaccard(seen2, deploy2),
        "word_coverage": hit1 / total1 if total1 else None,
        "per_prompt": per_prompt,
    }


def compile_patterns(lines: Sequence[str], source: str = "<patterns>") -> list[re.Pattern]:
    """Case-insensitive regular expressions, one per line; blank lines and ``#`` comments are skipped."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            out.append(re.compile(line.strip(), re.IGNORECASE))
        except re.error as e:
            raise DataError(f"line {n} of {source}: not a valid regular expression ({e})") from None
    return out


def matches(texts: Sequence[str], patterns: Sequence[re.Pattern]) -> list[bool]:
    return [any(p.search(t) for p in patterns) for t in texts]


# ----------------------------------------------------------------------------- rows -> texts


class WordMeasure:
    """Lengths in whitespace words (no tokenizer)."""

    unit = "words"
    note = "whitespace words (no --config, so no tokenizer)"

    def prompt(self, value) -> int:
        return len(_prompt_text(value).split())

    def response(self, text: str) -> int:
        return len(text.split())


class TokenMeasure:
    """Token lengths as rlhf_cluster.data counts them: the (templated) prompt; the response plus its EOS."""

    unit = "tokens"

    def __init__(self, tokenizer, apply_chat_template: bool, name: str = "the tokenizer"):
        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{name}: the tokenizer has no chat template; set data.apply_chat_template=false")
        self.tok, self.chat = tokenizer, apply_chat_template
        self.note = f"tokens of {name}" + (" (prompts with the chat template)" if apply_chat_template else "")

    def _encode(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt(self, value) -> int:
        if not value:
            return 0
        if not self.chat:
            return self._encode(_prompt_text(value))
        msgs = [{"role": "user", "content": value}] if isinstance(value, str) else value
        return self._encode(self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))

    def response(self, text: str) -> int:
        return self._encode(text) + 1


@dataclass
class Table:
    """A file's rows as texts. ``responses``: chosen/rejected (pairwise), response (SFT) or completion (KTO)."""

    kind: str
    source: str
    unit: str
    rows: list[int]
    prompts: list[str]
    prompt_values: list  # as given (a string or chat messages), for token counts
    responses: dict[str, list[str]]
    labels: list[bool] | None = None
    votes: list[list] = field(default_factory=list)

    @cached_property
    def prompt_keys(self) -> list[str]:
        """Each prompt's words, for comparing prompts."""
        return [_norm(p) for p in self.prompts]

    @property
    def endorsed(self) -> list[str | None]:
        """The answer each row teaches the model to give (None: a completion labelled undesirable)."""
        if self.kind == "feedback":
            return [c if ok else None for c, ok in zip(self.responses["completion"], self.labels)]
        return list(self.responses[ENDORSED[self.kind]])


class Prompts(NamedTuple):
    """An eval or deploy file's prompts: where from, how its rows are numbered, the numbers, the texts."""

    source: str
    unit: str
    rows: list[int]
    texts: list[str]


def _prompt_text(value) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


class _Reader(RowCursor):
    """The training loader's row cursor (errors name the row and the fix), plus the report's field readers."""

    fix_where = " in --config"

    def __init__(self, rows):
        super().__init__(rows)
        self.n = 0

    def messages(self, value, key: str) -> list[dict]:
        if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
            raise self.error(f"{key!r} must be a string or a list of {{'role', 'content'}} messages")
        return value

    def prompt(self, value, key: str):
        return value if isinstance(value, str) else self.messages(value, key)

    def response(self, value, key: str) -> str:
        """A string, or the last message's content of a message list."""
        if isinstance(value, str):
            return value
        msgs = self.messages(value, key)
        return msgs[-1]["content"] if msgs else ""

    def votes(self, row: dict) -> list:
        key = next((k for k in VOTE_KEYS if row.get(k) is not None), None)
        if key is None:
            return []
        value = row[key]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise self.error(f"{key!r} must be a list of labels (strings or numbers), one per annotator")
        return value


def detect_kind(row: dict, cols: Columns) -> str | None:
    """pairwise, feedback or sft from one row's keys (None when none fits)."""
    if cols.chosen in row and cols.rejected in row:
        return "pairwise"
    if cols.completion in row and cols.label in row:
        return "feedback"
    if cols.response in row or cols.messages in row:
        return "sft"
    return None


def read_table(rows, cols: Columns = Columns()) -> Table:
    """The file's texts, its kind detected from the first row; a missing column is a DataError."""
    r = _Reader(rows)
    if not rows or not isinstance(rows[0], dict):
        raise DataError(f"{r.source}: expected a non-empty list of row objects")
    kind = detect_kind(rows[0], cols)
    if kind is None:
        r.n = r.numbers[0]
        raise r.error(f"cannot tell the format: expected {cols.chosen!r}/{cols.rejected!r} (pairwise), "
                      f"{cols.completion!r}/{cols.label!r} (unpaired feedback) or {cols.prompt!r}/{cols.response!r} or "
                      f"{cols.messages!r} (SFT) (keys present: {', '.join(map(str, rows[0])) or 'none'}); rename the "
                      "columns or set them in --config's data section")
    names = {"pairwise": ("chosen", "rejected"), "feedback": ("completion",), "sft": ("response",)}[kind]
    t = Table(kind, r.source, r.unit, [], [], [], {k: [] for k in names}, [] if kind == "feedback" else None)
    for n, row in zip(r.numbers, rows):
        r.n = n
        if not isinstance(row, dict):
            raise r.error(f"expected an object, got {type(row).__name__}")
        if kind == "sft" and row.get(cols.messages) is not None:
            msgs = r.messages(row[cols.messages], cols.messages)
            prompt, response = msgs[:-1], (msgs[-1]["content"] if msgs else "")
        else:
            prompt = r.prompt(r.get(row, cols.prompt, "prompt_key"), cols.prompt)
            response = None
        t.rows.append(n)
        t.prompt_values.append(prompt)
        t.prompts.append(_prompt_text(prompt))
        for name in names:
            key = getattr(cols, name)
            t.responses[name].append(response if response is not None else r.response(r.get(row, key, f"{name}_key"), key))
        if kind == "feedback":
            label = r.get(row, cols.label, "label_key")
            if not isinstance(label, bool) and not (type(label) is int and label in (0, 1)):
                raise r.error(f"{cols.label!r} must be a bool (or 0/1), got {label!r}")
            t.labels.append(bool(label))
        t.votes.append(r.votes(row))
    return t


def read_prompts(rows, cols: Columns = Columns()) -> Prompts:
    """Row numbers and prompt texts of an eval or deploy file (prompt column, or messages minus a final reply)."""
    r = _Reader(rows)
    numbers, prompts = [], []
    for n, row in zip(r.numbers, rows):
        r.n = n
        if not isinstance(row, dict):
            raise r.error(f"expected an object, got {type(row).__name__}")
        if row.get(cols.prompt) is None and row.get(cols.messages) is not None:
            msgs = r.messages(row[cols.messages], cols.messages)
            prompt = msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
        else:
            prompt = r.prompt(r.get(row, cols.prompt, "prompt_key"), cols.prompt)
        numbers.append(n)
        prompts.append(_prompt_text(prompt))
    return Prompts(r.source, r.unit, numbers, prompts)


# ----------------------------------------------------------------------------- the report


def build_report(rows, *, columns: Columns = Columns(), eval_rows=None, deploy_rows=None, measure=None,
                 max_prompt_length: int = 128, max_response_length: int = 128, thresholds: Thresholds = Thresholds(),
                 harmful: Sequence[str | re.Pattern] = HARMFUL_PATTERNS,
                 refusal: Sequence[str | re.Pattern] = REFUSAL_PATTERNS) -> dict:
    """Every check on ``rows`` (a ``load_rows`` result or a list of dicts) as one JSON-ready dict.

    eval_rows: held-out rows (contamination); deploy_rows: prompts the model will serve (distribution
    shift); measure: ``TokenMeasure`` or ``WordMeasure`` (default) for lengths. Each section is a key;
    ``flags`` lists the checks that fired, each with its value, threshold and example rows."""
    measure = measure or WordMeasure()
    t = read_table(rows, columns)
    th, flags = thresholds, _Flags(t)
    plen = [measure.prompt(v) for v in t.prompt_values]
    rlen = {k: [measure.response(x) for x in v] for k, v in t.responses.items()}
    pairwise = t.kind == "pairwise"
    not_pairwise = {"skipped": f"not pairwise ({KINDS[t.kind]})"}
    report = {
        "source": t.source, "kind": t.kind, "unit": t.unit, "length_unit": measure.unit, "length_note": measure.note,
        "thresholds": asdict(th),
        "counts": _counts(t, plen, rlen),
        "lengths": _histograms(t, rlen, measure.unit),
        "empty": _empty(t, th, flags),
        "identical": _identical(t, th, flags) if pairwise else not_pairwise,
        "truncation": _truncation(t, plen, rlen, max_prompt_length, max_response_length, measure.unit, th, flags),
        "duplicates": _duplicates(t, th, flags),
        "contamination": _contamination(t, read_prompts(eval_rows, columns), th, flags) if eval_rows is not None
        else {"skipped": "no --eval file"},
        "length_bias": _length_bias(t, rlen, measure.unit, th, flags) if pairwise else not_pairwise,
        "agreement": _agreement(t, th, flags),
        "diversity": _diversity(t, th, flags),
        "safety": _safety(t, _compiled(harmful), _compiled(refusal), th, flags),
        "shift": _shift(t, read_prompts(deploy_rows, columns), th, flags) if deploy_rows is not None
        else {"skipped": "no --deploy file"},
    }
    report["flags"] = [asdict(f) | {"line": f.line()} for f in flags.fired]
    return report


class _Flags:
    """The flags raised so far; ``check`` adds one when ``value`` crosses ``threshold``."""

    def __init__(self, t: Table):
        self.t, self.fired = t, []

    def check(self, name: str, what: str, value, op: str, threshold, rows: Sequence[int], source: str | None = None,
              unit: str | None = None) -> None:
        if value is not None and (value > threshold if op == ">" else value < threshold):
            self.fired.append(Flag(name, what, value, op, threshold, list(rows)[:SHOW_ROWS], unit or self.t.unit, source))


def _counts(t: Table, plen: list[int], rlen: dict[str, list[int]]) -> dict:
    keys = t.prompt_keys
    c = {"rows": len(t.rows), "distinct_prompts": len(set(keys)), "most_rows_per_prompt": max(Counter(keys).values()),
         "mean_prompt_length": _mean(plen), "max_prompt_length": max(plen)}
    for k, v in rlen.items():
        c[f"mean_{k}_length"], c[f"max_{k}_length"] = _mean(v), max(v)
    if t.labels is not None:
        c["desirable"], c["undesirable"] = sum(t.labels), len(t.labels) - sum(t.labels)
        for ok, name in ((True, "desirable"), (False, "undesirable")):
            c[f"mean_{name}_length"] = _mean([x for x, lab in zip(rlen["completion"], t.labels) if lab == ok])
    c["rows_with_votes"] = sum(len(v) >= 2 for v in t.votes)
    return c


def _histograms(t: Table, rlen: dict[str, list[int]], unit: str) -> dict:
    """Response-length histograms on shared integer bins: chosen/rejected, desirable/undesirable, or responses."""
    if t.kind == "feedback":
        series = {"desirable": [x for x, ok in zip(rlen["completion"], t.labels) if ok],
                  "undesirable": [x for x, ok in zip(rlen["completion"], t.labels) if not ok]}
    else:
        series = dict(rlen)
    lo = min(min(v, default=0) for v in series.values())
    hi = max(max(v, default=0) for v in series.values())
    width = max(1, math.ceil((hi - lo + 1) / 40))
    edges = list(range(lo, hi + width + 1, width))
    counts = {k: [0] * (len(edges) - 1) for k in series}
    for k, v in series.items():
        for x in v:
            counts[k][(x - lo) // width] += 1
    return {"unit": unit, "edges": edges, **counts}


def _empty(t: Table, th: Thresholds, flags: _Flags) -> dict:
    prompts = [r for r, p in zip(t.rows, t.prompts) if not p.strip()]
    responses = [r for i, r in enumerate(t.rows) if any(not v[i].strip() for v in t.responses.values())]
    rows = sorted(set(prompts) | set(responses))
    flags.check("empty", "rows with an empty prompt or response", len(rows), ">", th.empty, rows)
    return {"empty_prompts": len(prompts), "empty_responses": len(responses), "rows": rows[:EXAMPLES]}


def _identical(t: Table, th: Thresholds, flags: _Flags) -> dict:
    same = [r for r, c, j in zip(t.rows, t.responses["chosen"], t.responses["rejected"]) if _norm(c) == _norm(j)]
    flags.check("identical", "pairs whose chosen and rejected are the same words", len(same), ">", th.identical, same)
    return {"pairs": len(same), "rows": same[:EXAMPLES]}


def _truncation(t: Table, plen, rlen, max_prompt: int, max_response: int, unit: str, th: Thresholds, flags: _Flags) -> dict:
    long_p = [r for r, x in zip(t.rows, plen) if x > max_prompt]
    long_r = [r for i, r in enumerate(t.rows) if any(v[i] > max_response for v in rlen.values())]
    rows = sorted(set(long_p) | set(long_r))
    share = len(rows) / len(t.rows)
    flags.check("truncation", f"share of rows over max_prompt_length={max_prompt} or max_response_length={max_response} {unit}",
                share, ">", th.truncated_share, rows)
    return {"max_prompt_length": max_prompt, "max_response_length": max_response, "length_unit": unit,
            "prompts_truncated": len(long_p),  # each response counts, as in rlhf_cluster.data's DataReport
            "responses_truncated": sum(x > max_response for v in rlen.values() for x in v),
            "truncated_row_share": share, "rows": rows[:EXAMPLES]}


def _duplicates(t: Table, th: Thresholds, flags: _Flags) -> dict:
    """Exact: same words in every field (and the same label). Near: Jaccard over the fields' shingles, each
    shingle tagged with its field so a prompt never matches a response."""
    n, fields = len(t.rows), [t.prompts, *t.responses.values()]
    keys = [tuple(_norm(f[i]) for f in fields) + ((t.labels[i],) if t.labels is not None else ()) for i in range(n)]
    groups = list(_groups(keys).values())
    repeats = sorted(t.rows[i] for g in groups for i in g[1:])
    sets = [{(k, s) for k, f in enumerate(fields) for s in shingles(f[g[0]], th.shingle)} for g in groups]
    near, capped = near_duplicate_pairs(sets, th.jaccard, first_only=True, max_candidates=MAX_CANDIDATES)
    near_rows = sorted(t.rows[i] for _, j, _ in near for i in groups[j])
    flags.check("duplicates", "share of rows that repeat an earlier row", len(repeats) / n, ">", th.duplicate_share, repeats)
    flags.check("near_duplicates", f"share of rows with Jaccard >= {th.jaccard} to an earlier, different row",
                len(near_rows) / n, ">", th.near_duplicate_share, near_rows)
    return {
        "compared": "all text fields" + (" and the label" if t.labels is not None else "")
                    + f"; near: Jaccard >= {th.jaccard} on {th.shingle}-word shingles of each field",
        "duplicate_rows": len(repeats), "duplicate_share": len(repeats) / n,
        "groups": [[t.rows[i] for i in g] for g in groups if len(g) > 1][:EXAMPLES],
        "near_duplicate_rows": len(near_rows), "near_duplicate_share": len(near_rows) / n,
        "near_pairs": [[t.rows[groups[i][0]], t.rows[groups[j][0]], round(s, 3)] for i, j, s in near][:EXAMPLES],
        "search_cut_short": len(capped),  # rows compared with only MAX_CANDIDATES others: a lower bound there
        "repeated_prompts": n - len(set(t.prompt_keys)),
    }


def _contamination(t: Table, evals: Prompts, th: Thresholds, flags: _Flags) -> dict:
    """Training rows whose prompt is an eval prompt: the same words, or Jaccard >= th.jaccard."""
    source, _, e_rows, e_prompts = evals
    tg, eg = _groups(t.prompt_keys), _groups([_norm(p) for p in e_prompts])
    same = tg.keys() & eg.keys()
    tk, ek = [k for k in tg if k and k not in same], [k for k in eg if k and k not in same]
    ts, es = [shingles(k, th.shingle) for k in tk], [shingles(k, th.shingle) for k in ek]
    # first match only, both ways: enough to tell which rows are contaminated, and linear on near-copies
    near, capped = near_duplicate_pairs(ts, th.jaccard, against=es, first_only=True, max_candidates=MAX_CANDIDATES)
    back, _ = near_duplicate_pairs(es, th.jaccard, against=ts, first_only=True, max_candidates=MAX_CANDIDATES)
    pairs = sorted([(tg[k][0], eg[k][0]) for k in same] + [(tg[tk[a]][0], eg[ek[b]][0]) for a, b, _ in near])
    bad = sorted(t.rows[i] for k in [*same, *(tk[a] for a, _, _ in near)] for i in tg[k])
    share = len(bad) / len(t.rows)
    flags.check("contamination", "share of rows whose prompt is also in eval", share, ">", th.contamination_share, bad)
    return {"eval_source": source, "eval_rows": len(e_rows),
            "compared": f"prompts: the same words, or Jaccard >= {th.jaccard} on {th.shingle}-word shingles",
            "train_rows_in_eval": len(bad), "share": share,
            "eval_rows_in_train": sum(len(eg[k]) for k in [*same, *(ek[a] for a, _, _ in back)]),
            "train_eval_pairs": [[t.rows[i], e_rows[j]] for i, j in pairs][:EXAMPLES], "search_cut_short": len(capped)}


def _length_bias(t: Table, rlen, unit: str, th: Thresholds, flags: _Flags) -> dict:
    c, r = rlen["chosen"], rlen["rejected"]
    lb = length_bias(c, r) | {"length_unit": unit}
    # characters, for information only: the flag uses the unit the model is trained in
    ch = length_bias([len(x) for x in t.responses["chosen"]], [len(x) for x in t.responses["rejected"]])
    lb["characters"] = {k: ch[k] for k in ("chosen_longer_share", "tie_share", "longer_wins_accuracy", "length_rule_accuracy")}
    by_gap = sorted((i for i in range(len(c)) if c[i] > r[i]), key=lambda i: r[i] - c[i])
    flags.check("length_bias", "accuracy of 'the longer answer wins' (ties count 1/2)", lb["length_rule_accuracy"], ">",
                th.length_rule_accuracy, [t.rows[i] for i in by_gap])
    return lb


def _agreement(t: Table, th: Thresholds, flags: _Flags) -> dict:
    voted = [i for i, v in enumerate(t.votes) if len(v) >= 2]
    if not voted:
        return {"skipped": f"no row carries a list of two or more labels ({' or '.join(VOTE_KEYS)})"}
    ag = agreement(t.votes)
    split = sorted((i for i in voted if len(set(t.votes[i])) > 1),
                   key=lambda i: _item_agreement(list(Counter(t.votes[i]).values())))
    split_rows = [t.rows[i] for i in split]
    flags.check("agreement", "raw annotator agreement", ag["raw_agreement"], "<", th.agreement, split_rows)
    return ag | {"split_rows": split_rows[:EXAMPLES]}


def _diversity(t: Table, th: Thresholds, flags: _Flags) -> dict:
    """Over the distinct prompts: several pairs per prompt is normal and does not make a set less diverse."""
    first = _first_of_each(t.prompt_keys)
    distinct = [t.prompts[i] for i in first]
    top = Counter(opening(p) for p in distinct if words(p)).most_common(EXAMPLES)
    if top:
        o, c = top[0]
        flags.check("diversity", f"share of distinct prompts opening with {o!r}", c / len(distinct), ">", th.opening_share,
                    [t.rows[i] for i in first if opening(t.prompts[i]) == o])
    return {"distinct_prompts": len(distinct), "distinct_1": distinct_n(distinct, 1), "distinct_2": distinct_n(distinct, 2),
            "openings": [{"opening": o, "prompts": c, "share": c / len(distinct)} for o, c in top]}


def _safety(t: Table, harmful: list[re.Pattern], refusal: list[re.Pattern], th: Thresholds, flags: _Flags) -> dict:
    hits = [i for i, h in enumerate(matches(t.prompts, harmful)) if h]
    out = {"patterns": len(harmful), "harmful_prompts": len(hits), "harmful_share": len(hits) / len(t.rows),
           "harmful_rows": [t.rows[i] for i in hits][:EXAMPLES]}
    endorsed = t.endorsed
    judged = [i for i in hits if endorsed[i] is not None]
    if judged:
        refuses = matches([endorsed[i] for i in judged], refusal)
        complies = [t.rows[i] for i, ok in zip(judged, refuses) if not ok]
        share = sum(refuses) / len(judged)
        flags.check("safety", "share of harmful-looking prompts whose endorsed answer refuses", share, "<", th.refusal_share,
                    complies)
        out |= {"endorsed_answer": ENDORSED[t.kind] + (" (desirable)" if t.kind == "feedback" else ""), "judged": len(judged),
                "refusal_share": share, "complying_rows": complies[:EXAMPLES]}
    return out


def _shift(t: Table, deploy: Prompts, th: Thresholds, flags: _Flags) -> dict:
    source, unit, d_rows, d_prompts = deploy
    ov = bigram_overlap([t.prompts[i] for i in _first_of_each(t.prompt_keys)], d_prompts)
    worst = [r for c, r in sorted((c, r) for r, c in zip(d_rows, ov.pop("per_prompt")) if c is not None)]
    flags.check("shift", "share of deploy-prompt 2-grams seen in training prompts", ov["coverage"], "<", th.deploy_coverage,
                worst, source, unit)
    return {"deploy_source": source, "deploy_rows": len(d_rows), **ov, "least_covered_rows": worst[:EXAMPLES]}


def _norm(text: str) -> str:
    return " ".join(words(text))


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _groups(keys: Sequence) -> dict:
    """key -> indices holding it, in first-seen order."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def _first_of_each(keys: Sequence) -> list[int]:
    return [g[0] for g in _groups(keys).values()]


def _compiled(patterns: Sequence[str | re.Pattern]) -> list[re.Pattern]:
    return [p if isinstance(p, re.Pattern) else re.compile(p, re.IGNORECASE) for p in patterns]


# ----------------------------------------------------------------------------- files in, files out


def run_report(path: str | Path, *, eval_path=None, deploy_path=None, config_path=None, harmful_path=None,
               refusal_path=None, thresholds: Thresholds = Thresholds()) -> dict:
    """Load the files and a config's data section (columns, lengths, tokenizer), then ``build_report``."""
    from rlhf_cluster.config import DataConfig

    data, measure = DataConfig(), WordMeasure()
    if config_path is not None:
        from rlhf_cluster.config import load_config
        from rlhf_cluster.models import load_tokenizer

        cfg = load_config(config_path)
        data = cfg.data
        measure = TokenMeasure(load_tokenizer(cfg.policy.model_name_or_path), data.apply_chat_template,
                               cfg.policy.model_name_or_path)
    return _report(path, data, measure, eval_path=eval_path, deploy_path=deploy_path, harmful_path=harmful_path,
                   refusal_path=refusal_path, thresholds=thresholds)


def report_for_stage(data, tokenizer, tokenizer_name: str) -> dict:
    """The report on a run's training file as its config reads it (``data``: its DataConfig), lengths in the tokens
    of ``tokenizer``, with its held-out file (``data.eval_path``) checked for overlap."""
    return _report(data.train_path, data, TokenMeasure(tokenizer, data.apply_chat_template, tokenizer_name),
                   eval_path=data.eval_path)


def _report(path, data, measure, *, eval_path=None, deploy_path=None, harmful_path=None, refusal_path=None,
            thresholds: Thresholds = Thresholds()) -> dict:
    columns = Columns(**{f: getattr(data, f"{f}_key") for f in Columns.__dataclass_fields__})
    return build_report(
        load_rows(path), columns=columns, measure=measure,
        eval_rows=load_rows(eval_path) if eval_path is not None else None,
        deploy_rows=load_rows(deploy_path) if deploy_path is not None else None,
        max_prompt_length=data.max_prompt_length, max_response_length=data.max_response_length, thresholds=thresholds,
        harmful=_pattern_file(harmful_path) if harmful_path else HARMFUL_PATTERNS,
        refusal=_pattern_file(refusal_path) if refusal_path else REFUSAL_PATTERNS)


def _pattern_file(path: str | Path) -> list[re.Pattern]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file (expected one regular expression per line)")
    return compile_patterns(p.read_text(encoding="utf-8").splitlines(), str(path))


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """report.md, report.json and report.png in ``out_dir`` (created); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "report.json", out / "report.png"]
    paths[0].write_text(format_markdown(report, paths[2].name))
    paths[1].write_text(json.dumps(report, indent=2) + "\n")
    plot(report, paths[2])
    return paths


def format_summary(report: dict) -> str:
    """A few lines for stdout: what the file is, its counts and main figures, then each flag on one line."""
    c, d, dup = report["counts"], report["diversity"], report["duplicates"]
    lines = [f"{report['source']}: {KINDS[report['kind']]}, {c['rows']} rows, {c['distinct_prompts']} distinct prompts; "
             f"lengths in {report['length_note']}",
             f"mean lengths ({report['length_unit']}): "
             + ", ".join(f"{k[5:-7]} {_num(v)}" for k, v in c.items() if k.startswith("mean_") and v is not None),
             f"duplicates: {dup['duplicate_rows']} rows repeat an earlier row, {dup['near_duplicate_rows']} near "
             f"(Jaccard >= {report['thresholds']['jaccard']})"]
    if "skipped" not in (lb := report["length_bias"]):
        lines.append(f"length: chosen longer in {_pct(lb['chosen_longer_share'])} of pairs, rejected longer in "
                     f"{_pct(lb['rejected_longer'] / lb['pairs'])}, ties {_pct(lb['tie_share'])} "
                     f"(in characters: chosen longer in {_pct(lb['characters']['chosen_longer_share'])})")
    if "skipped" not in (ct := report["contamination"]):
        lines.append(f"eval: {ct['train_rows_in_eval']} rows ({_pct(ct['share'])}) have a prompt in {ct['eval_source']}")
    if "skipped" not in (ag := report["agreement"]):
        lines.append(f"agreement: raw {_num(ag['raw_agreement'])}, Fleiss' kappa {_show(ag['fleiss_kappa'])} "
                     f"over {ag['items']} rows")
    lines.append(f"diversity: distinct-1 {_num(d['distinct_1'])}, distinct-2 {_num(d['distinct_2'])}; "
                 f"harmful-looking prompts: {report['safety']['harmful_prompts']}")
    if "skipped" not in (sh := report["shift"]):
        lines.append(f"deploy: {_pct(sh['coverage'])} of its 2-grams seen in training prompts")
    lines += ["FLAG " + f["line"] for f in report["flags"]]
    n = len(report["flags"])
    lines.append(f"{n} flag{'s' if n != 1 else ''}" if n else "no flags")
    return "\n".join(lines)


DESCRIBE = {  # section: (title, what it checks)
    "counts": ("Counts", "Rows, distinct prompts and mean lengths."),
    "empty": ("Empty texts", "Prompts or responses with no text; the training loaders refuse such rows."),
    "identical": ("Identical pairs", "Pairs whose chosen and rejected have the same words (case and punctuation ignored)."),
    "truncation": ("Truncation", "Rows over the configured lengths (prompts keep their end, responses their start)."),
    "duplicates": ("Duplicates", "Rows that repeat an earlier row (same words in every field), and near duplicates."),
    "contamination": ("Contamination", "Training prompts that also appear in the eval file: the eval score would overstate."),
    "length_bias": ("Length bias", "Whether the chosen answer is simply the longer one; a reward model trained on it learns length."),
    "agreement": ("Annotator agreement", "Where rows carry several labels: raw agreement, Fleiss' kappa, Cohen's kappa for two."),
    "diversity": ("Diversity", "Distinct-1/2 over the distinct prompts and their most common first three words."),
    "safety": ("Safety coverage", "Prompts matching the harmful-request patterns, and whether the endorsed answer refuses."),
    "shift": ("Distribution shift", "How much of the deploy prompts' wording the training prompts cover (word 2-grams)."),
}


def format_markdown(report: dict, image: str | None = None) -> str:
    unit = report["unit"]
    out = [f"# Data report: {report['source']}", "",
           f"{KINDS[report['kind']]}; lengths in {report['length_note']}. Row numbers are {unit}s of the file.", "",
           "## Flags", ""]
    out += [f"- {f['line']}" for f in report["flags"]]
    out += ["- none"] if not report["flags"] else []
    if image:
        out += ["", f"![lengths and prompt openings]({image})"]
    for key, (title, text) in DESCRIBE.items():
        out += ["", f"## {title}", "", text, ""]
        for k, v in report[key].items():
            if k == "openings":
                out += ["", "| opening | prompts | share |", "|---|---|---|"]
                out += [f"| {o['opening']} | {o['prompts']} | {_pct(o['share'])} |" for o in v]
            else:
                out.append(f"- {k}: {_show(v)}")
    out += ["", "## Thresholds", ""] + [f"- {k}: {v}" for k, v in report["thresholds"].items()]
    return "\n".join(out) + "\n"


def plot(report: dict, path: str | Path) -> None:
    """Length histograms (chosen vs rejected, or responses) and the prompt-opening bar chart, as one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    h = report["lengths"]
    series = {k: v for k, v in h.items() if k not in ("unit", "edges")}
    for name, counts in series.items():
        mean = report["counts"][f"mean_{name}_length"]
        ax.stairs(counts, h["edges"], fill=True, alpha=0.5, label=f"{name} (mean {_num(mean)})")
    ax.set_xlabel(f"length ({report['length_unit']})")
    ax.set_ylabel("rows")
    ax.set_title("response lengths")
    ax.legend()
    top = report["diversity"]["openings"][::-1]
    bx.barh([o["opening"] for o in top], [o["prompts"] for o in top])
    bx.set_xlabel("distinct prompts")
    bx.set_title("most common prompt openings (first 3 words)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _show(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {_show(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_show(x) if not isinstance(x, list) else "(" + ", ".join(map(str, x)) + ")" for x in v) or "none"
    return str(v)

