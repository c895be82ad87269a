"""A test Kubernetes API server that speaks the real TokenReview JSON over TLS on loopback.

Tests reach it through the official ``kubernetes`` client and a kubeconfig exactly as the CA
does in production, so what is tested is the wire conversation, not a mock of it. It serves
``POST /apis/authentication.k8s.io/v1/tokenreviews`` (``authentication.k8s.io/v1``), requires
its own bearer token from the client (like a real API server), and answers from a table of
token -> identity. Faults (5xx, 429, 403, slow, dropped connection) are switched per test.

The behaviour of the audience check follows kube-apiserver: a token whose audiences do not
intersect ``spec.audiences`` is not authenticated; an ``audience_aware=False`` identity
imitates an audience-unaware webhook authenticator that answers with its own audiences.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import json
import secrets
import ssl
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "API_AUDIENCE",
    "TOKENREVIEW_PATH",
    "FakeKubeApi",
    "Fault",
    "Identity",
    "running_k8s_api",
    "write_kubeconfig",
]

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
#: What kube-apiserver uses when a TokenReview names no audiences.
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
_MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Identity:
    """What the API server knows about one token."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)
    audiences: tuple[str, ...] = ("istio-ca",)
    #: False imitates an authenticator that ignores spec.audiences and states its own.
    audience_aware: bool = True

    @classmethod
    def service_account(
        cls,
        namespace: str,
        name: str,
        *,
        pod_name: str | None = None,
        pod_uid: str | None = None,
        audiences: Sequence[str] = ("istio-ca",),
        groups: Sequence[str] | None = None,
        audience_aware: bool = True,
    ) -> Identity:
        """Shaped like kube-apiserver's answer for a projected service-account token."""
        extra: dict[str, list[str]] = {}
        if pod_name:
            extra["authentication.kubernetes.io/pod-name"] = [pod_name]
        if pod_uid:
            extra["authentication.kubernetes.io/pod-uid"] = [pod_uid]
        if groups is None:
            groups = (
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            )
        return cls(
            username=f"system:serviceaccount:{namespace}:{name}",
            uid=secrets.token_hex(8),
            groups=tuple(groups),
            extra=extra,
            audiences=tuple(audiences),
            audience_aware=audience_aware,
        )


@dataclass(frozen=True)
class Fault:
    """A switchable misbehaviour. ``status``: answer with that HTTP code and a k8s Status;
    ``delay``: sleep that long before answering; ``drop``: close the connection unanswered;
    ``review_error``: answer 201 "not authenticated" with that ``status.error``. In
    ``message`` and ``review_error``, ``{token}`` is replaced by the reviewed token (to
    imitate a careless backend echoing it)."""

    status: int | None = None
    delay: float = 0.0
    drop: bool = False
    message: str = ""
    review_error: str | None = None


class FakeKubeApi:
    """State shared by the handler threads: the identity table, the fault, the counters."""

    def __init__(self, *, client_token: str, ca_pem: bytes, port: int) -> None:
        self.client_token = client_token
        self.ca_pem = ca_pem
        self.port = port
        self.server_url = f"https://127.0.0.1:{port}"
        self._lock = threading.Lock()
        self._tokens: dict[str, Identity] = {}
        self._fault: Fault | None = None
        self._per_token: Counter[str] = Counter()
        self.requests = 0
        self.last_body: dict[str, Any] | None = None
        self.stopping = threading.Event()

    # --- test controls --------------------------------------------------------------
    def add(self, token: str, identity: Identity) -> str:
        with self._lock:
            self._tokens[token] = identity
        return token

    def set_fault(self, fault: Fault | None) -> None:
        with self._lock:
            self._fault = fault

    @contextmanager
    def fault(self, fault: Fault) -> Iterator[None]:
        self.set_fault(fault)
        try:
            yield
        finally:
            self.set_fault(None)

    def reset(self) -> None:
        with self._lock:
            self._tokens.clear()
            self._fault = None
            self._per_token.clear()
            self.requests = 0
            self.last_body = None

    def count(self, token: str | None = None) -> int:
        """TokenReviews received (for one token, or all)."""
        with self._lock:
            return self.requests if token is None else self._per_token[token]

    def kubeconfig(self, path: Path, *, token: str | None = None, port: int | None = None) -> Path:
        return write_kubeconfig(
            path,
            server=f"https://127.0.0.1:{port or self.port}",
            ca_pem=self.ca_pem,
            token=self.client_token if token is None else token,
        )

    # --- called by the handler ------------------------------------------------------
    def _record(self, token: str, body: dict[str, Any]) -> tuple[Fault | None, Identity | None]:
        with self._lock:
            self.requests += 1
            self._per_token[token] += 1
            self.last_body = body
            return self._fault, self._tokens.get(token)


