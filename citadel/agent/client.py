"""Talking to the CA: Istio's CreateCertificate and citadel's GetBundle over verified TLS.

The token file is re-read on every request because kubelet rotates projected tokens in
place; a cached token would start failing hours into the pod's life. The token travels
only in the ``authorization`` metadata: it is never logged and never part of an error.

gRPC failures become ``FetchError`` with a verdict the retry loop can act on: transient
(the CA is down, overloaded, or timed out) or permanent (the CA refused *us*: bad token,
identity not allowed, malformed request), plus the CA's retry hint when it sent one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from citadel.ca._proto import bundle_pb2, bundle_pb2_grpc, ca_pb2, ca_pb2_grpc
from citadel.errors import CitadelError
from citadel.spiffe import TrustDomain

__all__ = ["BundleInfo", "CaClient", "FetchError", "read_token"]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
_RETRY_IN_MESSAGE = re.compile(r"retry (?:after|in) (\d+(?:\.\d+)?) ?s", re.IGNORECASE)
_MAX_TOKEN_BYTES = 64 * 1024


class FetchError(CitadelError):
    """A request to the CA failed. ``transient`` says whether trying again can help."""

    status = "UNAVAILABLE"
    reason = "ca_request_failed"

    def __init__(
        self,
        message: str,
        *,
        code: str,
        transient: bool,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.transient = transient
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class BundleInfo:
    trust_domain: str
    authorities: tuple[x509.Certificate, ...]
    sequence: int
    refresh_hint: float


def read_token(path: Path) -> str:
    """The current token; errors name the file, never the content."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FetchError(
            f"cannot read token file {path}: {exc.strerror}", code="TOKEN_FILE", transient=True
        ) from None
    if len(raw) > _MAX_TOKEN_BYTES:
        raise FetchError(f"token file {path} is too large", code="TOKEN_FILE", transient=False)
    token = raw.decode("utf-8", "replace").strip()
    if not token:
        raise FetchError(f"token file {path} is empty", code="TOKEN_FILE", transient=True)
    return token


def _retry_hint(err: grpc.aio.AioRpcError) -> float | None:
    """The CA's retry hint: ``retry-after`` trailer (seconds) or the message's wording."""
    for md in (err.trailing_metadata() or (), err.initial_metadata() or ()):
        for key, value in md:
            if key.lower() == "retry-after":
                try:
                    return max(0.0, float(value))
                except (TypeError, ValueError):
                    pass
            if key.lower() == "grpc-retry-pushback-ms":
                try:
                    return max(0.0, int(value) / 1000)
                except (TypeError, ValueError):
                    pass
    match = _RETRY_IN_MESSAGE.search(err.details() or "")
    return float(match.group(1)) if match else None


def _to_fetch_error(err: grpc.aio.AioRpcError, what: str, address: str) -> FetchError:
    code = err.code()
    details = (err.details() or "").strip()
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"CA at {address} is unavailable ({what}): {details or 'no detail'}"
    else:
        message = f"CA at {address} refused {what} with {code.name}: {details or 'no detail'}"
    return FetchError(
        message,
        code=code.name,
        transient=code in _TRANSIENT,
        retry_after=_retry_hint(err) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None,
    )


class CaClient:
    """One TLS channel to the CA, reused across requests. Use within a running loop."""

    def __init__(
        self,
        *,
        address: str,
        ca_root_pem: bytes,
        token_file: Path,
        server_name: str | None = None,
        timeout: float = 10.0,
        metadata: tuple[tuple[str, str], ...] = (),
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """``channel``: an open channel to share (its owner closes it); else our own."""
        self.address = address
        self._token_file = token_file
        self._timeout = timeout
        self._extra_md = metadata
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Our own backoff drives reconnection; keep gRPC's short so "CA is back" is seen.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=ca_root_pem)
        self._own_channel = channel is None
        self._channel = channel or grpc.aio.secure_channel(address, creds, options=options)
        self._ca = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
        self._bundle = bundle_pb2_grpc.TrustBundleServiceStub(self._channel)

    def read_token(self) -> str:
        """Re-read on every request: the caller derives its CSR hint from the same token."""
        return read_token(self._token_file)

    async def create_certificate(
        self, csr_pem: bytes, *, token: str, ttl_seconds: int | None
    ) -> list[str]:
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode(), validity_duration=int(ttl_seconds or 0)
        )
        try:
            response = await self._ca.CreateCertificate(
                request,
                metadata=(("authorization", f"Bearer {token}"), *self._extra_md),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise _to_fetch_error(err, "the certificate request", self.address) from None
        return list(response.cert_chain)

    async def get_bundle(self) -> BundleInfo | None:
        """The CA's trust bundle, or ``None`` if this CA has no bundle service (istiod)."""
        try:
            response = await self._bundle.GetBundle(
                bundle_pb2.GetBundleRequest(), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise _to_fetch_error(err, "the bundle request", self.address) from None
        try:
            authorities = tuple(
                x509.load_der_x509_certificate(d) for d in response.x509_authorities
            )
            TrustDomain(response.trust_domain)
        except ValueError as exc:
            raise FetchError(
                f"CA at {self.address} sent a malformed trust bundle: {exc}",
                code="BAD_BUNDLE",
                transient=True,
            ) from None
        if not authorities:
            raise FetchError(
                f"CA at {self.address} sent an empty trust bundle",
                code="BAD_BUNDLE",
                transient=True,
            )
        return BundleInfo(
            trust_domain=response.trust_domain,
            authorities=authorities,
            sequence=response.sequence,
            refresh_hint=float(response.refresh_hint_seconds or 0),
        )

    async def close(self) -> None:
        if self._own_channel:
            await self._channel.close()
