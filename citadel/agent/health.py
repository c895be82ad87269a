"""The admin port: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/status`` (JSON).

- ``/readyz`` is 200 only while the agent holds a certificate that has not expired: a pod
  must not receive traffic it cannot authenticate.
- ``/healthz`` is 503 "at-risk" once a renewal is overdue (past 80 % of the lifetime by
  default) or the certificate expired, so a stuck agent is visible — and restartable — well
  before its workload loses its identity. While the first certificate is being fetched it
  is 200: starting is not failing.

A deliberately tiny HTTP/1.1 server (one request per connection, bounded request head):
three fixed GET routes do not justify a web framework in every pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

__all__ = ["parse_listen", "start_admin_server"]

_MAX_HEAD = 8192


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _reply(status: int, body: dict[str, Any]) -> bytes:
    text = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
    payload = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status} {text.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + payload


def route(path: str, health: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    if path == "/readyz":
        ok = bool(health["ready"])
        return (200 if ok else 503), {"status": "ready" if ok else "not-ready", **health}
    if path == "/healthz":
        ok = not health["at_risk"]
        return (200 if ok else 503), {"status": "ok" if ok else "at-risk", **health}
    if path == "/status":
        return 200, health
    return 404, {"error": "not found", "paths": ["/healthz", "/readyz", "/status"]}


async def start_admin_server(
    health: Callable[[], dict[str, Any]], *, host: str, port: int
) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3:
                writer.write(_reply(404, {"error": "malformed request"}))
            elif parts[0] != "GET":
                writer.write(_reply(405, {"error": "use GET"}))
            else:
                status, body = route(parts[1].split("?", 1)[0], health())
                writer.write(_reply(status, body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=_MAX_HEAD)
