"""The trust bundle, published for agents (gRPC) and federation (HTTPS ``GET /bundle``).

The bundle is the set of CA certificates a workload must trust for the trust domain: the
roots in ``root-cert.pem``. It is re-read when that file changes, so a root rotation done by
replacing the file (or a mounted Secret) reaches every agent at its next poll.

``spiffe_sequence`` must increase whenever the bundle changes, also across replicas that
never talk to each other. It is therefore derived from the content — the newest
``NotBefore`` among the authorities, as Unix seconds, since a new root is always newer —
and bumped by one in-process if the content changed without a newer root (a root removed).

The JWKS form follows the SPIFFE Trust Domain and Bundle standard: each key has
``use: "x509-svid"``, its public parameters, ``x5c`` with exactly that one CA certificate
(base64 DER), and no ``kid``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from citadel.ca._proto import bundle_pb2, bundle_pb2_grpc
from citadel.errors import AuthorityError, ConfigError
from citadel.logs import get_logger
from citadel.spiffe import TrustDomain

__all__ = [
    "DEFAULT_REFRESH_HINT",
    "SERVICE_NAME",
    "Bundle",
    "BundleSource",
    "TrustBundleServicer",
    "add_to_server",
    "attach",
    "bundle_http_handler",
    "bundle_jwks",
    "serve_bundle_https",
]

DEFAULT_REFRESH_HINT = 300
SERVICE_NAME = bundle_pb2.DESCRIPTOR.services_by_name["TrustBundleService"].full_name
_log = get_logger("citadel.ca.bundle")
_MAX_REQUEST_HEAD = 8192


@dataclass(frozen=True, slots=True)
class Bundle:
    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]
    sequence: int
    refresh_hint: int

    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.authorities)

    def jwks(self) -> dict[str, Any]:
        return bundle_jwks(self.authorities, sequence=self.sequence, refresh_hint=self.refresh_hint)

    def to_proto(self) -> bundle_pb2.GetBundleResponse:
        return bundle_pb2.GetBundleResponse(
            trust_domain=self.trust_domain.name,
            x509_authorities=[c.public_bytes(serialization.Encoding.DER) for c in self.authorities],
            sequence=self.sequence,
            refresh_hint_seconds=self.refresh_hint,
            spiffe_bundle_json=json.dumps(self.jwks(), separators=(",", ":")),
        )


def _jwk(cert: x509.Certificate) -> dict[str, Any]:
    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        key: dict[str, Any] = ECAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, rsa.RSAPublicKey):
        key = RSAAlgorithm.to_jwk(pub, as_dict=True)
    else:
        raise AuthorityError(f"unsupported CA key type {type(pub).__name__} in the bundle")
    key.pop("kid", None)
    key["use"] = "x509-svid"
    key["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    return key


def bundle_jwks(
    authorities: Sequence[x509.Certificate], *, sequence: int, refresh_hint: int
) -> dict[str, Any]:
    """The SPIFFE bundle document (a JWKS) for ``authorities``."""
    return {
        "keys": [_jwk(c) for c in authorities],
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint,
    }


class BundleSource:
    """The current bundle; re-reads ``roots_path`` when its content changes. Thread-safe."""

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        roots_path: Path | None = None,
        authorities: Sequence[x509.Certificate] = (),
        refresh_hint: int = DEFAULT_REFRESH_HINT,
    ) -> None:
        if roots_path is None and not authorities:
            raise AuthorityError("a trust bundle needs a roots file or at least one authority")
        self._trust_domain = trust_domain
        self._path = roots_path
        self._static = tuple(authorities)
        self._refresh_hint = refresh_hint
        self._lock = threading.Lock()
        self._digest = b""
        self._bundle: Bundle | None = None
        self.current()

    def _load(self) -> tuple[bytes, tuple[x509.Certificate, ...]]:
        if self._path is None:
            certs = self._static
        else:
            try:
                certs = tuple(x509.load_pem_x509_certificates(self._path.read_bytes()))
            except (OSError, ValueError) as exc:
                raise AuthorityError(f"cannot read trust bundle {self._path}: {exc}") from None
        if not certs:
            raise AuthorityError("the trust bundle is empty")
        digest = hashlib.sha256(
            b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)
        ).digest()
        return digest, certs

    def current(self) -> Bundle:
        with self._lock:
            try:
                digest, certs = self._load()
            except AuthorityError:
                if self._bundle is None:
                    raise
                # Keep publishing the last good bundle rather than none at all.
                _log.warning("trust bundle unreadable; serving last good", path=str(self._path))
                return self._bundle
            if self._bundle is not None and digest == self._digest:
                return self._bundle
            newest = max(int(c.not_valid_before_utc.timestamp()) for c in certs)
            previous = self._bundle.sequence if self._bundle is not None else 0
            sequence = max(newest, previous + 1)
            self._bundle = Bundle(self._trust_domain, certs, sequence, self._refresh_hint)
            self._digest = digest
            if previous:
                _log.info("trust bundle changed", sequence=sequence, authorities=len(certs))
            return self._bundle


class TrustBundleServicer(bundle_pb2_grpc.TrustBundleServiceServicer):
    """``citadel.v1.TrustBundleService``: public data, no authentication needed."""

    def __init__(self, source: BundleSource) -> None:
        self._source = source

    async def GetBundle(
        self, request: bundle_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> bundle_pb2.GetBundleResponse:
        try:
            return self._source.current().to_proto()
        except AuthorityError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
            raise  # pragma: no cover (abort raises)


def add_to_server(server: grpc.aio.Server, source: BundleSource) -> None:
    bundle_pb2_grpc.add_TrustBundleServiceServicer_to_server(TrustBundleServicer(source), server)


def _response(status: str, content_type: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


def _problem(status: int, title: str, detail: str) -> bytes:
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
    return _response(f"{status} {title}", "application/problem+json", body.encode())


def bundle_http_handler(
    source: BundleSource,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    """A minimal HTTP/1.1 handler: ``GET /bundle`` and nothing else, one request per conn."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3:
                writer.write(_problem(400, "Bad Request", "malformed request line"))
            elif parts[1].split("?", 1)[0] != "/bundle":
                writer.write(_problem(404, "Not Found", "the only resource here is /bundle"))
            elif parts[0] not in ("GET", "HEAD"):
                writer.write(_problem(405, "Method Not Allowed", "use GET /bundle"))
            else:
                try:
                    bundle = source.current()
                except AuthorityError as exc:
                    writer.write(_problem(503, "Service Unavailable", exc.message))
                else:
                    body = json.dumps(bundle.jwks(), indent=2).encode()
                    resp = _response(
                        "200 OK",
                        "application/json",
                        body,
                        f"Cache-Control: max-age={bundle.refresh_hint}\r\n",
                    )
                    if parts[0] == "HEAD":
                        resp = resp[: resp.index(b"\r\n\r\n") + 4]
                    writer.write(resp)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    return handle


