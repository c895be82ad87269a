"""The pinning helper: real child processes, affinity read back from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

import cores

needs_affinity = pytest.mark.skipif(not cores.can_pin(), reason="no sched_setaffinity here")

# A child with two extra threads alive, so pin() must reach more than the main thread.
_THREADED_CHILD = """
import sys, threading
stop = threading.Event()
for _ in range(2):
    threading.Thread(target=stop.wait, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
"""


def _thread_masks(pid: int) -> dict[int, set[int]]:
    return {int(t): os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize(
    ("available", "server", "client"),
    [
        ([0, 1], {0}, {1}),
        ([0, 1, 2], {0}, {1, 2}),
        ([0, 1, 2, 3], {0, 1}, {2, 3}),
        ([5, 2], {2}, {5}),
    ],
    ids=["two-cores", "odd-count-client-gets-more", "four-cores", "unsorted-mask"],
)
def test_split_gives_server_the_lower_half(available, server, client) -> None:
    assert cores.split_cores("auto", available=available) == (server, client)


@pytest.mark.parametrize(
    ("mode", "available"),
    [("off", [0, 1]), ("auto", [0]), ("auto", [])],
    ids=["pinning-off", "one-core", "no-cores"],
)
def test_no_split_when_sides_cannot_be_separated(mode, available) -> None:
    assert cores.split_cores(mode, available=available) is None
    assert cores.describe(None) == {"pinned": False, "server_cores": None, "client_cores": None}


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="pin mode"):
        cores.split_cores("always", available=[0, 1])


@needs_affinity
def test_pin_reaches_every_thread_of_a_running_child() -> None:
    target = {max(os.sched_getaffinity(0))}
    child = subprocess.Popen(
        [sys.executable, "-c", _THREADED_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        masks = _thread_masks(child.pid)
        assert len(masks) >= 3
        cores.pin(child.pid, target)
        assert _thread_masks(child.pid) == dict.fromkeys(masks, target)
        assert cores.affinity(child.pid) == sorted(target)
    finally:
        child.communicate("\n", timeout=10)
    with pytest.raises(ProcessLookupError):
        cores.pin(child.pid, target)


@needs_affinity
def test_preexec_pins_the_child_before_it_runs() -> None:
    target = {min(os.sched_getaffinity(0))}
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        preexec_fn=cores.preexec(target),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(sorted(target))
    assert cores.preexec(None) is None


@needs_affinity
def test_pin_refuses_an_empty_mask() -> None:
    with pytest.raises(ValueError, match="empty"):
        cores.pin(os.getpid(), [])
