"""Surviving faults on a real local Ray: an actor killed mid-run (kill -9) is restarted from the last checkpoint,
and the steps after it come out as an uninterrupted run's would; nothing of an embedded Ray outlives its driver. (An
engine that dies before a weight sync is named: tests/cluster/test_actors.py.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray

from rlhf_cluster.cluster.connect import connect
from rlhf_cluster.config import load_config
from rlhf_cluster.drivers.ppo import run_ppo

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WALL_CLOCK = ("time/", "tps/")  # the only keys that differ between two runs of the same steps


@pytest.fixture(scope="module")
def local_ray():
    connect(None, num_cpus=2)
    yield
    ray.shutdown()


def small_grpo(model: Path, out: Path, *overrides: str):
    """The demo's PPO loop with the critic-free grpo estimator (one actor fewer to start, twice) on Ray, cut to
    4 short steps with a checkpoint every 2."""
    return load_config(REPO / "configs" / "grpo.yaml", [
        f"policy.model_name_or_path={model}", f"output_dir={out}", "schedule.num_steps=4", "schedule.save_every=2",
        "schedule.prompts_per_step=4", "schedule.eval_prompts=4", "rollout.max_new_tokens=8",
        "algorithm.mini_batch_size=16", *overrides])


def lines(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


class KillAt(threading.Thread):
    """Watches metrics.jsonl; when the line of each ``(step, role)`` of ``schedule`` first appears, keeps it and
    SIGKILLs that role's rank 0 (its pid from placement.json, which each restart rewrites)."""

    def __init__(self, out: Path, schedule: list[tuple[int, str]]):
        super().__init__(daemon=True)
        self.out, self.schedule = out, list(schedule)
        self.lines: dict[int, dict] = {}
        self.placed: dict | None = None  # placement.json as it was at the first kill
        self.done = threading.Event()

    def run(self) -> None:
        for step, role in self.schedule:
            while not self.done.is_set():
                seen = [m for m in lines(self.out) if m["step"] == step]
                if seen:
                    self.lines[step] = seen[0]
                    placed = json.loads((self.out / "placement.json").read_text())
                    self.placed = self.placed or placed
                    os.kill(placed[role][0]["pid"], signal.SIGKILL)
                    break
                time.sleep(0.005)


def test_killed_actors_are_restarted_from_the_last_checkpoint(local_ray, tiny_model_dir, tmp_path):
    """The policy and the rollout engine (vLLM) both killed after step 3: they are restarted from the newest
    checkpoint (step 2) while the frozen reference and reward actors, alive, are kept loaded; the lost step is redone,
    and its metrics equal the lost ones. (One restart for both keeps the suite's budget; how Restarts counts failures
    is tested in tests/unit/test_faults.py.)"""
    out = tmp_path / "run"
    killer = KillAt(out, [(3, "policy"), (3, "rollout")])
    killer.start()
    said: list[str] = []
    t = time.perf_counter()
    try:
        summary = run_ppo(small_grpo(tiny_model_dir, out, "fault_tolerance.max_restarts=1"), log=said.append)
    finally:
        killer.done.set()
    wall = time.perf_counter() - t
    print("restarts:", summary["restarts"])  # the recovery times the README quotes (pytest -s)
    assert killer.lines.keys() == {3}, "the step to kill after never appeared"
    assert summary["steps"] == 4 and {"eval_before", "eval_after"} <= summary.keys(), summary
    (first,) = summary["restarts"]
    assert first["actor"] in ("policy rank 0", "rollout rank 0") and first["kind"] == "died", first
    assert (first["failed_at_step"], first["resumed_from_step"], first["steps_lost"]) == (3, 2, 1), first
    assert 0 < first["seconds"] < wall, summary["restarts"]
    warned = [x for x in said if x.startswith(f"warning: {first['actor']} died after step 3")]
    assert warned and "step_000002" in warned[0] and "automatic restart 1 of 1" in warned[0], said
    assert "restarting every role but reference, reward (frozen and alive: kept loaded)" in warned[0], warned[0]
    placed = json.loads((out / "placement.json").read_text())  # rewritten by the restart
    for role, same in (("reference", True), ("reward", True), ("policy", False), ("rollout", False)):
        assert (placed[role][0]["pid"] == killer.placed[role][0]["pid"]) == same, (role, placed, killer.placed)
    assert any("(reference, reward kept loaded from before the restart)" in x for x in said), said
    assert any(x.startswith("recovered in ") and "resumed at step 2, 1 step lost" in x for x in said), said
    metrics = lines(out)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]  # each step once: the lost step's line was replaced
    for step, lost in killer.lines.items():
        again = metrics[step]
        assert again.keys() == lost.keys()
        for k, v in lost.items():
            if not k.startswith(WALL_CLOCK):
                assert again[k] == v, (step, k, v, again[k])  # resume is exact on CPU fp32


def test_nothing_of_an_embedded_ray_outlives_a_driver_killed_outright(tmp_path):
    """kill -9 of a driver that started its own Ray: its GCS, raylet, workers and the raylet's two agents (which Ray
    itself leaves running) are all gone within seconds."""
    import subprocess
    import sys

    import psutil

    from rlhf_cluster.cluster.reaper import ray_descendants

    driver = subprocess.Popen([sys.executable, "-c", "import time\nfrom rlhf_cluster.cluster.connect import connect\n"
                               "connect(None, num_cpus=1)\nprint('up', flush=True)\ntime.sleep(600)\n"],
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "up"
        deadline = time.monotonic() + 30
        while not any(psutil.Process(p).name().endswith("Agent") or "Agent" in " ".join(psutil.Process(p).cmdline())
                      for p in ray_descendants(driver.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        ours = ray_descendants(driver.pid)
        assert any("Agent" in " ".join(psutil.Process(p).cmdline()) for p in ours), "the raylet's agents never started"
        time.sleep(2.5)  # the watcher notes the processes every 2 s
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = [p for p, t in ours.items() if psutil.pid_exists(p) and abs(psutil.Process(p).create_time() - t) < 1e-3
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not left:
            break
        time.sleep(0.5)
    assert not left, [" ".join(psutil.Process(p).cmdline()) for p in left]
