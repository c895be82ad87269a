"""Generated RBAC policies of any size, in the shipped model's format, for the benches.

A generated policy has ``n_rules`` ``p`` rows granting (or denying) roles access to
host + keyMatch2 path + method-regex patterns, and ``assignments`` ``g`` rows giving
SPIFFE IDs roles (plus a small role hierarchy, so role closure is exercised). It is kept
as plain rule values as well as rendered to ``policy.csv``, so the Envoy bench can render
the *same* rules as Envoy's native RBAC filter (the way Istio compiles ALLOW/DENY
policies: a DENY filter first, then an ALLOW filter).

``requests`` draws Check tuples against a policy: about half are allowed, the rest denied
for the reasons real traffic is (wrong method, another role's path, an explicit deny, an
unknown caller, anonymous), and every path carries a distinct id, so a decision cache
sees misses, not one hot key.

CLI::

    python bench/policies.py --rules 10000 --out /tmp/pol10k
"""

from __future__ import annotations

import argparse
import functools
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GeneratedPolicy",
    "Rule",
    "generate",
    "keymatch2_regex",
    "requests",
    "write_policy_dir",
]

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "policies" / "model.conf"
TRUST_DOMAIN = "cluster.local"
METHOD_SETS = ("^GET$", "^(GET|POST)$", "^(GET|PUT|DELETE)$", "^POST$")


@dataclass(frozen=True, slots=True)
class Rule:
    role: str
    #: Exact host, or ``*`` (Casbin keyMatch: anything).
    host: str
    #: keyMatch2 pattern: ``:name`` is one segment, ``/*`` any suffix.
    path: str
    #: Anchored regex over the method.
    methods: str
    effect: str  # "allow" | "deny"

    def row(self) -> str:
        return f"p, {self.role}, {self.host}, {self.path}, {self.methods}, {self.effect}"


