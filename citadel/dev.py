"""A stand-in for a cluster's service-account token issuer: dev and tests only.

``citadel up``, ``citadel demo`` and the tests need service-account tokens without a
Kubernetes cluster. This module mints JWTs shaped exactly like projected tokens (same
issuer, claims, ``kid`` and RS256), so the CA's real ``JwksAuthenticator`` verifies them
through the same code path a cluster's tokens take. Nothing here is trusted by default:
the CA only accepts these tokens when pointed at ``DIR/dev-issuer/jwks.json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from citadel.ca.tokens import DEFAULT_AUDIENCE
from citadel.errors import ConfigError

__all__ = [
    "DEV_ISSUER_URL",
    "DevIssuer",
    "dev_issuer_dir",
    "init_dev_issuer",
    "load_dev_issuer",
    "mint_token",
]

#: The issuer kubeadm and most distributions give projected tokens.
DEV_ISSUER_URL: Final = "https://kubernetes.default.svc.cluster.local"
KEY_FILE: Final = "key.pem"
JWKS_FILE: Final = "jwks.json"


def dev_issuer_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "dev-issuer"


def _b64url_uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _kid(public_key: rsa.RSAPublicKey) -> str:
    """Kubernetes' key ID: base64url(SHA-256(DER SubjectPublicKeyInfo))."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


@dataclass(frozen=True, eq=False)
class DevIssuer:
    key: rsa.RSAPrivateKey
    kid: str
    directory: Path

    @property
    def jwks_path(self) -> Path:
        return self.directory / JWKS_FILE

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "use": "sig",
                    "kty": "RSA",
                    "kid": self.kid,
                    "alg": "RS256",
                    "n": _b64url_uint(numbers.n),
                    "e": _b64url_uint(numbers.e),
                }
            ]
        }


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_dev_issuer(state_dir: str | Path) -> DevIssuer:
    d = dev_issuer_dir(state_dir)
    path = d / KEY_FILE
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing; create it with: citadel dev issuer-init --state-dir {state_dir}"
        ) from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{path} must hold an RSA key (tokens are RS256)")
    return DevIssuer(key=key, kid=_kid(key.public_key()), directory=d)


def init_dev_issuer(state_dir: str | Path, *, key_size: int = 2048) -> tuple[DevIssuer, bool]:
    """Create (or reuse) ``DIR/dev-issuer/{key.pem,jwks.json}``. ``(issuer, created)``."""
    d = dev_issuer_dir(state_dir)
    if (d / KEY_FILE).exists():
        issuer = load_dev_issuer(state_dir)
        created = False
    else:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        _write_private(
            d / KEY_FILE,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        issuer = DevIssuer(key=key, kid=_kid(key.public_key()), directory=d)
        created = True
    # Always (re)write the public half so it can never drift from the key.
    tmp = d / f".{JWKS_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(issuer.jwks(), indent=2) + "\n")
    os.replace(tmp, d / JWKS_FILE)
    return issuer, created


def mint_token(
    issuer: DevIssuer,
    *,
    namespace: str,
    service_account: str,
    audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
    ttl: timedelta = timedelta(hours=1),
    clock: Callable[[], float] = time.time,
    pod_name: str | None = None,
    pod_uid: str | None = None,
    issuer_url: str = DEV_ISSUER_URL,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """A JWT with exactly the claims and header of a Kubernetes projected token.

    ``extra_claims`` overrides or adds claims (a ``None`` value removes one), which is
    how tests forge the broken tokens a CA must refuse.
    """
    now = int(clock())
    sa_uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"serviceaccount:{namespace}/{service_account}"))
    pod = pod_name or f"{service_account}-{uuid.uuid4().hex[:10]}"
    claims: dict[str, Any] = {
        "aud": list(audiences),
        "exp": now + int(ttl.total_seconds()),
        "iat": now,
        "iss": issuer_url,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": pod, "uid": pod_uid or str(uuid.uuid4())},
            "serviceaccount": {"name": service_account, "uid": sa_uid},
        },
        "nbf": now,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
    }
    for name, value in (extra_claims or {}).items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return jwt.encode(claims, issuer.key, algorithm="RS256", headers={"kid": issuer.kid})
