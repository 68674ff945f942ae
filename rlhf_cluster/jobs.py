"""Jobs on a Ray cluster through the Ray Job Submission API: submit, status, logs, stop, list.

``submit`` validates the config here first, then ships only what the job needs — the merged
config (``base:`` files and overrides folded in, every path made absolute as seen from here)
and a local reward module — never model weights or ``runs/``: models, data and output_dir
must be on storage every node mounts at the same path, and the job checks that on every
node before any actor starts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from rlhf_cluster.cluster.connect import (
    TOKEN_FIX,
    ConnectError,
    _token_state,
    check_dashboard,
    parse_address,
    stage_module,
    use_token_if_available,
)
from rlhf_cluster.config import (
    PATH_FIELDS,
    _read_tree,
    _set_dotted,
    absolute_path,
    load_config,
    parse_override,
    resolve_path,
)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(RuntimeError):
    """A job command failed; the message says why."""


def dashboard_address(address: str | None) -> str:
    """``--address``, else Ray's own ``RAY_API_SERVER_ADDRESS`` (or an http ``RAY_ADDRESS``)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or (
        os.environ.get("RAY_ADDRESS") if os.environ.get("RAY_ADDRESS", "").startswith("http") else None)
    if not address:
        raise ConnectError("no cluster given: pass --address http://HEAD:8265 (the dashboard's Jobs API) or set "
                           "RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address


def client(address: str | None, timeout_s: float = 30.0):
    """A JobSubmissionClient for the dashboard at ``address`` (after a bounded reachability check), and its URL."""
    url = dashboard_address(address)
    addr = parse_address(url)
    if addr.kind != "dashboard":
        raise ConnectError(f"{url} is not a dashboard URL: the Jobs API is at http://HEAD:8265")
    use_token_if_available()
    check_dashboard(addr, timeout_s)
    import logging

    from ray.job_submission import JobSubmissionClient

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "Uploading package ..." lines say nothing to a user

    try:
        return JobSubmissionClient(url), url
    except Exception as e:
        raise _one_line(e, url) from None


def _one_line(e: Exception, url: str) -> Exception:
    text = str(e)
    if type(e).__name__ == "AuthenticationError" or "Authentication" in text:
        return ConnectError(f"the Jobs API at {url} requires token authentication and {_token_state()}. Fix: {TOKEN_FIX}")
    return ConnectError(f"the Jobs API at {url}: {text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__}")


def _call(fn, url: str, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise JobError(f"no such job on {url}: {args[0] if args else ''} (`rlhf-cluster list` shows the jobs)") from None
        raise _one_line(e, url) from None
    except Exception as e:
        raise _one_line(e, url) from None


# ----------------------------------------------------------------------------- what a job ships


def _absolute_tree(tree: dict, base: Path, config_dir: Path | None = None) -> dict:
    """Path fields of a config tree made absolute as ``load_config`` does (values like ${stage.policy} stay).

    ``reward.code_dir`` is dropped: the job finds a shipped reward module next to its config.
    """
    if isinstance(tree.get("reward"), dict):
        tree["reward"].pop("code_dir", None)
    for dotted in PATH_FIELDS:
        node = tree
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and "${" not in node[leaf]:
            node[leaf] = resolve_path(dotted, node[leaf], base, config_dir)
    return tree


def stage_job(config: str, overrides: list[str]) -> tuple[Path, str, list[str]]:
    """A folder holding what the job needs; returns it, the config's name inside it, and the output dirs.

    The config is validated here exactly as ``train`` would (pipelines: every stage).
    """
    from rlhf_cluster.pipeline import is_pipeline, load_pipeline

    cwd = Path.cwd()
    out = Path(tempfile.mkdtemp(prefix="rlhf_job_"))
    modules: list[tuple[Path, str]] = []  # (code dir, module) of local reward modules
    if is_pipeline(config):
        stages = load_pipeline(config, overrides)  # validates every stage and resolves its outputs
        tree = yaml.safe_load(Path(config).read_text())
        tree["output_dir"] = os.path.abspath(tree.get("output_dir") or "runs/pipeline")
        by_stage: dict[str, list[str]] = {}
        for text in overrides:
            head, _, rest = text.partition(".")
            by_stage.setdefault(head, []).append(rest)
        for i, s in enumerate(tree["stages"]):
            src = Path(s["config"])
            if not src.is_absolute() and not src.exists():
                src = Path(config).parent / src
            stage_tree = _absolute_tree(_read_tree(src), cwd, src.parent)
            name = f"stage_{i + 1}_{s['name']}.yaml"
            (out / name).write_text(yaml.safe_dump(stage_tree, sort_keys=False))
            s["config"] = name
            extra = s.setdefault("overrides", {}) or {}
            for text in by_stage.get(s["name"], []):
                key, value = parse_override(text)
                extra[key] = value
            s["overrides"] = _absolute_tree_flat(extra, cwd)
        cfgs = [st.config for st in stages]
        outputs = [st.config.output_dir for st in stages]
    else:
        cfg = load_config(config, overrides)
        tree = _read_tree(Path(config))
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(tree, key, value)
        tree = _absolute_tree(tree, cwd, Path(config).parent)
        cfgs, outputs = [cfg], [cfg.output_dir]
    for cfg in cfgs:
        if cfg.reward.function and cfg.reward.code_dir:
            modules.append((Path(cfg.reward.code_dir), cfg.reward.function.partition(":")[0]))
    for code_dir, module in modules:
        stage_module(str(code_dir), module, into=str(out))
    name = "pipeline.yaml" if is_pipeline(config) else "config.yaml"
    (out / name).write_text(yaml.safe_dump(tree, sort_keys=False))
    return out, name, outputs


def _absolute_tree_flat(overrides: dict, base: Path) -> dict:
    """Pipeline stage overrides (dotted keys) with path values made absolute."""
    paths = set(PATH_FIELDS)
    return {k: (absolute_path(v, base) if k in paths and isinstance(v, str) and "${" not in v else v)
            for k, v in overrides.items()}


# ----------------------------------------------------------------------------- commands


def submit(config: str, overrides: list[str], address: str | None, *, follow: bool = False, job_id: str | None = None,
           timeout_s: float = 30.0, overwrite: bool = False, out=print) -> int:
    """Validate here, then submit ``rlhf-cluster train`` (``--overwrite`` passed on); an output_dir that holds a
    previous run and is visible from here is refused before anything is sent, as the job itself would."""
    from rlhf_cluster.drivers.common import check_output_dir

    c, url = client(address, timeout_s)
    folder, name, outputs = stage_job(config, overrides)
    try:
        if not overwrite:
            for o in outputs:
                check_output_dir(o, can_resume=False)
        entrypoint = f"rlhf-cluster train {name} --address auto" + (" --overwrite" if overwrite else "")
        kwargs = {"submission_id": job_id} if job_id else {}
        jid = _call(c.submit_job, url, entrypoint=entrypoint, runtime_env={"working_dir": str(folder)}, **kwargs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out(f"submitted {jid}")
    for o in outputs:
        out(f"  output_dir: {o}")
    out(f"  follow: rlhf-cluster logs {jid} --follow --address {url}")
    if not follow:
        return 0
    return logs(jid, address, follow=True, timeout_s=timeout_s, out=out)


def status(job_id: str, address: str | None, timeout_s: float = 30.0, out=print) -> int:
    c, url = client(address, timeout_s)
    info = _call(c.get_job_info, url, job_id)
    out(f"{job_id}: {info.status}" + (f" — {info.message}" if info.message else ""))
    return 0


def logs(job_id: str, address: str | None, *, follow: bool = False, timeout_s: float = 30.0, out=print) -> int:
    """Print the job's output; with ``follow`` until it ends (exit code 0 only if it SUCCEEDED)."""
    c, url = client(address, timeout_s)
    if not follow:
        sys.stdout.write(_call(c.get_job_logs, url, job_id))
        return 0
    _call(c.get_job_status, url, job_id)  # a clear error for an unknown job before tailing

    shown = 0

    async def tail() -> None:
        nonlocal shown
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            shown += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as e:
        out(f"(log stream ended: {type(e).__name__}; waiting for the job to finish)")
    info = _wait(c, url, job_id, timeout_s=None)
    time.sleep(1.0)  # the driver's last lines (its error) can reach the log after the stream closed
    rest = _call(c.get_job_logs, url, job_id)[shown:]
    if rest:
        sys.stdout.write(rest)
    out(f"\njob {job_id} {info.status}" + (f": {info.message.splitlines()[0]}" if info.message and str(info.status) != "SUCCEEDED" else ""))
    return 0 if str(info.status) == "SUCCEEDED" else 1


def _wait(c, url: str, job_id: str, timeout_s: float | None):
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        info = _call(c.get_job_info, url, job_id)
        if str(info.status) in TERMINAL or (deadline is not None and time.time() > deadline):
            return info
        time.sleep(1.0)


def stop(job_id: str, address: str | None, timeout_s: float = 30.0, wait_s: float = 120.0, out=print) -> int:
    """Ask the job to stop and wait until it has (its driver gone, so are its actors)."""
    c, url = client(address, timeout_s)
    _call(c.stop_job, url, job_id)
    info = _wait(c, url, job_id, wait_s)
    out(f"{job_id}: {info.status}")
    return 0 if str(info.status) in TERMINAL else 1


def list_jobs(address: str | None, timeout_s: float = 30.0, out=print) -> int:
    c, url = client(address, timeout_s)
    jobs = [j for j in _call(c.list_jobs, url) if j.submission_id]
    if not jobs:
        out("no jobs")
        return 0
    out(f"{'job':32s} {'status':10s} {'started':20s} entrypoint")
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        out(f"{j.submission_id:32s} {str(j.status):10s} {started:20s} {j.entrypoint[:80]}")
    return 0

