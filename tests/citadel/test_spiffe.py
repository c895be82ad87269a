"""The SPIFFE ID value types against every rule of the SPIFFE-ID standard."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citadel.errors import InvalidSpiffeId
from citadel.spiffe import SpiffeId, TrustDomain

VALID = [
    "spiffe://example.org",
    "spiffe://example.org/ns/default/sa/web",
    "spiffe://a-b_c.d/x/Y.z-1_2",
    "spiffe://cluster.local/" + "a" * 100,
]

INVALID = {
    "empty": "",
    "missing_scheme": "example.org/ns/x",
    "wrong_scheme": "https://example.org/x",
    "uppercase_scheme": "SPIFFE://example.org/x",
    "empty_trust_domain": "spiffe:///path",
    "uppercase_trust_domain": "spiffe://Example.org/x",
    "port_in_trust_domain": "spiffe://example.org:8080/x",
    "userinfo_in_trust_domain": "spiffe://user@example.org/x",
    "percent_encoded_trust_domain": "spiffe://ex%41mple.org/x",
    "trailing_slash": "spiffe://example.org/ns/x/",
    "root_path_slash": "spiffe://example.org/",
    "empty_segment": "spiffe://example.org/ns//x",
    "dot_segment": "spiffe://example.org/ns/./x",
    "dot_dot_segment": "spiffe://example.org/ns/../x",
    "query": "spiffe://example.org/x?y=1",
    "fragment": "spiffe://example.org/x#frag",
    "percent_encoded_path": "spiffe://example.org/a%20b",
    "space_in_path": "spiffe://example.org/a b",
    "trust_domain_over_255_bytes": "spiffe://" + "a" * 256 + "/x",
    "id_over_2048_bytes": "spiffe://example.org/" + "a" * 2040,
    "non_ascii_path": "spiffe://example.org/caf\u00e9",
    "lone_surrogate_in_path": "spiffe://example.org/a\udcff",
    "lone_surrogate_in_trust_domain": "spiffe://ex\ud800ample.org/a",
}


@pytest.mark.parametrize("uri", VALID)
def test_valid_ids_parse_and_round_trip(uri: str) -> None:
    sid = SpiffeId(uri)
    assert str(sid) == uri
    assert SpiffeId(str(sid)) == sid


@pytest.mark.parametrize("uri", INVALID.values(), ids=INVALID.keys())
def test_invalid_ids_are_refused(uri: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId(uri)


def test_limits_are_inclusive() -> None:
    TrustDomain("a" * 255)
    uri = "spiffe://example.org/" + "a" * (2048 - len("spiffe://example.org/"))
    assert len(uri) == 2048
    SpiffeId(uri)


def test_workload_id_from_service_account() -> None:
    sid = TrustDomain("cluster.local").workload("shop", "orders")
    assert str(sid) == "spiffe://cluster.local/ns/shop/sa/orders"
    assert sid.kubernetes_identity == ("shop", "orders")
    assert sid.istio_principal == "cluster.local/ns/shop/sa/orders"
    assert SpiffeId.from_istio_principal("cluster.local/ns/shop/sa/orders") == sid


@pytest.mark.parametrize("ns", ["", "..", "a/b", "a b"])
def test_workload_refuses_bad_segments(ns: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        TrustDomain("cluster.local").workload(ns, "sa")


def test_istio_principal_with_scheme_is_refused() -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.from_istio_principal("spiffe://cluster.local/ns/a/sa/b")


def test_never_equal_to_plain_strings() -> None:
    uri = "spiffe://example.org/x"
    assert SpiffeId(uri) != uri
    assert uri != SpiffeId(uri)
    assert TrustDomain("example.org") != "example.org"
    assert SpiffeId(uri).__eq__(uri) is NotImplemented
    assert len({SpiffeId(uri), SpiffeId(uri)}) == 1


def test_immutable() -> None:
    sid = SpiffeId("spiffe://example.org/x")
    with pytest.raises(AttributeError):
        sid._uri = "spiffe://evil.org/x"  # type: ignore[misc]
    td = TrustDomain("example.org")
    with pytest.raises(AttributeError):
        td._name = "evil.org"  # type: ignore[misc]


def test_trust_domain_id_and_membership() -> None:
    td = TrustDomain("example.org")
    assert str(td.id) == "spiffe://example.org"
    assert td.id.path == ""
    assert SpiffeId("spiffe://example.org/a").member_of(td)
    assert not SpiffeId("spiffe://other.org/a").member_of(td)
    assert TrustDomain("spiffe://example.org/a") == td


_seg = st.text(alphabet="abcXYZ019.-_", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


@given(td=st.text(alphabet="abc019.-_", min_size=1, max_size=30), segs=st.lists(_seg, max_size=6))
def test_generated_valid_ids_round_trip(td: str, segs: list[str]) -> None:
    sid = SpiffeId.from_segments(td, *segs)
    assert SpiffeId(str(sid)) == sid
    assert sid.trust_domain == TrustDomain(td)


@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=300))
def test_parser_never_raises_anything_but_invalid_spiffe_id(text: str) -> None:
    try:
        sid = SpiffeId(text)
    except InvalidSpiffeId:
        return
    assert str(sid) == text and text.startswith("spiffe://")
