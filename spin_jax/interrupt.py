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
cleanup, no thread tracebacks; what was written atomically before stays valid, and a lock file
left behind is taken over by the rerun (a stale lock of this host). Further SIGTERMs are
ignored (the first one is being honoured). Leaving the guard restores the previous handlers.
Signal handlers can only be set from the main thread: elsewhere the guard does nothing
(``requested`` stays False).

Exit status: ``EXIT_INTERRUPTED = 75`` (EX_TEMPFAIL of sysexits.h, "try again later"). A job
script can requeue on it, e.g. in SLURM ``python launch/train.py ... || [ $? -eq 75 ] &&
scontrol requeue $SLURM_JOB_ID``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: interrupted, rerun the same command to resume


class Guard:
    """Turns SIGTERM / SIGINT into a flag while active (module doc)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), *,
                 announce: bool = True):  # fmt: skip
        self.signals = tuple(signals)
        self.announce = announce
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self.active = False

    def _handle(self, signum: int, frame) -> None:
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
            return
        if signum == signal.SIGINT:
            print(f"received {name} again: stopping now", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)

    def __enter__(self) -> Guard:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal works only in the main thread
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        self.active = False


def exit_interrupted(message: str) -> None:
    """Prints ``message`` (one line, on stderr) and exits with EXIT_INTERRUPTED."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
