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

from rlhf_cluster.config import ConfigError


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

    def peek(self) -> list:
        """What ``next`` will return, without moving on (a checkpoint taken now does not count it as seen)."""
        epoch, index, order = self.epoch, self.index, self._order
        out = self.next()
        self.epoch, self.index, self._order = epoch, index, order
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


def plot_panels(metrics: list[dict], panels: Sequence[tuple[str, Sequence[str]]], out_png: Path, title: str) -> Path:
    """:func:`panel_figure` written to ``out_png``."""
    import matplotlib.pyplot as plt

    fig = panel_figure(metrics, panels, title)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def panel_figure(metrics: list[dict], panels: Sequence[tuple[str, Sequence[str]]], title: str):
    """One figure, one panel per ``(panel title, keys)`` that has data, side by side.

    A training series (logged every step) is a line, with a shaded ±std band when ``metrics`` also has its
    ``.../std`` next to a ``.../mean``; a held-out series (``eval/...``, measured now and then) is drawn as
    points only, so two evaluations never read as a trend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(k):
        return [(m["step"], m[k]) for m in metrics if isinstance(m.get(k), (int, float))]

    shown = [(name, keys) for name, keys in panels if any(series(k) for k in keys)]
    if not shown:
        shown = [(title, [])]
    cols = 2 if len(shown) == 4 else len(shown)
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows + 0.4), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, shown):
        for k in keys:
            pts = series(k)
            if not pts:
                continue
            x, y = zip(*pts)
            if k.startswith("eval/"):
                ax.plot(x, y, linestyle="none", marker="o", ms=6, label=f"{k} (held-out)")
                continue
            (line,) = ax.plot(x, y, lw=1.5, label=k)
            std = {s: v for s, v in series(k.removesuffix("/mean") + "/std")} if k.endswith("/mean") else {}
            if std:
                xs = [s for s in x if s in std]
                ys = [v for s, v in pts if s in std]
                ax.fill_between(xs, [v - std[s] for s, v in zip(xs, ys)], [v + std[s] for s, v in zip(xs, ys)],
                                color=line.get_color(), alpha=0.2, lw=0, label=f"± {k.removesuffix('/mean')}/std")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


RL_PANELS = (("reward", ("reward/mean", "eval/reward_mean", "gold/mean")),
             ("KL to the reference, per token", ("kl/ref_per_token",)),
             ("policy entropy", ("actor/entropy",)),
             ("response length (tokens)", ("response/length_mean", "eval/response_length")))


def offline_panels(headline: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """One panel per reported metric (loss, accuracy, margin, ...): the training series and the held-out points."""
    return [(k, (f"train/{k}", f"eval/{k}")) for k in ("loss", *[h for h in headline if h != "loss"])]


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(d: dict) -> None:
    torch.set_rng_state(d["torch"])
    random.setstate(d["python"])


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or none can be resumed; the message says which and why."""


MANIFEST = "manifest.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_dirs(root: Path) -> list[Path]:
    """Committed checkpoint directories, newest first."""
    dirs = [d for d in root.glob("step_*") if d.is_dir() and not d.name.endswith(".tmp")]
    return sorted(dirs, key=lambda d: d.name, reverse=True)


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt_dir: Path, checksums: bool = True) -> dict:
    """Every file's size (and sha256) under ``ckpt_dir``, each file fsynced first; written last, so a
    checkpoint with a manifest is complete and one whose files differ from it is damaged."""
    files = {}
    for f in sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(f)
        files[str(f.relative_to(ckpt_dir))] = {"size": f.stat().st_size, **({"sha256": _sha256(f)} if checksums else {})}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=0))
    _fsync(tmp)
    os.replace(tmp, ckpt_dir / MANIFEST)
    return files


