"""deploy/kubernetes: schema-valid offline, complete, and as locked down as the design says.

Schemas come from the kubernetes-validate package (strict: unknown fields fail), checked
against the oldest Kubernetes we support and the newest the package bundles."""

from __future__ import annotations

import ast
import copy
import filecmp
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.manifests import (
    DEPLOY,
    K8S_DIR,
    REPO,
    citadel_containers,
    docs_of_kind,
    kubernetes_docs,
    kubernetes_files,
    load_docs,
    one,
    pod_spec,
)

OLDEST_SUPPORTED = "1.29.0"
VERSIONS = sorted({OLDEST_SUPPORTED, kubernetes_validate.latest_version()})
NAMESPACE = "citadel-system"
IMAGE_UID = 10001


def _validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def _arg(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def _kustomization() -> dict[str, Any]:
    return load_docs(K8S_DIR / "kustomization.yaml")[0]


# --- schema validation ------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", kubernetes_files(), ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schema(path: Path, version: str) -> None:
    docs = load_docs(path)
    assert docs, f"{path.name} holds no documents"
    for doc in docs:
        _validate(doc, version)


BROKEN = {
    "typo-in-field-name": lambda d: d["spec"].__setitem__("replica", 2),
    "replicas-as-string": lambda d: d["spec"].__setitem__("replicas", "two"),
    "unknown-securitycontext-field": lambda d: pod_spec(d)["containers"][0][
        "securityContext"
    ].__setitem__("readOnlyRootFileSystem", True),
    "missing-selector": lambda d: d["spec"].pop("selector"),
}


@pytest.mark.parametrize("defect", BROKEN.values(), ids=BROKEN.keys())
def test_validation_rejects_broken_deployment(defect: Any) -> None:
    """The schema check can fail: a damaged copy of the CA Deployment is refused."""
    doc = copy.deepcopy(one("Deployment", "citadel-ca"))
    defect(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(doc, kubernetes_validate.latest_version())


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_build_output_validates() -> None:
    """What `kubectl apply -k` would send, generated ConfigMap included, is schema-valid and
    carries the shipped policy files."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for doc in docs:
        _validate(doc, kubernetes_validate.latest_version())
        if doc["kind"] not in {"Namespace", "ClusterRoleBinding"}:
            assert doc["metadata"]["namespace"] == NAMESPACE
    cm = one("ConfigMap", "citadel-policies", docs)
    for name, text in cm["data"].items():
        shipped = REPO / "policies" / name
        if name.endswith(".test.yaml"):  # flattened from policies/tests/
            shipped = REPO / "policies" / "tests" / name.replace(".test.yaml", ".yaml")
        assert text == shipped.read_text(encoding="utf-8")
    assert len(docs) == sum(len(load_docs(p)) for p in kubernetes_files()) + 1


# --- completeness -------------------------------------------------------------------------


def test_kustomization_lists_exactly_the_manifest_files() -> None:
    listed = _kustomization()["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert set(listed) == {p.name for p in kubernetes_files()}


def test_policy_configmap_is_generated_from_every_policy_file() -> None:
    (gen,) = _kustomization()["configMapGenerator"]
    assert gen["name"] == "citadel-policies"
    # A stable name keeps the ConfigMap updated in place, which is what hot reload watches.
    assert gen["options"]["disableNameSuffixHash"] is True
    listed = {Path(f).name for f in gen["files"]}
    assert all(f.startswith("policies/") for f in gen["files"])
    assert listed == {p.name for p in (K8S_DIR / "policies").iterdir()}


def test_policy_copy_equals_the_shipped_policies() -> None:
    """kustomize cannot read ../../policies, so deploy/kubernetes/policies is a copy; it must
    never drift. Fix a failure with: cp policies/* deploy/kubernetes/policies/"""
    shipped = {p.name for p in (REPO / "policies").iterdir() if p.is_file()}
    copied = {
        p.name
        for p in (K8S_DIR / "policies").iterdir()
        if p.is_file() and not p.name.endswith(".test.yaml")
    }
    assert copied == shipped
    _, mismatch, errors = filecmp.cmpfiles(
        REPO / "policies", K8S_DIR / "policies", sorted(shipped), shallow=False
    )
    assert not mismatch and not errors, f"differ from policies/: {mismatch + errors}"
    # The policy tests ride along flattened (a ConfigMap has no subdirectories).
    for case in (REPO / "policies" / "tests").glob("*.yaml"):
        flat = K8S_DIR / "policies" / f"{case.stem}.test.yaml"
        assert flat.is_file(), f"cp {case} {flat}"
        assert flat.read_bytes() == case.read_bytes(), f"{flat} differs from {case}"


def test_every_namespaced_object_is_in_citadel_system() -> None:
    for doc in kubernetes_docs():
        if doc["kind"] in {"Namespace", "ClusterRoleBinding"}:
            continue
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    assert one("Namespace", NAMESPACE)


# --- security posture ---------------------------------------------------------------------

DEPLOYMENTS = ["citadel-ca", "citadel-authz"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_pods_run_non_root_with_runtime_default_seccomp(name: str) -> None:
    spec = pod_spec(one("Deployment", name))
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == IMAGE_UID and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_containers_are_locked_down(name: str) -> None:
    for c in [*pod_spec(one("Deployment", name)).get("initContainers", [])] + pod_spec(
        one("Deployment", name)
    )["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["runAsNonRoot"] is True
        assert sc.get("privileged", False) is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not sc["capabilities"].get("add")
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) >= {"cpu", "memory"}, f"{c['name']} {kind}"
        assert "readinessProbe" in c and "livenessProbe" in c


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_replicated_spread_and_protected_from_drains(name: str) -> None:
    dep = one("Deployment", name)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["replicas"] >= 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    terms = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert any(
        t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        and t["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
        for t in terms
    )
    pdbs = [
        p
        for p in docs_of_kind("PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(pdbs) == 1
    assert pdbs[0]["spec"]["minAvailable"] >= 1
    assert pdbs[0]["spec"]["minAvailable"] < dep["spec"]["replicas"], "a PDB that blocks drains"


def test_only_the_ca_gets_an_api_token() -> None:
    for sa in docs_of_kind("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False, sa["metadata"]["name"]
    assert pod_spec(one("Deployment", "citadel-ca"))["automountServiceAccountToken"] is True
    assert pod_spec(one("Deployment", "citadel-authz"))["automountServiceAccountToken"] is False


def test_ca_service_account_may_create_token_reviews() -> None:
    crb = one("ClusterRoleBinding", "citadel-ca-tokenreview")
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:auth-delegator",
    }
    ca_sa = pod_spec(one("Deployment", "citadel-ca"))["serviceAccountName"]
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": ca_sa, "namespace": NAMESPACE}]
    assert one("ServiceAccount", ca_sa)


def test_ca_reads_cacerts_secret_read_only_as_its_state_dir() -> None:
    spec = pod_spec(one("Deployment", "citadel-ca"))
    (c,) = spec["containers"]
    state_dir = _arg(c["args"], "--state-dir")
    assert _arg(c["args"], "--token-auth") == "tokenreview"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == state_dir]
    assert mount["readOnly"] is True
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == "cacerts"
    assert vol["secret"]["defaultMode"] == 0o440, "group-readable for fsGroup, nobody else"
    # The CA refuses a group-readable key unless told this is the Secret-mount case.
    assert "--allow-group-readable-key" in c["args"]
    assert isinstance(spec["securityContext"].get("fsGroup"), int)


def test_ca_accepts_its_key_as_kubernetes_mounts_it(tmp_path: Path) -> None:
    """The key mode the manifest produces (0440) loads with the manifest's flag, and only
    with it: the deployment and the CA's key check agree."""
    from citadel.ca.authority import init_authority, load_authority
    from citadel.errors import AuthorityError

    init_authority(tmp_path, trust_domain="cluster.local", key_type="ec-p256")
    key = next(tmp_path.rglob("ca-key.pem"))
    key.chmod(0o440)
    with pytest.raises(AuthorityError):
        load_authority(tmp_path)
    assert load_authority(tmp_path, allow_group_readable_key=True) is not None


def test_ca_readiness_checks_grpc_health_over_tls() -> None:
    """Kubernetes' native gRPC probe cannot speak TLS, so readiness runs a Python health
    check in the container; it must at least be valid Python aimed at the right place."""
    (c,) = pod_spec(one("Deployment", "citadel-ca"))["containers"]
    command = c["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    tree = ast.parse(command[2])
    assert tree.body
    state_dir = _arg(c["args"], "--state-dir")
    port = _arg(c["args"], "--listen").rsplit(":", 1)[1]
    assert f"{state_dir}/root-cert.pem" in command[2]
    assert f"localhost:{port}" in command[2]
    assert "grpc.secure_channel" in command[2] and "HealthStub" in command[2]
    assert c["livenessProbe"]["tcpSocket"]["port"] == c["ports"][0]["name"]


def test_ca_serving_certificate_names_what_clients_dial() -> None:
    """Agents verify the CA's certificate against the name they dial; the probe dials
    localhost. A name missing here is a TLS failure for every workload."""
    (c,) = pod_spec(one("Deployment", "citadel-ca"))["containers"]
    args = c["args"]
    names = {args[i + 1] for i, a in enumerate(args) if a == "--dns-name"}
    svc = one("Service", "citadel-ca")
    short = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert {short, f"{short}.cluster.local", "localhost"} <= names


def test_authz_mounts_policy_configmap_as_a_directory() -> None:
    spec = pod_spec(one("Deployment", "citadel-authz"))
    (c,) = spec["containers"]
    policy_dir = _arg(c["args"], "--policy-dir")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == policy_dir]
    assert "subPath" not in mount, "subPath mounts never see ConfigMap updates"
    assert mount["readOnly"] is True
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert vol["configMap"]["name"] == _kustomization()["configMapGenerator"][0]["name"]
    probes = {c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]}
    assert probes == {"/readyz", "/healthz"}
    admin_port = int(_arg(c["args"], "--admin-listen").rsplit(":", 1)[1])
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named[c["readinessProbe"]["httpGet"]["port"]] == admin_port


def test_authz_autoscales_on_cpu() -> None:
    hpa = one("HorizontalPodAutoscaler", "citadel-authz")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "citadel-authz",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


@pytest.mark.parametrize(
    ("service", "ports"),
    [("citadel-ca", {15012}), ("citadel-authz", {9191, 8181})],
)
def test_services_reach_the_ports_the_processes_listen_on(service: str, ports: set[int]) -> None:
    svc = one("Service", service)
    dep = one("Deployment", service)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in svc["spec"]["ports"]} == ports
    (c,) = pod_spec(dep)["containers"]
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    listening = {
        int(_arg(c["args"], f).rsplit(":", 1)[1])
        for f in ("--listen", "--admin-listen")
        if f in c["args"]
    }
    for p in svc["spec"]["ports"]:
        assert named[p["targetPort"]] == p["port"]
        assert p["port"] in listening


# --- network policies ---------------------------------------------------------------------


def _ingress_to(app: str, port: int) -> list[dict[str, Any]]:
    """Every `from` peer allowed to reach pods labelled app on port."""
    peers: list[dict[str, Any]] = []
    for np in docs_of_kind("NetworkPolicy"):
        sel = np["spec"]["podSelector"].get("matchLabels", {})
        if sel and sel.get("app.kubernetes.io/name") != app:
            continue
        for rule in np["spec"].get("ingress", []):
            if any(p["port"] == port for p in rule.get("ports", [])):
                peers.extend(rule["from"])
    return peers


def test_namespace_is_default_deny() -> None:
    deny = one("NetworkPolicy", "default-deny")
    assert deny["spec"]["podSelector"] == {}
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]


def test_network_policy_allows_exactly_the_intended_callers() -> None:
    assert _ingress_to("citadel-ca", 15012) == [{"namespaceSelector": {}}]
    mesh = _ingress_to("citadel-authz", 9191)
    assert mesh and all("namespaceSelector" in p and "ipBlock" not in p for p in mesh)
    assert {"namespaceSelector": {}} not in mesh, "9191 open to every namespace"
    assert _ingress_to("citadel-authz", 8181) == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert _ingress_to("citadel-authz", 15012) == []


def test_only_the_ca_may_leave_the_namespace_and_only_to_the_api_server() -> None:
    egress = [np for np in docs_of_kind("NetworkPolicy") if np["spec"].get("egress")]
    assert [np["spec"]["podSelector"] for np in egress] == [
        {"matchLabels": {"app.kubernetes.io/name": "citadel-ca"}}
    ]
    (rule,) = egress[0]["spec"]["egress"]
    assert {p["port"] for p in rule["ports"]} == {443, 6443}


# --- container image ----------------------------------------------------------------------


def test_containerfile_builds_a_non_root_citadel_image() -> None:
    text = (DEPLOY / "Containerfile").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert froms and froms[-1] == "python:3.11-slim"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == IMAGE_UID, "numeric, so runAsNonRoot can verify it"
    assert [ln for ln in lines if ln.startswith("ENTRYPOINT")][-1] == 'ENTRYPOINT ["citadel"]'
    assert re.search(r"pip (install|wheel)", text)
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (REPO / src).exists(), f"COPY source {src} missing from the repo"
    for _, c in citadel_containers(kubernetes_docs()):
        assert "command" not in c, "containers use the image's ENTRYPOINT"
