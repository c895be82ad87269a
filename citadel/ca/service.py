"""Istio's ``IstioCertificateService/CreateCertificate``: a thin edge over injected parts.

This is the one place domain errors become gRPC statuses (``grpc.StatusCode[err.status]``)
and the one place an issuance attempt is audited. The order is the security argument:
authenticate the token, apply the namespace/service-account lists, issue (CSR policy,
signing, self-check), write the audit record, and only then return the certificate. If
the record cannot be written, nothing is returned (fail closed): an issuance nobody can
account for must not happen.

Refusals carry a message a person can act on and never a stack trace; anything
unexpected becomes INTERNAL "internal error" (the detail goes to the operational log,
without the token, which is never logged or audited).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from citadel.audit import AuditLog
from citadel.ca._proto import ca_pb2, ca_pb2_grpc
from citadel.ca.issuance import IssuedCertificate, Issuer
from citadel.ca.limits import DEFAULT_MAX_IN_FLIGHT, DrainEstimate, Limits, RateLimiter
from citadel.ca.tokens import Caller, TokenAuthenticator
from citadel.errors import (
    AuditError,
    AuthenticationError,
    CitadelError,
    Overloaded,
    PermissionDenied,
)
from citadel.logs import get_logger

__all__ = ["AUDIT_KIND", "AccessLists", "IstioCertificateServicer", "add_to_server"]

AUDIT_KIND = "ca.issuance"
SERVICE_NAME = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name
_log = get_logger("citadel.ca.service")


@dataclass(frozen=True)
class AccessLists:
    """Optional allow/deny lists. Deny wins; an empty allow-list allows everything.

    Service accounts are written ``namespace/name``.
    """

    allow_namespaces: frozenset[str] = frozenset()
    deny_namespaces: frozenset[str] = frozenset()
    allow_service_accounts: frozenset[str] = frozenset()
    deny_service_accounts: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        *,
        allow_namespaces: Iterable[str] = (),
        deny_namespaces: Iterable[str] = (),
        allow_service_accounts: Iterable[str] = (),
        deny_service_accounts: Iterable[str] = (),
    ) -> AccessLists:
        return cls(
            frozenset(allow_namespaces),
            frozenset(deny_namespaces),
            frozenset(allow_service_accounts),
            frozenset(deny_service_accounts),
        )

    @property
    def empty(self) -> bool:
        """No list set: every authenticated caller passes (the check can be skipped)."""
        return not (
            self.allow_namespaces
            or self.deny_namespaces
            or self.allow_service_accounts
            or self.deny_service_accounts
        )

    def check(self, caller: Caller) -> None:
        ns, sa = caller.namespace, f"{caller.namespace}/{caller.service_account}"
        if ns in self.deny_namespaces:
            raise PermissionDenied(
                f"namespace {ns!r} is denied certificates by this CA", reason="namespace_denied"
            )
        if sa in self.deny_service_accounts:
            raise PermissionDenied(
                f"service account {sa} is denied certificates by this CA",
                reason="service_account_denied",
            )
        if self.allow_namespaces and ns not in self.allow_namespaces:
            raise PermissionDenied(
                f"namespace {ns!r} is not in this CA's allowed namespaces",
                reason="namespace_not_allowed",
            )
        if self.allow_service_accounts and sa not in self.allow_service_accounts:
            raise PermissionDenied(
                f"service account {sa} is not in this CA's allowed service accounts",
                reason="service_account_not_allowed",
            )


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str:
    values = [v for k, v in metadata or () if k.lower() == "authorization"]
    if not values:
        raise AuthenticationError(
            "missing credentials: send metadata 'authorization: Bearer <service-account token>'",
            reason="no_token",
        )
    if len(values) > 1:
        raise AuthenticationError("send exactly one authorization header", reason="bad_token")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    scheme, _, token = str(value).strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "authorization metadata must be 'Bearer <service-account token>'",
            reason="no_token",
        )
    return token.strip()


class IstioCertificateServicer(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(
        self,
        *,
        authenticator: TokenAuthenticator,
        issuer: Issuer,
        audit: AuditLog,
        access: AccessLists | None = None,
        max_in_flight: int | None = None,
        limiter: RateLimiter | None = None,
        drain: DrainEstimate | None = None,
    ) -> None:
        """``limiter`` carries the rate limits and the concurrency cap; ``max_in_flight``
        overrides its cap (kept for callers that only want a cap). ``drain`` spreads the
        retry hints of calls shed by the cap over the time the CA needs to serve them."""
        self._authenticator = authenticator
        self._issuer = issuer
        self._audit = audit
        self._access = access or AccessLists()
        self._check_access = None if self._access.empty else self._access.check
        self._authenticator_name = getattr(authenticator, "name", "")
        self._limiter = limiter or RateLimiter(Limits(rate=0, identity_rate=0))
        self._max_in_flight = max_in_flight or (
            self._limiter.limits.max_in_flight if limiter else DEFAULT_MAX_IN_FLIGHT
        )
        self._drain = drain or DrainEstimate()
        self._min_time_left = self._limiter.limits.min_time_left
        self._in_flight = 0
        self.granted = 0
        self.refused = 0
        self.shed = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        record: dict[str, Any] = {
            "outcome": "refused",
            "spiffe_id": None,
            "subject": None,
            "pod": None,
            "serial": None,
            "not_before": None,
            "not_after": None,
            "requested_ttl": request.validity_duration,
            "granted_ttl": None,
            "key_type": None,
            "peer": context.peer(),
            "authenticator": self._authenticator_name,
            "reason": None,
        }
        self._in_flight += 1
        admitted = False
        try:
            try:
                if self._in_flight > self._max_in_flight:
                    raise self._shed(
                        f"the CA has {self._max_in_flight} requests in progress, its limit",
                        reason="too_many_in_flight",
                    )
                if self._min_time_left:
                    self._check_time_left(context.time_remaining())
                self._limiter.check_global()
                admitted = True
                issued = await self._issue(request, context, record)
            except CitadelError as exc:
                return await self._refuse(context, record, exc)
            except Exception as exc:  # bad input must never crash the server
                _log.error(
                    "ca.issuance.internal_error",
                    error_type=type(exc).__name__,
                    where=traceback.format_tb(exc.__traceback__)[-1:],
                )
                record["reason"] = "internal"
                record["message"] = "internal error"
                self._write_refusal(record)
                self.refused += 1
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
                raise AssertionError("unreachable") from None
            try:
                self._audit.append(AUDIT_KIND, record)
            except AuditError as exc:
                _log.error("ca.issuance.audit_failed", error=exc.message, serial=record["serial"])
                self.refused += 1
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the CA cannot write its audit log, so it issues nothing; try again later",
                )
            self.granted += 1
            return ca_pb2.IstioCertificateResponse(cert_chain=issued.chain_pem)
        finally:
            self._in_flight -= 1
            if admitted:
                self._drain.completed()

    def _check_time_left(self, left: float | None) -> None:
        """Shed a call that waited in gRPC's queue until its deadline is nearly gone."""
        if left is None or left >= self._min_time_left:
            return
        raise self._shed(
            f"the request reached the CA with {left * 1000:.0f} ms of its deadline left "
            f"(the CA needs {self._min_time_left * 1000:.0f} ms); it is busy",
            reason="deadline_too_close",
        )

    def _shed(self, why: str, *, reason: str) -> Overloaded:
        """A refusal whose retry hint is spread over the time the CA needs to drain."""
        hint = self._drain.shed_hint(self._in_flight - 1)
        return Overloaded(f"{why}; retry after {hint:g} s", retry_after=hint, reason=reason)

    async def _issue(
        self,
        request: ca_pb2.IstioCertificateRequest,
        context: grpc.aio.ServicerContext,
        record: dict[str, Any],
    ) -> IssuedCertificate:
        token = bearer_token(context.invocation_metadata())
        caller = await self._authenticator.authenticate(token)
        del token
        record["subject"] = caller.subject
        record["pod"] = caller.pod_name
        if caller.pod_uid:
            record["pod_uid"] = caller.pod_uid
        record["spiffe_id"] = str(self._issuer.spiffe_id_for(caller))
        self._limiter.check_identity(caller.subject)
        if self._check_access is not None:
            self._check_access(caller)
        issued = self._issuer.issue(caller, request.csr, requested_ttl=request.validity_duration)
        record.update(
            outcome="granted",
            serial=format(issued.serial, "x"),
            not_before=issued.not_before.isoformat(),
            not_after=issued.not_after.isoformat(),
            granted_ttl=issued.granted_ttl,
            key_type=issued.key_type,
        )
        return issued

    def _write_refusal(self, record: dict[str, Any]) -> None:
        try:
            self._audit.append(AUDIT_KIND, record)
        except AuditError as exc:
            _log.error("ca.issuance.audit_failed", error=exc.message, outcome="refused")

    async def _refuse(
        self, context: grpc.aio.ServicerContext, record: dict[str, Any], exc: CitadelError
    ) -> ca_pb2.IstioCertificateResponse:
        record["outcome"] = "refused"
        record["reason"] = exc.reason
        record["message"] = exc.message
        if isinstance(exc, Overloaded):
            record["retry_after"] = exc.retry_after
            self.shed += 1
        self._write_refusal(record)
        self.refused += 1
        try:
            code = grpc.StatusCode[exc.status]
        except KeyError:
            code = grpc.StatusCode.INTERNAL
        if code is grpc.StatusCode.INTERNAL:
            _log.error("ca.issuance.refused_internal", reason=exc.reason, error=exc.message)
            message = "internal error"
        else:
            message = exc.message
        if isinstance(exc, Overloaded):
            context.set_trailing_metadata((("retry-after", str(int(exc.retry_after) or 1)),))
        await context.abort(code, message)
        raise AssertionError("unreachable")


def add_to_server(servicer: IstioCertificateServicer, server: grpc.aio.Server) -> None:
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)
