"""The request -> (sub, dom, obj, act) contract, and the paths it refuses to guess."""

from __future__ import annotations

import pytest

from authz.request import (
    ANONYMOUS,
    MAX_PATH_BYTES,
    Refused,
    normalize_host,
    normalize_method,
    normalize_path,
    principal_from_xfcc,
    request_tuple,
    trace_id_from,
)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("/api/orders", "/api/orders"),
        ("/api/orders?x=1", "/api/orders"),
        ("/api/orders#frag", "/api/orders"),
        ("/api/orders?q=#x", "/api/orders"),
        ("/api//orders", "/api/orders"),
        ("////api///orders", "/api/orders"),
        ("/api/./orders", "/api/orders"),
        ("/api/x/../orders", "/api/orders"),
        ("/../../admin", "/admin"),
        ("/api/orders/", "/api/orders/"),
        ("/api/orders/.", "/api/orders/"),
        ("/api/orders/x/..", "/api/orders/"),
        ("/..", "/"),
        ("/", "/"),
        ("/%61pi/%6Frders", "/api/orders"),
        ("/api/%2E%2E/admin", "/admin"),
        ("/api/%2e%2e/admin", "/admin"),
        ("/a%7Eb%2d%5f", "/a~b-_"),
        ("/a%20b", "/a%20b"),
        ("/a%3fb", "/a%3Fb"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a/..b/c", "/a/..b/c"),
        ("/a%25b", "/a%25b"),
    ],
)
def test_paths_are_normalised(raw: str, want: str) -> None:
    assert normalize_path(raw) == want


AMBIGUOUS = [
    ("encoded_slash", "/admin%2Fsecrets", "path_encoded_slash"),
    ("encoded_slash_lower", "/api/orders%2f..%2f..%2fadmin", "path_encoded_slash"),
    ("encoded_backslash", "/api%5C..%5Cadmin", "path_encoded_backslash"),
    ("raw_backslash", "/api\\..\\admin", "path_backslash"),
    ("raw_nul", "/api\x00/admin", "path_nul"),
    ("encoded_nul", "/api%00", "path_nul"),
    ("encoded_control", "/api%0A", "path_control_char"),
    ("raw_control", "/api\tx", "path_control_char"),
    ("raw_space", "/a b", "path_control_char"),
    ("truncated_escape", "/api%2", "path_invalid_escape"),
    ("non_hex_escape", "/api%zz", "path_invalid_escape"),
    ("lone_percent", "/100%", "path_invalid_escape"),
    ("escape_not_utf8", "/caf%E9", "path_not_utf8"),
    ("escape_overlong_utf8", "/%C0%AF", "path_not_utf8"),
    ("raw_non_ascii", "/caf\u00e9", "path_non_ascii"),
    ("surrogate_escape", "/x\udcff", "path_non_ascii"),
    ("relative_path", "api/orders", "path_not_absolute"),
    ("asterisk_form", "*", "path_not_absolute"),
    ("empty_path", "", "path_empty"),
    ("only_query", "?a=1", "path_empty"),
    ("overlong", "/" + "a" * MAX_PATH_BYTES, "path_too_long"),
]


@pytest.mark.parametrize(
    ("raw", "code"), [(r, c) for _, r, c in AMBIGUOUS], ids=[i for i, _, _ in AMBIGUOUS]
)
def test_ambiguous_paths_are_refused_never_guessed(raw: str, code: str) -> None:
    with pytest.raises(Refused) as info:
        normalize_path(raw)
    assert info.value.code == code
    assert info.value.http_status == 403


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("orders.shop.svc.cluster.local", "orders.shop.svc.cluster.local"),
        ("Orders.Shop:8080", "orders.shop"),
        ("orders.shop.", "orders.shop"),
        ("orders.shop.:80", "orders.shop"),
        ("[::1]:80", "[::1]"),
        ("[::1]", "[::1]"),
        ("[FE80::1]", "[fe80::1]"),
        ("127.0.0.1:9000", "127.0.0.1"),
        ("", ""),
    ],
)
def test_hosts_are_lowercased_without_port(raw: str, want: str) -> None:
    assert normalize_host(raw) == want


@pytest.mark.parametrize(
    "raw",
    ["a b", "evil.com/x", "user@host", "[::1", "[::1]x", "::1", "host:port", "x" * 300, "[::1]:9x"],
    ids=[
        "space",
        "slash",
        "userinfo",
        "unterminated_v6",
        "junk_after_v6",
        "bare_v6",
        "named_port",
        "too_long",
        "bad_v6_port",
    ],
)
def test_malformed_hosts_are_refused(raw: str) -> None:
    with pytest.raises(Refused) as info:
        normalize_host(raw)
    assert info.value.code == "host_invalid"


def test_method_is_uppercased_and_must_be_a_token() -> None:
    assert normalize_method("get") == "GET"
    for bad in ("", "GE T", "G\x00T", "X" * 40):
        with pytest.raises(Refused):
            normalize_method(bad)


def test_empty_principal_is_anonymous_and_others_kept_exactly() -> None:
    t = request_tuple(principal="", host="h", method="get", path="/x")
    assert (t.sub, t.dom, t.obj, t.act) == (ANONYMOUS, "h", "/x", "GET")
    sid = "spiffe://cluster.local/ns/shop/sa/Frontend"
    assert request_tuple(principal=sid, host="h", method="GET", path="/").sub == sid


def test_trace_ids() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_id_from({"traceparent": tp}) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_from({"x-b3-traceid": "80F198EE56343BA8"}) == "80f198ee56343ba8"
    assert trace_id_from({"traceparent": "garbage", "x-b3-traceid": "zz"}) is None
    assert trace_id_from({}) is None


def test_xfcc_uri_of_last_element() -> None:
    xfcc = (
        "By=spiffe://td/ns/a/sa/gw;Hash=ab;URI=spiffe://td/ns/a/sa/first,"
        'By=spiffe://td/ns/a/sa/b;Hash=cd;Subject="CN=x,O=y";URI=spiffe://td/ns/a/sa/last'
    )
    assert principal_from_xfcc(xfcc) == "spiffe://td/ns/a/sa/last"
    assert principal_from_xfcc('Hash=1;URI="spiffe://td/q"') == "spiffe://td/q"
    assert principal_from_xfcc("Hash=1") == ANONYMOUS
    assert principal_from_xfcc("") == ANONYMOUS
    with pytest.raises(Refused):
        principal_from_xfcc("URI=spiffe://td/a;URI=spiffe://td/b")