class _HttpsCertificate:
    """The HTTPS endpoint's certificate, re-issued from the intermediate after 2/3 of its life.

    ``ssl`` wants files for a chain, so the PEMs pass through a private temporary directory
    that is removed at once; the SNI callback swaps in a fresh context for new handshakes.
    """

    def __init__(self, authority: Any, dns_names: Sequence[str], ttl: timedelta) -> None:
        self._authority = authority
        self._names = list(dns_names)
        self._ttl = ttl
        self.context = self._issue()

    def _issue(self) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._authority.issue_serving_certificate(
            dns_names=self._names, key=key, ttl=self._ttl
        )
        start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
        self._renew_at = start + (end - start) * 2 / 3
        chain = (
            cert.public_bytes(serialization.Encoding.PEM)
            + "".join(self._authority.chain_pem[:-1]).encode()
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory(prefix="citadel-bundle-") as tmp:
            os.chmod(tmp, 0o700)
            (Path(tmp) / "chain.pem").write_bytes(chain)
            key_path = Path(tmp) / "key.pem"
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key_pem)
            ctx.load_cert_chain(Path(tmp) / "chain.pem", key_path)
        ctx.sni_callback = self._sni
        return ctx

    def _sni(self, sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if time.time() >= self._renew_at:
            try:
                self.context = self._issue()
            except Exception as exc:  # keep the current one; try again next handshake
                _log.error("bundle https certificate renewal failed", error=str(exc)[:200])
        sock.context = self.context


async def attach(
    server: grpc.aio.Server,
    *,
    authority: Any,
    cacerts_dir: Path,
    https_listen: str | None = None,
    tls: bool = True,
    dns_names: Sequence[str] = ("localhost", "127.0.0.1"),
    serving_ttl: timedelta = timedelta(days=30),
    refresh_hint: int = DEFAULT_REFRESH_HINT,
) -> BundleSource:
    """Publish the CA's bundle: ``GetBundle`` on ``server``, ``GET /bundle`` if asked.

    The bundle is ``cacerts_dir/root-cert.pem`` (re-read on change), or the authority's
    root when that file is absent. The HTTPS listener closes when the gRPC server ends.
    """
    roots = cacerts_dir / "root-cert.pem"
    source = BundleSource(
        trust_domain=authority.trust_domain,
        roots_path=roots if roots.exists() else None,
        authorities=() if roots.exists() else (authority.root,),
        refresh_hint=refresh_hint,
    )
    add_to_server(server, source)
    if https_listen:
        host, _, port = https_listen.rpartition(":")
        ctx = _HttpsCertificate(authority, dns_names, serving_ttl).context if tls else None
        try:
            https = await serve_bundle_https(
                source, host=host.strip("[]"), port=int(port), ssl_context=ctx
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot serve GET /bundle on {https_listen}: {exc} (pick another HOST:PORT)"
            ) from None
        bound = https.sockets[0].getsockname()[1]
        _log.info("bundle endpoint", url=f"{'https' if tls else 'http'}://{host}:{bound}/bundle")

        async def close_with_grpc() -> None:
            await server.wait_for_termination()
            https.close()

        _background.add(task := asyncio.ensure_future(close_with_grpc()))
        task.add_done_callback(_background.discard)
    return source


_background: set[asyncio.Task[None]] = set()


async def serve_bundle_https(
    source: BundleSource, *, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> asyncio.Server:
    """Start the ``GET /bundle`` endpoint (HTTPS when ``ssl_context`` is given)."""
    return await asyncio.start_server(
        bundle_http_handler(source), host, port, ssl=ssl_context, limit=_MAX_REQUEST_HEAD
    )
