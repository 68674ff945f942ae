"""Reward sources: where r(x, y) comes from — a scalar-head model, a Python function, or an HTTP server.

Every source scores a :class:`RewardInputs` and returns a (B,) float tensor. What a source reads
decides what the driver sends it: a model gets token ids only; a function or a server gets the
prompt and response text plus each dataset row's other fields (``extras``: a ground-truth
answer, unit tests, a rubric), so verifiable rewards can be written.

A function is ``fn(prompts, responses, **fields) -> list[float]``: the first two parameters
are positional; any further parameter is filled with that dataset column (one value per row),
and a ``**kwargs`` parameter receives every column.

An HTTP server takes ``POST {"prompts": [...], "responses": [...], "extras": [{...}, ...]}`` and
answers ``{"rewards": [...]}`` (one number per row); see :class:`HttpReward`.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cluster.experience import Experience
from rlhf_cluster.http_post import post_json
from rlhf_cluster.models import load_scalar_model, pick_device, resolve_dtype, sequence_scores
from rlhf_cluster.workers.scorers import FrozenModel


class RewardError(RuntimeError):
    """A reward source failed or answered something that is not one number per row; the message names the source."""


@dataclass
class RewardInputs:
    """The rows one reward call scores. Fields a source does not read stay None (and are never sent)."""

    exp: Experience | None = None  # token ids: a reward model reads these
    prompts: list[str] | None = None  # the prompt text of each row
    responses: list[str] | None = None  # the decoded response of each row
    extras: list[dict[str, Any]] | None = None  # each dataset row's other fields

    @property
    def batch_size(self) -> int:
        return self.exp.batch_size if self.exp is not None else len(self.responses)

    def select(self, s: slice) -> RewardInputs:
        take = lambda x: None if x is None else (x.select(s) if isinstance(x, Experience) else x[s])
        return RewardInputs(take(self.exp), take(self.prompts), take(self.responses), take(self.extras))


def as_rewards(out, n: int, source: str, allow_nonfinite: bool = False) -> torch.Tensor:
    """A source's answer checked and turned into (n,) float32: one real number per row, nothing else; NaN and inf
    only with ``allow_nonfinite`` (the training reward: the driver skips the step they occur in)."""
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise RewardError(f"{source} must return one number per response (a list of {n} floats), "
                          f"got {type(out).__name__}")
    values = out.tolist() if hasattr(out, "tolist") else list(out)
    if len(values) != n:
        raise RewardError(f"{source} returned {len(values)} values for {n} responses")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            hint = " (use 1.0/0.0, not True/False)" if isinstance(v, bool) else ""
            raise RewardError(f"{source} returned {type(v).__name__} {v!r} for response {i}; "
                              f"each reward must be a real number{hint}")
        if not allow_nonfinite and not math.isfinite(v):
            raise RewardError(f"{source} returned a non-finite reward ({v}) for response {i}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


# ----------------------------------------------------------------------------- model


class ModelReward(FrozenModel):
    """r(x, y) from a scalar-head model, read at each sequence's last real token."""

    needs_text = False

    def __init__(self, model_path: str, *, micro_batch_size: int = 8, dtype: str = "auto"):
        super().__init__(load_scalar_model(model_path, resolve_dtype(dtype, pick_device())), micro_batch_size)

    @torch.no_grad()
    def score(self, inputs: RewardInputs) -> torch.Tensor:
        return torch.cat([sequence_scores(self.model, m.input_ids, m.attention_mask).float().cpu()
                          for m in self._micro_batches(inputs.exp)])


# ----------------------------------------------------------------------------- function


