"""The admin HTTP surface (FastAPI): health, readiness, metrics, policy status, explain,
reload, and Envoy's HTTP ext_authz variant.

The HTTP ext_authz variant is dispatched before FastAPI by a plain ASGI check on the raw
path prefix: it is on the request path of every call Envoy authorises, so it skips
routing, validation and JSON encoding, and it reads ``raw_path`` (undecoded) because the
decoded path is exactly what must not be trusted (``%2F`` would already be ``/``).
Envoy sends the original path appended to the prefix, the original method and Host; the
principal comes from ``x-forwarded-client-cert`` only when the operator trusts the proxy
(``trust_xfcc``), otherwise every request is ``anonymous``.

Errors are RFC 9457 problem documents (``application/problem+json``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from authz.decisions import DecisionPipeline, explain_request
from authz.loading import counts_for
from authz.metrics import AuthzMetrics
from authz.request import ANONYMOUS, Refused, principal_from_xfcc, trace_id_from
from authz.service import DECISION_HEADER
from authz.state import LoadOutcome, PolicyState

__all__ = [
    "AdminApp",
    "ExplainRequest",
    "create_admin_app",
    "create_ext_authz_app",
    "problem",
]

PROBLEM_TYPE = "application/problem+json"
_STATUS_TITLES = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem(status: int, detail: str, **extra: Any) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": _STATUS_TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_TYPE)


class ExplainRequest(BaseModel):
    principal: str = Field(default="", max_length=2048, description="Empty means anonymous.")
    host: str = Field(max_length=1024)
    method: str = Field(max_length=64)
    path: str = Field(max_length=16384, description="Raw path as Envoy would send it.")


class ExplainResponse(BaseModel):
    decision: str
    allowed: bool
    code: str
    reason: str | None
    rule: list[str] | None
    revision: str
    engine: str
    roles: list[str]
    tuple: dict[str, str] | None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def policy_status(state: PolicyState) -> dict[str, Any]:
    engine = state.engine
    last = state.last_error.as_dict() if state.last_error is not None else None
    return {
        "revision": state.revision,
        "engine": engine.kind,
        "source": state.source,
        "loaded_at": _iso(state.loaded_at),
        "rule_counts": counts_for(state.revision),
        "reloads_ok": state.reloads_ok,
        "reloads_failed": state.reloads_failed,
        "last_error": last,
        "history": [h.as_dict() | {"at_iso": _iso(h.at)} for h in state.history],
    }


def explain(state: PolicyState, req: ExplainRequest) -> ExplainResponse:
    """What the serving policy decides for this request, and why; records nothing."""
    result = explain_request(
        state.engine, principal=req.principal, host=req.host, method=req.method, path=req.path
    )
    return ExplainResponse(**result.as_dict())


def _build_api(
    *,
    state: PolicyState,
    metrics: AuthzMetrics,
    ready: Callable[[], bool],
    http_prefix: str,
    reload: Callable[[], LoadOutcome] | None = None,
) -> FastAPI:
    api = FastAPI(
        title="citadel authz admin",
        description="Health, metrics, policy status and decision explanations of the "
        f"ext_authz service. Envoy's HTTP ext_authz variant is served under `{http_prefix}`.",
        version="1",
    )
    if reload is None:
        from authz.reload import Reloader

        reload = Reloader(state, state.source, watch=False).reload_now
    reload_now = reload

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        return problem(422, "the request body is not valid", errors=errors)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail))

    @api.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        return problem(500, f"internal error ({type(exc).__name__})")

    @api.get("/healthz", summary="Liveness: the process is up.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: a policy is loaded and the server is serving.")
    async def readyz() -> Response:
        if state.engine is None:
            return problem(503, "not ready: no policy loaded")
        if not ready():
            return problem(503, "not ready: shutting down, or the audit log cannot be written")
        return JSONResponse({"status": "ready", "revision": state.revision})

    @api.get("/metrics", summary="Prometheus metrics.")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/policy", summary="The serving policy revision, rule counts and load history.")
    async def get_policy() -> dict[str, Any]:
        return policy_status(state)

    @api.post(
        "/v1/explain",
        response_model=ExplainResponse,
        summary="Decide a request without enforcing or recording it, and say why.",
    )
    async def post_explain(req: ExplainRequest) -> ExplainResponse:
        return explain(state, req)

    @api.post("/v1/reload", summary="Reload the policy directory now; last good wins.")
    async def post_reload() -> Response:
        # The server's Reloader (serialised with its watcher); else one of our own, so an
        # explicit reload always passes the same gate (validation + policy tests).
        outcome = await asyncio.to_thread(reload_now)
        body = outcome.as_dict()
        if outcome.ok:
            return JSONResponse(body)
        return problem(422, f"policy refused: {outcome.error}", outcome=body)

    return api


class AdminApp:
    """ASGI app: the ext_authz HTTP variant under ``http_prefix``, ``api`` for the rest (the
    FastAPI admin app, or a 404 on the ``--http-listen`` port)."""

    def __init__(
        self, *, api: Any, pipeline: DecisionPipeline, http_prefix: str, trust_xfcc: bool
    ) -> None:
        self.api = api
        self.pipeline = pipeline
        self.trust_xfcc = trust_xfcc
        prefix = "/" + http_prefix.strip("/")
        self._prefix = prefix.encode()
        self._prefix_len = len(self._prefix)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
            if raw.startswith(self._prefix) and (
                len(raw) == self._prefix_len or raw[self._prefix_len] == 0x2F
            ):
                try:
                    await self._ext_authz(scope, raw[self._prefix_len :], send)
                except Exception:  # fail closed: a bug here must read as a denial
                    await send({"type": "http.response.start", "status": 403, "headers": []})
                    await send({"type": "http.response.body", "body": b""})
                return
        await self.api(scope, receive, send)

    async def _ext_authz(self, scope: dict[str, Any], raw_path: bytes, send: Any) -> None:
        started = time.perf_counter_ns()
        host = xfcc = ""
        extra: dict[str, str] = {}
        for k, v in scope["headers"]:
            if k == b"host":
                host = v.decode("latin-1")
            elif k == b"x-forwarded-client-cert":
                xfcc = v.decode("latin-1")
            elif k in (b"x-request-id", b"traceparent", b"x-b3-traceid"):
                extra[k.decode()] = v.decode("latin-1")
        path = raw_path.decode("latin-1")
        qs = scope.get("query_string") or b""
        if qs:
            path += "?" + qs.decode("latin-1")
        method = scope["method"]
        request_id = extra.get("x-request-id")
        trace_id = trace_id_from(extra) if extra else None
        principal = ANONYMOUS
        try:
            if self.trust_xfcc and xfcc:
                principal = principal_from_xfcc(xfcc)
        except Refused as refused:
            outcome = self.pipeline.refuse(
                refused, transport="http", started_ns=started, principal="", host=host,
                method=method, path=path, request_id=request_id, trace_id=trace_id,
            )  # fmt: skip
        else:
            outcome = self.pipeline.decide(
                principal=principal, host=host, method=method, path=path, transport="http",
                started_ns=started, request_id=request_id, trace_id=trace_id,
            )  # fmt: skip
        did = outcome.decision_id.encode()
        if outcome.allowed:
            headers = [(DECISION_HEADER.encode(), did), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        body = json.dumps(
            {
                "decision_id": outcome.decision_id,
                "status": outcome.http_status,
                "reason": outcome.reason,
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (DECISION_HEADER.encode(), did),
        ]
        await send(
            {"type": "http.response.start", "status": outcome.http_status, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})


def create_admin_app(
    *,
    state: PolicyState,
    pipeline: DecisionPipeline,
    metrics: AuthzMetrics,
    ready: Callable[[], bool] = lambda: True,
    http_prefix: str = "/ext_authz",
    trust_xfcc: bool = False,
    reload: Callable[[], LoadOutcome] | None = None,
) -> AdminApp:
    api = _build_api(
        state=state, metrics=metrics, ready=ready, http_prefix=http_prefix, reload=reload
    )
    return AdminApp(api=api, pipeline=pipeline, http_prefix=http_prefix, trust_xfcc=trust_xfcc)


def create_ext_authz_app(
    *, pipeline: DecisionPipeline, http_prefix: str = "/ext_authz", trust_xfcc: bool = False
) -> AdminApp:
    """Envoy's HTTP ext_authz variant alone, for its own listener (``--http-listen``).

    Every sidecar must reach the port the variant is served on; the admin port also takes
    reloads and answers explain, policy and metrics, which no workload should reach. Here
    any other path is a 404 problem document.
    """
    prefix = "/" + http_prefix.strip("/")

    async def not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await problem(404, f"only Envoy's HTTP ext_authz is served here, under {prefix}")(
                scope, receive, send
            )

    return AdminApp(api=not_found, pipeline=pipeline, http_prefix=prefix, trust_xfcc=trust_xfcc)
