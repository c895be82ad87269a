"""ext_authz under attack, over real gRPC: every hostile CheckRequest is refused with its
documented status and exactly one audit record, and the server keeps serving.

Surfaces (ids name the defect): missing attributes, path tricks, invalid UTF-8 in every
string field, header floods, principal spoofing. test_service.py holds the first cut of
these; this table completes them and adds the one-record-each and still-serving checks.

Documented outcomes (authz/request.py, authz/service.py):
- no HTTP attributes, no/malformed method, undecodable message -> INVALID_ARGUMENT, HTTP 400;
- ambiguous path (encoded / or \\, backslash, NUL, control, bad escape, non-UTF-8 escape,
  raw non-ASCII, ``;`` path parameters, too long, relative, empty) -> PERMISSION_DENIED 403;
- dot-segment tricks are normalised (never refused): ``/a/../admin`` *is* ``/admin`` and the
  ``/admin/*`` deny rule applies;
- the principal is only ``attributes.source.principal``; no header, extension, metadata,
  destination or SNI ever becomes it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as eag
from google.protobuf import struct_pb2
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.service import DECISION_HEADER, SERVICE_NAME
from citadel.audit import read_records, verify_files
from tests.authz.conftest import FRONTEND, ORDERS_HOST, ServerThread, check_request

HTTP_CODE = {400: code_pb2.INVALID_ARGUMENT, 403: code_pb2.PERMISSION_DENIED}


def req(*, principal: str = FRONTEND, **kw: Any) -> ea.CheckRequest:
    """A Check from the storefront unless told otherwise."""
    return check_request(principal=principal, **kw)


@pytest.fixture(scope="module")
def server(start_server) -> ServerThread:
    return start_server()


@pytest.fixture(scope="module")
def channel(server: ServerThread):
    ch = grpc.insecure_channel(
        server.grpc_target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def raw_check(channel) -> Callable[[bytes], ea.CheckResponse]:
    return channel.unary_unary(
        f"/{SERVICE_NAME}/Check",
        request_serializer=lambda b: b,
        response_deserializer=ea.CheckResponse.FromString,
    )


#: Cases run per surface, reported at module end (the issue's "cases per surface").
TALLY: Counter[str] = Counter()


def _decisions(server: ServerThread) -> list[dict]:
    return [r for r in read_records([server.audit_path]) if r.get("kind") == "authz.decision"]


def _exchange(server, raw_check, payload: bytes) -> tuple[ea.CheckResponse, dict]:
    """Send one Check; return the response and its single audit record (asserted single)."""
    before = len(_decisions(server))
    resp = raw_check(payload, timeout=10)
    decisions = _decisions(server)
    assert len(decisions) == before + 1, "exactly one audit record per Check"
    if resp.status.code == code_pb2.OK:
        did = {h.header.key: h.header.value for h in resp.ok_response.headers}[DECISION_HEADER]
    else:
        did = json.loads(resp.denied_response.body)["decision_id"]
    mine = [r for r in decisions if r["decision_id"] == did]
    assert len(mine) == 1 and mine[0] is decisions[-1]
    return resp, mine[0]


def _still_serving(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    ok = eag.AuthorizationStub(channel).Check(req(), timeout=5)
    assert ok.status.code == code_pb2.OK


def _assert_refused(resp: ea.CheckResponse, rec: dict, http: int, code: str) -> None:
    assert resp.status.code == HTTP_CODE[http], resp.status
    assert resp.denied_response.status.code == http
    assert rec["outcome"] == "deny" and rec["code"] == code, rec


# ---------------------------------------------------------------- missing attributes

_HTTP = ac.AttributeContext.HttpRequest
MISSING = [
    ("empty_message", ea.CheckRequest(), 400, "missing_http_attributes"),
    ("only_source", ea.CheckRequest(attributes=ac.AttributeContext(
        source=ac.AttributeContext.Peer(principal=FRONTEND))), 400, "missing_http_attributes"),
    ("request_without_http", ea.CheckRequest(attributes=ac.AttributeContext(
        request=ac.AttributeContext.Request())), 400, "missing_http_attributes"),
    ("empty_http", ea.CheckRequest(attributes=ac.AttributeContext(
        request=ac.AttributeContext.Request(http=_HTTP()))), 400, "method_invalid"),
    ("empty_method", req(method=""), 400, "method_invalid"),
    ("method_with_space", req(method="GET /x"), 400, "method_invalid"),
    ("method_overlong", req(method="G" * 100), 400, "method_invalid"),
    ("empty_host", req(host=""), 403, "no_rule"),
    ("host_with_slash", req(host="orders/admin"), 403, "host_invalid"),
    ("host_userinfo", req(host=f"evil@{ORDERS_HOST}"), 403, "host_invalid"),
    ("host_bad_port", req(host=f"{ORDERS_HOST}:80:80"), 403, "host_invalid"),
    ("host_overlong", req(host="a" * 300), 403, "host_invalid"),
    ("empty_path", req(path=""), 403, "path_empty"),
    ("path_only_query", req(path="?admin=1"), 403, "path_empty"),
]  # fmt: skip


@pytest.mark.parametrize(("message", "http", "code"), [c[1:] for c in MISSING],
                         ids=[c[0] for c in MISSING])  # fmt: skip
def test_missing_attributes(server, channel, raw_check, message, http, code) -> None:
    TALLY["missing attributes"] += 1
    resp, rec = _exchange(server, raw_check, message.SerializeToString())
    _assert_refused(resp, rec, http, code)
    _still_serving(channel)


# ---------------------------------------------------------------- path tricks

ADMIN = "deny_rule"  # reached /admin/*: the deny rule decides, as the policy says
PATHS = [
    ("dot_dot_to_admin", "/a/../admin/users", ADMIN),
    ("dot_dot_above_root", "/../../../admin/users", ADMIN),
    ("double_slash_admin", "//admin/users", ADMIN),
    ("many_slashes_admin", "/api////..//admin//users", ADMIN),
    ("dot_segment_admin", "/./admin/./users", ADMIN),
    ("encoded_dots_lower", "/api/%2e%2e/admin/users", ADMIN),
    ("encoded_dots_upper", "/api/%2E%2E/admin/users", ADMIN),
    ("encoded_dots_mixed_case", "/api/%2E%2e/admin/users", ADMIN),
    ("half_encoded_dots", "/api/.%2e/admin/users", ADMIN),
    ("encoded_letters", "/%61dmin/users", ADMIN),
    ("encoded_dot_single", "/%2e/admin/users", ADMIN),
    ("trailing_dot_dot_admin", "/admin/users/x/..", ADMIN),
    ("query_hides_nothing", "/admin/users?/api/orders", ADMIN),
    ("fragment_hides_nothing", "/admin/users#/api/orders", ADMIN),
    ("double_encoded_slash_kept", "/admin%252Fusers", "no_rule"),
    ("double_encoded_dots_kept", "/api/%252e%252e/admin/users", "no_rule"),
    ("encoded_slash_upper", "/admin%2Fusers", "path_encoded_slash"),
    ("encoded_slash_lower", "/api/orders%2f..%2f..%2fadmin", "path_encoded_slash"),
    ("encoded_backslash_upper", "/api/orders%5C..%5Cadmin", "path_encoded_backslash"),
    ("encoded_backslash_lower", "/api/orders%5c..%5cadmin", "path_encoded_backslash"),
    ("raw_backslash", "/api/orders\\..\\admin", "path_backslash"),
    ("double_backslash", "/\\\\admin\\users", "path_backslash"),
    ("raw_nul", "/admin\x00/api/orders", "path_nul"),
    ("encoded_nul", "/api/orders%00/../../admin", "path_nul"),
    ("encoded_newline", "/api/orders%0d%0aX-Injected:1", "path_control_char"),
    ("raw_tab", "/api/\torders", "path_control_char"),
    ("raw_del", "/api/orders\x7f", "path_control_char"),
    ("invalid_escape", "/api/orders/%zz", "path_invalid_escape"),
    ("truncated_escape", "/api/orders/%2", "path_invalid_escape"),
    ("lone_percent", "/api/orders/%", "path_invalid_escape"),
    ("escape_not_utf8", "/api/orders/%ff", "path_not_utf8"),
    ("overlong_utf8_slash", "/api/orders/%c0%af..%c0%afadmin", "path_not_utf8"),
    ("raw_non_ascii", "/api/orders/\u00e9", "path_non_ascii"),
    ("raw_fullwidth_slash", "/admin\uff0fusers", "path_non_ascii"),
    ("tomcat_dot_dot_semicolon", "/api/orders/..;/admin/users", "path_semicolon"),
    ("matrix_param_on_admin", "/admin;x=1/users", "path_semicolon"),
    ("encoded_semicolon", "/api/orders/..%3b/admin", "path_semicolon"),
    ("relative_path", "admin/users", "path_not_absolute"),
    ("absolute_uri_form", "http://evil/admin", "path_not_absolute"),
    ("asterisk_form", "*", "path_not_absolute"),
    ("overlong_path", "/api/orders/" + "a" * 5000, "path_too_long"),
    ("overlong_dot_dots", "/api/orders" + "/.." * 2000 + "/admin", "path_too_long"),
]


@pytest.mark.parametrize(("path", "code"), [c[1:] for c in PATHS], ids=[c[0] for c in PATHS])
def test_path_tricks(server, channel, raw_check, path, code) -> None:
    TALLY["path tricks"] += 1
    resp, rec = _exchange(server, raw_check, req(path=path).SerializeToString())
    _assert_refused(resp, rec, 403, code)
    if code.startswith("path_"):
        assert "ambiguous path" in json.loads(resp.denied_response.body)["reason"]
        assert rec["path"] is None and rec["raw_path"]
    elif code == ADMIN:
        assert rec["path"].startswith("/admin/") and rec["rule"][-1] == "deny"
    _still_serving(channel)


# ---------------------------------------------------------------- invalid UTF-8

MARK = "ZQZQZQZQ"
BAD = b"\xff\xfe\xc0\x80\xed\xa0\x80\x80"  # invalid start, overlong NUL, surrogate, stray
assert len(BAD) == len(MARK)


def _http(**kw) -> ac.AttributeContext:
    base = {"method": "GET", "host": ORDERS_HOST, "path": "/api/orders"}
    base.update(kw)
    return ac.AttributeContext(
        source=ac.AttributeContext.Peer(principal=FRONTEND),
        request=ac.AttributeContext.Request(http=_HTTP(**base)),
    )


def _with(attrs: ac.AttributeContext, fn: Callable[[ac.AttributeContext], None]):
    fn(attrs)
    return attrs


UTF8_FIELDS = {
    "source_principal": _with(_http(), lambda a: setattr(a.source, "principal", MARK)),
    "source_service": _with(_http(), lambda a: setattr(a.source, "service", MARK)),
    "source_label": _with(_http(), lambda a: a.source.labels.__setitem__("app", MARK)),
    "source_certificate": _with(_http(), lambda a: setattr(a.source, "certificate", MARK)),
    "destination_principal": _with(_http(), lambda a: setattr(a.destination, "principal", MARK)),
    "http_method": _http(method=MARK),
    "http_host": _http(host=MARK),
    "http_path": _http(path="/" + MARK),
    "http_id": _http(id=MARK),
    "http_scheme": _http(scheme=MARK),
    "http_query": _http(query=MARK),
    "http_fragment": _http(fragment=MARK),
    "http_protocol": _http(protocol=MARK),
    "http_body": _http(body=MARK),
    "header_name": _http(headers={MARK: "v"}),
    "header_value": _http(headers={"x-request-id": MARK}),
    "header_map_value": _with(_http(), lambda a: a.request.http.header_map.headers.append(
        base_pb2.HeaderValue(key="x-request-id", value=MARK))),
    "header_map_key": _with(_http(), lambda a: a.request.http.header_map.headers.append(
        base_pb2.HeaderValue(key=MARK, value="v"))),
    "context_extension_key": _with(_http(), lambda a: a.context_extensions.__setitem__(MARK, "v")),
    "context_extension_value": _with(_http(),
                                     lambda a: a.context_extensions.__setitem__("k", MARK)),
    "tls_sni": _with(_http(), lambda a: setattr(a.tls_session, "sni", MARK)),
    "metadata_string": _with(_http(), lambda a: a.metadata_context.filter_metadata[
        "envoy.filters.http.jwt_authn"].CopyFrom(struct_pb2.Struct(fields={
            "sub": struct_pb2.Value(string_value=MARK)}))),
}  # fmt: skip


@pytest.mark.parametrize("field", list(UTF8_FIELDS))
def test_invalid_utf8_in_every_string_field(server, channel, raw_check, field) -> None:
    TALLY["invalid UTF-8"] += 1
    payload = ea.CheckRequest(attributes=UTF8_FIELDS[field]).SerializeToString()
    assert payload.count(MARK.encode()) == 1
    resp, rec = _exchange(server, raw_check, payload.replace(MARK.encode(), BAD))
    _assert_refused(resp, rec, 400, "malformed_request")
    assert rec["principal"] == "anonymous"  # nothing of the message was trusted
    _still_serving(channel)


@pytest.mark.parametrize(
    "payload",
    [b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05\x0a\x03", b"\xff" * 64, b"\x0a\x80"],
    ids=["length_overflow", "truncated_submessage", "garbage_tags", "truncated_varint"],
)
def test_malformed_protobuf(server, channel, raw_check, payload) -> None:
    TALLY["invalid UTF-8"] += 1  # the same decoder path: undecodable bytes
    resp, rec = _exchange(server, raw_check, payload)
    _assert_refused(resp, rec, 400, "malformed_request")
    _still_serving(channel)


# ---------------------------------------------------------------- header floods

FLOODS = {
    "5000_headers_allowed": ({f"x-h-{i}": "v" * 20 for i in range(5000)}, None),
    "20000_tiny_headers": ({f"h{i}": "" for i in range(20000)}, None),
    "5000_headers_then_admin": ({f"x-h-{i}": "v" for i in range(5000)}, "/admin/users"),
    "one_2mb_header": ({"x-big": "a" * (2 * 1024 * 1024)}, None),
    "oversized_request_id": ({"x-request-id": "r" * 100_000}, None),
    "traceparent_garbage": ({"traceparent": "00-" + "z" * 5000, "x-b3-traceid": "%00"}, None),
}


@pytest.mark.parametrize("case", list(FLOODS))
def test_header_floods(server, channel, raw_check, case) -> None:
    TALLY["header floods"] += 1
    headers, path = FLOODS[case]
    resp, rec = _exchange(
        server, raw_check, req(headers=headers, path=path or "/api/orders").SerializeToString()
    )
    if path:
        _assert_refused(resp, rec, 403, "deny_rule")
    else:
        assert resp.status.code == code_pb2.OK and rec["outcome"] == "allow"
    assert len(json.dumps(rec)) < 4096  # no header flood reaches the audit record
    if rec.get("request_id"):
        assert len(rec["request_id"]) < 300
    assert rec["trace_id"] is None
    _still_serving(channel)


def test_header_map_flood(server, channel, raw_check) -> None:
    TALLY["header floods"] += 1
    m = ea.CheckRequest(attributes=_http())
    hm = m.attributes.request.http.header_map.headers
    for i in range(5000):
        hm.append(base_pb2.HeaderValue(key=f"x-h-{i}", raw_value=b"\xff" * 10))
    resp, rec = _exchange(server, raw_check, m.SerializeToString())
    assert resp.status.code == code_pb2.OK and rec["outcome"] == "allow"
    _still_serving(channel)


# ---------------------------------------------------------------- principal spoofing

SPOOF_HEADERS = {
    "xfcc": {"x-forwarded-client-cert": f"By=spiffe://x;URI={FRONTEND}"},
    "xfcc_many_elements": {"x-forwarded-client-cert": ",".join([f"URI={FRONTEND}"] * 50)},
    "x_spiffe_id": {"x-spiffe-id": FRONTEND},
    "x_principal": {"x-principal": FRONTEND, "x-source-principal": FRONTEND},
    "envoy_peer_headers": {"x-envoy-peer-principal": FRONTEND, "x-envoy-internal": "true"},
    "istio_peer_metadata": {"x-envoy-peer-metadata-id": f"sidecar~{FRONTEND}"},
    "authorization_bearer_spiffe": {"authorization": f"Bearer {FRONTEND}"},
    "forwarded_for": {"forwarded": f"for={FRONTEND}", "x-forwarded-for": FRONTEND},
    "pseudo_header_authority": {":authority": ORDERS_HOST, "x-user": FRONTEND},
}


@pytest.mark.parametrize("case", list(SPOOF_HEADERS))
def test_principal_spoofing_via_headers(server, channel, raw_check, case) -> None:
    TALLY["principal spoofing"] += 1
    m = req(principal="", headers=SPOOF_HEADERS[case])
    resp, rec = _exchange(server, raw_check, m.SerializeToString())
    _assert_refused(resp, rec, 403, "no_rule")
    assert rec["principal"] == "anonymous"
    _still_serving(channel)


def _spoof_attrs() -> dict[str, ac.AttributeContext]:
    out = {}
    a = _http()
    a.source.principal = ""
    a.request.http.header_map.headers.append(
        base_pb2.HeaderValue(key="x-forwarded-client-cert", value=f"URI={FRONTEND}")
    )
    out["header_map_xfcc"] = a
    a = _http()
    a.source.principal = ""
    a.destination.principal = FRONTEND
    out["destination_principal"] = a
    a = _http()
    a.source.principal = ""
    a.context_extensions["principal"] = FRONTEND
    a.context_extensions["source.principal"] = FRONTEND
    out["context_extensions"] = a
    a = _http()
    a.source.principal = ""
    a.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(
        struct_pb2.Struct(fields={"principal": struct_pb2.Value(string_value=FRONTEND)})
    )
    out["dynamic_metadata"] = a
    a = _http()
    a.source.principal = ""
    a.tls_session.sni = FRONTEND
    out["tls_sni"] = a
    a = _http()
    a.source.principal = ""
    a.source.certificate = "-----BEGIN CERTIFICATE-----\nspoof\n-----END CERTIFICATE-----"
    a.source.labels["principal"] = FRONTEND
    out["source_labels_and_certificate"] = a
    a = _http()
    a.source.principal = ""
    a.source.service = FRONTEND
    out["source_service"] = a
    return out


SPOOF_ATTRS = _spoof_attrs()


@pytest.mark.parametrize("case", list(SPOOF_ATTRS))
def test_principal_spoofing_via_other_attributes(server, channel, raw_check, case) -> None:
    TALLY["principal spoofing"] += 1
    payload = ea.CheckRequest(attributes=SPOOF_ATTRS[case]).SerializeToString()
    resp, rec = _exchange(server, raw_check, payload)
    _assert_refused(resp, rec, 403, "no_rule")
    assert rec["principal"] == "anonymous"
    _still_serving(channel)


def test_principal_is_taken_verbatim(server, channel, raw_check) -> None:
    """Near-misses of a real principal are other principals, never normalised into it."""
    for i, p in enumerate([
        FRONTEND + "/", FRONTEND.upper(), " " + FRONTEND, FRONTEND + "\n",
        FRONTEND.replace("spiffe://", "SPIFFE://"), f"{FRONTEND}?x", "anonymous ",
    ]):  # fmt: skip
        TALLY["principal spoofing"] += 1
        resp, rec = _exchange(server, raw_check, req(principal=p).SerializeToString())
        assert resp.status.code == code_pb2.PERMISSION_DENIED, (i, p)
        assert rec["principal"] == p
    _still_serving(channel)


def test_audit_chain_intact_and_tally(server) -> None:
    """Last: the whole run left a verifiable trail; print the per-surface counts."""
    report = verify_files([server.audit_path])
    assert report.ok, report.problem
    print("\nadversarial ext_authz cases per surface:", dict(TALLY), "total", sum(TALLY.values()))
    assert sum(TALLY.values()) >= 100
