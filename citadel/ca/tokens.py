"""Who is calling: token authenticators behind one interface.

An authenticator turns a bearer token into a ``Caller`` or raises: ``AuthenticationError``
(the token is bad: UNAUTHENTICATED), ``Unavailable`` (the verifier's backend, e.g. the
Kubernetes API, could not be reached in time: UNAVAILABLE). It never returns a caller it
did not verify, and never logs or echoes the token.

Implementations: ``JwksAuthenticator`` (offline, pyjwt against the cluster's JWKS) in
``citadel.ca.jwks`` and ``TokenReviewAuthenticator`` (the Kubernetes TokenReview API via the
official client) in ``citadel.ca.tokenreview``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from citadel.errors import AuthenticationError

__all__ = [
    "DEFAULT_AUDIENCE",
    "SERVICE_ACCOUNT_PREFIX",
    "Caller",
    "TokenAuthenticator",
    "parse_service_account_username",
    "token_fingerprint",
]

#: Istio sidecars' projected tokens carry this audience, so they work unchanged.
DEFAULT_AUDIENCE = "istio-ca"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
#: Refuse absurd tokens before spending any work on them.
MAX_TOKEN_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified workload: the Kubernetes service account behind a token."""

    namespace: str
    service_account: str
    #: ``system:serviceaccount:<ns>:<sa>`` as the token or TokenReview stated it.
    subject: str
    audiences: tuple[str, ...] = ()
    pod_name: str | None = None
    pod_uid: str | None = None
    #: When the token stops being valid (caches never outlive it).
    expires_at: datetime | None = None
    #: Which authenticator vouched for the caller ("jwks" or "tokenreview").
    authenticator: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class TokenAuthenticator(Protocol):
    """Verifies a bearer token. Implementations must be safe to call concurrently."""

    name: str

    async def authenticate(self, token: str) -> Caller: ...


def parse_service_account_username(username: str) -> tuple[str, str]:
    """``system:serviceaccount:<ns>:<sa>`` -> ``(ns, sa)``; anything else is refused."""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        raise AuthenticationError("token does not belong to a Kubernetes service account")
    parts = username[len(SERVICE_ACCOUNT_PREFIX) :].split(":")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise AuthenticationError("token subject is not system:serviceaccount:<ns>:<sa>")
    return parts[0], parts[1]


def token_fingerprint(token: str) -> str:
    """A non-reversible handle for a token (cache keys; never the token itself)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_token_shape(token: str) -> None:
    """Cheap refusals before any crypto or network call."""
    if not token:
        raise AuthenticationError("missing bearer token")
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthenticationError(f"bearer token is larger than {MAX_TOKEN_BYTES} bytes")
