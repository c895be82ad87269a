"""The Envoy side of ``envoy_vs_rbac.py``: its throwaway PKI and its bootstrap.

One Envoy carries every variant as its own pair of listeners (a plaintext front that
re-originates over mTLS, and the inbound with the variant's authorization filters), so
the variants differ only in those filters: citadel over gRPC or HTTP ext_authz, or Envoy's
native RBAC with the same rules rendered as Istio compiles them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import policies
from citadel import envoyconf as conf

#: The repository root: the throwaway PKI is the tests' (tests/ is not installed).
_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ certificates


def make_certs(directory: Path, client_uri: str) -> dict[str, Path]:
    """A throwaway CA, a server cert for the inbound listeners, a client SVID."""
    if str(_ROOT) not in sys.path:
        sys.path.append(str(_ROOT))  # last: nothing of bench/ or site-packages is shadowed
    from cryptography.hazmat.primitives.asymmetric import ec

    from citadel.agent.keys import key_pem
    from tests.citadel.agent.pki import MiniCA

    ca = MiniCA.create()
    data = {"ca.pem": ca.root_pem()}
    for name, uri in (("server", "spiffe://cluster.local/ns/b/sa/s"), ("client", client_uri)):
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = ca.issue(key.public_key(), uris=(uri,), ttl=timedelta(hours=2))
        data[f"{name}.pem"] = "".join(ca.chain(leaf)[:2]).encode()  # leaf + intermediate
        data[f"{name}.key"] = key_pem(key)
    files = {}
    for name, content in data.items():
        path = directory / name
        path.write_bytes(content)
        os.chmod(path, 0o600)
        files[name] = path
    return files


# ------------------------------------------------------------------ Envoy config


_URI_TEMPLATE = "type.googleapis.com/envoy.extensions.path.match.uri_template.v3"


def keymatch2_template(pattern: str) -> str:
    """A keyMatch2 pattern as an Envoy URI template (what Istio compiles ``{*}``/``{**}``
    paths to): ``:name`` is one segment (``*``), a trailing ``/*`` any suffix (``/**``)."""
    return re.sub(r":[A-Za-z0-9_]+", "*", pattern.replace("/*", "/**"))


def _path_permission(path: str, style: str) -> dict:
    if style == "regex":
        return {"url_path": {"path": {"safe_regex": {"regex": policies.keymatch2_regex(path)}}}}
    if ":" not in path and "*" not in path:
        return {"url_path": {"path": {"exact": path}}}
    return {
        "uri_template": {
            "name": "envoy.path.match.uri_template.uri_template_matcher",
            "typed_config": {
                "@type": f"{_URI_TEMPLATE}.UriTemplateMatchConfig",
                "path_template": keymatch2_template(path),
            },
        }
    }


def _method_permission(methods: str, style: str) -> dict | None:
    if methods == ".*":
        return None
    if style == "regex":
        return {"header": {"name": ":method", "string_match": {"safe_regex": {"regex": methods}}}}
    names = methods.strip("^$()").split("|")
    one = [{"header": {"name": ":method", "string_match": {"exact": m}}} for m in names]
    return one[0] if len(one) == 1 else {"or_rules": {"rules": one}}


def rbac_policies(
    pol: policies.GeneratedPolicy, effect: str, *, style: str = "istio"
) -> dict[str, dict]:
    """Casbin rows of one effect as Envoy RBAC policies (one policy per row).

    ``istio`` renders them the way Istio compiles an AuthorizationPolicy: exact paths, URI
    templates for ``:id`` and ``/*``, methods as exact ``:method`` matches; ``regex`` uses
    one RE2 regex each for path and method (the same decisions, more CPU in Envoy).
    """
    members: dict[str, list[str]] = {}
    out: dict[str, dict] = {}
    for i, rule in enumerate(pol.rules):
        if rule.effect != effect:
            continue
        if rule.role not in members:
            members[rule.role] = pol.members_of(rule.role)
        if not members[rule.role]:
            continue
        perms = [_path_permission(rule.path, style)]
        method = _method_permission(rule.methods, style)
        if method is not None:
            perms.append(method)
        if rule.host != "*":
            perms.append({"header": {"name": ":authority", "string_match": {"exact": rule.host}}})
        out[f"row{i}"] = {
            "permissions": [{"and_rules": {"rules": perms}}],
            "principals": [
                {"authenticated": {"principal_name": {"exact": m}}} for m in members[rule.role]
            ],
        }
    return out


def _file_tls(certs: dict[str, Path], name: str) -> dict:
    """A CommonTlsContext from files: this side's ``name`` certificate, the bench CA."""
    return {
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(certs[f"{name}.pem"])},
                "private_key": {"filename": str(certs[f"{name}.key"])},
            }
        ],
        "validation_context": {"trusted_ca": {"filename": str(certs["ca.pem"])}},
    }


def authz_configs(
    citadel_port: int, http_port: int, *, tune: bool
) -> dict[str, tuple[dict, list[dict]]]:
    """ext_authz configurations by listener name: (the HTTP filter, the clusters it needs).

    ``ext_authz`` is what the deploy config and the demo ship (``citadel.envoyconf``'s
    defaults). With ``tune``, alternatives run beside it in the same Envoy and the same
    interleaved trials, so each is compared with the others under the same noise.
    """
    addr = conf.address(citadel_port)
    forbidden = {"status_on_error": {"code": "Forbidden"}}

    def envoy_grpc(name: str, **options) -> tuple[dict, list[dict]]:
        flt = conf.ext_authz_filter(name, timeout="0.25s", **forbidden, **options)
        return flt, [conf.ext_authz_cluster(name, addr)]

    out = {"ext_authz": envoy_grpc("citadel")}
    http = conf.ext_authz_http_filter(
        "citadel_http", f"http://127.0.0.1:{http_port}", timeout="0.25s", **forbidden
    )
    out["ext_authz_http"] = (http, [conf.static_cluster("citadel_http", conf.address(http_port))])
    if not tune:
        return out
    out["ea_all_headers"] = envoy_grpc("ea_all_headers", allowed_headers=None)
    out["ea_raw_headers"] = envoy_grpc("ea_raw_headers", encode_raw_headers=True)
    google, _ = envoy_grpc("unused")
    google["typed_config"]["grpc_service"] = {
        "google_grpc": {"target_uri": f"127.0.0.1:{citadel_port}", "stat_prefix": "ea_google"},
        "timeout": "0.25s",
    }
    out["ea_google_grpc"] = (google, [])
    return out


def envoy_config(
    *,
    ports: dict[str, int],
    admin_port: int,
    certs: dict,
    pol,
    authz: dict[str, tuple[dict, list[dict]]],
    rbac: Sequence[str] = ("rbac",),
) -> dict:
    def rbac_filter(name: str, action: str, effect: str, style: str) -> dict:
        rules = {"action": action, "policies": rbac_policies(pol, effect, style=style)}
        return {
            "name": name,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": rules,
            },
        }

    filters: dict[str, list[dict]] = {name: [flt] for name, (flt, _) in authz.items()}
    for name, style in (("rbac", "istio"), ("rbac_regex", "regex")):
        if name in rbac:
            filters[name] = [
                rbac_filter("envoy.filters.http.rbac.deny", "DENY", "deny", style),
                rbac_filter("envoy.filters.http.rbac.allow", "ALLOW", "allow", style),
            ]
    filters["none"] = []
    downstream_tls = conf.downstream_tls(_file_tls(certs, "server"))
    upstream_tls = conf.upstream_tls(_file_tls(certs, "client"))
    ok = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
    }

    listeners = []
    clusters = [c for _, cs in authz.values() for c in cs]
    for v in filters:
        hop = {"match": {"prefix": "/"}, "route": {"cluster": f"hop_{v}"}}
        listeners.append(
            conf.listener(
                f"front_{v}",
                conf.address(ports[f"front_{v}"]),
                [conf.http_connection_manager(f"front_{v}", [hop])],
            )
        )
        listeners.append(
            conf.listener(
                f"inbound_{v}",
                conf.address(ports[f"inbound_{v}"]),
                [conf.http_connection_manager(f"inbound_{v}", [ok], filters[v], xfcc_uri=True)],
                transport_socket=downstream_tls,
            )
        )
        clusters.append(
            conf.static_cluster(
                f"hop_{v}", conf.address(ports[f"inbound_{v}"]), transport_socket=upstream_tls
            )
        )
    return {
        "admin": {"address": conf.address(admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
