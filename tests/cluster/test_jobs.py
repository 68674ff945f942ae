"""Running on a real cluster, as an operator does: a real `ray start --head` with token authentication (its
own temp dir, loopback dashboard, free ports) plus a second raylet, driven only through the `rlhf-cluster`
CLI from a user's project directory that is neither the cluster's working directory nor this repo.

Checks: submit → follow → success with the config's relative paths and a local reward module, outputs
where the user asked (not in Ray's temp dir), the policy's two ranks on two nodes; a second job stopped
mid-run leaves no actor alive; list/status; token refused when missing or wrong; and every bad address
fails fast with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from raynode import RayHead, free_ports

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "rlhf-cluster")

REWARD_MODULE = '''
def nice(prompts, responses):
    """The demo's sentiment reward, from a module next to the user's config (not an installed package)."""
    from rlhf_cluster.rewards import sentiment

    return sentiment(prompts, responses)
'''


def cli(*args: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def cli_at_once(calls: list[tuple[tuple[str, ...], dict]], cwd: Path) -> list[tuple[subprocess.CompletedProcess, float]]:
    """Several commands started together, each its own process as from a user's shell: (result, seconds) each."""
    from concurrent.futures import ThreadPoolExecutor

    def timed(args, env):
        t = time.time()
        return cli(*args, cwd=cwd, env=env, timeout=120), time.time() - t

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: timed(*call), calls))


def user_env(home: Path, token: str | None) -> dict:
    """A user's shell: no Ray variables, a HOME of its own (no ~/.ray/auth_token unless given), the venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def head():
    h = RayHead(num_cpus=2)
    try:
        h.add_node(num_cpus=1, resources='{"second_node": 1}')
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def project(tmp_path_factory, head, tiny_model_dir):
    """A user's project: configs and data copied, a local reward module next to the config, a tiny model (the
    session's, copied: `build-tiny` through the CLI is tests/e2e's)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "configs" / "my_reward.py").write_text(REWARD_MODULE)
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    home = root / "home"
    home.mkdir()
    return root, user_env(home, head.token)


