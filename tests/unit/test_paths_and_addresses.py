"""What travels to a cluster and how it is reached: absolute paths, local reward modules, job folders,
addresses, and the one-line errors for each mistake (no Ray cluster needed)."""

from __future__ import annotations

import http.server
import os
import socket
import threading
from pathlib import Path

import pytest
import yaml

from rlhf_cluster.cli import main
from rlhf_cluster.cluster.connect import ConnectError, check_dashboard, check_gcs, parse_address, stage_module
from rlhf_cluster.config import load_config, preflight
from rlhf_cluster.jobs import stage_job

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's directory with a config that extends a base file, relative paths and a local reward module."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "base.yaml").write_text(yaml.safe_dump({
        "method": "ppo", "policy": {"model_name_or_path": "models/tiny"}, "data": {"train_path": "data/prompts.jsonl"},
        "algorithm": {"mini_batch_size": 4}}))
    (tmp_path / "cfg" / "run.yaml").write_text("base: base.yaml\noutput_dir: runs/x\nreward:\n  function: my_reward:fn\n")
    (tmp_path / "cfg" / "my_reward.py").write_text("def fn(prompts, responses):\n    return [1.0 for _ in responses]\n")
    (tmp_path / "runs" / "big").mkdir(parents=True)
    (tmp_path / "runs" / "big" / "weights.bin").write_bytes(b"x" * 1000)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_path_is_absolute_and_a_local_reward_module_is_found(project):
    cfg = load_config("cfg/run.yaml", ["policy.micro_batch_size=4", "critic.micro_batch_size=4"])
    assert cfg.policy.model_name_or_path == str(project / "models" / "tiny")
    assert cfg.critic.model_name_or_path == cfg.reference.model_name_or_path == str(project / "models" / "tiny")
    assert cfg.data.train_path == str(project / "data" / "prompts.jsonl")
    assert cfg.output_dir == str(project / "runs" / "x")
    assert cfg.reward.code_dir == str(project / "cfg")  # next to the config, not installed


def test_an_installed_package_is_never_shipped(project):
    cfg = load_config("cfg/run.yaml", ["reward.function=rlhf_cluster.rewards:sentiment"])
    assert cfg.reward.code_dir is None


def test_preflight_imports_the_local_reward_module(project):
    from rlhf_cluster.tiny import build_tiny_model

    build_tiny_model(project / "models" / "tiny")
    (project / "data").mkdir()
    (project / "data" / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    preflight(load_config("cfg/run.yaml", ["policy.micro_batch_size=4", "critic.micro_batch_size=4"]))
    bad = load_config("cfg/run.yaml", ["reward.function=my_reward:nope", "policy.micro_batch_size=4",
                                       "critic.micro_batch_size=4"])
    with pytest.raises(Exception, match="module 'my_reward' has no function 'nope'"):
        preflight(bad)


def test_a_job_ships_the_merged_config_and_the_reward_module_only(project):
    folder, name, outputs = stage_job("cfg/run.yaml", ["policy.micro_batch_size=4", "critic.micro_batch_size=4"])
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["config.yaml", "my_reward.py"]  # never runs/ or models
    tree = yaml.safe_load((folder / name).read_text())
    assert "base" not in tree and tree["policy"]["micro_batch_size"] == 4
    assert tree["policy"]["model_name_or_path"] == str(project / "models" / "tiny")
    assert tree["output_dir"] == outputs[0] == str(project / "runs" / "x")
    assert "code_dir" not in tree["reward"]  # the job finds the module next to its config


def test_stage_module_copies_one_module(project):
    out = Path(stage_module(str(project / "cfg"), "my_reward"))
    assert sorted(p.name for p in out.iterdir()) == ["my_reward.py"]
    with pytest.raises(ConnectError, match="holds neither nope.py nor a package nope/"):
        stage_module(str(project / "cfg"), "nope")


def test_addresses_are_classified():
    assert parse_address(None).kind == parse_address("local").kind == "local"
    assert parse_address("auto").kind == "auto"
    assert parse_address("10.0.0.1:6379") == parse_address("10.0.0.1:6379")
    a = parse_address("10.0.0.1:6379")
    assert (a.kind, a.host, a.port) == ("gcs", "10.0.0.1", 6379)
    assert parse_address("ray://head").port == 10001 and parse_address("http://head").port == 8265
    for bad in ("head", "head:port", "ftp://head:1"):
        with pytest.raises(ConnectError, match="expected HOST:PORT"):
            parse_address(bad)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def test_a_refused_port_an_http_port_and_a_silent_port_are_told_apart(http_server):
    port = _closed_port()
    with pytest.raises(ConnectError, match=f"nothing listens at 127.0.0.1:{port} .*connection refused"):
        check_gcs(parse_address(f"127.0.0.1:{port}"), 2)
    with pytest.raises(ConnectError, match="is an HTTP server — Ray's dashboard"):
        check_gcs(parse_address(f"127.0.0.1:{http_server}"), 2)
    check_dashboard(parse_address(f"http://127.0.0.1:{http_server}"), 2)  # an HTTP server is accepted as a dashboard
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:  # accepts the connection, never answers: bounded by the timeout
        with pytest.raises(ConnectError, match="did not answer as a Ray GCS within 1 s|not a Ray GCS"):
            check_gcs(parse_address(f"127.0.0.1:{silent.getsockname()[1]}"), 1)
        with pytest.raises(ConnectError, match="does not speak HTTP"):
            check_dashboard(parse_address(f"http://127.0.0.1:{silent.getsockname()[1]}"), 1)
    finally:
        silent.close()


def test_cli_overrides_may_follow_flags_and_config_explains_fields(capsys, tmp_path):
    assert main(["config", str(REPO / "configs" / "dpo.yaml"), "--explain", "seed=7"]) == 0
    out = capsys.readouterr().out
    assert "seed: 7   (default 0)" in out and "preference.loss: dpo   (default dpo)   one of: cdpo, dpo, hinge, ipo, kto" in out
    assert main(["config"]) == 0
    assert "policy.zero_stage: auto   one of: auto, 0, 1, 2, 3" in capsys.readouterr().out
    assert main(["config", str(REPO / "configs" / "pipeline_sft_dpo.yaml")]) == 0
    assert "# --- stage dpo (dpo)" in capsys.readouterr().out
    assert main(["train", str(REPO / "configs" / "dpo.yaml"), "--address", "127.0.0.1:1", "policy.zero_stge=1"]) == 2
    assert "did you mean 'policy.zero_stage'" in capsys.readouterr().err
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    assert main(["list"]) == 2
    assert "no cluster given: pass --address http://HEAD:8265" in capsys.readouterr().err
