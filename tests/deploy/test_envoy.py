"""deploy/envoy: each bootstrap is a real Envoy v3 Bootstrap — every typed_config resolved,
no unknown field — that the real Envoy binary accepts, wired as the design says."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

# Importing these registers their messages in the default descriptor pool; without them
# ParseDict cannot resolve the `@type` of a typed_config and fails, which is the point.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, descriptor_pool, json_format, message, message_factory

from citadel.envoyproc import find_envoy, validate
from tests.deploy.manifests import ENVOY_DIR, load_docs

BOOTSTRAPS = sorted(ENVOY_DIR.glob("*.yaml"))
MAX_AUTHZ_TIMEOUT_S = 0.5

HCM = http_connection_manager_pb2.HttpConnectionManager
ExtAuthz = ext_authz_pb2.ExtAuthz


def parse_bootstrap(doc: dict[str, Any]) -> bootstrap_pb2.Bootstrap:
    """Strict parse: unknown fields and unresolvable `@type`s raise ParseError."""
    return json_format.ParseDict(doc, bootstrap_pb2.Bootstrap(), ignore_unknown_fields=False)


def _load(path: Path) -> dict[str, Any]:
    (doc,) = load_docs(path)
    return doc


def _anys(msg: message.Message) -> list[any_pb2.Any]:
    """Every Any nested anywhere in msg, including inside other Anys' payloads."""
    found: list[any_pb2.Any] = []
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        items = (
            value.values()
            if field.message_type.GetOptions().map_entry
            else (value if field.is_repeated else [value])
        )
        for item in items:
            if not isinstance(item, message.Message):
                continue
            if item.DESCRIPTOR.full_name == "google.protobuf.Any":
                found.append(item)
                inner = _unpack(item)
                found.extend(_anys(inner))
            else:
                found.extend(_anys(item))
    return found


def _unpack(a: any_pb2.Any) -> message.Message:
    desc = descriptor_pool.Default().FindMessageTypeByName(a.TypeName())
    inner = message_factory.GetMessageClass(desc)()
    assert a.Unpack(inner), a.type_url
    return inner


def _typed(msgs: list[any_pb2.Any], cls: type[message.Message]) -> list[Any]:
    out = []
    for a in msgs:
        if a.Is(cls.DESCRIPTOR):
            m = cls()
            a.Unpack(m)
            out.append(m)
    return out


@pytest.fixture(scope="module", params=BOOTSTRAPS, ids=lambda p: p.name)
def bootstrap(request: pytest.FixtureRequest) -> bootstrap_pb2.Bootstrap:
    return parse_bootstrap(_load(request.param))


def test_there_is_a_bootstrap() -> None:
    assert BOOTSTRAPS


