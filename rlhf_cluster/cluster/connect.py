"""Reaching a Ray cluster: the embedded default, an existing cluster's GCS, Ray Client, or
the Jobs API — with Ray 2.60's token authentication and errors that fit on one line.

Every failure raises :class:`ConnectError`, whose message names the address, what was
tried and the likely fix; nothing here waits longer than the caller's timeout.
"""

from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

from rlhf_cluster import stopping
from rlhf_cluster.cluster import reaper


class ConnectError(RuntimeError):
    """The cluster cannot be reached or refused us; the message says why and what to do."""


def actor_env() -> dict[str, str]:
    """Every actor's environment: models load from local directories only (no hub at run time), and the
    libraries' log defaults of :mod:`rlhf_cluster.logs` — a value set here, on the driver, wins."""
    from rlhf_cluster.logs import DEFAULTS

    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **{k: "1" if k == "TQDM_DISABLE" else v
                                                                          for k, v in DEFAULTS.items()}}
    return {k: os.environ.get(k, v) for k, v in env.items()}

TOKEN_FIX = ("put the cluster's token in RAY_AUTH_TOKEN or in ~/.ray/auth_token (or point RAY_AUTH_TOKEN_PATH at "
             "a file holding it); `ray get-auth-token` on the head prints it")


# ----------------------------------------------------------------------------- token auth


