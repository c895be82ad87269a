"""Envoy SDS: ``StreamSecrets`` on a Unix socket, serving ``default`` and ``ROOTCA``.

The names are Istio's agent's, so an Envoy configured for istio-agent works unchanged:
``default`` is a ``tls_certificate`` (inline chain + key), ``ROOTCA`` a
``validation_context`` (inline trust bundle).

State-of-the-world xDS rules, per stream:
- every response carries ``version_info`` and a fresh ``nonce``;
- a request whose ``response_nonce`` is not the last one sent is stale and ignored;
- an ACK (nonce echoed, no ``error_detail``) records the accepted version; a NACK
  (``error_detail`` set) is logged and *not* answered — the same content would only be
  refused again — so the next push happens on the next real change;
- the version is a digest of the subscribed resources' content, so a stream is pushed only
  when what it subscribed to actually changed (a rotation pushes ``default``; a bundle
  change pushes ``ROOTCA``); unknown names are simply not returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from citadel.logs import get_logger

__all__ = [
    "ROOTCA",
    "SECRET_TYPE_URL",
    "WORKLOAD_CERT",
    "SdsServicer",
    "SecretStore",
    "start_sds_server",
]

WORKLOAD_CERT = "default"
ROOTCA = "ROOTCA"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
_log = get_logger("citadel.agent.sds")


@dataclass(frozen=True, slots=True)
class _Snapshot:
    generation: int
    resources: dict[str, secret_pb2.Secret]
    digests: dict[str, str]


class SecretStore:
    """The secrets Envoy may ask for; streams wait here for changes. One event loop."""

    def __init__(self) -> None:
        self._resources: dict[str, secret_pb2.Secret] = {}
        self._digests: dict[str, str] = {}
        self._generation = 0
        self._changed = asyncio.Event()

    def _put(self, name: str, secret: secret_pb2.Secret) -> None:
        digest = hashlib.sha256(secret.SerializeToString(deterministic=True)).hexdigest()
        if self._digests.get(name) == digest:
            return
        self._resources[name] = secret
        self._digests[name] = digest
        self._generation += 1
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def set_certificate(self, *, chain_pem: bytes, key_pem: bytes) -> None:
        self._put(
            WORKLOAD_CERT,
            secret_pb2.Secret(
                name=WORKLOAD_CERT,
                tls_certificate=common_pb2.TlsCertificate(
                    certificate_chain=base_pb2.DataSource(inline_bytes=chain_pem),
                    private_key=base_pb2.DataSource(inline_bytes=key_pem),
                ),
            ),
        )

    def set_bundle(self, *, bundle_pem: bytes) -> None:
        self._put(
            ROOTCA,
            secret_pb2.Secret(
                name=ROOTCA,
                validation_context=common_pb2.CertificateValidationContext(
                    trusted_ca=base_pb2.DataSource(inline_bytes=bundle_pem)
                ),
            ),
        )

    def snapshot(self) -> _Snapshot:
        return _Snapshot(self._generation, dict(self._resources), dict(self._digests))

    def changed(self) -> asyncio.Event:
        """An event set at the next change (grab it before reading the snapshot)."""
        return self._changed


def _version(snapshot: _Snapshot, names: Iterable[str]) -> tuple[str, list[str]]:
    present = sorted(n for n in names if n in snapshot.resources)
    h = hashlib.sha256()
    for n in present:
        h.update(n.encode() + b"\0" + snapshot.digests[n].encode() + b"\0")
    return h.hexdigest()[:16], present


class SdsServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    """``envoy.service.secret.v3.SecretDiscoveryService``; streaming only."""

    def __init__(self, store: SecretStore) -> None:
        self._store = store
        self._nonces = itertools.count(1)
        #: Counters, for tests and the admin page: pushes sent, ACKs and NACKs seen.
        self.stats = {"responses": 0, "acks": 0, "nacks": 0, "stale": 0}

    async def StreamSecrets(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for req in request_iterator:
                    await requests.put(req)
            finally:
                await requests.put(None)

        reader = asyncio.create_task(pump())
        names: set[str] | None = None  # None: no request yet; empty set: wildcard
        sent_version: str | None = None
        last_nonce = ""
        try:
            while True:
                changed = self._store.changed()
                snapshot = self._store.snapshot()
                if names is not None:
                    wanted = names or set(snapshot.resources)
                    version, present = _version(snapshot, wanted)
                    if present and version != sent_version:
                        last_nonce = str(next(self._nonces))
                        sent_version = version
                        self.stats["responses"] += 1
                        yield self._response(snapshot, present, version, last_nonce)
                        continue
                get = asyncio.ensure_future(requests.get())
                change = asyncio.ensure_future(changed.wait())
                done, _ = await asyncio.wait({get, change}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    continue
                change.cancel()
                req = get.result()
                if req is None:
                    return
                if req.type_url and req.type_url != SECRET_TYPE_URL:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"this SDS server only serves {SECRET_TYPE_URL}",
                    )
                if req.response_nonce and req.response_nonce != last_nonce:
                    self.stats["stale"] += 1
                    continue
                new_names = set(req.resource_names)
                if req.response_nonce and req.HasField("error_detail"):
                    self.stats["nacks"] += 1
                    _log.warning(
                        "envoy rejected secrets",
                        node=req.node.id,
                        names=sorted(new_names),
                        version=sent_version,
                        error=req.error_detail.message,
                    )
                elif req.response_nonce:
                    self.stats["acks"] += 1
                if names is None or new_names != names:
                    # First request, or a changed subscription: answer it afresh.
                    names = new_names
                    sent_version = None
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    @staticmethod
    def _response(
        snapshot: _Snapshot, names: list[str], version: str, nonce: str
    ) -> discovery_pb2.DiscoveryResponse:
        resources = []
        for name in names:
            packed = any_pb2.Any()
            packed.Pack(snapshot.resources[name])
            resources.append(packed)
        return discovery_pb2.DiscoveryResponse(
            version_info=version, resources=resources, type_url=SECRET_TYPE_URL, nonce=nonce
        )

    async def FetchSecrets(
        self, request: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.DiscoveryResponse:
        snapshot = self._store.snapshot()
        version, present = _version(snapshot, set(request.resource_names) or snapshot.resources)
        return self._response(snapshot, present, version, str(next(self._nonces)))


async def start_sds_server(
    store: SecretStore, socket_path: Path, *, mode: int = 0o600
) -> tuple[grpc.aio.Server, SdsServicer]:
    """Serve SDS on a Unix socket only this user (or group, with 0660) can connect to."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()  # a stale socket from a previous run
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 1024 * 1024),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ]
    )
    servicer = SdsServicer(store)
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    os.chmod(socket_path, mode)
    return server, servicer
