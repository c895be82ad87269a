"""citadel.envoyproc and citadel.envoyconf against the real Envoy binary."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from citadel import envoyconf as conf
from citadel.envoyproc import EnvoyError, EnvoyProcess, find_envoy, validate
from tests.conftest import free_port

ENVOY = find_envoy()
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="envoy binary not installed")


def _bootstrap(admin: int, port: int) -> dict:
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 204}}
    hcm = conf.http_connection_manager("in", [route])
    return {
        "admin": {"address": conf.address(admin)},
        "static_resources": {
            "listeners": [conf.listener("in", conf.address(port), [hcm])],
            "clusters": [conf.static_cluster("authz", conf.address(free_port()), http2=True)],
        },
    }


def test_no_envoy_on_path_is_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_envoy() is None
    with pytest.raises(EnvoyError, match="not on PATH"):
        EnvoyProcess({}, work_dir=tmp_path)


@needs_envoy
def test_a_wrapper_script_on_path_resolves_to_the_binary() -> None:
    assert ENVOY is not None
    with open(ENVOY, "rb") as fh:
        assert fh.read(2) != b"#!"  # no interpreter or shim between us and Envoy


@pytest.mark.envoy
@needs_envoy
def test_start_ready_serve_stop(tmp_path: Path) -> None:
    admin, port = free_port(), free_port()
    with EnvoyProcess(_bootstrap(admin, port), work_dir=tmp_path, name="t") as envoy:
        assert envoy.admin_port == admin  # read from the bootstrap
        envoy.wait_ready(timeout=30)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().status == 204
        conn.close()
        assert json.loads((tmp_path / "envoy-t.json").read_text())["admin"]
    assert envoy.poll() is not None  # stopped on the way out


@pytest.mark.envoy
@needs_envoy
def test_an_envoy_that_exits_fails_with_its_log(tmp_path: Path) -> None:
    broken = _bootstrap(free_port(), free_port())
    broken["static_resources"]["clusters"][0]["type"] = "NO_SUCH_TYPE"
    with (
        EnvoyProcess(broken, work_dir=tmp_path, name="broken") as envoy,
        pytest.raises(EnvoyError, match="broken Envoy exited") as info,
    ):
        envoy.wait_ready(timeout=30)
    assert "NO_SUCH_TYPE" in info.value.message  # the log tail says why


@pytest.mark.envoy
@needs_envoy
def test_validate_accepts_a_bootstrap_and_refuses_a_typo(tmp_path: Path) -> None:
    assert validate(_bootstrap(free_port(), free_port())).returncode == 0
    bad = _bootstrap(free_port(), free_port())
    bad["static_resources"]["clusters"][0]["conect_timeout"] = "1s"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    result = validate(path)
    assert result.returncode != 0
    assert "conect_timeout" in result.stdout + result.stderr
