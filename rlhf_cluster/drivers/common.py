"""What every driver loop shares: the prompt sampler, metric sinks, checkpoint files, plots."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


class EpochSampler:
    """Epochs of shuffled examples (prompts, pairs, ...); its position is part of every checkpoint.

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so (epoch, index)
    is all a resumed run needs to continue with exactly the prompts it would have seen.
    """

    def __init__(self, items: Sequence, batch_size: int, seed: int, shuffle: bool = True):
        if not items:
            raise ValueError("the prompt dataset is empty")
        self.items, self.batch_size, self.seed, self.shuffle = items, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        n = len(self.items)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch)).tolist()

    def next(self) -> list:
        out = []
        while len(out) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.items[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.index = int(d["epoch"]), int(d["index"])
        self._order = self._make_order()


class MetricsSink:
    """metrics.jsonl (one line per step) plus TensorBoard under ``out/tensorboard``.

    ``resume_step``: a resumed run keeps the lines up to the checkpoint's step and drops the
    ones a crashed run wrote after it, which the resumed run writes again (no duplicated steps).
    """

    def __init__(self, out_dir: Path, resume_step: int | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a" if resume_step is not None else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # TensorBoard is optional at run time; the JSONL is the record
            self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curve(metrics: list[dict], keys: Sequence[str], out_png: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(m["step"], m[k]) for m in metrics if k in m]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=k)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(d: dict) -> None:
    torch.set_rng_state(d["torch"])
    random.setstate(d["python"])


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The directory named by ``checkpoints/latest``, written only after a checkpoint is complete."""
    marker = checkpoint_root(output_dir) / "latest"
    if not marker.is_file():
        return None
    path = checkpoint_root(output_dir) / marker.read_text().strip()
    return path if path.is_dir() else None


def commit_checkpoint(tmp_dir: Path, final_dir: Path, driver_state: dict) -> None:
    """Write the driver state, move the finished directory into place, then point ``latest`` at it."""
    torch.save(driver_state, tmp_dir / "driver_state.pt")
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp_dir.rename(final_dir)
    marker = final_dir.parent / "latest"
    tmp_marker = marker.with_suffix(".tmp")
    tmp_marker.write_text(final_dir.name)
    os.replace(tmp_marker, marker)


def load_driver_state(ckpt_dir: Path) -> dict:
    # weights_only=True: a checkpoint is data, never code. RNG states are tensors and tuples.
    return torch.load(ckpt_dir / "driver_state.pt", weights_only=True)