def _status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def _review(spec: dict[str, Any], identity: Identity | None) -> dict[str, Any]:
    requested = [a for a in spec.get("audiences") or [] if isinstance(a, str)] or [API_AUDIENCE]
    if identity is None:
        return {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
    if identity.audience_aware:
        granted = [a for a in identity.audiences if a in requested]
        if not granted:
            return {
                "user": {},
                "error": f"[invalid bearer token, token audiences {list(identity.audiences)!r}"
                f" is invalid for the target audiences {requested!r}]",
            }
    else:
        granted = list(identity.audiences)
    user: dict[str, Any] = {"username": identity.username, "groups": list(identity.groups)}
    if identity.uid:
        user["uid"] = identity.uid
    if identity.extra:
        user["extra"] = identity.extra
    return {"authenticated": True, "user": user, "audiences": granted}


class _TlsServer(ThreadingHTTPServer):
    """TLS per connection in the handler thread, so a client that never finishes its
    handshake cannot stall the accept loop."""

    daemon_threads = True
    ssl_context: ssl.SSLContext

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        return self.ssl_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that give up mid-request (timeouts under test) are expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-kube-apiserver"
    timeout = 15
    api: FakeKubeApi  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(404, _status_body(404, "NotFound", "the server could not find the resource"))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._send(413, _status_body(413, "RequestEntityTooLarge", "body too large"))
            return
        raw = self.rfile.read(length)
        expected = f"Bearer {self.api.client_token}".encode()
        got = (self.headers.get("Authorization") or "").encode()
        if not hmac.compare_digest(got, expected):
            self._send(401, _status_body(401, "Unauthorized", "Unauthorized"))
            return
        if self.path.split("?", 1)[0] != TOKENREVIEW_PATH:
            self._send(404, _status_body(404, "NotFound", "the server could not find the resource"))
            return
        try:
            body = json.loads(raw)
            spec = body["spec"]
            token = spec["token"]
            if body.get("kind", "TokenReview") != "TokenReview" or not isinstance(token, str):
                raise ValueError("not a TokenReview")
        except (ValueError, KeyError, TypeError):
            self._send(400, _status_body(400, "BadRequest", "malformed TokenReview"))
            return
        fault, identity = self.api._record(token, body)
        if fault is not None:
            if fault.delay and self.api.stopping.wait(fault.delay):
                return
            if fault.drop:
                self.close_connection = True
                self.connection.close()
                return
            if fault.status is not None:
                reason = _REASONS.get(fault.status, "Unknown")
                message = (fault.message or reason).replace("{token}", token)
                self._send(fault.status, _status_body(fault.status, reason, message))
                return
        if fault is not None and fault.review_error is not None:
            status = {"user": {}, "error": fault.review_error.replace("{token}", token)}
        else:
            status = _review(spec, identity)
        self._send(
            201,
            {
                "kind": "TokenReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "spec": {"token": token, "audiences": spec.get("audiences") or []},
                "status": status,
            },
        )


def _make_certs() -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a serving certificate for 127.0.0.1/localhost: (ca, cert, key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-apiserver-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


def write_kubeconfig(path: Path, *, server: str, ca_pem: bytes, token: str) -> Path:
    """A kubeconfig as kubectl writes it (JSON is YAML), with inline CA data and a token."""
    import base64

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "citadel-ca", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "citadel-ca"}}],
        "current-context": "test",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


@contextmanager
def running_k8s_api(directory: Path) -> Iterator[FakeKubeApi]:
    """Start the server on an ephemeral loopback port; stop it (promptly) on exit."""
    ca_pem, cert_pem, key_pem = _make_certs()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "apiserver.crt").write_bytes(cert_pem)
    (directory / "apiserver.key").write_bytes(key_pem)
    (directory / "apiserver.key").chmod(0o600)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(directory / "apiserver.crt", directory / "apiserver.key")

    httpd = _TlsServer(("127.0.0.1", 0), _Handler)
    httpd.ssl_context = ctx
    api = FakeKubeApi(
        client_token=secrets.token_urlsafe(24), ca_pem=ca_pem, port=httpd.server_address[1]
    )
    httpd.RequestHandlerClass = type("Handler", (_Handler,), {"api": api})
    thread = threading.Thread(target=httpd.serve_forever, name="fake-kube-api", daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