def test_every_typed_config_resolves(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    anys = _anys(bootstrap)
    types = {a.TypeName() for a in anys}
    assert types >= {
        HCM.DESCRIPTOR.full_name,
        ExtAuthz.DESCRIPTOR.full_name,
        router_pb2.Router.DESCRIPTOR.full_name,
        tls_pb2.DownstreamTlsContext.DESCRIPTOR.full_name,
        tls_pb2.UpstreamTlsContext.DESCRIPTOR.full_name,
        http_protocol_options_pb2.HttpProtocolOptions.DESCRIPTOR.full_name,
    }
    for a in anys:
        assert a.type_url.startswith("type.googleapis.com/")


def _listener(b: bootstrap_pb2.Bootstrap, name: str) -> Any:
    (lst,) = [x for x in b.static_resources.listeners if x.name == name]
    return lst


def _cluster(b: bootstrap_pb2.Bootstrap, name: str) -> Any:
    (c,) = [x for x in b.static_resources.clusters if x.name == name]
    return c


def _is_http2(cluster: Any) -> bool:
    opts = cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    (o,) = _typed([opts], http_protocol_options_pb2.HttpProtocolOptions)
    return o.explicit_http_config.HasField("http2_protocol_options")


def _sds_names(ctx: Any) -> tuple[list[str], str]:
    """(certificate SDS names, validation SDS name), asserting both come from sds-grpc."""
    certs = ctx.tls_certificate_sds_secret_configs
    val = ctx.combined_validation_context.validation_context_sds_secret_config
    for s in [*certs, val]:
        src = s.sds_config.api_config_source
        assert s.sds_config.resource_api_version == 2  # V3
        assert [g.envoy_grpc.cluster_name for g in src.grpc_services] == ["sds-grpc"]
    return [s.name for s in certs], val.name


def test_admin_is_loopback_only(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    assert bootstrap.admin.address.socket_address.address == "127.0.0.1"


def test_sds_comes_from_the_agent_socket_over_http2(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    sds = _cluster(bootstrap, "sds-grpc")
    (ep,) = [e for g in sds.load_assignment.endpoints for e in g.lb_endpoints]
    assert ep.endpoint.address.pipe.path.endswith(".sock")
    assert _is_http2(sds)


def test_inbound_requires_client_cert_from_sds(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    (chain,) = _listener(bootstrap, "inbound").filter_chains
    (tls,) = _typed([chain.transport_socket.typed_config], tls_pb2.DownstreamTlsContext)
    assert tls.require_client_certificate.value is True
    assert _sds_names(tls.common_tls_context) == (["default"], "ROOTCA")
    sans = tls.common_tls_context.combined_validation_context.default_validation_context
    assert [m.matcher.prefix for m in sans.match_typed_subject_alt_names] == [
        "spiffe://cluster.local/"
    ]


def test_inbound_asks_citadel_authz_and_fails_closed(bootstrap: bootstrap_pb2.Bootstrap) -> None:
    (chain,) = _listener(bootstrap, "inbound").filter_chains
    (hcm,) = _typed([f.typed_config for f in chain.filters], HCM)
    names = [f.name for f in hcm.http_filters]
    assert names == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    (authz,) = _typed([hcm.http_filters[0].typed_config], ExtAuthz)
    assert authz.failure_mode_allow is False
    assert authz.include_peer_certificate is False
    assert authz.transport_api_version == 2  # V3
    timeout = authz.grpc_service.timeout.ToTimedelta().total_seconds()
    assert 0 < timeout <= MAX_AUTHZ_TIMEOUT_S
    assert authz.status_on_error.code in (0, 403)  # unset means 403
    cluster = _cluster(bootstrap, authz.grpc_service.envoy_grpc.cluster_name)
    assert _is_http2(cluster)
    (ep,) = [e for g in cluster.load_assignment.endpoints for e in g.lb_endpoints]
    assert ep.endpoint.address.socket_address.port_value == 9191


def test_outbound_presents_the_svid_and_pins_the_peer(
    bootstrap: bootstrap_pb2.Bootstrap,
) -> None:
    (chain,) = _listener(bootstrap, "outbound").filter_chains
    (hcm,) = _typed([f.typed_config for f in chain.filters], HCM)
    for vh in hcm.route_config.virtual_hosts:
        for route in vh.routes:
            cluster = _cluster(bootstrap, route.route.cluster)
            (tls,) = _typed([cluster.transport_socket.typed_config], tls_pb2.UpstreamTlsContext)
            assert _sds_names(tls.common_tls_context) == (["default"], "ROOTCA")
            ctx = tls.common_tls_context.combined_validation_context.default_validation_context
            (san,) = ctx.match_typed_subject_alt_names
            assert san.matcher.exact.startswith("spiffe://")


# --- the parse can fail -------------------------------------------------------------------


def _http_filters(doc: dict[str, Any]) -> list[dict[str, Any]]:
    listener = next(x for x in doc["static_resources"]["listeners"] if x["name"] == "inbound")
    return listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]


def _rename(d: dict[str, Any], old: str, new: str) -> None:
    d[new] = d.pop(old)


TYPOS = {
    "misspelt-ext-authz-field": lambda d: _rename(
        _http_filters(d)[0]["typed_config"], "failure_mode_allow", "failure_mode_alow"
    ),
    "unknown-typed-config-type": lambda d: _http_filters(d)[1]["typed_config"].__setitem__(
        "@type", "type.googleapis.com/envoy.extensions.filters.http.router.v3.Rooter"
    ),
    "misspelt-top-level-field": lambda d: _rename(d, "static_resources", "static_resource"),
    "bad-enum-value": lambda d: _http_filters(d)[0]["typed_config"].__setitem__(
        "transport_api_version", "V4"
    ),
    "bad-duration": lambda d: _http_filters(d)[0]["typed_config"]["grpc_service"].__setitem__(
        "timeout", "250ms"
    ),
}


@pytest.mark.parametrize("typo", TYPOS.values(), ids=TYPOS.keys())
def test_a_typo_fails_the_parse(typo: Any) -> None:
    doc = copy.deepcopy(_load(ENVOY_DIR / "sidecar.yaml"))
    parse_bootstrap(copy.deepcopy(doc))  # the untouched document parses
    typo(doc)
    with pytest.raises(json_format.ParseError):
        parse_bootstrap(doc)


# --- the real binary ----------------------------------------------------------------------

ENVOY = find_envoy()
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="envoy binary not installed")


def _envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return validate(path, binary=ENVOY)


@pytest.mark.envoy
@needs_envoy
@pytest.mark.parametrize("path", BOOTSTRAPS, ids=lambda p: p.name)
def test_real_envoy_accepts_bootstrap(path: Path) -> None:
    """Validate mode builds every listener and cluster without connecting, so the SDS socket
    and the DNS names need not exist here."""
    result = _envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


@pytest.mark.envoy
@needs_envoy
def test_real_envoy_rejects_a_typo(tmp_path: Path) -> None:
    doc = _load(ENVOY_DIR / "sidecar.yaml")
    TYPOS["misspelt-ext-authz-field"](doc)
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = _envoy_validate(bad)
    assert result.returncode != 0
    assert "failure_mode_alow" in result.stdout + result.stderr
