"""A scriptable stand-in for the CA *peer* (not for our code): it lets the agent's unit
tests provoke answers the real CA never gives (wrong key, wrong ID, overload with a hint).
The bundle side is citadel's real ``TrustBundleServicer``. End-to-end tests use the real CA.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from citadel.ca import bundle as bundle_mod
from citadel.ca._proto import ca_pb2, ca_pb2_grpc
from citadel.spiffe import TrustDomain
from tests.citadel.agent.pki import MiniCA, serving_pair


@dataclass
class Script:
    #: One entry consumed per call; when empty, "ok" forever.
    steps: list[str] = field(default_factory=list)
    ttl: timedelta = timedelta(hours=1)
    retry_after: str = "0.4"


class ScriptedCA(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self, pki: MiniCA, script: Script) -> None:
        self.pki = pki
        self.script = script
        self.calls: list[float] = []
        self.authorizations: list[str] = []
        self.other = MiniCA.create()

    async def CreateCertificate(self, request, context):
        loop = asyncio.get_running_loop()
        self.calls.append(loop.time())
        md = dict(context.invocation_metadata())
        self.authorizations.append(md.get("authorization", ""))
        step = self.script.steps.pop(0) if self.script.steps else "ok"
        if step == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down for a test")
        if step == "exhausted":
            context.set_trailing_metadata((("retry-after", self.script.retry_after),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")
        if step == "denied":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "CSR SAN does not match")
        if step == "unauthenticated":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "token did not verify")
        csr = x509.load_pem_x509_csr(request.csr.encode())
        pub = csr.public_key()
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uri = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
        except x509.ExtensionNotFound:
            uri = "spiffe://cluster.local/ns/default/sa/default"
        uris: tuple[str, ...] = (uri,)
        pki = self.pki
        if step == "wrong_key":
            pub = ec.generate_private_key(ec.SECP256R1()).public_key()
        elif step == "wrong_id":
            uris = ("spiffe://cluster.local/ns/evil/sa/x",)
        elif step == "two_uris":
            uris = (uri, "spiffe://cluster.local/ns/evil/sa/x")
        elif step == "other_ca":
            pki = self.other
        ttl = self.script.ttl
        if request.validity_duration:
            ttl = timedelta(seconds=request.validity_duration)
        leaf = pki.issue(pub, uris=uris, ttl=ttl)
        return ca_pb2.IstioCertificateResponse(cert_chain=pki.chain(leaf))


async def start_fake_ca(
    pki: MiniCA, script: Script, roots_file: Path, *, port: int = 0
) -> tuple[grpc.aio.Server, int, ScriptedCA]:
    roots_file.write_bytes(pki.root_pem())
    server = grpc.aio.server()
    ca = ScriptedCA(pki, script)
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(ca, server)
    source = bundle_mod.BundleSource(
        trust_domain=TrustDomain(pki.td), roots_path=roots_file, refresh_hint=1
    )
    bundle_mod.add_to_server(server, source)
    chain, key = serving_pair(pki)
    creds = grpc.ssl_server_credentials([(key, chain)])
    port = server.add_secure_port(f"127.0.0.1:{port}", creds)
    await server.start()
    return server, port, ca
