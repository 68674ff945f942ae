"""The watcher that stops an embedded Ray's processes after its driver died: only the very processes it noted."""

import subprocess

import psutil

from rlhf_cluster.cluster.reaper import stop


def test_a_noted_process_is_stopped_and_a_reused_pid_is_left_alone():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(proc.pid).create_time()
        assert stop({proc.pid: started - 5.0}, grace_s=1) == []  # same PID, another start time: not ours
        assert proc.poll() is None
        assert stop({proc.pid: started}, grace_s=1) == [proc.pid]
        proc.wait(5)  # gone (psutil reaped it, so its status is not ours to read)
    finally:
        proc.kill()
