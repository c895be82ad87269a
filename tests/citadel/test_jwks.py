"""JWKS token authentication: projected tokens pass; every forgery is refused by name."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwt.algorithms import ECAlgorithm

from citadel.ca.jwks import JwksAuthenticator
from citadel.dev import DevIssuer, init_dev_issuer, mint_token
from citadel.errors import AuthenticationError, ConfigError, Unavailable

T0 = 1_900_000_000.0


def clock() -> float:
    return T0


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> DevIssuer:
    return init_dev_issuer(tmp_path_factory.mktemp("state"))[0]


@pytest.fixture(scope="module")
def auth(issuer: DevIssuer) -> JwksAuthenticator:
    return JwksAuthenticator(jwks_file=issuer.jwks_path, clock=clock)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def token(issuer: DevIssuer, **kw: Any) -> str:
    kw.setdefault("namespace", "default")
    kw.setdefault("service_account", "web")
    kw.setdefault("clock", clock)
    return mint_token(issuer, **kw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw_jwt(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    sig = sign(signing_input.encode()) if sign else b""
    return signing_input + "." + _b64(sig)


def _claims(issuer: DevIssuer) -> dict[str, Any]:
    return jwt.decode(token(issuer), options={"verify_signature": False})


# ------------------------------------------------------------------ accepted


def test_valid_token_gives_caller(auth: JwksAuthenticator, issuer: DevIssuer) -> None:
    caller = run(auth.authenticate(token(issuer, pod_name="web-1", pod_uid="uid-1")))
    assert (caller.namespace, caller.service_account) == ("default", "web")
    assert caller.subject == "system:serviceaccount:default:web"
    assert caller.pod_name == "web-1" and caller.pod_uid == "uid-1"
    assert caller.audiences == ("istio-ca",)
    assert caller.authenticator == "jwks"
    assert caller.expires_at is not None and caller.expires_at.timestamp() == T0 + 3600
    assert caller.extra["issuer"] == "https://kubernetes.default.svc.cluster.local"


def test_leeway_tolerates_small_skew(auth: JwksAuthenticator, issuer: DevIssuer) -> None:
    tok = token(issuer, ttl=timedelta(seconds=60))
    late = JwksAuthenticator(jwks_file=issuer.jwks_path, clock=lambda: T0 + 60 + 25)
    assert run(late.authenticate(tok)).namespace == "default"  # 25 s past exp
    ahead = token(issuer, clock=lambda: T0 + 25)  # the issuer's clock runs 25 s fast
    assert run(auth.authenticate(ahead)).namespace == "default"


def test_configured_audiences_and_issuers(issuer: DevIssuer) -> None:
    a = JwksAuthenticator(
        jwks_file=issuer.jwks_path,
        clock=clock,
        audiences=["citadel", "istio-ca"],
        issuers=["https://issuer.example"],
    )
    tok = token(issuer, audiences=["citadel"], issuer_url="https://issuer.example")
    assert run(a.authenticate(tok)).audiences == ("citadel",)


def test_es256_keys(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="ec1", use="sig")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    a = JwksAuthenticator(jwks_file=tmp_path / "jwks.json", clock=clock)
    claims = {
        "iss": "https://kubernetes.default.svc",
        "sub": "system:serviceaccount:ns:sa",
        "aud": "istio-ca",
        "exp": T0 + 60,
        "iat": T0,
        "kubernetes.io": {"namespace": "ns", "serviceaccount": {"name": "sa", "uid": "u"}},
    }
    tok = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "ec1"})
    caller = run(a.authenticate(tok))
    assert (caller.namespace, caller.service_account, caller.pod_name) == ("ns", "sa", None)
    es384 = _raw_jwt({"alg": "ES384", "kid": "ec1"}, claims, lambda d: b"\x00" * 96)
    with pytest.raises(AuthenticationError, match="curve"):
        run(a.authenticate(es384))


# ------------------------------------------------------------------ refused


def _forgeries(issuer: DevIssuer) -> list[tuple[str, str, str]]:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    base = _claims(issuer)
    pub_pem = issuer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def hs256(data: bytes) -> bytes:
        return hmac.new(pub_pem, data, hashlib.sha256).digest()

    def rs256(data: bytes) -> bytes:
        return issuer.key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def k8s(ns: str, sa: str) -> dict[str, Any]:
        return {"namespace": ns, "serviceaccount": {"name": sa, "uid": "x"}}

    rs = {"kid": issuer.kid}
    return [
        ("empty", "", "missing bearer token"),
        ("oversized", "a" * 20000, "larger than"),
        ("not-a-jwt", "hello", "well-formed JWT"),
        ("garbage-segments", "a.b.c", "well-formed JWT"),
        ("alg-none", _raw_jwt({"alg": "none", "kid": issuer.kid}, base), "'none' is not accepted"),
        (
            "hs256-with-public-key",
            _raw_jwt({"alg": "HS256", "kid": issuer.kid, "typ": "JWT"}, base, hs256),
            "'HS256' is not accepted",
        ),
        (
            "es256-header-on-rsa-key",
            _raw_jwt({"alg": "ES256", "kid": issuer.kid}, base, lambda d: b"\x00" * 64),
            "does not match its signing key",
        ),
        (
            "wrong-signing-key",
            jwt.encode(base, other, algorithm="RS256", headers=rs),
            "signature does not verify",
        ),
        (
            "tampered-claims",
            _raw_jwt(
                {"alg": "RS256", "kid": issuer.kid, "typ": "JWT"},
                {**base, "sub": "system:serviceaccount:kube-system:admin"},
            ).rsplit(".", 1)[0]
            + "."
            + token(issuer).rsplit(".", 1)[1],
            "signature does not verify",
        ),
        ("unknown-kid", jwt.encode(base, other, "RS256", headers={"kid": "nope"}), "unknown key"),
        ("expired", token(issuer, clock=lambda: T0 - 7200), "expired"),
        (
            "not-yet-valid",
            token(issuer, extra_claims={"nbf": int(T0) + 600}),
            "not valid before",
        ),
        ("issued-in-future", token(issuer, extra_claims={"iat": int(T0) + 600}), "future"),
        ("no-exp", token(issuer, extra_claims={"exp": None}), "no expiry"),
        (
            "legacy-secret-token",
            jwt.encode(
                {
                    "iss": "kubernetes/serviceaccount",
                    "sub": "system:serviceaccount:default:web",
                    "kubernetes.io/serviceaccount/namespace": "default",
                },
                issuer.key,
                "RS256",
                headers=rs,
            ),
            "legacy",
        ),
        ("exp-not-number", token(issuer, extra_claims={"exp": "tomorrow"}), "exp"),
        ("wrong-issuer", token(issuer, issuer_url="https://evil.example"), "not trusted"),
        ("wrong-audience", token(issuer, audiences=["vault"]), "audience"),
        ("no-audience", token(issuer, extra_claims={"aud": None}), "audience"),
        (
            "user-not-service-account",
            token(issuer, extra_claims={"sub": "admin"}),
            "service account",
        ),
        (
            "sub-disagrees-with-claims",
            token(issuer, extra_claims={"kubernetes.io": k8s("kube-system", "web")}),
            "does not agree",
        ),
        (
            "sa-disagrees-with-claims",
            token(issuer, extra_claims={"kubernetes.io": k8s("default", "admin")}),
            "does not agree",
        ),
        ("no-kubernetes-claims", token(issuer, extra_claims={"kubernetes.io": None}), "lacks"),
        (
            "exp-infinity",
            _raw_jwt({"alg": "RS256", "kid": issuer.kid}, {**base, "exp": float("inf")}, rs256),
            "well-formed JWT",
        ),
        (
            "exp-far-future",
            _raw_jwt({"alg": "RS256", "kid": issuer.kid}, {**base, "exp": 10**20}, rs256),
            "plausible timestamp",
        ),
        (
            "crit-header",
            _raw_jwt({"alg": "RS256", "kid": issuer.kid, "crit": ["x"], "x": 1}, base, rs256),
            "crit",
        ),
        (
            "padded-base64",
            token(issuer).split(".")[0] + "==." + ".".join(token(issuer).split(".")[1:]),
            "well-formed JWT",
        ),
    ]


_FORGERY_IDS = [
    "empty",
    "oversized",
    "not-a-jwt",
    "garbage-segments",
    "alg-none",
    "hs256-with-public-key",
    "es256-header-on-rsa-key",
    "wrong-signing-key",
    "tampered-claims",
    "unknown-kid",
    "expired",
    "not-yet-valid",
    "issued-in-future",
    "no-exp",
    "legacy-secret-token",
    "exp-not-number",
    "wrong-issuer",
    "wrong-audience",
    "no-audience",
    "user-not-service-account",
    "sub-disagrees-with-claims",
    "sa-disagrees-with-claims",
    "no-kubernetes-claims",
    "exp-infinity",
    "exp-far-future",
    "crit-header",
    "padded-base64",
]


@pytest.fixture(scope="module")
def forgeries(issuer: DevIssuer) -> dict[str, tuple[str, str]]:
    table = {name: (tok, msg) for name, tok, msg in _forgeries(issuer)}
    assert list(table) == _FORGERY_IDS
    return table


@pytest.mark.parametrize("name", _FORGERY_IDS)
def test_forged_tokens_refused(
    auth: JwksAuthenticator, forgeries: dict[str, tuple[str, str]], name: str
) -> None:
    tok, message = forgeries[name]
    with pytest.raises(AuthenticationError, match=message) as info:
        run(auth.authenticate(tok))
    assert info.value.status == "UNAUTHENTICATED"
    if tok:
        assert tok not in info.value.message


def test_expiry_beyond_leeway(issuer: DevIssuer) -> None:
    tok = token(issuer, ttl=timedelta(seconds=60))
    late = JwksAuthenticator(jwks_file=issuer.jwks_path, clock=lambda: T0 + 60 + 31)
    with pytest.raises(AuthenticationError, match="expired"):
        run(late.authenticate(tok))


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"jwks_file": "x", "oidc_issuer": "https://a"}, "exactly one"),
        ({"jwks_file": "/nonexistent/jwks.json"}, "cannot read"),
        ({"oidc_issuer": "http://issuer.example"}, "https"),
        ({"oidc_issuer": "https://a", "algorithms": ["HS256"]}, "never none or HMAC"),
        ({"oidc_issuer": "https://a", "algorithms": ["none"]}, "not allowed"),
        ({"oidc_issuer": "https://a", "audiences": []}, "audience"),
        ({"oidc_issuer": "https://a", "leeway": timedelta(hours=1)}, "leeway"),
    ],
    ids=[
        "no-source",
        "two-sources",
        "missing-file",
        "plain-http-remote",
        "hmac-alg",
        "none-alg",
        "no-audience",
        "huge-leeway",
    ],
)
def test_bad_configuration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JwksAuthenticator(**kwargs)


def test_jwks_file_without_usable_keys(tmp_path: Path) -> None:
    f = tmp_path / "jwks.json"
    f.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}))
    with pytest.raises(ConfigError, match="no usable"):
        JwksAuthenticator(jwks_file=f)


def test_file_rotation_picked_up_on_unknown_kid(tmp_path: Path) -> None:
    state = tmp_path / "s"
    first, _ = init_dev_issuer(state)
    now = [T0]
    a = JwksAuthenticator(jwks_file=first.jwks_path, clock=lambda: now[0])
    # Rotate: a new issuer key replaces the file.
    (state / "dev-issuer" / "key.pem").unlink()
    second, _ = init_dev_issuer(state)
    tok = mint_token(second, namespace="a", service_account="b", clock=lambda: now[0])
    with pytest.raises(AuthenticationError, match="unknown key"):
        run(a.authenticate(tok))  # within the refresh interval of the initial load
    now[0] += 31
    assert run(a.authenticate(tok)).namespace == "a"


# ------------------------------------------------------------------ OIDC discovery


class _Issuer:
    def __init__(self, jwks: dict[str, Any]) -> None:
        self.jwks = jwks
        self.hits: list[str] = []
        self.fail = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append(self.path)
                if outer.fail:
                    self.send_response(503)
                    self.end_headers()
                    return
                base = f"http://127.0.0.1:{self.server.server_address[1]}"
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": base, "jwks_uri": base + "/openid/v1/jwks"}
                elif self.path == "/openid/v1/jwks":
                    body = outer.jwks
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def oidc(issuer: DevIssuer) -> Iterator[_Issuer]:
    srv = _Issuer(issuer.jwks())
    yield srv
    srv.server.shutdown()
    srv.server.server_close()


def test_oidc_discovery_cache_and_rate_limited_refetch(oidc: _Issuer, issuer: DevIssuer) -> None:
    now = [T0]

    async def scenario() -> None:
        a = JwksAuthenticator(oidc_issuer=oidc.url, clock=lambda: now[0])
        try:
            tok = token(issuer, issuer_url=oidc.url)
            assert (await a.authenticate(tok)).service_account == "web"
            assert oidc.hits == ["/.well-known/openid-configuration", "/openid/v1/jwks"]
            await a.authenticate(tok)
            assert len(oidc.hits) == 2  # cached
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            forged = jwt.encode(_claims(issuer), other, "RS256", headers={"kid": "rotated"})
            for _ in range(20):  # a storm of unknown kids: at most one refetch
                with pytest.raises(AuthenticationError, match="unknown key"):
                    await a.authenticate(forged)
            assert len(oidc.hits) == 2  # the initial fetch is recent: rate-limited
            now[0] += 31
            with pytest.raises(AuthenticationError, match="unknown key"):
                await a.authenticate(forged)
            with pytest.raises(AuthenticationError, match="unknown key"):
                await a.authenticate(forged)
            assert len(oidc.hits) == 4  # exactly one more discovery + jwks
            # The issuer goes down: cached keys keep working.
            oidc.fail = True
            now[0] += 3600
            assert await a.authenticate(token(issuer, issuer_url=oidc.url, clock=lambda: now[0]))
        finally:
            await a.aclose()

    run(scenario())


def test_oidc_unreachable_is_unavailable(oidc: _Issuer, issuer: DevIssuer) -> None:
    oidc.fail = True

    async def scenario() -> None:
        a = JwksAuthenticator(oidc_issuer=oidc.url, clock=clock)
        try:
            with pytest.raises(Unavailable, match="HTTP 503"):
                await a.authenticate(token(issuer, issuer_url=oidc.url))
        finally:
            await a.aclose()

    run(scenario())