def verify_checkpoint(ckpt_dir: Path) -> str | None:
    """None when every file the manifest lists is there with its size and checksum; else what is wrong."""
    manifest = ckpt_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest.json: the save did not finish"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is damaged"
    if "driver_state.pt" not in files:
        return "the manifest lists no driver_state.pt"
    for rel, want in files.items():
        f = ckpt_dir / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["size"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {want['size']}"
        if "sha256" in want and _sha256(f) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def resumable_checkpoint(output_dir: str | Path, log=print) -> Path | None:
    """The newest checkpoint that verifies: the one ``latest`` names, else older ones, each skipped with a warning."""
    root = checkpoint_root(output_dir)
    marker = root / "latest"
    named = root / marker.read_text().strip() if marker.is_file() else None
    candidates = _step_dirs(root) if root.is_dir() else []
    if named is not None and named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    for ckpt in candidates:
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log(f"warning: checkpoint {ckpt} cannot be resumed ({problem}); trying the previous one")
    return None


def committed_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories whose save finished (their manifest, written last, is there), newest first; even
    when ``latest`` was not yet updated (a driver killed between the rename and the marker)."""
    root = checkpoint_root(output_dir)
    return [d for d in (_step_dirs(root) if root.is_dir() else []) if (d / "manifest.json").is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The directory named by ``checkpoints/latest``, written only after a checkpoint is complete."""
    marker = checkpoint_root(output_dir) / "latest"
    if not marker.is_file():
        return None
    path = checkpoint_root(output_dir) / marker.read_text().strip()
    return path if path.is_dir() else None


def clean_stale(output_dir: str | Path, log=print) -> None:
    """Remove the ``step_N.tmp`` directories of saves that never finished (a crash, a full disk)."""
    root = checkpoint_root(output_dir)
    for tmp in sorted(root.glob("step_*.tmp")) if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"removed {tmp}: an unfinished checkpoint save")


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all); returns what was deleted."""
    if keep <= 0:
        return []
    old = _step_dirs(checkpoint_root(output_dir))[keep:]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return old


def commit_checkpoint(tmp_dir: Path, final_dir: Path, driver_state: dict, checksums: bool = True) -> None:
    """Write the driver state and the manifest, move the finished directory into place, then point
    ``latest`` at it."""
    torch.save(driver_state, tmp_dir / "driver_state.pt")
    write_manifest(tmp_dir, checksums)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp_dir.rename(final_dir)
    marker = final_dir.parent / "latest"
    tmp_marker = marker.with_suffix(".tmp")
    tmp_marker.write_text(final_dir.name)
    _fsync(tmp_marker)
    os.replace(tmp_marker, marker)


def check_zero_layout(ckpt_dir: Path, zero_stages: dict[str, int]) -> None:
    """Refuse, before any actor starts, to resume a trainer's DeepSpeed state with or without ZeRO when it was
    saved the other way (DeepSpeed fails on it with an unrelated error). ``zero_stages``: trained role → the
    configured stage."""
    root = ckpt_dir / "deepspeed"
    for role, stage in zero_stages.items():
        saved = root / role
        if not saved.is_dir():
            continue
        zero = any(saved.glob("*optim_states.pt"))  # ZeRO keeps its optimizer partitions in files of their own
        if zero != (stage > 0):
            raise CheckpointError(
                f"{ckpt_dir} holds the {role}'s training state saved {'with ZeRO' if zero else 'without ZeRO'}, but "
                f"{role}.zero_stage is {stage}: resume with {role}.zero_stage={2 if zero else 0} (zero_stage: auto "
                "picks 0 for one rank and 2 for several)")


def load_driver_state(ckpt_dir: Path) -> dict:
    # weights_only=True: a checkpoint is data, never code. RNG states are tensors and tuples.
    return torch.load(ckpt_dir / "driver_state.pt", weights_only=True)


# --------------------------------------------------------------------------- the run lock


class RunLockError(RuntimeError):
    """Another run holds ``output_dir``."""


class RunLock:
    """One run per ``output_dir`` at a time: an exclusive ``flock`` on ``output_dir/.run.lock``, held for the
    run and released by the kernel however the process ends (no stale lock after a crash or ``kill -9``).
    The file names the holder (pid, host, start time) for the error the second run gets."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / ".run.lock"
        self._f = None

    def __enter__(self) -> RunLock:
        import datetime
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunLockError(f"output_dir {self.path.parent} is in use by another run ({holder}); wait for it to finish, "
                               "stop it, or choose another output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.datetime.now().isoformat(timespec='seconds')}")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


