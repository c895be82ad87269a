"""The dev issuer mints tokens indistinguishable in shape from projected tokens."""

from __future__ import annotations

import json
import os
import stat
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from typer.testing import CliRunner

from citadel.cli import app
from citadel.dev import DEV_ISSUER_URL, init_dev_issuer, load_dev_issuer, mint_token
from citadel.errors import ConfigError

T0 = 1_900_000_000


def test_issuer_init_files_and_reuse(tmp_path: Path) -> None:
    issuer, created = init_dev_issuer(tmp_path)
    assert created
    key = tmp_path / "dev-issuer" / "key.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    jwks = json.loads((tmp_path / "dev-issuer" / "jwks.json").read_text())
    (k,) = jwks["keys"]
    assert k["kty"] == "RSA" and k["alg"] == "RS256" and k["use"] == "sig"
    assert k["kid"] == issuer.kid and "d" not in k
    again, created = init_dev_issuer(tmp_path)
    assert not created and again.kid == issuer.kid


def test_load_missing_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="citadel dev issuer-init"):
        load_dev_issuer(tmp_path)


def test_token_has_projected_shape(tmp_path: Path) -> None:
    issuer, _ = init_dev_issuer(tmp_path)
    tok = mint_token(
        issuer,
        namespace="shop",
        service_account="cart",
        audiences=("istio-ca", "other"),
        ttl=timedelta(minutes=10),
        clock=lambda: T0,
        pod_name="cart-abc",
    )
    header = jwt.get_unverified_header(tok)
    assert header == {"alg": "RS256", "kid": issuer.kid, "typ": "JWT"}
    pub = jwt.PyJWK(issuer.jwks()["keys"][0]).key
    claims = jwt.decode(
        tok,
        pub,
        algorithms=["RS256"],
        audience="istio-ca",
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert set(claims) == {"aud", "exp", "iat", "iss", "jti", "kubernetes.io", "nbf", "sub"}
    assert claims["iss"] == DEV_ISSUER_URL == "https://kubernetes.default.svc.cluster.local"
    assert claims["sub"] == "system:serviceaccount:shop:cart"
    assert claims["aud"] == ["istio-ca", "other"]
    assert claims["iat"] == claims["nbf"] == T0 and claims["exp"] == T0 + 600
    k8s = claims["kubernetes.io"]
    assert k8s["namespace"] == "shop"
    assert k8s["serviceaccount"]["name"] == "cart" and k8s["serviceaccount"]["uid"]
    assert k8s["pod"]["name"] == "cart-abc" and k8s["pod"]["uid"]


def test_extra_claims_override_and_remove(tmp_path: Path) -> None:
    issuer, _ = init_dev_issuer(tmp_path)
    tok = mint_token(
        issuer, namespace="a", service_account="b", extra_claims={"exp": None, "iss": "x"}
    )
    claims = jwt.decode(tok, options={"verify_signature": False})
    assert "exp" not in claims and claims["iss"] == "x"


def test_cli_issuer_init_and_token(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["dev", "issuer-init", "--state-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "dev",
            "token",
            "--state-dir",
            str(tmp_path),
            "--namespace",
            "default",
            "--service-account",
            "web",
            "--audience",
            "aud1",
            "--ttl",
            "5m",
        ],
    )
    assert r.exit_code == 0, r.output
    tok = r.stdout.strip().splitlines()[-1]
    claims = jwt.decode(tok, options={"verify_signature": False})
    assert claims["aud"] == ["aud1"] and claims["exp"] - claims["iat"] == 300


def test_cli_token_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["dev", "token", "--state-dir", str(tmp_path), "-n", "a", "-s", "b"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "issuer-init" in r.output
    r = runner.invoke(app, [*args, "--ttl", "soon"])
    assert r.exit_code == 2 and "--ttl" in r.output
