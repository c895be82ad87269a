"""The ext_authz ``Authorization/Check`` servicer: thin, the pipeline injected.

It only reads the wire: the peer principal Envoy set from the mTLS handshake (never a
header: headers are whatever the caller chose to send), host, method and raw path, and
the three allow-listed headers that let a decision be found from a trace. Everything else
is the shared ``DecisionPipeline``. Requests are decoded by ``decode_check_request``
instead of grpc's default deserializer so a malformed message (e.g. invalid UTF-8 in a
string field) becomes an audited 400 denial rather than an anonymous INTERNAL error, and
``Check`` returns serialized bytes (an allow is a cached template plus the decision id).

Deadlines: a Check whose gRPC deadline has passed, or leaves less than ``min_deadline_s``,
is not evaluated: the caller has given up (Envoy's default ext_authz timeout is 200 ms and
it denies on timeout), so deciding it only delays the requests queued behind it. It is
denied (``DEADLINE_EXCEEDED`` in the CheckResponse, HTTP 503) and audited with code
``deadline_exceeded``. Under overload this is what keeps the queue from growing without
bound: work that queued too long is dropped at the cost of one audit record, not a
decision. Every refusal is a CheckResponse rather than a gRPC error so Envoy denies even
with ``failure_mode_allow: true``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from authz.decisions import DecisionPipeline, Outcome
from authz.request import Refused, trace_id_from

__all__ = [
    "DEADLINE_HTTP_STATUS",
    "DECISION_HEADER",
    "SERVICE_NAME",
    "AuthorizationServicer",
    "Undecodable",
    "add_to_server",
    "decode_check_request",
]

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
DECISION_HEADER = "x-citadel-decision-id"
_TRACE_HEADERS = ("x-request-id", "traceparent", "x-b3-traceid")
_OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
DEADLINE_HTTP_STATUS = 503
#: Default floor: a Check with less time left than this cannot be answered usefully.
MIN_DEADLINE_S = 0.001
# The CheckResponse status of denials that are not policy decisions.
_RPC_CODES = {
    "deadline_exceeded": code_pb2.DEADLINE_EXCEEDED,
    "overloaded": code_pb2.RESOURCE_EXHAUSTED,
}
_CheckRequest = external_auth_pb2.CheckRequest
_CheckResponse = external_auth_pb2.CheckResponse


class Undecodable:
    """Stands in for a CheckRequest whose bytes did not parse."""

    __slots__ = ("error", "size")

    def __init__(self, size: int, error: str) -> None:
        self.size = size
        self.error = error


def decode_check_request(data: bytes) -> _CheckRequest | Undecodable:
    try:
        return _CheckRequest.FromString(data)
    except (DecodeError, ValueError) as exc:
        return Undecodable(len(data), str(exc)[:200])


class _Templates:
    """Serialized responses that differ only in their decision id, built once per shape.

    Building and serializing a CheckResponse costs more than the decision itself on the
    hot path (~12 µs for a denial), yet an answer differs from the next of its kind only
    in its decision id, and ids of one length give identical framing. So each shape (its
    key: everything but the id) is built once with a sentinel id and kept as the bytes
    around the id's places; an answer is those parts joined with the id. A template is
    trusted only if rebuilding with a second sentinel reproduces the direct build
    byte-for-byte; otherwise (and past ``limit`` shapes, e.g. reasons carrying numbers)
    the response is built directly.
    """

    def __init__(self, limit: int = 256) -> None:
        self._parts: dict[tuple[Any, int], tuple[bytes, ...] | None] = {}
        self._limit = limit

    def render(self, key: Any, decision_id: str, build: Callable[[Any, str], bytes]) -> bytes:
        n = len(decision_id)
        parts = self._parts.get((key, n), False)
        if parts is False:
            if len(self._parts) >= self._limit:
                return build(key, decision_id)
            parts = self._parts[(key, n)] = self._split(key, build, n)
        if parts is None or not decision_id.isascii():
            return build(key, decision_id)
        return decision_id.encode().join(parts)

    @staticmethod
    def _split(key: Any, build: Callable[[Any, str], bytes], n: int) -> tuple[bytes, ...] | None:
        parts = tuple(build(key, "z" * n).split(b"z" * n))
        if len(parts) < 2 or (b"y" * n).join(parts) != build(key, "y" * n):
            return None
        return parts


_templates = _Templates()


def _allow_message(_key: None, decision_id: str) -> bytes:
    return _CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=DECISION_HEADER, value=decision_id),
                    append_action=_OVERWRITE,
                )
            ]
        ),
    ).SerializeToString()


def _allow_bytes(decision_id: str) -> bytes:
    return _templates.render(None, decision_id, _allow_message)


def _deny_message(key: tuple[int, int, str | None], decision_id: str) -> bytes:
    code, http_status, reason = key
    body = json.dumps({"decision_id": decision_id, "status": http_status, "reason": reason})
    return _CheckResponse(
        status=status_pb2.Status(code=code, message=f"{reason} (decision {decision_id})"),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status),  # type: ignore[arg-type]
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="content-type", value="application/json"),
                    append_action=_OVERWRITE,
                ),
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=DECISION_HEADER, value=decision_id),
                    append_action=_OVERWRITE,
                ),
            ],
            body=body,
        ),
    ).SerializeToString()


def _deny(outcome: Outcome) -> bytes:
    code = _RPC_CODES.get(outcome.code)
    if code is None:
        bad_request = outcome.http_status == 400
        code = code_pb2.INVALID_ARGUMENT if bad_request else code_pb2.PERMISSION_DENIED
    key = (code, outcome.http_status, outcome.reason)
    return _templates.render(key, outcome.decision_id, _deny_message)


def _trace_headers(http: Any) -> dict[str, str]:
    """The allow-listed headers only; Envoy sends either ``headers`` or ``header_map``."""
    found: dict[str, str] = {}
    headers = http.headers
    if headers:
        for name in _TRACE_HEADERS:
            value = headers.get(name)
            if value:
                found[name] = value
    elif http.HasField("header_map"):
        for hv in http.header_map.headers:
            key = hv.key.lower()
            if key in _TRACE_HEADERS:
                found[key] = hv.value or hv.raw_value.decode("latin-1")
    return found


class AuthorizationServicer:
    """``Check`` for Envoy; never raises, every outcome audited by the pipeline."""

    def __init__(
        self, pipeline: DecisionPipeline, *, min_deadline_s: float = MIN_DEADLINE_S
    ) -> None:
        self._pipeline = pipeline
        self._min_deadline_s = min_deadline_s
        #: Checks refused unevaluated because their deadline had passed (or nearly).
        self.deadline_refused = 0

    async def Check(
        self, request: _CheckRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> bytes:
        started = time.perf_counter_ns()
        pipeline = self._pipeline
        try:
            if isinstance(request, Undecodable):
                outcome = pipeline.refuse(
                    Refused(
                        "malformed_request",
                        "CheckRequest could not be decoded (malformed protobuf or invalid "
                        "UTF-8 in a string field)",
                        http_status=400,
                    ),
                    transport="grpc",
                    started_ns=started,
                )
                return _deny(outcome)
            attrs = request.attributes
            principal = attrs.source.principal
            if not attrs.request.HasField("http"):
                outcome = pipeline.refuse(
                    Refused(
                        "missing_http_attributes",
                        "CheckRequest has no HTTP attributes (is this Envoy's network filter?)",
                        http_status=400,
                    ),
                    transport="grpc",
                    started_ns=started,
                    principal=principal,
                )
                return _deny(outcome)
            http = attrs.request.http
            extra = _trace_headers(http)
            remaining = context.time_remaining()
            if remaining is not None and remaining < self._min_deadline_s:
                self.deadline_refused += 1
                outcome = pipeline.refuse(
                    Refused(
                        "deadline_exceeded",
                        f"not evaluated: {max(remaining, 0) * 1000:.1f} ms of the caller's "
                        "deadline left (queued too long; the server is overloaded)",
                        http_status=DEADLINE_HTTP_STATUS,
                    ),
                    transport="grpc",
                    started_ns=started,
                    principal=principal,
                    host=http.host,
                    method=http.method,
                    path=http.path,
                    request_id=extra.get("x-request-id"),
                    trace_id=trace_id_from(extra) if extra else None,
                )
                return _deny(outcome)
            outcome = pipeline.decide(
                principal=principal,
                host=http.host,
                method=http.method,
                path=http.path,
                transport="grpc",
                started_ns=started,
                request_id=extra.get("x-request-id"),
                trace_id=trace_id_from(extra) if extra else None,
            )
            return _allow_bytes(outcome.decision_id) if outcome.allowed else _deny(outcome)
        except Exception:  # the pipeline never raises; this is the last line of fail-closed
            outcome = Outcome(False, pipeline.new_id(), 403, "internal_error", "internal error")
            return _deny(outcome)


def _method_handlers(servicer: AuthorizationServicer) -> dict[str, grpc.RpcMethodHandler]:
    return {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check,
            request_deserializer=decode_check_request,
            response_serializer=None,  # Check returns serialized bytes
        )
    }


def add_to_server(servicer: AuthorizationServicer, server: grpc.aio.Server) -> None:
    """Register ``Check`` both ways, as grpc's own generated code does.

    As a *registered* method grpc-core matches the path itself and skips the Python-level
    generic-handler lookup (a ``HandlerCallDetails`` and a handler scan per call); the
    generic handler stays for servers and clients that do not use registered methods.
    """
    handlers = _method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