@dataclass(frozen=True)
class GeneratedPolicy:
    rules: tuple[Rule, ...]
    #: (member, role) pairs: SPIFFE ID -> role, and role -> parent role.
    assignments: tuple[tuple[str, str], ...]
    principals: tuple[str, ...]

    @property
    def csv(self) -> str:
        lines = [f"# generated: {len(self.rules)} rules, {len(self.assignments)} role assignments"]
        lines += [f"g, {member}, {role}" for member, role in self.assignments]
        lines += [r.row() for r in self.rules]
        return "\n".join(lines) + "\n"

    @functools.cached_property
    def _parents(self) -> dict[str, list[str]]:
        parents: dict[str, list[str]] = {}
        for m, r in self.assignments:
            parents.setdefault(m, []).append(r)
        return parents

    @functools.cached_property
    def _members(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = {}
        for p in self.principals:
            for role in self.roles_of(p):
                members.setdefault(role, []).append(p)
        return members

    def roles_of(self, member: str) -> set[str]:
        """Every role ``member`` holds, directly or through the hierarchy."""
        parents = self._parents
        seen: set[str] = set()
        todo = [member]
        while todo:
            for r in parents.get(todo.pop(), []):
                if r not in seen:
                    seen.add(r)
                    todo.append(r)
        return seen

    def members_of(self, role: str) -> list[str]:
        """Every principal holding ``role`` (the closure), for rendering native RBAC."""
        return list(self._members.get(role, ()))


def _host(i: int) -> str:
    return f"svc{i}.ns{i % 50}.svc.{TRUST_DOMAIN}"


def generate(n_rules: int, *, assignments: int = 1000, seed: int = 0) -> GeneratedPolicy:
    """A policy with exactly ``n_rules`` p rows and ``assignments`` principal->role rows."""
    rng = random.Random(seed)
    n_roles = max(2, min(n_rules // 5, 1000))
    roles = [f"role:r{k}" for k in range(n_roles)]
    principals = tuple(
        f"spiffe://{TRUST_DOMAIN}/ns/ns{i % 50}/sa/workload{i}" for i in range(assignments)
    )
    pairs = [(p, roles[i % n_roles]) for i, p in enumerate(principals)]
    # A shallow hierarchy: every tenth role also inherits a shared "role:base".
    pairs += [(roles[k], "role:base") for k in range(0, n_roles, 10)]

    rules: list[Rule] = []
    for j in range(n_rules):
        if j % 20 == 19:  # about 5% explicit denies, over the same role's admin subtree
            prev = rules[-1]
            rules.append(Rule(prev.role, prev.host, f"/api/v1/svc{j - 1}/admin/*", ".*", "deny"))
            continue
        role = "role:base" if j % 97 == 0 else roles[j % n_roles]
        host = "*" if j % 10 == 0 else _host(j % 200)
        shape = j % 3
        if shape == 0:
            path = f"/api/v1/svc{j}/items/:id"
        elif shape == 1:
            path = f"/api/v1/svc{j}/*"
        else:
            path = f"/api/v1/svc{j}/items/:id/parts/:part"
        rules.append(Rule(role, host, path, rng.choice(METHOD_SETS), "allow"))
    return GeneratedPolicy(tuple(rules), tuple(pairs), principals)


def _concrete_path(rule: Rule, rng: random.Random, uid: int) -> str:
    path = re.sub(r":[A-Za-z0-9_]+", lambda _m: f"x{uid}", rule.path)
    return path.replace("/*", f"/items/x{uid}/detail")


def _allowed_method(methods: str) -> str:
    return {"^GET$": "GET", "^(GET|POST)$": "POST", "^(GET|PUT|DELETE)$": "PUT"}.get(
        methods, "POST"
    )


def requests(policy: GeneratedPolicy, n: int, *, seed: int = 1) -> list[tuple[str, str, str, str]]:
    """``n`` distinct Casbin tuples ``(sub, dom, obj, act)`` = (principal, host, path, method).

    Roughly half are allowed."""
    rng = random.Random(seed)
    by_role: dict[str, list[Rule]] = {}
    for r in policy.rules:
        by_role.setdefault(r.role, []).append(r)
    out: list[tuple[str, str, str, str]] = []
    for uid in range(n):
        principal = rng.choice(policy.principals)
        mine = [r for role in policy.roles_of(principal) for r in by_role.get(role, [])]
        allows = [r for r in mine if r.effect == "allow"]
        kind = uid % 10
        if kind < 5 and allows:  # should be allowed
            rule = rng.choice(allows)
            method = _allowed_method(rule.methods)
        elif kind == 5 and allows:  # wrong method
            rule = rng.choice(allows)
            method = "PATCH"
        elif kind == 6:  # someone else's path
            rule = rng.choice(policy.rules)
            method = "GET"
        elif kind == 7 and any(r.effect == "deny" for r in mine):  # explicit deny
            rule = rng.choice([r for r in mine if r.effect == "deny"])
            method = "GET"
        elif kind == 8:
            principal = f"spiffe://{TRUST_DOMAIN}/ns/unknown/sa/stranger{uid}"
            rule = rng.choice(policy.rules)
            method = "GET"
        else:
            principal = "anonymous"
            rule = rng.choice(policy.rules)
            method = "GET"
        host = rule.host if rule.host != "*" else _host(rng.randrange(200))
        out.append((principal, host, _concrete_path(rule, rng, uid), method))
    return out


def keymatch2_regex(pattern: str) -> str:
    """The RE2 regex Envoy should use for a keyMatch2 pattern (same semantics)."""
    out = []
    for part in re.split(r"(/\*|:[A-Za-z0-9_]+)", pattern):
        if part == "/*":
            out.append("/.*")
        elif part.startswith(":"):
            out.append("[^/]+")
        else:
            out.append(re.escape(part))
    return "".join(out)


def write_policy_dir(directory: str | Path, policy: GeneratedPolicy) -> Path:
    """Write ``model.conf`` (the shipped one) and the generated ``policy.csv``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODEL, d / "model.conf")
    (d / "policy.csv").write_text(policy.csv, encoding="utf-8")
    return d


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write a generated RBAC policy directory")
    parser.add_argument("--rules", type=int, required=True)
    parser.add_argument("--assignments", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    pol = generate(args.rules, assignments=args.assignments, seed=args.seed)
    print(write_policy_dir(args.out, pol))


if __name__ == "__main__":
    main()
