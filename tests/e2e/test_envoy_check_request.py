"""What a real Envoy puts in the CheckRequest with the ext_authz filter citadel ships.

``citadel.envoyconf.ext_authz_filter`` (and deploy/envoy/sidecar.yaml) send only the trace
headers: citadel still gets host, method, path and the trace ids, and credentials the
client sent (``authorization``, ``cookie``) never reach the authz service. A recording
Check server stands in for citadel here, since the point is what Envoy sends.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2

from citadel import envoyconf as conf
from citadel.envoyproc import EnvoyProcess, find_envoy
from tests.conftest import free_port

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(find_envoy() is None, reason="envoy binary not installed"),
]

CHECK = "/envoy.service.auth.v3.Authorization/Check"


class Recorder:
    """A Check server that allows everything and keeps every CheckRequest it got."""

    def __init__(self) -> None:
        self.seen: list[external_auth_pb2.CheckRequest] = []
        self.lock = threading.Lock()

    def check(self, request: bytes, _context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.seen.append(external_auth_pb2.CheckRequest.FromString(request))
        ok = external_auth_pb2.CheckResponse()
        ok.status.code = 0
        return ok.SerializeToString()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(recorder.check)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("envoy.service.auth.v3.Authorization",
                                              {"Check": handler})]
    )  # fmt: skip
    authz_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    admin, front = free_port(), free_port()
    ok = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
    hcm = conf.http_connection_manager("front", [ok], [conf.ext_authz_filter("authz")])
    config = {
        "admin": {"address": conf.address(admin)},
        "static_resources": {
            "listeners": [conf.listener("front", conf.address(front), [hcm])],
            "clusters": [conf.ext_authz_cluster("authz", conf.address(authz_port))],
        },
    }
    work = Path(tmp_path_factory.mktemp("envoy-check-request"))
    try:
        with EnvoyProcess(config, work_dir=work) as envoy:
            envoy.wait_ready(timeout=30)
            yield {"recorder": recorder, "port": front}
    finally:
        server.stop(grace=None)


def _request(port: int, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/api/orders/7?x=1", body=b"secret body", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_only_trace_headers_reach_the_authz_service(setup: dict) -> None:
    recorder: Recorder = setup["recorder"]
    before = len(recorder.seen)
    sent = {
        "host": "orders.shop.svc.cluster.local",
        "authorization": "Bearer not-for-authz",
        "cookie": "session=not-for-authz",
        "x-custom": "1",
        "x-request-id": "trace-me",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    assert _request(setup["port"], sent) == 200
    (req,) = recorder.seen[before:]
    http_attrs = req.attributes.request.http
    # What citadel decides on arrives in its own fields.
    assert (http_attrs.host, http_attrs.method, http_attrs.path) == (
        "orders.shop.svc.cluster.local",
        "POST",
        "/api/orders/7?x=1",
    )
    # Of the headers, only the trace ids (the request body is never sent either).
    extra = {k: v for k, v in http_attrs.headers.items() if not k.startswith(":")}
    assert extra == {"x-request-id": "trace-me", "traceparent": sent["traceparent"]}
    assert not http_attrs.body and not http_attrs.raw_body
    assert "not-for-authz" not in req.SerializeToString().decode("latin-1")
