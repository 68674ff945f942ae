"""Logs a person can read: libraries' start-up chatter off by default, known-benign warnings dropped,
and progress as a bar on a terminal but as plain periodic lines in a log file.

``quiet_libraries()`` runs in the driver and in every actor before vLLM, DeepSpeed or transformers are
imported. Each setting is a default: a variable already in the environment wins
(``VLLM_LOGGING_LEVEL=INFO rlhf-cluster train ...`` brings vLLM's engine log back).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

# Warnings that are expected here and say nothing about the run, by logger.
BENIGN = {
    # Every in-place weight reload: the rotary embedding's cos/sin cache is computed, never loaded.
    "vllm.model_executor.model_loader.reload.layerwise": ("RotaryEmbedding: Failed to load weights",),
    # CPU machines: vLLM falls back to its torch kernels, and DeepSpeed to its CPU accelerator, as intended.
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}

DEFAULTS = {
    # The engine's config dump, per-phase INFO lines and a dozen configuration notices per start (eager mode,
    # no tcmalloc, no Triton on CPU...); errors still show.
    "VLLM_LOGGING_LEVEL": "ERROR",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars, one per model load
    "TRANSFORMERS_VERBOSITY": "error",  # e.g. "newly initialized: score.weight" for every fresh value head
    "TQDM_DISABLE": "1" if not sys.stderr.isatty() else "",  # libraries' own bars when stderr is a file
}


class _DropBenign(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_libraries() -> None:
    for key, value in DEFAULTS.items():
        if value:
            os.environ.setdefault(key, value)
    # vLLM's kernel dispatcher touches a deprecated torch alias on import.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    for name, prefixes in BENIGN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropBenign) for f in logger.filters):
            logger.addFilter(_DropBenign(prefixes))


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line every ``every`` steps (about ten per run) and at
    the end, so a log file gets readable lines instead of one endless carriage-return line."""

    def __init__(self, total: int, initial: int, desc: str, log=print, tty: bool | None = None):
        self.total, self.step, self.desc, self.log = total, initial, desc, log
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every = max(1, total // 10)
        self.t0, self.start = time.perf_counter(), initial
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=0)

    def update(self, **shown: str) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix(**shown)
            self.bar.update(1)
        elif self.step % self.every == 0 or self.step == self.total:
            rate = (self.step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
            fields = "  ".join(f"{k} {v}" for k, v in shown.items())
            self.log(f"{self.desc} step {self.step}/{self.total}  {fields}  ({rate:.2f} steps/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
