"""The trust bundle: SPIFFE JWKS shape, sequence, and the HTTPS ``GET /bundle`` endpoint."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from citadel.ca.bundle import BundleSource, serve_bundle_https
from citadel.errors import AuthorityError
from citadel.spiffe import TrustDomain
from tests.citadel.agent.pki import MiniCA, serving_pair

TD = TrustDomain("cluster.local")
PUB = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _rsa_root() -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa root")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(seconds=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def test_jwks_follows_the_spiffe_bundle_format(tmp_path):
    ec_root = MiniCA.create().root
    rsa_root = _rsa_root()
    roots = tmp_path / "roots.pem"
    roots.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ec_root, rsa_root))
    )
    doc = BundleSource(trust_domain=TD, roots_path=roots, refresh_hint=60).current().jwks()
    assert doc["spiffe_refresh_hint"] == 60
    assert isinstance(doc["spiffe_sequence"], int) and doc["spiffe_sequence"] > 0
    assert [k["kty"] for k in doc["keys"]] == ["EC", "RSA"]
    for key, cert in zip(doc["keys"], (ec_root, rsa_root), strict=True):
        assert key["use"] == "x509-svid"
        assert "kid" not in key
        assert len(key["x5c"]) == 1
        assert x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0])) == cert
        # The JWK's own parameters are the certificate's public key.
        assert jwt.PyJWK(key).key.public_bytes(*PUB) == cert.public_key().public_bytes(*PUB)


def test_sequence_increases_on_change_only_and_last_good_survives(tmp_path):
    roots = tmp_path / "roots.pem"
    a, b = MiniCA.create(), MiniCA.create()
    roots.write_bytes(a.root_pem())
    source = BundleSource(trust_domain=TD, roots_path=roots)
    s1 = source.current().sequence
    assert source.current().sequence == s1
    roots.write_bytes(a.root_pem() + b.root_pem())
    s2 = source.current().sequence
    assert s2 > s1
    roots.write_bytes(b.root_pem())  # a root removed: still increases
    s3 = source.current().sequence
    assert s3 > s2
    roots.write_bytes(b"garbage")
    assert source.current().sequence == s3


@pytest.mark.parametrize(
    "content", [pytest.param(b"", id="empty-file"), pytest.param(b"not pem", id="not-pem")]
)
def test_unusable_roots_at_start_are_a_clear_error(tmp_path, content):
    roots = tmp_path / "roots.pem"
    roots.write_bytes(content)
    with pytest.raises(AuthorityError, match="trust bundle"):
        BundleSource(trust_domain=TD, roots_path=roots)


def test_https_get_bundle(tmp_path):
    ca = MiniCA.create()
    roots = tmp_path / "roots.pem"
    roots.write_bytes(ca.root_pem())
    chain, key = serving_pair(ca)
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cafile=str(roots))

    async def body() -> None:
        source = BundleSource(trust_domain=TD, roots_path=roots, refresh_hint=30)
        server = await serve_bundle_https(source, host="127.0.0.1", port=0, ssl_context=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            async with httpx.AsyncClient(verify=client_ctx) as client:
                r = await client.get(f"https://127.0.0.1:{port}/bundle")
                assert r.status_code == 200
                assert r.headers["content-type"] == "application/json"
                assert r.json() == source.current().jwks()
                r = await client.get(f"https://127.0.0.1:{port}/elsewhere")
                assert r.status_code == 404
                assert r.headers["content-type"] == "application/problem+json"
                r = await client.post(f"https://127.0.0.1:{port}/bundle")
                assert r.status_code == 405
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(body())


def test_attach_publishes_over_grpc_and_https_with_the_ca_s_own_certificate(tmp_path):
    from citadel.ca._proto import bundle_pb2, bundle_pb2_grpc
    from citadel.ca.authority import init_authority
    from citadel.ca.bundle import attach
    from tests.conftest import free_port

    authority = init_authority(tmp_path / "cacerts", trust_domain="cluster.local")
    root_pem = (tmp_path / "cacerts" / "root-cert.pem").read_bytes()
    https_port = free_port()

    async def body() -> None:
        server = grpc.aio.server()
        source = await attach(
            server,
            authority=authority,
            cacerts_dir=tmp_path / "cacerts",
            https_listen=f"127.0.0.1:{https_port}",
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                got = await bundle_pb2_grpc.TrustBundleServiceStub(ch).GetBundle(
                    bundle_pb2.GetBundleRequest()
                )
            assert got.trust_domain == "cluster.local"
            assert [x509.load_der_x509_certificate(d) for d in got.x509_authorities] == [
                x509.load_pem_x509_certificate(root_pem)
            ]
            assert json.loads(got.spiffe_bundle_json) == source.current().jwks()
            # HTTPS, verified with root-cert.pem: the same file workloads trust.
            ctx = ssl.create_default_context(cadata=root_pem.decode())
            async with httpx.AsyncClient(verify=ctx) as client:
                r = await client.get(f"https://127.0.0.1:{https_port}/bundle")
            assert r.status_code == 200
            assert r.json()["keys"][0]["x5c"] == source.current().jwks()["keys"][0]["x5c"]
        finally:
            await server.stop(0)
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.ConnectError):  # closed together with the gRPC server
            async with httpx.AsyncClient(verify=ctx) as client:
                await client.get(f"https://127.0.0.1:{https_port}/bundle")

    asyncio.run(body())


def test_attach_refuses_a_taken_https_port_clearly(tmp_path):
    import socket

    from citadel.ca.authority import init_authority
    from citadel.ca.bundle import attach
    from citadel.errors import ConfigError

    authority = init_authority(tmp_path / "cacerts", trust_domain="cluster.local")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def body() -> None:
            server = grpc.aio.server()
            with pytest.raises(ConfigError, match=f"cannot serve GET /bundle on 127.0.0.1:{port}"):
                await attach(
                    server,
                    authority=authority,
                    cacerts_dir=tmp_path / "cacerts",
                    https_listen=f"127.0.0.1:{port}",
                )

        asyncio.run(body())
