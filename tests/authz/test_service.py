"""ext_authz Check end to end over real gRPC on loopback, with the xds-protos stub."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as eag
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz.service import DECISION_HEADER, SERVICE_NAME
from citadel.audit import AuditLog, StreamSink, read_records, verify_files
from citadel.errors import PolicyError
from tests.authz.conftest import (
    FRONTEND,
    ORDERS,
    ORDERS_HOST,
    PAYMENTS_HOST,
    POLICIES,
    PROMETHEUS,
    ServerThread,
    check_request,
    config_for,
    policy_copy,
)
from tests.conftest import free_port


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> grpc.Channel:
    ch = grpc.insecure_channel(
        server.grpc_target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> eag.AuthorizationStub:
    return eag.AuthorizationStub(channel)


def assert_allowed(resp: ea.CheckResponse) -> str:
    assert resp.status.code == code_pb2.OK, resp
    (hdr,) = resp.ok_response.headers
    assert hdr.header.key == DECISION_HEADER and hdr.header.value
    return hdr.header.value


def assert_denied(resp: ea.CheckResponse, http: int = 403) -> dict:
    want = code_pb2.PERMISSION_DENIED if http == 403 else code_pb2.INVALID_ARGUMENT
    assert resp.status.code == want, resp
    assert resp.denied_response.status.code == http
    hdrs = {h.header.key: h.header.value for h in resp.denied_response.headers}
    assert hdrs["content-type"] == "application/json"
    body = json.loads(resp.denied_response.body)
    assert body["decision_id"] == hdrs[DECISION_HEADER]
    return body


def still_serving(stub: eag.AuthorizationStub) -> None:
    assert_allowed(stub.Check(check_request(principal=FRONTEND), timeout=5))


def audit_by_id(server: ServerThread) -> dict[str, dict]:
    return {
        r["decision_id"]: r
        for r in read_records([server.audit_path])
        if r.get("kind") == "authz.decision"
    }


# ---------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    ("principal", "host", "method", "path"),
    [
        (FRONTEND, ORDERS_HOST, "GET", "/api/orders"),
        (FRONTEND, ORDERS_HOST + ":8080", "post", "/api/orders?page=2"),
        (FRONTEND, "Orders.Shop.Svc.Cluster.Local", "GET", "/api/orders/42"),
        (ORDERS, PAYMENTS_HOST, "POST", "/api/charges"),
        (ORDERS, "catalog.shop.svc.cluster.local", "GET", "/status"),
        (PROMETHEUS, "anything.example", "GET", "/metrics"),
        ("", "anything.example", "GET", "/healthz"),
        (FRONTEND, ORDERS_HOST, "GET", "/api/x/../orders//7"),
    ],
    ids=["role_grant", "port_and_query", "host_case", "role_chain", "inherited_role",
         "monitoring", "anonymous_health", "normalised_path"],
)  # fmt: skip
def test_allowed(stub, server, principal, host, method, path) -> None:
    did = assert_allowed(stub.Check(check_request(principal=principal, host=host,
                                                  method=method, path=path)))  # fmt: skip
    rec = audit_by_id(server)[did]
    assert rec["outcome"] == "allow" and rec["principal"] == (principal or "anonymous")


@pytest.mark.parametrize(
    ("principal", "host", "method", "path", "code"),
    [
        (FRONTEND, PAYMENTS_HOST, "POST", "/api/charges", "no_rule"),
        (FRONTEND, ORDERS_HOST, "DELETE", "/api/orders/1", "no_rule"),
        (FRONTEND, ORDERS_HOST, "GET", "/admin/users", "deny_rule"),
        (PROMETHEUS, ORDERS_HOST, "GET", "/admin/x", "deny_rule"),
        ("", ORDERS_HOST, "GET", "/api/orders", "no_rule"),
        ("spiffe://cluster.local/ns/shop/sa/Frontend", ORDERS_HOST, "GET", "/api/orders",
         "no_rule"),
        (FRONTEND, ORDERS_HOST, "GET", "/api/orders/../../admin/x", "deny_rule"),
    ],
    ids=["wrong_service", "wrong_method", "admin_denied", "monitoring_admin", "anonymous_api",
         "principal_case_differs", "dot_segments_to_admin"],
)  # fmt: skip
def test_denied(stub, server, principal, host, method, path, code) -> None:
    body = assert_denied(stub.Check(check_request(principal=principal, host=host,
                                                  method=method, path=path)))  # fmt: skip
    rec = audit_by_id(server)[body["decision_id"]]
    assert rec["outcome"] == "deny" and rec["code"] == code
    if code == "no_rule":
        assert rec["reason"] == "no rule allowed" and rec["rule"] is None
    else:
        assert rec["rule"][-1] == "deny"


def test_explicit_deny_overrides_allow(start_server, tmp_path: Path) -> None:
    pdir = policy_copy(
        tmp_path, "p, role:storefront, orders.shop.svc.cluster.local, /*, ^GET$, allow\n"
    )
    srv = start_server(pdir)
    with grpc.insecure_channel(srv.grpc_target) as ch:
        s = eag.AuthorizationStub(ch)
        assert_allowed(s.Check(check_request(principal=FRONTEND, path="/anything")))
        body = assert_denied(s.Check(check_request(principal=FRONTEND, path="/admin/x")))
    rec = audit_by_id(srv)[body["decision_id"]]
    assert rec["code"] == "deny_rule" and rec["rule"][-1] == "deny"


AMBIGUOUS = [
    ("encoded_slash", "/admin%2Fusers", "path_encoded_slash"),
    ("encoded_slash_traversal", "/api/orders%2F..%2F..%2Fadmin", "path_encoded_slash"),
    ("encoded_backslash", "/api/orders%5C..%5Cadmin", "path_encoded_backslash"),
    ("raw_backslash", "/api/orders\\..\\admin", "path_backslash"),
    ("raw_nul", "/api/orders\x00.json", "path_nul"),
    ("encoded_nul", "/api/orders%00.json", "path_nul"),
    ("invalid_escape", "/api/orders/%zz", "path_invalid_escape"),
    ("truncated_escape", "/api/orders/%4", "path_invalid_escape"),
    ("escape_not_utf8", "/api/orders/%ff", "path_not_utf8"),
    ("raw_non_ascii", "/api/orders/\u00e9", "path_non_ascii"),
    ("relative_path", "api/orders", "path_not_absolute"),
    ("empty_path", "", "path_empty"),
    ("overlong_path", "/api/orders/" + "a" * 5000, "path_too_long"),
]


@pytest.mark.parametrize(("path", "code"), [(p, c) for _, p, c in AMBIGUOUS],
                         ids=[i for i, _, _ in AMBIGUOUS])  # fmt: skip
def test_ambiguous_paths_denied_and_server_keeps_serving(stub, server, path, code) -> None:
    body = assert_denied(stub.Check(check_request(principal=FRONTEND, path=path)))
    assert "ambiguous path" in body["reason"]
    rec = audit_by_id(server)[body["decision_id"]]
    assert rec["code"] == code and rec["path"] is None and "raw_path" in rec
    still_serving(stub)


@pytest.mark.parametrize(
    "request_",
    [
        ea.CheckRequest(),
        ea.CheckRequest(attributes=ac.AttributeContext(
            source=ac.AttributeContext.Peer(principal=FRONTEND))),
        ea.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request())),
    ],
    ids=["empty_request", "no_request_attributes", "tcp_filter_no_http"],
)  # fmt: skip
def test_missing_http_attributes_is_400(stub, server, request_) -> None:
    body = assert_denied(stub.Check(request_), http=400)
    assert audit_by_id(server)[body["decision_id"]]["code"] == "missing_http_attributes"
    still_serving(stub)


def test_missing_method_is_400(stub) -> None:
    assert_denied(stub.Check(check_request(principal=FRONTEND, method="")), http=400)


def test_invalid_utf8_bytes_in_path_denied_400(channel, server, stub) -> None:
    raw = check_request(principal=FRONTEND, path="/api/orders/XXXX").SerializeToString()
    bad = raw.replace(b"XXXX", b"\xff\xfe\xc0\x80")
    call = channel.unary_unary(
        f"/{SERVICE_NAME}/Check",
        request_serializer=lambda b: b,
        response_deserializer=ea.CheckResponse.FromString,
    )
    body = assert_denied(call(bad), http=400)
    assert audit_by_id(server)[body["decision_id"]]["code"] == "malformed_request"
    garbage = call(b"\x0a\xff\xff\xff\xff\x0f")  # truncated length-delimited field
    assert_denied(garbage, http=400)
    still_serving(stub)


def test_thousands_of_headers(stub) -> None:
    headers = {f"x-h-{i}": "v" * 20 for i in range(5000)}
    assert_allowed(stub.Check(check_request(principal=FRONTEND, headers=headers)))


def test_huge_header_value_within_limit(stub) -> None:
    headers = {"x-big": "a" * (2 * 1024 * 1024), "x-request-id": "big-1"}
    assert_allowed(stub.Check(check_request(principal=FRONTEND, headers=headers)))


def test_message_over_limit_is_refused_and_server_keeps_serving(stub) -> None:
    headers = {"x-big": "a" * (5 * 1024 * 1024)}
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(check_request(principal=FRONTEND, headers=headers))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving(stub)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-forwarded-client-cert": f"By=x;URI={FRONTEND}"},
        {"x-spiffe-id": FRONTEND, "x-principal": FRONTEND},
        {"x-envoy-peer-principal": FRONTEND, "x-forwarded-for": "10.0.0.1"},
    ],
    ids=["xfcc_header", "spiffe_header", "envoy_style_header"],
)
def test_principal_never_taken_from_headers(stub, server, headers) -> None:
    body = assert_denied(stub.Check(check_request(principal="", headers=headers)))
    assert audit_by_id(server)[body["decision_id"]]["principal"] == "anonymous"


def test_audit_record_fields_and_header_hygiene(stub, server) -> None:
    secret = "Bearer s3cr3t-token-value"
    headers = {
        "authorization": secret,
        "cookie": "session=topsecret",
        "x-request-id": "req-123",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    }
    did = assert_allowed(
        stub.Check(
            check_request(
                principal=FRONTEND,
                host=ORDERS_HOST + ":80",
                path="/api//orders?x=1",
                headers=headers,
            )
        )
    )
    rec = audit_by_id(server)[did]
    assert rec["kind"] == "authz.decision"
    assert rec["request_id"] == "req-123"
    assert rec["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert rec["host"] == ORDERS_HOST and rec["method"] == "GET"
    assert rec["path"] == "/api/orders" and rec["raw_path"] == "/api//orders?x=1"
    assert rec["revision"] == server.running.state.revision
    assert isinstance(rec["latency_us"], int) and rec["transport"] == "grpc"
    b3 = stub.Check(check_request(principal=FRONTEND, headers={"x-b3-traceid": "a" * 16}))
    assert audit_by_id(server)[assert_allowed(b3)]["trace_id"] == "a" * 16
    text = Path(server.audit_path).read_text()
    assert "s3cr3t" not in text and "topsecret" not in text


def test_one_audit_record_per_check_under_concurrent_load(channel, server) -> None:
    stub = eag.AuthorizationStub(channel)
    n = 2000
    futures = []
    for i in range(n):
        principal, path = (FRONTEND, "/api/orders") if i % 2 else ("", "/api/orders")
        req = check_request(principal=principal, path=path,
                            headers={"x-request-id": f"load-{i}"})  # fmt: skip
        futures.append(stub.Check.future(req, timeout=60))
    results = [f.result() for f in futures]
    allowed = sum(r.status.code == code_pb2.OK for r in results)
    assert allowed == n // 2
    recs = [r for r in read_records([server.audit_path])
            if str(r.get("request_id", "")).startswith("load-")]  # fmt: skip
    ids = [r["request_id"] for r in recs]
    assert len(ids) == n and len(set(ids)) == n
    for r in recs:
        i = int(r["request_id"].split("-")[1])
        assert r["outcome"] == ("allow" if i % 2 else "deny")
    report = verify_files([server.audit_path])
    assert report.ok, report.problem


def test_health_and_reflection(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for svc in ("", SERVICE_NAME):
        resp = health.Check(health_pb2.HealthCheckRequest(service=svc))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = list(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))  # fmt: skip
    names = {s.name for s in resp.list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


# ---------------------------------------------------------------- failing closed


def test_audit_write_failure_denies(start_server) -> None:
    r, w = os.pipe()
    audit = AuditLog(StreamSink(os.fdopen(w, "wb")), name="authz-test")
    srv = start_server(audit=audit)
    os.close(r)  # the reader is gone: every further write fails with EPIPE
    with grpc.insecure_channel(srv.grpc_target) as ch:
        s = eag.AuthorizationStub(ch)
        body = assert_denied(s.Check(check_request(principal=FRONTEND)))
        assert "could not be recorded" in body["reason"]
        assert_denied(s.Check(check_request(principal=FRONTEND)))
    assert srv.running.metrics.audit_failures._value.get() == 2


def test_invalid_policy_refused_at_start(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "model.conf").write_text((POLICIES / "model.conf").read_text().replace(
        "r = sub, dom, obj, act", "r = sub, obj, act"))  # fmt: skip
    (d / "policy.csv").write_text("p, a, b, c, d, allow\n")
    with pytest.raises(PolicyError, match="exactly 4"):
        ServerThread(config_for(d, tmp_path / "a.log"))


def test_port_taken_is_refused_clearly(server, tmp_path: Path) -> None:
    from citadel.errors import ConfigError

    cfg = config_for(POLICIES, tmp_path / "a.log")
    cfg.listen = server.grpc_target
    with pytest.raises(ConfigError, match="cannot listen"):
        ServerThread(cfg)
    cfg.listen, cfg.admin_listen = "127.0.0.1:0", f"127.0.0.1:{server.running.admin_port}"
    with pytest.raises(ConfigError, match="address already in use"):
        ServerThread(cfg)


# ---------------------------------------------------------------- TLS and mTLS


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, *, ca=False, san=None):
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if not ca:
        b = b.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    return b.sign(issuer_key or key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test ca", ca_key, ca=True)
    out: dict[str, Path] = {}
    for who, san in (
        ("server", [x509.DNSName("localhost")]),
        ("client", [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/istio/sa/envoy")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, key, ca, ca_key, san=san)
        (d / f"{who}.pem").write_bytes(_pem(cert))
        (d / f"{who}.key").write_bytes(_pem(key))
        out[who], out[f"{who}_key"] = d / f"{who}.pem", d / f"{who}.key"
    (d / "ca.pem").write_bytes(_pem(ca))
    out["ca"] = d / "ca.pem"
    return out


def _tls_channel(target: str, pki, *, client_cert: bool) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client_key"].read_bytes() if client_cert else None,
        certificate_chain=pki["client"].read_bytes() if client_cert else None,
    )
    options = [("grpc.ssl_target_name_override", "localhost")]
    return grpc.secure_channel(target, creds, options=options)


def test_tls_listener(start_server, pki) -> None:
    srv = start_server(tls_cert=pki["server"], tls_key=pki["server_key"])
    with _tls_channel(srv.grpc_target, pki, client_cert=False) as ch:
        assert_allowed(eag.AuthorizationStub(ch).Check(check_request(principal=FRONTEND)))
    with grpc.insecure_channel(srv.grpc_target) as ch, pytest.raises(grpc.RpcError):
        eag.AuthorizationStub(ch).Check(check_request(principal=FRONTEND), timeout=2)


def test_mtls_listener_requires_client_cert(start_server, pki) -> None:
    srv = start_server(tls_cert=pki["server"], tls_key=pki["server_key"], client_ca=pki["ca"])
    with _tls_channel(srv.grpc_target, pki, client_cert=True) as ch:
        assert_allowed(eag.AuthorizationStub(ch).Check(check_request(principal=FRONTEND)))
    with _tls_channel(srv.grpc_target, pki, client_cert=False) as ch:
        with pytest.raises(grpc.RpcError) as info:
            eag.AuthorizationStub(ch).Check(check_request(principal=FRONTEND), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- the process


def _serve_cmd(policy_dir: Path, audit: Path, port: int, admin: int) -> list[str]:
    return [sys.executable, "-m", "citadel.cli", "authz", "serve", "--policy-dir",
            str(policy_dir), "--listen", f"127.0.0.1:{port}", "--admin-listen",
            f"127.0.0.1:{admin}", "--audit-log", str(audit)]  # fmt: skip


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
def test_cli_serve_drains_on_sigterm(tmp_path: Path, event_loop: str) -> None:
    """In-flight checks finish and are on record; late ones are refused, never lost - on
    uvloop (the default where installed) and on the standard loop alike."""
    port, admin, audit = free_port(), free_port(), tmp_path / "audit.log"
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "audit-key.pem"
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    key_file.chmod(0o600)
    cmd = [*_serve_cmd(POLICIES, audit, port, admin), "--audit-signing-key", str(key_file),
           "--event-loop", event_loop]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            s = eag.AuthorizationStub(ch)
            assert_allowed(s.Check(check_request(principal=FRONTEND)))
            futures = [s.Check.future(check_request(principal=FRONTEND)) for _ in range(300)]
            proc.send_signal(signal.SIGTERM)
            ok = 1
            for f in futures:
                try:
                    assert_allowed(f.result())
                    ok += 1
                except grpc.RpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    serving = next(
        json.loads(line) for line in (out + err).splitlines() if '"authz serving"' in line
    )
    uvloop_installed = importlib.util.find_spec("uvloop") is not None
    assert serving["loop"] == ("uvloop" if event_loop == "auto" and uvloop_installed else "asyncio")
    # Every stream closed with a checkpoint signed by the operator's key.
    assert verify_files([audit], public_key=key.public_key(), require_closed=True).ok
    n = sum(1 for r in read_records([audit]) if r.get("kind") == "authz.decision")
    assert n == ok


def test_cli_serve_with_invalid_policy_exits_nonzero(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "model.conf").write_text((POLICIES / "model.conf").read_text())
    (d / "policy.csv").write_text("p, role:x, *, /a\n")
    t0 = time.monotonic()
    res = subprocess.run(_serve_cmd(d, tmp_path / "a.log", free_port(), free_port()),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "policy.csv:1" in res.stderr and "values" in res.stderr
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------- policy validation at load

_MODEL = (POLICIES / "model.conf").read_text()
_GOOD_ROW = "p, anonymous, *, /healthz, ^GET$, allow\n"


@pytest.mark.parametrize(
    ("model", "rows", "file", "line", "words"),
    [
        (_MODEL.replace("r = sub, dom, obj, act", "r = sub, obj, act"), _GOOD_ROW,
         "model.conf", None, "takes 3 values"),
        (_MODEL.replace("r = sub, dom, obj, act", "r = sub, dom, obj, act, x"), _GOOD_ROW,
         "model.conf", None, "takes 5 values"),
        (_MODEL, _GOOD_ROW + "p2, a, b, c, d, allow\n", "policy.csv", 2, "unknown policy type"),
        (_MODEL, _GOOD_ROW + "\n# c\np, a, b, c, allow\n", "policy.csv", 4, "has 4 values"),
        (_MODEL, "g, a, b, c\n", "policy.csv", 1, "has 3 values"),
        (_MODEL, "p, a, b, c, d, permit\n", "policy.csv", 1, "effect must be"),
        ("[matchers]\nm = r.sub == p.sub\n", _GOOD_ROW, "model.conf", None, "no request"),
    ],
    ids=["request_three_values", "request_five_values", "unknown_ptype", "row_too_short",
         "role_row_too_long", "effect_not_allow_or_deny", "no_request_definition"],
)  # fmt: skip
def test_policy_refused_at_load_with_file_and_line(tmp_path, model, rows, file, line, words):
    from authz.policy import load_policy_dir

    (tmp_path / "model.conf").write_text(model)
    (tmp_path / "policy.csv").write_text(rows)
    with pytest.raises(PolicyError, match=words) as info:
        load_policy_dir(tmp_path)
    assert (info.value.file, info.value.line) == (file, line)


def test_start_up_objects_are_frozen_out_of_the_collector(tmp_path: Path) -> None:
    """The engine and server built at start are frozen (as after every reload), so a full
    collection never re-scans them while Checks wait for the GIL."""
    import gc

    gc.unfreeze()
    server = ServerThread(config_for(POLICIES, tmp_path / "audit.log", watch_policy=False))
    try:
        frozen = gc.get_freeze_count()
        engine = server.running.state.engine
        assert frozen > 1000
        assert not gc.is_tracked(engine) or engine not in gc.get_objects(generation=2)
    finally:
        server.stop()
