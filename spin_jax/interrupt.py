"""Graceful preemption and Ctrl-C: stop between units of work, keep what is finished.

    from spin_jax import interrupt

    with interrupt.Guard() as guard:
        for batch in work:
            if guard.requested:
                break                 # the unit in flight is finished, nothing is half written
            do(batch)
    if guard.requested:
        interrupt.exit_interrupted(f"interrupted; {done} of {total} images done; "
                                   "rerun the same command to resume")

Inside the guard, the first SIGTERM (what SLURM and Kubernetes send before they preempt a job)
or SIGINT (Ctrl-C) only sets ``guard.requested`` (and ``guard.signal_name``), and says so in
one line on stderr; the caller checks the flag between units of work (steps, batches, shards)
and stops cleanly. A second SIGINT exits at once with ``os._exit(EXIT_INTERRUPTED)``: no
cleanup but the release of this process's ``runlock`` locks, no thread tracebacks; what was
written atomically before stays valid. Further SIGTERMs are ignored (the first one is being
honoured). Leaving the guard restores the previous handlers. Signal handlers can only be set
from the main thread: elsewhere the guard does nothing (``requested`` stays False).

Grace period: ``Guard(grace_seconds=N)`` (or ``guard.grace_seconds = N`` before the signal) ends
the process on its own N seconds after the first signal if the caller has not stopped by then,
so that a scheduler's SIGKILL (SLURM's KillWait and Kubernetes' terminationGracePeriodSeconds
are 30 s by default) never comes first: one line on stderr (``guard.describe()``, set by the
caller, says what was cut short and what is intact; a generic line otherwise), then the same
exit as a second SIGINT. Only what was written atomically (to a temporary name, then renamed,
as orbax's checkpoints) survives as finished, so a rerun never trusts a half-written file. The
clock starts when the signal arrives, not when Python runs the handler (which waits for a long
native call, such as a train step, to return): a thread reads each signal from
``signal.set_wakeup_fd``. That thread is also what handles a second SIGINT, so it stops at once
even during such a call. 0 = no limit (the default).

Exit status: ``EXIT_INTERRUPTED = 75`` (EX_TEMPFAIL of sysexits.h, "try again later"). A job
script can requeue on it, e.g. in SLURM ``python launch/train.py ... || [ $? -eq 75 ] &&
scontrol requeue $SLURM_JOB_ID``.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: interrupted, rerun the same command to resume


class Guard:
    """Turns SIGTERM / SIGINT into a flag while active (module doc)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), *,
                 announce: bool = True, grace_seconds: float = 0.0):  # fmt: skip
        self.signals = tuple(signals)
        self.announce = announce
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self.active = False
        self.grace_seconds = float(grace_seconds)  # read when the first signal arrives
        # The line printed when the grace period runs out (called from the watcher thread).
        self.describe: Callable[[], str] | None = None
        self.deadline: float | None = None  # time.monotonic() of the forced exit, once armed
        self._watcher: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1
        self._closed = threading.Event()

    def _handle(self, signum: int, frame) -> None:
        # Later signals: the watcher thread handles a second SIGINT; further SIGTERMs are ignored.
        del frame
        name = signal.Signals(signum).name
        if not self.requested:
            self.requested = True
            self.signal_name = name
            if self.announce:
                again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
                print(
                    f"received {name}: stopping after the work in progress{again}",
                    file=sys.stderr,
                    flush=True,
                )

    def remaining(self) -> float:
        """Seconds left before the forced exit (inf before a signal, or without a limit)."""
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def _watch(self, fd: int) -> None:
        """Sees each signal as it arrives (a byte per signal from the wakeup fd): arms the
        grace period on the first, exits on a second SIGINT, and exits when time runs out."""
        sigints = 0
        while not self._closed.is_set():
            timeout = None if self.deadline is None else max(0.0, self.remaining())
            ready, _, _ = select.select([fd], [], [], timeout)
            if self._closed.is_set():
                return
            if not ready:  # the grace period ran out
                line = (
                    f"grace period of {self.grace_seconds:g} s ran out before the work in "
                    "progress finished; what was finished is kept; rerun the same command to "
                    "resume"
                )
                try:
                    line = self.describe() if self.describe is not None else line
                except Exception:  # the exit must happen even if the caller's line fails
                    pass
                _exit_now(f"\n{line}")  # on a line of its own: a progress bar may hold one
            for signum in os.read(fd, 512):
                if signum not in self.signals:
                    continue
                if self.deadline is None and self.grace_seconds > 0:
                    self.deadline = time.monotonic() + self.grace_seconds
                sigints += signum == signal.SIGINT
                if sigints > 1:
                    _exit_now("received SIGINT again: stopping now")

    def __enter__(self) -> Guard:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal works only in the main thread
        r, w = os.pipe()
        os.set_blocking(w, False)  # set_wakeup_fd needs a non-blocking fd
        self._pipe = (r, w)
        self._previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._closed.clear()
        self._watcher = threading.Thread(target=self._watch, args=(r,), daemon=True,
                                         name="interrupt-guard")  # fmt: skip
        self._watcher.start()
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        signal.set_wakeup_fd(self._previous_fd)
        self._closed.set()
        r, w = self._pipe
        os.write(w, b"\0")  # wake the watcher (0 is no signal number)
        self._watcher.join()
        os.close(r)
        os.close(w)
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        self.active = False
        self.deadline = None


def _exit_now(line: str) -> None:
    """Prints ``line`` and exits at once (no atexit, no joining of threads), releasing this
    process's locks first so that the rerun finds its folder free."""
    from spin_jax import runlock

    print(line, file=sys.stderr, flush=True)
    runlock.release_all()
    os._exit(EXIT_INTERRUPTED)


def exit_interrupted(message: str) -> None:
    """Prints ``message`` (one line, on stderr) and exits with EXIT_INTERRUPTED."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
