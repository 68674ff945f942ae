"""Checkpoint files: a manifest written last, verification and fallback on resume, stale saves removed, old
ones pruned, data-only loads, and one run per output_dir."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from rlhf_cluster.drivers.common import (
    CheckpointError,
    RunLock,
    RunLockError,
    check_zero_layout,
    clean_stale,
    commit_checkpoint,
    prune_checkpoints,
    resumable_checkpoint,
    verify_checkpoint,
)


def save(out, step: int, payload: bytes = b"weights") -> object:
    root = out / "checkpoints"
    tmp = root / f"step_{step:06d}.tmp"
    (tmp / "deepspeed").mkdir(parents=True)
    (tmp / "deepspeed" / "model.pt").write_bytes(payload)
    final = root / f"step_{step:06d}"
    commit_checkpoint(tmp, final, {"step": step})
    return final


def test_a_committed_checkpoint_verifies_and_latest_points_at_it(tmp_path):
    ck = save(tmp_path, 5)
    assert verify_checkpoint(ck) is None
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000005"
    assert resumable_checkpoint(tmp_path) == ck


@pytest.mark.parametrize("damage, reason", [
    (lambda ck: (ck / "deepspeed" / "model.pt").write_bytes(b"weightz"), "does not match its checksum"),
    (lambda ck: (ck / "deepspeed" / "model.pt").write_bytes(b"w"), "has 1 bytes, the manifest says 7"),
    (lambda ck: (ck / "driver_state.pt").unlink(), "driver_state.pt is missing"),
    (lambda ck: (ck / "manifest.json").unlink(), "no manifest.json"),
    (lambda ck: (ck / "manifest.json").write_text("{"), "manifest.json is damaged"),
])
def test_a_damaged_latest_falls_back_to_the_previous_one_with_a_warning(tmp_path, damage, reason):
    older = save(tmp_path, 5)
    newest = save(tmp_path, 10)
    damage(newest)
    said = []
    assert resumable_checkpoint(tmp_path, said.append) == older
    assert len(said) == 1 and str(newest) in said[0] and reason in said[0], said


def test_nothing_resumable_is_none(tmp_path):
    assert resumable_checkpoint(tmp_path) is None
    ck = save(tmp_path, 3)
    (ck / "manifest.json").unlink()
    assert resumable_checkpoint(tmp_path, lambda _: None) is None


def test_unfinished_saves_are_removed_and_old_checkpoints_pruned(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    stale = tmp_path / "checkpoints" / "step_000005.tmp"
    (stale / "deepspeed").mkdir(parents=True)
    said = []
    clean_stale(tmp_path, said.append)
    assert not stale.exists() and "unfinished checkpoint" in said[0]
    gone = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in gone) == ["step_000001", "step_000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000003", "step_000004"]
    assert prune_checkpoints(tmp_path, keep=0) == []


def test_deepspeed_files_load_as_data_and_a_crafted_pickle_is_refused(tmp_path):
    from rlhf_cluster.workers.trainer import UnsafeCheckpointError, load_as_data

    class Engine:  # DeepSpeed's engine reads every checkpoint file through engine.checkpoint_engine.load
        class checkpoint_engine:
            load = None

    engine = Engine()
    load_as_data(engine)
    good = tmp_path / "good.pt"
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    torch.save({"w": torch.ones(2), "scaler": LossScaler(1.0), "step": 3}, good)
    assert engine.checkpoint_engine.load(str(good))["w"].tolist() == [1.0, 1.0]

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer": Exploit()}, bad, pickle_module=pickle)
    with pytest.raises(UnsafeCheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt: refused to load"):
        engine.checkpoint_engine.load(str(bad))
    assert not (tmp_path / "pwned").exists()


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockError, match=rf"output_dir {tmp_path} is in use by another run \(pid {os.getpid()} on "):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released when the first run ends
        pass


def test_resuming_with_or_without_zero_against_the_checkpoint_is_refused_naming_the_setting(tmp_path):
    """DeepSpeed writes ZeRO's optimizer partitions to *optim_states.pt files; a stage-0 engine cannot load them."""
    (tmp_path / "deepspeed" / "policy").mkdir(parents=True)
    (tmp_path / "deepspeed" / "policy" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (tmp_path / "deepspeed" / "critic").mkdir()
    (tmp_path / "deepspeed" / "critic" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    check_zero_layout(tmp_path, {"policy": 2, "critic": 0})
    with pytest.raises(CheckpointError, match=r"policy's training state saved with ZeRO, but policy.zero_stage is 0: "
                                              r"resume with policy.zero_stage=2"):
        check_zero_layout(tmp_path, {"policy": 0, "critic": 0})
    with pytest.raises(CheckpointError, match=r"critic's training state saved without ZeRO.*critic.zero_stage=0"):
        check_zero_layout(tmp_path, {"policy": 3, "critic": 2})
