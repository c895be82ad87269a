"""Which asyncio event loop the servers run on.

grpc.aio drives its calls through the asyncio loop, and on the Check path the loop's own
bookkeeping (handles, futures, the self-pipe wake-ups from grpc's poller thread) costs as
much as citadel's decision. uvloop (libuv, Cython) does that bookkeeping in C: on the
bench machine one Check costs ~15-25% less server CPU with it (``bench/check_service.py``
measures both loops in one run). gRPC supports any asyncio loop; uvloop is declared as a
dependency where it builds (Linux, macOS).

``auto`` (the default) takes uvloop when it imports and the standard loop otherwise;
``asyncio`` forces the standard loop (a fallback if a platform's uvloop misbehaves);
``uvloop`` insists and refuses to start without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from citadel.errors import ConfigError

__all__ = ["EVENT_LOOPS", "loop_factory", "run", "running_loop_name", "stop_signals"]

EVENT_LOOPS = ("auto", "uvloop", "asyncio")
T = TypeVar("T")


def loop_factory(event_loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``asyncio.Runner``; None means the standard loop."""
    if event_loop not in EVENT_LOOPS:
        raise ConfigError(f"event loop {event_loop!r} is not one of {', '.join(EVENT_LOOPS)}")
    if event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if event_loop == "uvloop":
            raise ConfigError(
                "event loop 'uvloop' asked for, but uvloop is not installed"
            ) from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, event_loop: str = "auto") -> T:
    """``asyncio.run`` on the chosen loop."""
    try:
        factory = loop_factory(event_loop)
    except ConfigError:
        main.close()  # never awaited: say so quietly rather than warn
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: which loop this coroutine runs on (for start-up logs)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


@contextlib.asynccontextmanager
async def stop_signals(
    stop: asyncio.Event | None = None, *, optional: bool = False
) -> AsyncIterator[asyncio.Event]:
    """An event set by SIGTERM or SIGINT while the block runs; the handlers go on exit.

    Every long-running command waits on one of these, then drains: what runs inside the
    block still has SIGTERM/SIGINT absorbed, what runs after it gets the default handling
    again. ``optional``: a loop without signal support (NotImplementedError) is tolerated
    and the event is then only set by its owner.
    """
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:
            if not optional:
                raise
            continue
        installed.append(sig)
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
