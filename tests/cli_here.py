"""`rlhf-cluster ARGS` run in the test's own process: what the console script runs, less the start-up of a fresh
interpreter (2-5 s of imports each) and its exit. For the tests of what a command says and returns; the tiers that
check a real process (the e2e runs, the cluster jobs) start one."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Runs in ``cwd`` (the repo root by default) and returns what a subprocess run would: the exit status, stdout,
    stderr. The signal handlers a training command installs are put back afterwards."""
    from rlhf_cluster.cli import main
    from rlhf_cluster.stopping import STOP

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        os.chdir(here)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        STOP.installed, STOP.signum = False, None
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