def use_token_if_available() -> bool:
    """Turn on Ray's token mode in this process when a token is at hand, as ``--address auto`` does.

    Ray 2.60 enables token authentication by default on new clusters but sends the token
    only in token mode, which it turns on by itself for ``auto`` alone: an explicit
    ``HOST:PORT`` or a Jobs client without it is refused. An explicit ``RAY_AUTH_MODE`` wins.
    Returns whether token mode is on.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    from ray._raylet import AuthenticationTokenLoader, Config

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray caches its config; re-read it so this process sees token mode
    return True


# ----------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class Address:
    kind: str  # "local" (embedded), "auto", "gcs" (HOST:PORT), "client" (ray://), "dashboard" (http[s]://)
    text: str
    host: str = ""
    port: int = 0


def parse_address(text: str | None) -> Address:
    if text is None or text == "local":
        return Address("local", "local")
    if text == "auto":
        return Address("auto", text)
    if "://" in text:
        u = urlparse(text)
        if u.scheme not in ("ray", "http", "https") or not u.hostname:
            raise ConnectError(f"address {text!r}: expected HOST:PORT (the GCS), ray://HOST:PORT (Ray Client) or "
                               f"http://HOST:PORT (the dashboard's Jobs API)")
        default = {"ray": 10001, "http": 8265, "https": 443}[u.scheme]
        return Address("client" if u.scheme == "ray" else "dashboard", text, u.hostname, u.port or default)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConnectError(f"address {text!r}: expected HOST:PORT (e.g. 10.0.0.1:6379), 'auto', ray://HOST:10001 "
                           f"or http://HOST:8265")
    return Address("gcs", text, host, int(port))


def probe_tcp(addr: Address, timeout_s: float, what: str) -> bytes:
    """Connect, then send an HTTP request and return the first bytes of the answer (b'' for none).

    An HTTP server (the dashboard) answers ``HTTP/1.x``; a gRPC server (GCS, Ray Client)
    answers with a binary HTTP/2 frame or closes the connection.
    """
    try:
        with socket.create_connection((addr.host, addr.port), timeout=timeout_s) as s:
            s.settimeout(min(timeout_s, 3.0))
            try:
                s.sendall(b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
                return s.recv(16)
            except OSError:
                return b""
    except socket.gaierror:
        raise ConnectError(f"cannot resolve {addr.host!r} (from {what} {addr.text!r}): check the host name") from None
    except ConnectionRefusedError:
        raise ConnectError(f"nothing listens at {addr.host}:{addr.port} (from {what} {addr.text!r}): connection refused. "
                           f"Is Ray running there, and is this its port? ({_port_hint(addr.kind)})") from None
    except TimeoutError:
        raise ConnectError(f"no answer from {addr.host}:{addr.port} (from {what} {addr.text!r}) within {timeout_s:g} s: "
                           f"the host is down, a firewall drops the traffic, or the address is wrong "
                           f"(raise cluster.connect_timeout_s for a slow network)") from None
    except OSError as e:
        raise ConnectError(f"cannot reach {addr.host}:{addr.port} (from {what} {addr.text!r}): {e.strerror or e}") from None


def _port_hint(kind: str) -> str:
    return {"gcs": "the GCS port is `ray start --head --port`, 6379 by default",
            "client": "the Ray Client port is `--ray-client-server-port`, 10001 by default",
            "dashboard": "the Jobs API is on the dashboard port, `--dashboard-port`, 8265 by default"}.get(kind, "")


def check_gcs(addr: Address, timeout_s: float) -> None:
    """Fail fast unless ``addr`` is a Ray GCS that accepts our token."""
    head = probe_tcp(addr, timeout_s, "--address")
    if head.startswith(b"HTTP/"):
        raise ConnectError(
            f"{addr.text} is an HTTP server — Ray's dashboard / Jobs API, not the GCS. Submit a job there with "
            f"`rlhf-cluster submit CONFIG --address http://{addr.host}:{addr.port}`, or give train the GCS address "
            f"(HOST:6379 by default, the port of `ray start --head --port`)")
    result: dict = {}

    def ask() -> None:  # the GCS client retries internally on some failures, so it runs on a watched thread
        try:
            from ray._raylet import GcsClient

            GcsClient(address=f"{addr.host}:{addr.port}").internal_kv_get(b"rlhf_cluster_probe", None, timeout=timeout_s)
            result["ok"] = True
        except Exception as e:
            result["error"] = e

    with _native_stderr_muted():  # the C++ client logs each failed attempt; our one line says it all
        t = threading.Thread(target=ask, daemon=True)
        t.start()
        t.join(timeout_s)
    err = result.get("error")
    if result.get("ok"):
        return
    if err is None:
        raise ConnectError(f"{addr.text} accepted a connection but did not answer as a Ray GCS within {timeout_s:g} s; "
                           f"if it is the Ray Client port use ray://{addr.host}:{addr.port}, otherwise check the port "
                           f"({_port_hint('gcs')})")
    if type(err).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(err):
        raise ConnectError(f"the Ray cluster at {addr.text} refused this client's token: token authentication is on "
                           f"(Ray 2.60's default) and {_token_state()}. Fix: {TOKEN_FIX}")
    raise ConnectError(f"{addr.text} is not a Ray GCS that answers: {type(err).__name__}: {str(err).splitlines()[0][:200]}")


@contextmanager
def _native_stderr_muted():
    """Send file descriptor 2 (where Ray's C++ logging writes) to /dev/null for the duration."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _token_state() -> str:
    """Why a cluster refused us: no token here at all, or one that does not match."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return "no token was found here"
    return "the token found here does not match"


def check_dashboard(addr: Address, timeout_s: float) -> None:
    head = probe_tcp(addr, timeout_s, "--address")
    if addr.text.startswith("https://"):
        return  # TLS: the probe's plain HTTP tells nothing; the Jobs client reports its own errors
    if not head.startswith(b"HTTP/"):
        raise ConnectError(f"{addr.host}:{addr.port} does not speak HTTP, so it is not Ray's dashboard / Jobs API "
                           f"(is it the GCS port?); {_port_hint('dashboard')}")


# ----------------------------------------------------------------------------- ray.init


def _job_working_dir() -> str | None:
    """The working_dir of the Ray job this driver runs in (``rlhf-cluster submit`` ships one), if any."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None


def check_reachable(address: str | None, timeout_s: float = 30.0) -> None:
    """Fail fast, before any data is read or model loaded, when ``address`` cannot be a Ray cluster this process
    could join: the dashboard's HTTP address, or a GCS / Ray Client port nothing answers on. (``connect`` checks the
    same again; this only moves the verdict to the first second of a run.)"""
    addr = parse_address(address)
    if addr.kind in ("local", "auto"):
        return
    if addr.kind == "dashboard":
        raise ConnectError(
            f"{addr.text} is the dashboard / Jobs API address: submit there with `rlhf-cluster submit CONFIG --address "
            f"{addr.text}`; `train --address` takes the GCS (HOST:6379), 'auto' on a cluster node, or ray://HOST:10001")
    use_token_if_available()
    if addr.kind == "gcs":
        check_gcs(addr, timeout_s)
    else:
        probe_tcp(addr, timeout_s, "--address")


def connect(address: str | None, *, num_cpus: int | None = None, timeout_s: float = 30.0,
            working_dir: str | None = None) -> None:
    """A fresh embedded Ray (``address`` None/'local'), or a connection to an existing cluster.

    ``address='local'`` always starts a new instance: a plain ``ray.init()`` would first try
    a stale ``/tmp/ray/ray_current_cluster`` left by a crashed run. ``working_dir`` (a small
    folder, e.g. the user's reward module) is shipped to every actor.
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict = {"env_vars": actor_env()}
    if working_dir and not _job_working_dir():
        runtime_env["working_dir"] = working_dir  # inside a submitted job, the job's own folder already travels
    addr = parse_address(address)
    if addr.kind == "local":
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, logging_level="WARNING")
        stopping.reinstall()  # ray.init replaced our SIGTERM/SIGINT handler with its crash-dump one
        reaper.watch()  # this Ray is ours: nothing of it may outlive this process, even a kill -9 of it
        return
    use_token_if_available()
    check_reachable(address, timeout_s)
    if addr.kind == "client":
        os.environ.setdefault("RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S", str(int(max(timeout_s, 1))))
    try:
        ray.init(address=addr.text, runtime_env=runtime_env, logging_level="WARNING")
    except ConnectionError as e:
        hint = " (no local Ray found: start one with `ray start --head`, or pass --address HOST:PORT)" if addr.kind == "auto" else ""
        raise ConnectError(f"cannot connect to the Ray cluster at {addr.text}: {str(e).splitlines()[0]}{hint}") from None
    except Exception as e:
        if type(e).__name__ == "AuthenticationError":
            raise ConnectError(f"the Ray cluster at {addr.text} refused this client's token. Fix: {TOKEN_FIX}") from None
        raise ConnectError(f"cannot connect to the Ray cluster at {addr.text}: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}") from None
    stopping.reinstall()


# ----------------------------------------------------------------------------- what travels to the actors


MAX_SHIPPED_BYTES = 20 * 2**20


def stage_module(code_dir: str, module: str, into: str | None = None) -> str:
    """A folder (``into``, or a new temporary one) holding just ``module``'s top-level file or package from
    ``code_dir``, to ship as the actors' working directory (never the whole folder: it may hold models)."""
    import shutil
    import tempfile
    from pathlib import Path

    top = module.split(".")[0]
    src_file, src_pkg = Path(code_dir) / f"{top}.py", Path(code_dir) / top
    out = Path(into) if into else Path(tempfile.mkdtemp(prefix="rlhf_code_"))
    if src_file.is_file():
        shutil.copy2(src_file, out / src_file.name)
    elif (src_pkg / "__init__.py").is_file():
        shutil.copytree(src_pkg, out / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        raise ConnectError(f"reward.code_dir={code_dir!r} holds neither {top}.py nor a package {top}/ for "
                           f"reward.function's module {module!r}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if size > MAX_SHIPPED_BYTES:
        raise ConnectError(f"the reward module {module!r} in {code_dir} is {size / 2**20:.0f} MiB; only code is shipped "
                           f"to the actors (limit {MAX_SHIPPED_BYTES // 2**20} MiB) — keep data and models on shared storage")
    return str(out)


def _probe_paths(readable: dict[str, str], writable: dict[str, str]) -> list[str]:
    """On one node: which paths are missing or not writable there (runs as a Ray task)."""
    import socket as _socket
    import uuid

    host = _socket.gethostname()
    problems = [f"{field}={path!r} does not exist on node {host}" for field, path in readable.items()
                if not os.path.exists(path)]
    for field, path in writable.items():
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".rlhf_write_probe_{uuid.uuid4().hex}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            problems.append(f"{field}={path!r} is not writable on node {host}: {e.strerror or e}")
    return problems


def check_paths_on_nodes(readable: dict[str, str], writable: dict[str, str], timeout_s: float = 60.0) -> None:
    """Check paths the way the actors will see them: on every alive node of the connected cluster.

    Actors on other machines open the same absolute paths, so models and data must be on
    storage every node mounts at the same place, and output_dir writable from each.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe_paths)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(readable, writable)
            for n in nodes]
    try:
        results = ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ConnectError(f"checking paths on the cluster's {len(nodes)} nodes took over {timeout_s:g} s") from None
    problems = [f"{p} (node {n['NodeManagerAddress']})" for n, ps in zip(nodes, results) for p in ps]
    if problems:
        raise ConnectError("paths the actors need are not there on every node:\n  " + "\n  ".join(problems) +
                           "\n  every node reads models and data and writes output_dir at the same absolute path: put them "
                           "on shared storage (NFS, a PersistentVolumeClaim) mounted at the same path everywhere")
