"""SDS over a real Unix socket with a real gRPC xDS client (the servicer is the real one)."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from citadel.agent.sds import ROOTCA, SECRET_TYPE_URL, WORKLOAD_CERT, SecretStore, start_sds_server


class XdsClient:
    """A minimal SotW xDS client: send requests, read responses, decode secrets."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while (req := await self.outbox.get()) is not None:
                yield req

        self.call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(requests())
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        # One reader for the stream's life: a timed-out read must not cancel the RPC.
        try:
            async for resp in self.call:
                await self.inbox.put(resp)
        except grpc.aio.AioRpcError as err:
            await self.inbox.put(err)

    async def send(self, names, version="", nonce="", error=None):
        req = discovery_pb2.DiscoveryRequest(
            version_info=version,
            resource_names=names,
            type_url=SECRET_TYPE_URL,
            response_nonce=nonce,
        )
        req.node.id = "test-node"
        if error:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.outbox.put(req)

    async def recv(self, timeout: float = 2.0) -> discovery_pb2.DiscoveryResponse:
        item = await asyncio.wait_for(self.inbox.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def nothing(self, wait: float = 0.2) -> bool:
        try:
            await asyncio.wait_for(self.inbox.get(), wait)
        except TimeoutError:
            return True
        return False


def secrets(resp: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    out = {}
    for any_ in resp.resources:
        s = secret_pb2.Secret()
        assert any_.Unpack(s)
        out[s.name] = s
    return out


async def _session(tmp_path, body):
    store = SecretStore()
    sock = tmp_path / "sds.sock"
    server, servicer = await start_sds_server(store, sock)
    channel = grpc.aio.insecure_channel(f"unix:{sock}")
    try:
        return await body(store, servicer, channel, sock)
    finally:
        await channel.close()
        await server.stop(0)


def test_serves_default_and_rootca_acks_pushes_on_change(tmp_path):
    async def body(store, servicer, channel, sock) -> None:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        c = XdsClient(channel)
        await c.send([WORKLOAD_CERT, ROOTCA])
        assert await c.nothing()  # nothing to serve yet: the stream waits
        store.set_bundle(bundle_pem=b"ROOTS-1")
        store.set_certificate(chain_pem=b"CHAIN-1", key_pem=b"KEY-1")
        r1 = await c.recv()
        got = secrets(r1)
        # The first push may race the two updates; converge to both.
        if set(got) != {WORKLOAD_CERT, ROOTCA}:
            await c.send([WORKLOAD_CERT, ROOTCA], version=r1.version_info, nonce=r1.nonce)
            r1 = await c.recv()
            got = secrets(r1)
        assert r1.type_url == SECRET_TYPE_URL and r1.version_info and r1.nonce
        assert got[WORKLOAD_CERT].tls_certificate.certificate_chain.inline_bytes == b"CHAIN-1"
        assert got[WORKLOAD_CERT].tls_certificate.private_key.inline_bytes == b"KEY-1"
        assert got[ROOTCA].validation_context.trusted_ca.inline_bytes == b"ROOTS-1"
        await c.send([WORKLOAD_CERT, ROOTCA], version=r1.version_info, nonce=r1.nonce)  # ACK
        assert await c.nothing()  # no change, no push
        store.set_certificate(chain_pem=b"CHAIN-1", key_pem=b"KEY-1")  # same content
        assert await c.nothing()
        store.set_certificate(chain_pem=b"CHAIN-2", key_pem=b"KEY-2")  # rotation
        r2 = await c.recv()
        assert r2.version_info != r1.version_info and r2.nonce != r1.nonce
        assert secrets(r2)[WORKLOAD_CERT].tls_certificate.private_key.inline_bytes == b"KEY-2"
        await c.send([WORKLOAD_CERT, ROOTCA], version=r2.version_info, nonce=r2.nonce)
        assert await c.nothing()
        assert servicer.stats["acks"] >= 2
        await c.outbox.put(None)

    asyncio.run(_session(tmp_path, body))


def test_nack_is_not_answered_with_a_tight_repush_loop(tmp_path):
    async def body(store, servicer, channel, sock) -> None:
        store.set_certificate(chain_pem=b"BAD", key_pem=b"BAD")
        c = XdsClient(channel)
        await c.send([WORKLOAD_CERT])
        r1 = await c.recv()
        await c.send([WORKLOAD_CERT], version="", nonce=r1.nonce, error="bad certificate")
        assert await c.nothing(0.5)
        assert servicer.stats["nacks"] == 1 and servicer.stats["responses"] == 1
        store.set_certificate(chain_pem=b"GOOD", key_pem=b"GOOD")  # the next real change
        r2 = await c.recv()
        assert secrets(r2)[WORKLOAD_CERT].tls_certificate.private_key.inline_bytes == b"GOOD"
        await c.outbox.put(None)

    asyncio.run(_session(tmp_path, body))


def test_only_subscribed_and_known_resources_are_returned(tmp_path):
    async def body(store, servicer, channel, sock) -> None:
        store.set_certificate(chain_pem=b"C", key_pem=b"K")
        store.set_bundle(bundle_pem=b"R")
        c = XdsClient(channel)
        await c.send([ROOTCA, "file-cert:/nope"])
        r1 = await c.recv()
        assert list(secrets(r1)) == [ROOTCA]
        await c.send([ROOTCA, "file-cert:/nope"], version=r1.version_info, nonce=r1.nonce)
        store.set_certificate(chain_pem=b"C2", key_pem=b"K2")  # not subscribed: no push
        assert await c.nothing()
        store.set_bundle(bundle_pem=b"R2")
        assert secrets(await c.recv())[ROOTCA].validation_context.trusted_ca.inline_bytes == b"R2"
        # A wildcard stream (no names) gets everything.
        w = XdsClient(channel)
        await w.send([])
        assert set(secrets(await w.recv())) == {WORKLOAD_CERT, ROOTCA}
        await c.outbox.put(None)
        await w.outbox.put(None)

    asyncio.run(_session(tmp_path, body))


def test_stale_nonce_is_ignored(tmp_path):
    async def body(store, servicer, channel, sock) -> None:
        store.set_certificate(chain_pem=b"C", key_pem=b"K")
        c = XdsClient(channel)
        await c.send([WORKLOAD_CERT])
        r1 = await c.recv()
        store.set_certificate(chain_pem=b"C2", key_pem=b"K2")
        r2 = await c.recv()
        # A late NACK of r1 must neither count nor trigger anything.
        await c.send([WORKLOAD_CERT], nonce=r1.nonce, error="late")
        assert await c.nothing()
        assert servicer.stats["stale"] == 1 and servicer.stats["nacks"] == 0
        await c.send([WORKLOAD_CERT], version=r2.version_info, nonce=r2.nonce)
        assert await c.nothing()
        await c.outbox.put(None)

    asyncio.run(_session(tmp_path, body))


def test_wrong_type_url_is_refused(tmp_path):
    async def body(store, servicer, channel, sock) -> None:
        c = XdsClient(channel)
        req = discovery_pb2.DiscoveryRequest(
            type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"
        )
        await c.outbox.put(req)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.recv()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(_session(tmp_path, body))