def _wait_for_nodes(head: RayHead, env: dict, n: int, timeout_s: float = 60) -> None:
    code = (f"import ray; ray.init(address='{head.gcs}', logging_level='ERROR'); "
            f"print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        p = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                           text=True, timeout=60)
        if p.returncode == 0 and p.stdout.strip().endswith(str(n)):
            return
        time.sleep(1)
    raise AssertionError(f"the cluster did not show {n} nodes")


def test_submit_follow_runs_a_two_node_job_with_relative_paths(head, project):
    root, env = project
    _wait_for_nodes(head, env, 2)
    # GRPO: the RL loop (vLLM rollout, reference, reward, weight sync) with the policy's 2 ranks on 2 nodes.
    p = cli("submit", "configs/grpo.yaml", "policy.model_name_or_path=models/tiny", "reward.function=my_reward:nice",
            "--address", head.dashboard, "--follow", "policy.num_nodes=2", "output_dir=runs/demo", "schedule.num_steps=2",
            "schedule.save_every=0", "schedule.eval_prompts=8", cwd=root, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    assert "submitted raysubmit_" in p.stdout and f"output_dir: {root / 'runs' / 'demo'}" in p.stdout, p.stdout[:2000]
    assert "held-out reward: before" in p.stdout and "SUCCEEDED" in p.stdout
    out = root / "runs" / "demo"  # where the user asked, not inside Ray's session directory
    assert (out / "policy" / "model.safetensors").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 3
    where = json.loads((out / "placement.json").read_text())
    assert len({p["node_id"] for p in where["policy"]}) == 2, where["policy"]  # one data-parallel rank per node
    assert set(where) == {"policy", "reference", "reward", "rollout"}


def test_stop_leaves_no_actor_running_and_list_shows_both_jobs(head, project):
    root, env = project
    # SFT: the offline loop with one actor (the policy), for 1000 epochs: running when it is stopped.
    p = cli("submit", "configs/sft.yaml", "policy.model_name_or_path=models/tiny", "--address", head.dashboard,
            "--job-id", "stop-me", "output_dir=runs/long", "schedule.num_epochs=1000", cwd=root, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    deadline = time.time() + 300
    while "actors ready" not in cli("logs", "stop-me", "--address", head.dashboard, cwd=root, env=env).stdout:
        assert time.time() < deadline, "the job's actors never came up"
        time.sleep(3)
    stopped = cli("stop", "stop-me", "--address", head.dashboard, cwd=root, env=env, timeout=300)
    assert stopped.returncode == 0 and "stop-me: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert "STOPPED" in cli("status", "stop-me", "--address", head.dashboard, cwd=root, env=env).stdout
    code = ("import ray; from ray.util.state import list_actors; "
            f"ray.init(address='{head.gcs}', logging_level='ERROR'); "
            f"alive = list_actors(address='{head.dashboard}', filters=[('state', '=', 'ALIVE')]); "
            "print(len([a for a in alive if a.class_name.endswith('Actor')]))")
    deadline = time.time() + 60
    while True:
        left = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                              text=True, timeout=120)
        if left.stdout.strip().endswith("0") or time.time() > deadline:
            break
        time.sleep(2)
    assert left.stdout.strip().endswith("0"), left.stdout + left.stderr[-2000:]
    listed = cli("list", "--address", head.dashboard, cwd=root, env=env)
    assert listed.returncode == 0 and "stop-me" in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stdout


def test_token_missing_or_wrong_is_refused_in_one_line(head, project, tmp_path):
    root, env = project
    no_token = user_env(tmp_path, None)
    jobs_api = [(("list", "--address", head.dashboard), no_token),
                (("list", "--address", head.dashboard), {**no_token, "RAY_AUTH_TOKEN": "wrong"}),
                (("submit", "configs/dpo.yaml", "policy.model_name_or_path=models/tiny", "--address", head.dashboard), no_token)]
    gcs = (("train", "configs/dpo.yaml", "policy.model_name_or_path=models/tiny", "--address", head.gcs), no_token)
    *answers, (p, seconds) = cli_at_once([*jobs_api, gcs], root)
    for q, _ in answers:
        assert q.returncode == 2, q.stdout + q.stderr
        assert q.stderr.startswith("error: the Jobs API at") and "token" in q.stderr and "RAY_AUTH_TOKEN" in q.stderr, q.stderr
        assert len(q.stderr.strip().splitlines()) == 1, q.stderr
    assert p.returncode == 2 and "refused this client's token" in p.stderr and seconds < 30, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_bad_addresses_fail_fast_naming_the_address_and_the_fix(head, project):
    root, env = project
    (closed,) = free_ports(1)
    train = ["train", "configs/dpo.yaml", "policy.model_name_or_path=models/tiny", "--connect-timeout", "5"]
    cases = [
        ([*train, "--address", f"127.0.0.1:{closed}"], f"nothing listens at 127.0.0.1:{closed}"),
        ([*train, "--address", f"ray://127.0.0.1:{closed}"], f"nothing listens at 127.0.0.1:{closed}"),
        ([*train, "--address", f"127.0.0.1:{head.dash_port}"], "is an HTTP server — Ray's dashboard"),
        ([*train, "--address", head.dashboard], "is the dashboard / Jobs API address"),
        (["list", "--address", f"http://127.0.0.1:{head.port}"], "does not speak HTTP"),
        (["status", "raysubmit_nope", "--address", head.dashboard], "no such job"),
    ]
    for (args, expected), (p, seconds) in zip(cases, cli_at_once([(args, env) for args, _ in cases], root)):
        assert p.returncode == 2, (args, p.stdout[-2000:], p.stderr[-2000:])
        assert expected in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        assert seconds < 40, (args, seconds)
