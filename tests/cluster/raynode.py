"""A real ``ray start --head`` for tests: its own temp dir and working directory, free ports,
token authentication, and a stop that kills exactly the processes it started (``ray stop``
would stop every Ray on the host)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RayHead:
    """``ray start --head --block`` in a new session; ``gcs`` / ``dashboard`` are its addresses."""

    def __init__(self, *, num_cpus: int = 2, token: str | None = None, resources: str | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="rayhead_"))
        self.token = token if token is not None else uuid.uuid4().hex
        port, dash, agent, client = free_ports(4)
        self.port, self.dash_port, self.client_port = port, dash, client
        # Jobs run `rlhf-cluster` from the head's PATH, as on a real node where the package is installed.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(k, None)
        cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
               f"--temp-dir={self.dir / 'tmp'}", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={resources}")
        self.log = open(self.dir / "ray_start.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=self.dir, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.workers: list[subprocess.Popen] = []
        self._wait_for_dashboard()

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    @property
    def gcs(self) -> str:
        # Ray registers the node under its own address, not loopback; the GCS listens on all interfaces.
        return f"127.0.0.1:{self.port}"

    def _wait_for_dashboard(self, timeout_s: float = 90.0) -> None:
        import urllib.request

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {(self.dir / 'ray_start.log').read_text()[-2000:]}")
            try:
                req = urllib.request.Request(f"{self.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the dashboard of the test head did not come up in {timeout_s:.0f} s")

    def add_node(self, *, num_cpus: int = 1, resources: str | None = None, node_ip: str = "127.0.0.2") -> None:
        """A second raylet on this host joining the head (its own temp dir)."""
        cmd = [str(BIN / "ray"), "start", "--block", f"--address={self.gcs_node_address()}", f"--num-cpus={num_cpus}",
               f"--node-ip-address={node_ip}", "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={resources}")
        log = open(self.dir / f"worker{len(self.workers)}.log", "w")
        self.workers.append(subprocess.Popen(cmd, cwd=self.dir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True))

    def gcs_node_address(self) -> str:
        log = (self.dir / "ray_start.log").read_text()
        for line in log.splitlines():
            if "ray start --address=" in line:
                return line.split("--address=")[1].strip().strip("'\"").split("'")[0]
        return self.gcs

    def processes(self) -> list[psutil.Process]:
        out = []
        for p in [self.proc, *self.workers]:
            try:
                root = psutil.Process(p.pid)
                out += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self) -> None:
        procs = self.processes()
        for p in [self.proc, *self.workers]:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)  # a test cluster: nothing to save, so no long grace
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.log.close()
