"""deploy/istio: Istio's CRDs have no schema in kubernetes-validate, so these snippets are
parsed and checked structurally — known field names only (a typo fails), and every value
agrees with the Services deploy/kubernetes actually creates."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from citadel.durations import parse_duration
from tests.deploy.manifests import ISTIO_DIR, load_docs, one

# istio.mesh.v1alpha1.MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider
GRPC_PROVIDER_FIELDS = {
    "service",
    "port",
    "timeout",
    "failOpen",
    "statusOnError",
    "includeRequestBodyInCheck",
}
AUTHZ_POLICY_SPEC_FIELDS = {"selector", "targetRef", "targetRefs", "action", "provider", "rules"}
RULE_FIELDS = {"from", "to", "when"}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_AUTHZ_TIMEOUT_S = 0.5


def _service_fqdn(name: str) -> tuple[str, dict[str, int]]:
    svc = one("Service", name)
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    return f"{name}.{svc['metadata']['namespace']}.svc.cluster.local", ports


def _mesh_configs() -> dict[str, dict[str, Any]]:
    (op,) = load_docs(ISTIO_DIR / "istio-operator.yaml")
    assert op["apiVersion"] == "install.istio.io/v1alpha1"
    assert op["kind"] == "IstioOperator"
    assert op["metadata"]["namespace"] == "istio-system"
    (helm,) = load_docs(ISTIO_DIR / "helm-values.yaml")
    return {"istio-operator": op["spec"]["meshConfig"], "helm-values": helm["meshConfig"]}


MESH = _mesh_configs()


def test_operator_and_helm_snippets_say_the_same() -> None:
    assert MESH["istio-operator"] == MESH["helm-values"]


def check_provider(mesh: dict[str, Any]) -> None:
    (provider,) = mesh["extensionProviders"]
    assert DNS_1123.match(provider["name"])
    assert set(provider) == {"name", "envoyExtAuthzGrpc"}
    grpc = provider["envoyExtAuthzGrpc"]
    assert set(grpc) <= GRPC_PROVIDER_FIELDS, f"unknown fields {set(grpc) - GRPC_PROVIDER_FIELDS}"
    fqdn, ports = _service_fqdn("citadel-authz")
    assert grpc["service"] == fqdn
    assert grpc["port"] == ports["grpc-authz"]
    assert grpc["failOpen"] is False
    timeout = parse_duration(grpc["timeout"]).total_seconds()
    assert 0 < timeout <= MAX_AUTHZ_TIMEOUT_S


@pytest.mark.parametrize("mesh", MESH.values(), ids=MESH.keys())
def test_extension_provider_points_at_citadel_authz_and_fails_closed(
    mesh: dict[str, Any],
) -> None:
    check_provider(mesh)


def _grpc(mesh: dict[str, Any]) -> dict[str, Any]:
    return mesh["extensionProviders"][0]["envoyExtAuthzGrpc"]


def _rename(d: dict[str, Any], old: str, new: str) -> None:
    d[new] = d.pop(old)


BROKEN_PROVIDERS = {
    "misspelt-fail-open": lambda m: _rename(_grpc(m), "failOpen", "failopen"),
    "snake-case-field": lambda m: _rename(_grpc(m), "failOpen", "fail_open"),
    "fails-open": lambda m: _grpc(m).__setitem__("failOpen", True),
    "wrong-port": lambda m: _grpc(m).__setitem__("port", 8181),
    "short-service-name": lambda m: _grpc(m).__setitem__("service", "citadel-authz"),
    "timeout-too-long": lambda m: _grpc(m).__setitem__("timeout", "10s"),
    "http-provider-kind": lambda m: _rename(
        m["extensionProviders"][0], "envoyExtAuthzGrpc", "envoyExtAuthzHttp"
    ),
}


@pytest.mark.parametrize("defect", BROKEN_PROVIDERS.values(), ids=BROKEN_PROVIDERS.keys())
def test_a_broken_provider_fails_the_check(defect: Any) -> None:
    mesh = copy.deepcopy(MESH["istio-operator"])
    defect(mesh)
    with pytest.raises((AssertionError, KeyError)):
        check_provider(mesh)


@pytest.mark.parametrize("mesh", MESH.values(), ids=MESH.keys())
def test_istio_agent_is_sent_to_the_citadel_ca(mesh: dict[str, Any]) -> None:
    ca_addr = mesh["defaultConfig"]["proxyMetadata"]["CA_ADDR"]
    host, port = ca_addr.rsplit(":", 1)
    fqdn, ports = _service_fqdn("citadel-ca")
    assert fqdn.startswith(host + ".") or fqdn == host
    assert int(port) == ports["grpc-ca"]


def test_trust_domain_matches_the_shipped_policy() -> None:
    td = MESH["istio-operator"]["trustDomain"]
    policy = (ISTIO_DIR.parents[1] / "policies" / "policy.csv").read_text(encoding="utf-8")
    assert f"spiffe://{td}/ns/" in policy


def test_authorization_policy_delegates_to_citadel() -> None:
    (ap,) = load_docs(ISTIO_DIR / "authorization-policy.yaml")
    assert ap["apiVersion"] == "security.istio.io/v1"
    assert ap["kind"] == "AuthorizationPolicy"
    assert DNS_1123.match(ap["metadata"]["name"]) and ap["metadata"]["namespace"]
    spec = ap["spec"]
    assert set(spec) <= AUTHZ_POLICY_SPEC_FIELDS, set(spec) - AUTHZ_POLICY_SPEC_FIELDS
    assert spec["action"] == "CUSTOM"
    assert set(spec["provider"]) == {"name"}
    names = {p["name"] for p in MESH["istio-operator"]["extensionProviders"]}
    assert spec["provider"]["name"] in names
    # CUSTOM with no rules never matches, so it would check nothing.
    assert spec["rules"], "CUSTOM without rules checks no request"
    for rule in spec["rules"]:
        assert set(rule) <= RULE_FIELDS


def test_citadel_system_is_outside_the_mesh() -> None:
    """The CA must not need a certificate from itself to start."""
    ns = one("Namespace", "citadel-system")
    assert ns["metadata"]["labels"]["istio-injection"] == "disabled"
    for name in ("citadel-ca", "citadel-authz"):
        annotations = one("Deployment", name)["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("sidecar.istio.io/inject") != "true"