# --------------------------------------------------------------------------- a previous run in output_dir

# Everything a run writes into output_dir (the online and offline drivers, open_roles), and eval/ (where
# `rlhf-cluster eval` of output_dir/policy writes by default): --overwrite removes these and nothing else, so files
# a user keeps there (a config, notes) stay.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "metrics.jsonl.tmp", "tensorboard", "timeline.json", "placement.json",
               "reward_curve.png", "loss_curve.png", "policy", "reward_model", "eval")


def holds_run(output_dir: str | Path) -> bool:
    """A run has written here: its metrics.jsonl or its checkpoints/."""
    d = Path(output_dir)
    return (d / "metrics.jsonl").exists() or checkpoint_root(d).exists()


def check_output_dir(output_dir: str | Path, can_resume: bool = True) -> None:
    """Refuse to start afresh over a previous run: its metrics and checkpoints would be mixed with the new ones.
    A run still writing there is named instead (its lock)."""
    if not holds_run(output_dir):
        return
    with RunLock(output_dir):  # RunLockError naming the holder when a run is still going
        pass
    choices = "--resume to continue it, --overwrite to start afresh" if can_resume else "--overwrite to start afresh"
    raise ConfigError(f"output_dir {output_dir} already holds a run (metrics.jsonl or checkpoints/); pass {choices} "
                      "(deleting its outputs), or choose another output_dir")


def previous_outputs(output_dir: str | Path) -> list[Path]:
    """What earlier runs left in ``output_dir`` (of :data:`RUN_OUTPUTS`)."""
    d = Path(output_dir)
    return [d / name for name in RUN_OUTPUTS if (d / name).exists() or (d / name).is_symlink()]


def clear_output_dir(output_dir: str | Path, log=print) -> list[Path]:
    """Delete a previous run's outputs (:data:`RUN_OUTPUTS`) from ``output_dir``, under its lock; returns what went."""
    d = Path(output_dir)
    gone = previous_outputs(d)
    if not gone:
        return []
    with RunLock(d):
        for path in gone:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    log(f"--overwrite: removed the previous run's {', '.join(p.name for p in gone)} from {d}")
    return gone


# ----------------------------------------------------------------------------- non-finite steps


class SkipStep(Exception):
    """This step's inputs are unusable (a non-finite reward): nothing is trained on them and the run moves on."""


class BadStepsError(RuntimeError):
    """Too many steps in a row were skipped for non-finite values (``fault_tolerance.max_bad_steps``)."""


class BadSteps:
    """Steps skipped for non-finite values (rewards, losses, gradient norms): each one said, and the run stopped
    after ``limit`` in a row, naming the last cause. A clean step resets the count."""

    HINT = ("Usual causes: a reward function that returns NaN or inf for some responses, a learning rate too high "
            "for the model, or fp16 overflow (use bf16 or fp32).")

    def __init__(self, limit: int, log=print):
        self.limit, self.log = limit, log
        self.in_a_row = 0
        self.total = 0

    def record(self, step: int, reason: str | None) -> None:
        if reason is None:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        self.log(f"warning: step {step}: {reason} ({self.in_a_row} in a row; the run stops at "
                 f"fault_tolerance.max_bad_steps={self.limit})")
        if self.in_a_row >= self.limit:
            raise BadStepsError(f"stopped at step {step}: {self.in_a_row} steps in a row were skipped for non-finite "
                                f"values (fault_tolerance.max_bad_steps={self.limit}); the last: {reason}. {self.HINT}")


def skip_reason(stats: Sequence[dict], role: str) -> str | None:
    """The first rank's account of skipped optimizer steps in an update (``None`` when every step was applied)."""
    for s in stats:
        if s.get("skip_reason"):
            return f"{role}: {s['skip_reason']}"
    return None
