"""One error hierarchy for citadel and authz.

Each error names the gRPC status it becomes (``status``) so the translation to a wire
status happens once, at the servicer edge, and domain code never imports grpc. Messages
are written for the person reading them on the other end: they say what was wrong and,
where it helps, what to do. They never contain a token, a key or a stack trace.
"""

from __future__ import annotations

__all__ = [
    "AuditError",
    "AuthenticationError",
    "AuthorityError",
    "CitadelError",
    "ConfigError",
    "InvalidRequest",
    "InvalidSpiffeId",
    "Overloaded",
    "PermissionDenied",
    "PolicyError",
    "Unavailable",
]


class CitadelError(Exception):
    """Base of every error citadel raises on purpose."""

    #: Name of the ``grpc.StatusCode`` member this error maps to at the servicer edge.
    status: str = "INTERNAL"
    #: Short machine-readable reason, recorded in audit records.
    reason: str = "internal"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidSpiffeId(CitadelError, ValueError):
    status = "INVALID_ARGUMENT"
    reason = "invalid_spiffe_id"


class AuthenticationError(CitadelError):
    """The caller's credential is missing, malformed, or did not verify."""

    status = "UNAUTHENTICATED"
    reason = "unauthenticated"


class PermissionDenied(CitadelError):
    """The caller is authenticated but may not have what it asked for."""

    status = "PERMISSION_DENIED"
    reason = "permission_denied"


class InvalidRequest(CitadelError, ValueError):
    """The request itself is malformed (CSR, TTL, attributes)."""

    status = "INVALID_ARGUMENT"
    reason = "invalid_argument"


class Overloaded(CitadelError):
    """Shed load instead of queueing it; ``retry_after`` is a hint in seconds."""

    status = "RESOURCE_EXHAUSTED"
    reason = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, reason: str | None = None):
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class Unavailable(CitadelError):
    """A dependency (Kubernetes API, JWKS endpoint) could not be reached in time."""

    status = "UNAVAILABLE"
    reason = "unavailable"


class AuditError(CitadelError):
    """An audit record could not be written; the operation it records must fail closed."""

    status = "UNAVAILABLE"
    reason = "audit_failed"


class ConfigError(CitadelError):
    """Operator configuration is wrong; raised at start-up, never per request."""

    reason = "config"


class AuthorityError(ConfigError):
    """The CA's key material is missing, malformed, or does not hold together."""

    reason = "authority"


class PolicyError(ConfigError):
    """A policy could not be loaded or validated. ``file``/``line`` locate it when known."""

    reason = "policy"

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None):
        super().__init__(message)
        self.file = file
        self.line = line
