"""The headers ext_authz sends citadel are the ones citadel reads, in every place they're set.

citadel authz reads host, method, path and the peer principal from their own CheckRequest
fields, plus the trace headers (``authz.service``). The shipped sidecar bootstrap and
``citadel.envoyconf`` (demo, tests, bench) send exactly those trace headers; if citadel
ever reads another header, these fail until the configs send it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from authz import service
from citadel import envoyconf as conf

SIDECAR = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "sidecar.yaml"
EXT_AUTHZ = "envoy.filters.http.ext_authz"


def _ext_authz_configs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for flt in chain["filters"]:
                for http in flt.get("typed_config", {}).get("http_filters", []):
                    if http["name"] == EXT_AUTHZ:
                        found.append(http["typed_config"])
    return found


def _exact(cfg: dict[str, Any]) -> tuple[str, ...]:
    return tuple(p["exact"] for p in cfg["allowed_headers"]["patterns"])


def test_envoyconf_sends_the_headers_citadel_reads() -> None:
    assert conf.TRACE_HEADERS == service._TRACE_HEADERS
    assert _exact(conf.ext_authz_filter("c")["typed_config"]) == conf.TRACE_HEADERS


def test_sidecar_sends_the_headers_citadel_reads() -> None:
    (cfg,) = _ext_authz_configs(yaml.safe_load(SIDECAR.read_text()))
    assert _exact(cfg) == conf.TRACE_HEADERS
    assert not cfg.get("with_request_body")  # the body never goes to citadel


def test_all_headers_is_an_explicit_choice() -> None:
    assert "allowed_headers" not in conf.ext_authz_filter("c", allowed_headers=None)["typed_config"]
