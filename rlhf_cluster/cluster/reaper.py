"""Nothing of an embedded Ray outlives its driver, however the driver ends.

A driver that starts its own Ray (``cluster.address`` null) owns the GCS, the raylet and
their helpers. On a normal exit or a signal Ray stops them, and when the driver is killed
outright (``kill -9``, the OOM killer) the GCS, raylet and actors follow it, but the
raylet's two agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) are left running
for good. This watcher, a small process in a session of its own, notes every Ray process
descended from the driver while it runs and, once the driver is gone (its end of a pipe
closes, however it died), stops those still alive: SIGTERM, then SIGKILL after a grace.
Processes are matched by PID and start time, so a reused PID is never touched.

Run as ``python -m rlhf_cluster.cluster.reaper DRIVER_PID``; :func:`watch` starts it.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

POLL_S = 2.0  # how often the Ray processes are noted (a process started and killed in between is Ray's to stop)
GRACE_S = 3.0

_watcher: subprocess.Popen | None = None


def watch() -> None:
    """Start the watcher for this process (once); it lives until this process ends."""
    global _watcher
    if _watcher is not None and _watcher.poll() is None:
        return
    # stdin is the pipe whose closing says the driver is gone; a session of its own keeps the terminal's
    # Ctrl-C (sent to the driver's whole process group) from stopping it first.
    _watcher = subprocess.Popen([sys.executable, "-m", "rlhf_cluster.cluster.reaper", str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)


def exit_now(code: int) -> None:
    """Leave the process at once when its embedded Ray is watched, leaving Ray's stop to the watcher: a normal exit
    waits ~4 s for Ray's own shutdown, after the run's results are already out. Returns (doing nothing) otherwise."""
    if _watcher is None or _watcher.poll() is not None or _watcher.stdin is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        _watcher.stdin.write(b"s")  # note Ray's processes once more, now
        _watcher.stdin.flush()
    except OSError:
        return
    time.sleep(POLL_S / 4)
    os._exit(code)


def ray_descendants(pid: int) -> dict[int, float]:
    """PID → start time of every descendant of ``pid`` that belongs to Ray (its name or command line says so)."""
    import psutil

    found = {}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return found
    for p in children:
        try:
            name = " ".join(p.cmdline()) or p.name()
            if p.pid != os.getpid() and ("ray::" in name or "/ray/" in name):
                found[p.pid] = p.create_time()
        except psutil.Error:
            continue
    return found


def stop(known: dict[int, float], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM the processes of ``known`` still alive (same PID and start time), SIGKILL any left after
    ``grace_s``; returns the PIDs that were still running."""
    import psutil

    alive = []
    for pid, started in known.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3:
                alive.append(p)
        except psutil.Error:
            continue
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in alive]


def main(driver_pid: int) -> None:
    known: dict[int, float] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver is gone
        known.update(ray_descendants(driver_pid))
    time.sleep(1.0)  # a driver exiting normally is stopping Ray itself; give it a moment
    stop(known)


if __name__ == "__main__":
    main(int(sys.argv[1]))
