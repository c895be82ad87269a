"""Keep a bench's load generator off the cores of the server it measures (Linux).

On a small machine a Python load generator costs about as much CPU per request as the
server under test, and when both float over the same cores the server's tail latency is
mostly the client stealing its core at the wrong moment. A real client sits on another
machine. Pinning the server process(es) to one set of cores and the client process(es) to
the others emulates that on one host; it is only fair when the baseline and the server
under test get the same split in the same run, and when the result says which cores
each side had (``describe()``).

``sched_setaffinity`` on a pid sets *one thread's* mask, so ``pin()`` sets every thread
of the process (threads and processes started afterwards inherit the mask of their
creator). To pin a process before it starts any thread, use ``preexec(cores)`` as
``subprocess.Popen(preexec_fn=...)`` or call ``pin_self(cores)`` first thing in a child.

API::

    split = split_cores()            # (server_cores, client_cores), or None: cannot pin
    if split:
        pin(server_pid, split[0])    # every thread of that process
        pin_self(split[1])           # this process (all its threads)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

__all__ = [
    "PIN_MODES",
    "affinity",
    "can_pin",
    "describe",
    "pin",
    "pin_self",
    "preexec",
    "split_cores",
]

#: ``--pin`` choices: ``auto`` pins when the machine allows it, ``off`` never pins.
PIN_MODES = ("auto", "off")


def can_pin() -> bool:
    """Whether this platform can set CPU affinity (Linux ``sched_setaffinity``)."""
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def split_cores(
    mode: str = "auto", *, available: Iterable[int] | None = None
) -> tuple[frozenset[int], frozenset[int]] | None:
    """(server cores, client cores) from the cores this process may use, or None.

    None when ``mode`` is ``off``, the platform cannot pin, or fewer than two cores are
    usable (then both sides must share, and the caller runs unpinned). The server gets
    the lower half (rounded down, at least one core), the client the rest: a Python
    client costs about what the server does per request, so it never gets fewer cores.
    On two cores: server {0}, client {1}.
    """
    if mode not in PIN_MODES:
        raise ValueError(f"pin mode must be one of {PIN_MODES}, not {mode!r}")
    if mode == "off" or (available is None and not can_pin()):
        return None
    cores = sorted(available if available is not None else os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    half = max(1, len(cores) // 2)
    return frozenset(cores[:half]), frozenset(cores[half:])


def _tids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def pin(pid: int, cores: Iterable[int]) -> None:
    """Pin every thread of process ``pid`` (0: this process) to ``cores``.

    Raises ProcessLookupError when the process is gone; threads that exit while being
    pinned are skipped. Child processes are not followed: start them after pinning (they
    inherit the mask) or pin each one.
    """
    mask = set(cores)
    if not mask:
        raise ValueError("cannot pin to an empty set of cores")
    pid = pid or os.getpid()
    os.sched_setaffinity(pid, mask)  # the main thread: raises if the process is gone
    for tid in _tids(pid):
        if tid != pid:
            with contextlib.suppress(ProcessLookupError):  # that thread exited meanwhile
                os.sched_setaffinity(tid, mask)


def pin_self(cores: Iterable[int]) -> None:
    """Pin this process (every thread it has now; later ones inherit)."""
    pin(0, cores)


def affinity(pid: int = 0) -> list[int]:
    """The cores process ``pid`` (its main thread; 0: this process) may run on, sorted."""
    return sorted(os.sched_getaffinity(pid))


def preexec(cores: Iterable[int] | None) -> Callable[[], None] | None:
    """A ``Popen(preexec_fn=...)`` that pins the child before it runs anything, or None.

    Only a system call runs between fork and exec (no locks taken), so this is safe even
    from a parent that has threads.
    """
    if cores is None:
        return None
    mask = frozenset(cores)

    def _pin() -> None:
        os.sched_setaffinity(0, mask)

    return _pin


def describe(split: tuple[frozenset[int], frozenset[int]] | None) -> dict[str, object]:
    """What a bench's JSON says about pinning: mode and each side's cores."""
    if split is None:
        return {"pinned": False, "server_cores": None, "client_cores": None}
    return {"pinned": True, "server_cores": sorted(split[0]), "client_cores": sorted(split[1])}
