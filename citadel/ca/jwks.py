"""Offline verification of projected service-account tokens against the cluster's JWKS.

Keys come from a JWKS file (a copy of the API server's ``/openid/v1/jwks``, or the dev
issuer's) or from an OIDC issuer's discovery document. Either way they are cached and
refetched when a token names a ``kid`` we have not seen (key rotation), at most once per
``refresh_interval`` so a flood of forged ``kid`` values cannot turn into a flood of
fetches.

The algorithm is checked from the header *before* any verification: ``none`` and HMAC
are never allowed (an attacker who can choose HS256 can sign with the public key as the
secret). Claim checks use the injected clock, not pyjwt's, so tests can fix time.

When an OIDC issuer stops answering, cached keys keep verifying (a short outage must not
stop every renewal) until they are ``max_stale`` old; past that, and for any ``kid`` the
cache does not hold while the issuer cannot be asked, the answer is ``Unavailable``
rather than ``AuthenticationError``: the CA cannot tell a forgery from a rotated key, and
the caller should retry, not discard its token.

Offline verification cannot know that a pod was deleted (TokenReview can); the token's
short lifetime is the bound on that.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms

from citadel.ca.tokens import (
    DEFAULT_AUDIENCE,
    Caller,
    check_token_shape,
    parse_service_account_username,
)
from citadel.errors import AuthenticationError, ConfigError, Unavailable
from citadel.logs import get_logger

__all__ = [
    "DEFAULT_ALGORITHMS",
    "DEFAULT_ISSUERS",
    "DEFAULT_LEEWAY",
    "LEGACY_ISSUER",
    "JwksAuthenticator",
]

DEFAULT_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
#: The issuers a cluster's API server most commonly stamps on projected tokens.
DEFAULT_ISSUERS: Final = (
    "https://kubernetes.default.svc.cluster.local",
    "https://kubernetes.default.svc",
)
DEFAULT_LEEWAY: Final = timedelta(seconds=30)
LEGACY_ISSUER: Final = "kubernetes/serviceaccount"
MAX_JWKS_BYTES: Final = 1024 * 1024
_KTY_FOR_ALG: Final = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
_MAX_TIMESTAMP: Final = 2**40  # year ~36800: larger values are an attack on the parser
_CURVE_FOR_ALG: Final = {"ES256": "secp256r1", "ES384": "secp384r1"}

_log = get_logger("citadel.ca.jwks")


def _clip(value: object, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


class _Key:
    __slots__ = ("alg", "key", "kty")

    def __init__(self, key: Any, kty: str, alg: str | None) -> None:
        self.key, self.kty, self.alg = key, kty, alg


def _parse_jwks(doc: object, source: str) -> dict[str, _Key]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(f"{source} is not a JWKS document (no 'keys' list)")
    keys: dict[str, _Key] = {}
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            continue
        kty, use = jwk.get("kty"), jwk.get("use", "sig")
        if use != "sig" or kty not in ("RSA", "EC"):
            continue  # never "oct" (HMAC secrets) or encryption keys
        try:
            key = (RSAAlgorithm if kty == "RSA" else ECAlgorithm).from_jwk(jwk)
        except (jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            _log.warning("jwks.key_skipped", source=source, index=i)
            continue
        if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            key = key.public_key()  # a JWKS never needs private members; drop them
        kid = jwk.get("kid")
        keys[str(kid) if kid is not None else ""] = _Key(key, kty, jwk.get("alg"))
    if not keys:
        raise ConfigError(f"{source} holds no usable RSA or EC signing keys")
    return keys


_B64URL = re.compile(rb"[A-Za-z0-9_-]*")
_ALGORITHMS: Final = {name: get_default_algorithms()[name] for name in DEFAULT_ALGORITHMS}


def _b64decode(segment: bytes) -> bytes:
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment:
        raise ValueError("non-canonical base64url")
    return raw


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_jws(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Strict compact JWS: three canonical base64url segments, JSON objects in the first two."""
    try:
        data = token.encode("ascii")
        parts = data.split(b".")
        if len(parts) != 3:
            raise ValueError("not three segments")
        header = json.loads(_b64decode(parts[0]), parse_constant=_no_constants)
        claims = json.loads(_b64decode(parts[1]), parse_constant=_no_constants)
        signature = _b64decode(parts[2])
    except (ValueError, UnicodeError, binascii.Error):
        raise AuthenticationError("bearer token is not a well-formed JWT") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise AuthenticationError("bearer token is not a well-formed JWT")
    return header, claims, parts[0] + b"." + parts[1], signature


