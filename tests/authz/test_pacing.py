"""A paced reload thread pauses in its long loops; nothing else ever does."""

from __future__ import annotations

import threading
import time

from authz.pacing import breathe, paced


def _time_breaths(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        breathe()
    return time.perf_counter() - t0


def test_breathe_pauses_only_inside_paced_and_only_in_that_thread() -> None:
    assert _time_breaths(1000) < 0.05  # unpaced: a no-op
    other: list[float] = []
    with paced(0.0, 0.01):  # every breath is due: each pauses 10 ms
        assert _time_breaths(5) >= 0.05
        t = threading.Thread(target=lambda: other.append(_time_breaths(1000)))
        t.start()
        t.join()
    assert other[0] < 0.05  # another thread is not paced
    assert _time_breaths(1000) < 0.05  # and pacing ends with the block


def test_breathe_pauses_once_per_work_slice_and_nests() -> None:
    with paced(10.0, 0.5):  # a 10 s work slice never runs out here
        assert _time_breaths(1000) < 0.05
        with paced(None, 0.5):  # None: the thread's pacing is left as it is
            assert _time_breaths(1000) < 0.05
        with paced(0.0, 0.01):
            assert _time_breaths(3) >= 0.03
        assert _time_breaths(1000) < 0.05
