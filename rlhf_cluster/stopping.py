"""Stopping on a signal: the first SIGTERM/SIGINT asks the loop to stop after its step (checkpoint first),
a second stops at once.

Ray's ``ray.init`` installs its own fatal-signal handler in the driver, which turns SIGTERM into a crash
dump; :func:`reinstall` puts ours back afterwards (``connect`` calls it).
"""

from __future__ import annotations

from pathlib import Path


class Terminated(KeyboardInterrupt):
    """The run stopped on SIGTERM or SIGINT (``signum``); ``checkpoint`` is where it can be resumed from."""

    def __init__(self, signum: int, checkpoint: Path | None = None, step: int | None = None):
        super().__init__(signum)
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


class StopFlag:
    """Set by the first SIGTERM/SIGINT: the loop finishes its step, saves a checkpoint and stops. A second
    signal stops at once (``Terminated`` raised wherever the driver is)."""

    def __init__(self):
        self.signum: int | None = None
        self.installed = False
        self.log = print
        self.checkpoint = True  # write one before stopping

    def install(self, log=print) -> None:
        import signal

        def handler(signum, frame):
            if self.signum is not None:
                raise Terminated(signum)
            self.signum = signum
            name = signal.Signals(signum).name
            log(f"\n{name}: stopping after the current step (a checkpoint is written first); {name} again stops now")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        self.installed, self.log = True, log


STOP = StopFlag()


def reinstall() -> None:
    """Put the stop handler back if it was installed (after something, like ``ray.init``, replaced it)."""
    if STOP.installed:
        STOP.install(STOP.log)
