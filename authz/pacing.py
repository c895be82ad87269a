"""Let a reload give way to the event loop deciding Checks, without preempting the loop.

A reload runs in a thread of the serving process and shares the GIL with the event loop.
CPython hands the GIL over only when a waiting thread has waited a whole switch interval
(5 ms), and shortening the interval preempts the loop as often as the reload, which made
Check p99 worse. Instead the reload thread itself pauses: the long loops of a reload call
``breathe()``, and in a thread that runs under ``paced()`` that sleeps for ``rest_s``
once ``work_s`` of work has passed since the last pause, so a waiting event loop gets the
GIL within about ``work_s``. Anywhere else ``breathe()`` does nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["breathe", "paced"]

_local = threading.local()


def breathe() -> None:
    """Pause if this thread is paced and has worked ``work_s`` since its last pause."""
    pace = getattr(_local, "pace", None)
    if pace is not None:
        pace()


@contextlib.contextmanager
def paced(work_s: float | None, rest_s: float) -> Iterator[None]:
    """Pace ``breathe()`` calls in this thread (``work_s`` None: leave it as it is)."""
    if work_s is None:
        yield
        return
    clock, sleep = time.perf_counter, time.sleep
    due = clock() + work_s

    def pace() -> None:
        nonlocal due
        if clock() >= due:
            sleep(rest_s)
            due = clock() + work_s

    outer = getattr(_local, "pace", None)
    _local.pace = pace
    try:
        yield
    finally:
        _local.pace = outer
