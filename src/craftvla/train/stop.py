"""When a run stops early: SIGINT / SIGTERM (Ctrl-C, a scheduler's pre-emption) and --max_minutes.

The first signal asks the loop to stop after the step in progress; the loop then writes a checkpoint
of that step and the plots, as at a normal end, and `craftvla train` says how to resume. A second
Ctrl-C stops at once, without them (an interrupted save leaves the previous checkpoint intact: saves
are atomic). Every rank stops at the same step: the decision is reduced across processes at the
logging interval.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Optional

import torch

log = logging.getLogger("craftvla.train")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The exit status of a process stopped by a signal, as shells report it (128 + signal number).
EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


class StopSignals:
    """A context manager that turns SIGINT / SIGTERM into a request (`received`: the signal's name)."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signal.Signals(signum).name
        log.warning(
            "%s: stopping after this step; a checkpoint and the plots are written first "
            "(Ctrl-C again to stop at once, without them)",
            self.received,
        )


def stop_reason(
    accelerator, t0: float, max_minutes: Optional[float], signals: StopSignals, step: int, every: int
) -> Optional[str]:
    """Why the run stops after this step ("SIGINT", "SIGTERM", "max_minutes"), or None; the same
    answer on every rank (a signal or the clock on any rank stops them all). With several processes
    that takes an all-reduce and a host sync, so they decide only every `every` steps (the logging
    interval, where the metrics reduction syncs anyway); a single process decides every step."""
    if accelerator.num_processes > 1 and step % every:
        return None
    late = max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes
    signalled = {"SIGINT": 1.0, "SIGTERM": 2.0}.get(signals.received or "", 0.0)
    if accelerator.num_processes > 1:
        flags = torch.tensor([signalled, float(late)], device=accelerator.device)
        signalled, late = accelerator.reduce(flags, reduction="max").tolist()
    if signalled:
        return "SIGTERM" if signalled == 2.0 else "SIGINT"
    return "max_minutes" if late else None