class JwksAuthenticator:
    """Verifies Kubernetes projected service-account JWTs offline. Safe for concurrent use."""

    name = "jwks"

    def __init__(
        self,
        *,
        jwks_file: str | Path | None = None,
        oidc_issuer: str | None = None,
        issuers: Sequence[str] | None = None,
        audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
        leeway: timedelta = DEFAULT_LEEWAY,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        clock: Callable[[], float] = time.time,
        refresh_interval: timedelta = timedelta(seconds=30),
        max_age: timedelta = timedelta(minutes=10),
        max_stale: timedelta = timedelta(hours=6),
        http_timeout: float = 5.0,
        ca_file: str | Path | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if (jwks_file is None) == (oidc_issuer is None):
            raise ConfigError("give exactly one of a JWKS file or an OIDC issuer URL")
        bad = [a for a in algorithms if a not in DEFAULT_ALGORITHMS]
        if bad:
            raise ConfigError(
                f"algorithm(s) {', '.join(bad)} not allowed; choose from "
                f"{', '.join(DEFAULT_ALGORITHMS)} (never none or HMAC)"
            )
        if not audiences:
            raise ConfigError("at least one audience is required")
        if leeway < timedelta(0) or leeway > timedelta(minutes=5):
            raise ConfigError("clock leeway must be between 0 and 5 minutes")
        self._file = Path(jwks_file) if jwks_file is not None else None
        self._oidc = oidc_issuer.rstrip("/") if oidc_issuer else None
        if self._oidc is not None:
            parts = urlsplit(self._oidc)
            if parts.scheme != "https" and not (
                parts.scheme == "http" and _is_loopback(parts.hostname or "")
            ):
                raise ConfigError(f"OIDC issuer must be an https:// URL (got {self._oidc})")
        default_issuers = (self._oidc,) if self._oidc else DEFAULT_ISSUERS
        self.issuers = frozenset(issuers or default_issuers)
        self.audiences = frozenset(audiences)
        self.algorithms = frozenset(algorithms)
        self._leeway = leeway.total_seconds()
        self._clock = clock
        self._refresh = refresh_interval.total_seconds()
        self._max_age = max_age.total_seconds()
        if max_stale < max_age:
            raise ConfigError("the key cache's hard expiry must not be shorter than max_age")
        self._max_stale = max_stale.total_seconds()
        #: Why the last refresh failed (``None`` after a success): unknown kids are then
        #: Unavailable, not forgeries.
        self._last_error: str | None = None
        self._timeout = http_timeout
        self._verify: Any = str(ca_file) if ca_file else True
        self._http = http_client
        self._own_http = http_client is None
        self._keys: dict[str, _Key] = {}
        self._loaded_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetches = 0
        if self._file is not None:
            self._keys = self._read_file()
            self._loaded_at = self._attempted_at = clock()

    # ------------------------------------------------------------------ keys

    @property
    def source(self) -> str:
        return str(self._file) if self._file is not None else str(self._oidc)

    def _read_file(self) -> dict[str, _Key]:
        assert self._file is not None
        self.fetches += 1
        try:
            raw = self._file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read JWKS file {self._file}: {exc.strerror}") from None
        if len(raw) > MAX_JWKS_BYTES:
            raise ConfigError(f"JWKS file {self._file} is larger than {MAX_JWKS_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ConfigError(f"JWKS file {self._file} is not JSON") from None
        return _parse_jwks(doc, str(self._file))

    async def _get_json(self, client: httpx.AsyncClient, url: str) -> Any:
        resp = await client.get(url, headers={"accept": "application/json"})
        if resp.status_code != 200:
            raise Unavailable(f"{url} answered HTTP {resp.status_code}")
        if len(resp.content) > MAX_JWKS_BYTES:
            raise Unavailable(f"{url} answered more than {MAX_JWKS_BYTES} bytes")
        try:
            return resp.json()
        except ValueError:
            raise Unavailable(f"{url} did not answer JSON") from None

    async def _fetch_oidc(self) -> dict[str, _Key]:
        assert self._oidc is not None
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self._timeout, verify=self._verify, follow_redirects=False
            )
        self.fetches += 1
        discovery_url = self._oidc + "/.well-known/openid-configuration"
        try:
            discovery = await self._get_json(self._http, discovery_url)
            if not isinstance(discovery, dict) or discovery.get("issuer") != self._oidc:
                raise Unavailable(f"{discovery_url} names a different issuer than {self._oidc}")
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri:
                raise Unavailable(f"{discovery_url} has no jwks_uri")
            doc = await self._get_json(self._http, jwks_uri)
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"cannot fetch signing keys from {self._oidc}: {type(exc).__name__}"
            ) from None
        try:
            return _parse_jwks(doc, jwks_uri)
        except ConfigError as exc:
            raise Unavailable(exc.message) from None

    async def refresh(self, *, force: bool = False) -> None:
        """Reload keys; rate-limited unless ``force``. Keeps the old keys on failure."""
        async with self._lock:
            now = self._clock()
            if not force and now - self._attempted_at < self._refresh:
                return
            self._attempted_at = now
            try:
                keys = self._read_file() if self._file is not None else await self._fetch_oidc()
            except (ConfigError, Unavailable) as exc:
                _log.warning("jwks.refresh_failed", source=self.source, error=exc.message)
                self._last_error = exc.message
                if not self._keys:
                    raise Unavailable(f"no token signing keys available: {exc.message}") from None
                return
            self._keys = keys
            self._loaded_at = now
            self._last_error = None
            _log.info("jwks.refreshed", source=self.source, keys=len(keys))

    async def _key_for(self, kid: str | None) -> _Key:
        if self._oidc is not None:
            if self._clock() - self._loaded_at > self._max_age:
                await self.refresh(force=not self._keys)
            age = self._clock() - self._loaded_at
            if age > self._max_stale:
                raise Unavailable(
                    f"the token signing keys of {self._oidc} are {age / 3600:.1f} h old and "
                    f"cannot be refreshed ({self._last_error or 'no answer'}); nothing is "
                    "issued until the issuer answers",
                    reason="jwks_stale",
                )
        key = self._lookup(kid)
        if key is None:
            await self.refresh()  # maybe rotated; rate-limited
            key = self._lookup(kid)
        if key is None:
            if self._last_error is not None:
                raise Unavailable(
                    f"token is signed with a key this CA does not hold (kid {_clip(kid)!r}) "
                    f"and the key set cannot be refreshed from {self.source} "
                    f"({self._last_error}); retry later",
                    reason="jwks_unavailable",
                )
            raise AuthenticationError(
                f"token is signed with an unknown key (kid {_clip(kid)!r}); "
                f"it was not issued by a trusted issuer",
                reason="unknown_key",
            )
        return key

    def _lookup(self, kid: str | None) -> _Key | None:
        if kid is not None:
            return self._keys.get(kid)
        if len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return None

    # ------------------------------------------------------------------ tokens

    async def authenticate(self, token: str) -> Caller:
        check_token_shape(token)
        header, unverified, signing_input, signature = _parse_jws(token)
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthenticationError(
                f"token algorithm {_clip(alg, 20)!r} is not accepted "
                f"(allowed: {', '.join(sorted(self.algorithms))})",
                reason="bad_algorithm",
            )
        if "crit" in header:
            raise AuthenticationError(
                "token header carries critical extensions ('crit'), which are not supported",
                reason="bad_token",
            )
        if unverified.get("iss") == LEGACY_ISSUER or "exp" not in unverified:
            raise AuthenticationError(
                "token has no expiry (a legacy secret-based service-account token?); "
                "use a projected token with audience " + ", ".join(sorted(self.audiences)),
                reason="legacy_token",
            )
        kid = header.get("kid")
        key = await self._key_for(kid if isinstance(kid, str) else None)
        self._check_key_alg(key, alg)
        # pyjwt's algorithm implementation verifies (it converts JOSE ECDSA signatures);
        # parsing is ours, once, because pyjwt's per-character checks dominate the cost.
        try:
            ok = _ALGORITHMS[alg].verify(signing_input, key.key, signature)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise AuthenticationError("token signature does not verify", reason="bad_signature")
        return self._caller(unverified)

    def _check_key_alg(self, key: _Key, alg: str) -> None:
        if _KTY_FOR_ALG[alg[:2]] != key.kty or (key.alg is not None and key.alg != alg):
            raise AuthenticationError(
                f"token algorithm {alg} does not match its signing key", reason="bad_algorithm"
            )
        curve = _CURVE_FOR_ALG.get(alg)
        if curve is not None and key.key.curve.name != curve:
            raise AuthenticationError(
                f"token algorithm {alg} does not match its key's curve", reason="bad_algorithm"
            )

    def _caller(self, claims: Mapping[str, Any]) -> Caller:
        iss = claims.get("iss")
        if iss not in self.issuers:
            raise AuthenticationError(
                f"token issuer {_clip(iss)!r} is not trusted "
                f"(trusted: {', '.join(sorted(self.issuers))})",
                reason="bad_issuer",
            )
        aud = claims.get("aud")
        auds = (aud,) if isinstance(aud, str) else tuple(a for a in aud or () if isinstance(a, str))
        if not self.audiences.intersection(auds):
            raise AuthenticationError(
                f"token audience {_clip(list(auds))} does not include "
                f"{' or '.join(sorted(self.audiences))}",
                reason="bad_audience",
            )
        now, leeway = self._clock(), self._leeway
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        for label, value in (("exp", exp), ("nbf", nbf), ("iat", iat)):
            if value is not None and (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not 0 <= value < _MAX_TIMESTAMP
            ):
                raise AuthenticationError(
                    f"token claim {label} is not a plausible timestamp", reason="bad_token"
                )
        if exp is None:
            raise AuthenticationError("token has no expiry", reason="legacy_token")
        if now > exp + leeway:
            raise AuthenticationError(
                f"token expired at {_iso(exp)}; mount a fresh projected token",
                reason="token_expired",
            )
        if nbf is not None and now + leeway < nbf:
            raise AuthenticationError(
                f"token is not valid before {_iso(nbf)} (check clocks)",
                reason="token_not_yet_valid",
            )
        if iat is not None and now + leeway < iat:
            raise AuthenticationError(
                f"token was issued in the future ({_iso(iat)}; check clocks)",
                reason="token_not_yet_valid",
            )
        sub = claims.get("sub")
        if not isinstance(sub, str):
            raise AuthenticationError("token has no subject", reason="bad_subject")
        namespace, service_account = parse_service_account_username(sub)
        k8s = claims.get("kubernetes.io")
        if not isinstance(k8s, dict):
            raise AuthenticationError(
                "token lacks the kubernetes.io claims of a projected service-account token",
                reason="bad_subject",
            )
        sa = k8s.get("serviceaccount")
        sa_name = sa.get("name") if isinstance(sa, dict) else None
        if k8s.get("namespace") != namespace or sa_name != service_account:
            raise AuthenticationError(
                "token subject does not agree with its kubernetes.io namespace/serviceaccount "
                "claims",
                reason="bad_subject",
            )
        pod = k8s.get("pod")
        pod = pod if isinstance(pod, dict) else {}
        extra = {"issuer": str(iss)}
        if isinstance(sa, dict) and isinstance(sa.get("uid"), str):
            extra["serviceaccount_uid"] = sa["uid"]
        if isinstance(claims.get("jti"), str):
            extra["jti"] = claims["jti"]
        return Caller(
            namespace=namespace,
            service_account=service_account,
            subject=sub,
            audiences=auds,
            pod_name=pod.get("name") if isinstance(pod.get("name"), str) else None,
            pod_uid=pod.get("uid") if isinstance(pod.get("uid"), str) else None,
            expires_at=datetime.fromtimestamp(exp, UTC),
            authenticator=self.name,
            extra=extra,
        )

    async def aclose(self) -> None:
        if self._http is not None and self._own_http:
            await self._http.aclose()
            self._http = None


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return str(ts)
