"""deploy/examples: a meshed workload whose agent, Envoy and CA settings agree with each
other — the paths and names a person would otherwise get wrong one at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.manifests import (
    ENVOY_DIR,
    citadel_containers,
    docs_of_kind,
    example_files,
    load_docs,
    one,
    pod_spec,
)

VERSIONS = sorted({"1.29.0", kubernetes_validate.latest_version()})


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _mounted_file(spec: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume that provides `path` inside `container`, and the file name within it."""
    for m in container["volumeMounts"]:
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            (vol,) = [v for v in spec["volumes"] if v["name"] == m["name"]]
            return {"volume": vol, "file": path[len(prefix) :], "mount": m}
    raise AssertionError(f"{path} is not on any volume of {container['name']}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_example_validates_against_kubernetes_schema(path: Path, version: str) -> None:
    for doc in load_docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_agent_envoy_and_ca_agree(path: Path) -> None:
    docs = load_docs(path)
    agents = [(w, c) for w, c in citadel_containers(docs) if c["args"][0] == "agent"]
    assert agents, "an example workload without the agent"
    ca_args = pod_spec(one("Deployment", "citadel-ca"))["containers"][0]["args"]
    ca_port = _arg(ca_args, "--listen").rsplit(":", 1)[1]
    (bootstrap,) = load_docs(ENVOY_DIR / "sidecar.yaml")
    (sds,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "sds-grpc"]
    sds_path = sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "pipe"
    ]["path"]
    for where, agent in agents:
        name = where.split("/")[1]
        (dep,) = [d for d in docs_of_kind("Deployment", docs) if d["metadata"]["name"] == name]
        spec = pod_spec(dep)
        args = agent["args"]
        assert _arg(args, "--ca-address") == f"citadel-ca.citadel-system.svc:{ca_port}"
        # The token is a projected one for the CA's audience, not an API token.
        token = _mounted_file(spec, agent, _arg(args, "--token-file"))
        (src,) = token["volume"]["projected"]["sources"]
        assert src["serviceAccountToken"]["path"] == token["file"]
        assert src["serviceAccountToken"]["audience"] == _arg(ca_args, "--audience")
        assert spec["automountServiceAccountToken"] is False
        # The root the agent trusts is mounted, read-only.
        root = _mounted_file(spec, agent, _arg(args, "--ca-root"))
        assert root["mount"]["readOnly"] is True
        # Envoy dials the socket the agent serves, on a volume both containers share.
        assert _arg(args, "--sds-socket") == sds_path
        shared = _mounted_file(spec, agent, sds_path)["volume"]["name"]
        (envoy,) = [c for c in spec["containers"] if c["name"] == "envoy"]
        assert _mounted_file(spec, envoy, sds_path)["volume"]["name"] == shared
        config = _mounted_file(spec, envoy, envoy["args"][envoy["args"].index("-c") + 1])
        assert config["file"] == "sidecar.yaml"
        # A native sidecar: running before Envoy and the app start, and for the pod's life.
        assert agent in spec.get("initContainers", []) and agent["restartPolicy"] == "Always"
