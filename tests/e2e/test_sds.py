"""SDS end to end: the real CA -> the agent -> a real gRPC xDS client on the Unix socket."""

from __future__ import annotations

import asyncio
import stat
from datetime import UTC, datetime

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from citadel.agent.agent import AgentConfig
from citadel.agent.run import start_agent
from citadel.agent.sds import ROOTCA, WORKLOAD_CERT
from tests.citadel.agent.ca_harness import CaHarness
from tests.citadel.agent.pki import MiniCA
from tests.citadel.agent.test_sds import XdsClient, secrets

PUB = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _leaf_and_key(secret) -> tuple[x509.Certificate, object]:
    tls = secret.tls_certificate
    leaf = x509.load_pem_x509_certificates(tls.certificate_chain.inline_bytes)[0]
    key = serialization.load_pem_private_key(tls.private_key.inline_bytes, None)
    return leaf, key


def test_sds_serves_acks_pushes_on_rotation_and_bundle_change_handles_nack(tmp_path):
    harness = CaHarness(tmp_path / "ca")
    harness.start()
    token = tmp_path / "token"
    token.write_text(harness.token("shop", "cart"))
    sock = tmp_path / "run" / "sds.sock"
    config = AgentConfig(
        ca_address=harness.address,
        ca_root=harness.root_path,
        token_file=token,
        out_dir=tmp_path / "out",
        ttl_seconds=3,
        bundle_poll_seconds=0.3,
        backoff_initial=0.1,
        backoff_max=0.5,
    )

    async def go() -> None:
        running = await start_agent(config, sds_socket=sock)
        channel = grpc.aio.insecure_channel(f"unix:{sock}")
        try:
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            c = XdsClient(channel)
            await c.send([WORKLOAD_CERT, ROOTCA])
            r1 = await c.recv(timeout=10)
            got = secrets(r1)
            if set(got) != {WORKLOAD_CERT, ROOTCA}:  # first push raced the second secret
                await c.send([WORKLOAD_CERT, ROOTCA], version=r1.version_info, nonce=r1.nonce)
                r1 = await c.recv()
                got = secrets(r1)
            leaf1, key1 = _leaf_and_key(got[WORKLOAD_CERT])
            assert leaf1.public_key().public_bytes(*PUB) == key1.public_key().public_bytes(*PUB)
            san = leaf1.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
                "spiffe://cluster.local/ns/shop/sa/cart"
            ]
            roots = x509.load_pem_x509_certificates(
                got[ROOTCA].validation_context.trusted_ca.inline_bytes
            )
            assert roots == x509.load_pem_x509_certificates(harness.root_path.read_bytes())
            await c.send([WORKLOAD_CERT, ROOTCA], version=r1.version_info, nonce=r1.nonce)

            # Rotation: a push with a new version and a new certificate, no request needed.
            r2 = await c.recv(timeout=10)
            assert r2.version_info != r1.version_info
            leaf2, key2 = _leaf_and_key(secrets(r2)[WORKLOAD_CERT])
            assert leaf2.serial_number != leaf1.serial_number
            assert leaf2.public_key().public_bytes(*PUB) == key2.public_key().public_bytes(*PUB)

            # NACK it: no re-push of the same content; the next push is the next rotation.
            await c.send(
                [WORKLOAD_CERT, ROOTCA], version=r1.version_info, nonce=r2.nonce, error="nope"
            )
            t_nack = datetime.now(UTC)
            r3 = await c.recv(timeout=10)
            leaf3, _ = _leaf_and_key(secrets(r3)[WORKLOAD_CERT])
            assert leaf3.serial_number != leaf2.serial_number
            assert running.agent.renew_at is not None
            assert running.sds.stats["nacks"] == 1
            assert (datetime.now(UTC) - t_nack).total_seconds() > 0.3  # not a tight loop
            await c.send([WORKLOAD_CERT, ROOTCA], version=r3.version_info, nonce=r3.nonce)

            # Bundle change at the CA: ROOTCA is pushed with the new authority.
            extra = MiniCA.create()
            harness.root_path.write_bytes(harness.root_path.read_bytes() + extra.root_pem())
            while True:
                r4 = await c.recv(timeout=10)
                s4 = secrets(r4)
                bundle = x509.load_pem_x509_certificates(
                    s4[ROOTCA].validation_context.trusted_ca.inline_bytes
                )
                await c.send([WORKLOAD_CERT, ROOTCA], version=r4.version_info, nonce=r4.nonce)
                if extra.root in bundle:
                    break
            assert extra.root in x509.load_pem_x509_certificates(
                (tmp_path / "out" / "bundle.pem").read_bytes()
            )
            await c.outbox.put(None)
        finally:
            await channel.close()
            await running.close()

    try:
        asyncio.run(go())
    finally:
        harness.close()
