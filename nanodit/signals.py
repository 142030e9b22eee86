"""Stopping on a signal: SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends) end a run cleanly.

    with GracefulStop() as stop:
        ...                         # start-up: a signal here aborts at once (there is nothing to save yet)
        stop.arm()                  # the loop begins: from now on a signal only asks to stop
        while ...:
            step()
            if stop.requested:      # the step finished: save, then raise Interrupted (exit 128 + signum)

The first signal during the loop sets a flag: the current step finishes, a checkpoint is written and the run
exits with 130 (SIGINT) or 143 (SIGTERM), printing one line that says where the checkpoint is. A second signal
aborts at once (``os._exit``, nothing more is written; the last checkpoint stays intact because every write
is a temp file + rename). DataLoader workers inherit the handler across fork; there it does nothing, so that
only the main process decides when the run stops and shuts the workers down in order.

Under torchrun (``grace_s`` > 0) a second signal within ``grace_s`` seconds of the first is the same request: a
Ctrl-C reaches every worker from the terminal and again from torchrun, which forwards it (and SIGKILLs workers
that are not done 30 s later); the ranks agree on the step to stop after (nanodit/distributed.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal; ``exit_code`` is 128 + the signal number, the message one line."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class GracefulStop:
    """Installs the SIGINT/SIGTERM handlers for its ``with`` block (main thread only; elsewhere a no-op)."""

    def __init__(self, grace_s: float = 0.0):
        self.signum: int | None = None
        self.grace_s, self._first_at = grace_s, 0.0
        self.armed = False
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def arm(self) -> None:
        """Training has begun: a signal now asks for a stop after the current step."""
        self.armed = True

    @property
    def requested(self) -> int | None:
        """The signal number that asked to stop, or None."""
        return self.signum

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process stops the run and the workers
        name = signal_name(signum)
        if self.signum is not None and time.monotonic() - self._first_at < self.grace_s:
            return  # the same request again (a launcher forwarding it)
        if self.signum is not None:
            # os.write, not print: a handler may run in the middle of another print (reentrant buffer)
            os.write(2, f"\n{name} again: aborted at once; the last checkpoint is intact\n".encode())
            os._exit(128 + signum)
        self.signum, self._first_at = signum, time.monotonic()
        if not self.armed:
            raise Interrupted(signum, f"interrupted by {name} before the first step: nothing to save")
        again = "Ctrl-C" if signum == signal.SIGINT else name
        os.write(
            2,
            f"\n{name}: stopping after this step and writing a checkpoint ({again} again aborts at once)\n".encode(),
        )