def function_fields(fn: Callable) -> tuple[list[str], bool]:
    """The dataset columns ``fn`` asks for by name (parameters after the first two, without defaults
    first), and whether it takes ``**kwargs`` (then it gets every column)."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise TypeError(f"takes {len(positional)} positional parameter(s); a reward function is "
                        "fn(prompts, responses, **fields) -> list[float]")
    named = [p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def required_fields(fn: Callable) -> list[str]:
    """Columns ``fn`` cannot run without (named parameters with no default)."""
    sig = inspect.signature(fn).parameters
    named, _ = function_fields(fn)
    return [n for n in named if sig[n].default is inspect.Parameter.empty]


class FunctionReward:
    """r(x, y) from a Python function ``fn(prompts, responses, **fields) -> list[float]``."""

    needs_text = True

    def __init__(self, spec: str, code_dir: str | None = None, allow_nonfinite: bool = False):
        from rlhf_cluster.config import resolve_function

        self.spec, self.allow_nonfinite = spec, allow_nonfinite
        self.fn: Callable = resolve_function(spec, code_dir)
        self.fields, self.takes_all = function_fields(self.fn)

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        extras = inputs.extras or [{} for _ in inputs.responses]
        names = sorted({k for row in extras for k in row}) if self.takes_all else self.fields
        sig = inspect.signature(self.fn).parameters
        kwargs = {}
        for name in names:
            if not self.takes_all and all(name not in row for row in extras) and sig[name].default is not inspect.Parameter.empty:
                continue  # an optional parameter no row fills keeps its default
            kwargs[name] = [row.get(name) for row in extras]
        out = self.fn(list(inputs.prompts), list(inputs.responses), **kwargs)
        return as_rewards(out, len(inputs.responses), f"reward function {self.spec}", self.allow_nonfinite)


# ----------------------------------------------------------------------------- http


class HttpReward:
    """r(x, y) from a user's reward server: ``POST url`` with JSON
    ``{"prompts": [...], "responses": [...], "extras": [{...}, ...]}``, answered by ``{"rewards": [...]}``.

    Rows go in requests of ``batch_size``. A request that times out, cannot connect, or gets a
    429/5xx is retried ``max_retries`` times with exponential backoff; any other failure (a 4xx, a
    body that is not the expected JSON) is reported at once. Every error names the URL.
    ``api_key_env``: an environment variable whose value is sent as ``Authorization: Bearer``.
    """

    needs_text = True

    def __init__(self, url: str, *, timeout_s: float = 30.0, max_retries: int = 3, batch_size: int = 64,
                 api_key_env: str | None = None, backoff_s: float = 0.5, allow_nonfinite: bool = False):
        self.url, self.timeout_s, self.max_retries, self.batch_size = url, timeout_s, max_retries, batch_size
        self.allow_nonfinite = allow_nonfinite
        self.backoff_s = backoff_s
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise RewardError(f"reward server {url}: environment variable {api_key_env} (reward.api_key_env) is not set")
            self.headers["Authorization"] = f"Bearer {key}"

    def score(self, inputs: RewardInputs) -> torch.Tensor:
        n = len(inputs.responses)
        extras = inputs.extras or [{} for _ in range(n)]
        parts = [self._post(inputs.prompts[i:i + self.batch_size], inputs.responses[i:i + self.batch_size],
                            extras[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0)

    def _post(self, prompts: list[str], responses: list[str], extras: list[dict]) -> torch.Tensor:
        body = json.dumps({"prompts": prompts, "responses": responses, "extras": extras}, default=str).encode()
        raw = post_json(self.url, body, self.headers, timeout_s=self.timeout_s, max_retries=self.max_retries,
                        backoff_s=self.backoff_s, what=f"reward server {self.url}", error=RewardError,
                        hint="raise reward.timeout_s / reward.max_retries, or check the server")
        try:
            rewards = json.loads(raw)["rewards"]
        except (ValueError, KeyError, TypeError):
            raise RewardError(f"reward server {self.url} must answer JSON {{\"rewards\": [...]}}, got "
                              f"{raw[:120].decode(errors='replace')!r}") from None
        return as_rewards(rewards, len(responses), f"reward server {self.url}", self.allow_nonfinite)


def build_reward_source(spec) -> ModelReward | FunctionReward | HttpReward:
    """The source a :class:`~rlhf_cluster.cluster.specs.RewardSpec` describes."""
    if spec.kind == "function":
        return FunctionReward(spec.function, spec.code_dir, spec.allow_nonfinite)
    if spec.kind == "http":
        return HttpReward(spec.url, timeout_s=spec.timeout_s, max_retries=spec.max_retries, batch_size=spec.batch_size,
                          api_key_env=spec.api_key_env, allow_nonfinite=spec.allow_nonfinite)
    m = spec.model
    return ModelReward(m.model_path, micro_batch_size=m.micro_batch_size, dtype=m.dtype)
