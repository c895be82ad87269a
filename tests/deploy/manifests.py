"""Loading deploy/: one place that knows where the files are and how to read them, so each
test states a property of the deployment rather than how to find it."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEPLOY",
    "ENVOY_DIR",
    "EXAMPLES_DIR",
    "ISTIO_DIR",
    "K8S_DIR",
    "REPO",
    "citadel_containers",
    "docs_of_kind",
    "example_files",
    "kubernetes_docs",
    "kubernetes_files",
    "load_docs",
    "one",
    "pod_spec",
]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_DIR = DEPLOY / "kubernetes"
ENVOY_DIR = DEPLOY / "envoy"
ISTIO_DIR = DEPLOY / "istio"
EXAMPLES_DIR = DEPLOY / "examples"

Doc = dict[str, Any]


@functools.cache
def _parsed(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_docs(path: Path) -> list[Doc]:
    """Every non-empty YAML document in a file (a multi-document file yields several).
    Parsed once per run; each caller gets its own copy to change freely."""
    return copy.deepcopy(_parsed(path.resolve()))


def kubernetes_files() -> list[Path]:
    """The manifests kustomize applies: every YAML file in deploy/kubernetes except the
    kustomization itself."""
    return sorted(
        p
        for p in K8S_DIR.iterdir()
        if p.suffix in {".yaml", ".yml"} and p.name != "kustomization.yaml"
    )


def example_files() -> list[Path]:
    """Example workloads (not part of the kustomization, applied per namespace)."""
    return sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix in {".yaml", ".yml"})


def kubernetes_docs() -> list[Doc]:
    return [d for p in kubernetes_files() for d in load_docs(p)]


def docs_of_kind(kind: str, docs: list[Doc] | None = None) -> list[Doc]:
    return [d for d in (kubernetes_docs() if docs is None else docs) if d.get("kind") == kind]


def one(kind: str, name: str, docs: list[Doc] | None = None) -> Doc:
    found = [d for d in docs_of_kind(kind, docs) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(doc: Doc) -> Doc:
    """The pod spec of a workload object (Deployment, or a bare Pod)."""
    if doc["kind"] == "Pod":
        return doc["spec"]
    return doc["spec"]["template"]["spec"]


def _image_name(image: str) -> str:
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def citadel_containers(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(where, container) for every container running the citadel image, init ones too."""
    for d in docs:
        if d.get("kind") not in {"Deployment", "Pod", "DaemonSet", "StatefulSet", "Job"}:
            continue
        spec = pod_spec(d)
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            if _image_name(c["image"]) == "citadel":
                yield f"{d['kind']}/{d['metadata']['name']}/{c['name']}", c
