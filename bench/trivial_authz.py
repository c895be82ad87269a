"""The baseline: an always-OK ext_authz Check servicer on grpc.aio, nothing else.

It is wired the way citadel's decision service is (grpc.aio server, the generated
``xds-protos`` servicer, request parsed into a ``CheckRequest``, an ``OkHttpResponse``
carrying one header), so the difference between the two in one bench run is the cost of
citadel's own work: request mapping, the decision, the audit record, metrics.

Run it in its own process so it does not share a GIL with the load generator::

    python bench/trivial_authz.py --listen 127.0.0.1:9191 [--event-loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

__all__ = ["TrivialAuthorization", "serve"]

_OK = status_pb2.Status(code=0)


class TrivialAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    """Allows everything; the cheapest Check a Python gRPC server can answer."""

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        response = external_auth_pb2.CheckResponse(status=_OK)
        header = response.ok_response.headers.add()
        header.header.key = "x-citadel-decision-id"
        header.header.value = "trivial"
        return response


async def serve(listen: str, *, ready: asyncio.Event | None = None, gc_freeze: bool = True) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(TrivialAuthorization(), server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    if gc_freeze:
        # citadel does this at start-up (its default): what start-up built (grpc,
        # protobuf) lives as long as the process, so full collections need not re-scan
        # it. Without it the baseline's own collector pauses dominate its p99.
        gc.collect()
        gc.freeze()
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(f"trivial ext_authz listening on {listen}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:9191")
    parser.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="asyncio: what a plain grpc.aio server runs on; uvloop: the loop citadel "
        "serves on by default, for a like-for-like baseline",
    )
    parser.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="freeze start-up objects out of the cyclic collector, as citadel does",
    )
    args = parser.parse_args(argv)
    if args.event_loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.listen, gc_freeze=args.gc_freeze))
    else:
        asyncio.run(serve(args.listen, gc_freeze=args.gc_freeze))


if __name__ == "__main__":
    main()
