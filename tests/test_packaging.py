"""The distribution ships what an installed citadel needs: every package and the policies."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_in_the_tree_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    in_tree = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("citadel", "authz")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert in_tree <= listed, f"add to [tool.setuptools] packages: {sorted(in_tree - listed)}"
    assert listed - in_tree == {"citadel.policies"}


def test_shipped_policies_are_package_data() -> None:
    tool = _pyproject()["tool"]["setuptools"]
    assert tool["package-dir"]["citadel.policies"] == "policies"
    patterns = tool["package-data"]["citadel.policies"]
    shipped = {
        p.relative_to(ROOT / "policies") for p in (ROOT / "policies").rglob("*") if p.is_file()
    }
    covered = {f for f in shipped if any(f.match(pat) for pat in patterns)}
    assert shipped == covered, f"not shipped: {sorted(map(str, shipped - covered))}"
