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
    "decode_check_request",
    "generic_handler",
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


def _allow_message(decision_id: str) -> _CheckResponse:
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
    )


class _AllowTemplates:
    """Serialized allow responses, built once per decision-id length.

    An allow differs from the next only in its decision id, and ids of one length give
    identical framing, so the bytes are a cached prefix + id + suffix: building and
    serializing the message costs more than the decision itself on the hot path.
    """

    def __init__(self) -> None:
        self._parts: dict[int, tuple[bytes, bytes]] = {}

    def __call__(self, decision_id: str) -> bytes:
        raw = decision_id.encode("ascii")
        parts = self._parts.get(len(raw))
        if parts is None:
            n = len(raw)
            a = _allow_message("a" * n).SerializeToString()
            b = _allow_message("b" * n).SerializeToString()
            i = next(k for k in range(len(a)) if a[k] != b[k])  # where the id starts
            parts = self._parts[n] = (a[:i], a[i + n :])
        return parts[0] + raw + parts[1]


_allow_bytes = _AllowTemplates()


def _deny(outcome: Outcome) -> bytes:
    body = json.dumps(
        {
            "decision_id": outcome.decision_id,
            "status": outcome.http_status,
            "reason": outcome.reason,
        }
    )
    code = _RPC_CODES.get(outcome.code)
    if code is None:
        bad_request = outcome.http_status == 400
        code = code_pb2.INVALID_ARGUMENT if bad_request else code_pb2.PERMISSION_DENIED
    return _CheckResponse(
        status=status_pb2.Status(
            code=code,
            message=f"{outcome.reason} (decision {outcome.decision_id})",
        ),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=outcome.http_status),  # type: ignore[arg-type]
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="content-type", value="application/json"),
                    append_action=_OVERWRITE,
                ),
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=DECISION_HEADER, value=outcome.decision_id),
                    append_action=_OVERWRITE,
                ),
            ],
            body=body,
        ),
    ).SerializeToString()


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


def generic_handler(servicer: AuthorizationServicer) -> grpc.GenericRpcHandler:
    """``Check`` registered with the tolerant decoder (see the module docstring)."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                servicer.Check,
                request_deserializer=decode_check_request,
                response_serializer=None,  # Check returns serialized bytes
            )
        },
    )
