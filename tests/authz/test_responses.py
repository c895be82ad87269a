"""Templated CheckResponses are byte-for-byte the responses built directly.

The servicer answers from cached serialized templates (authz/service.py ``_Templates``);
these properties pin that a templated answer can never differ from the message it stands
for, whatever the decision id, reason or status.
"""

from __future__ import annotations

import json

from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from authz import service
from authz.decisions import Outcome

ids = st.text(alphabet="0123456789abcdefyz", min_size=1, max_size=40)
reasons = st.one_of(st.none(), st.text(max_size=80))
codes = st.sampled_from(["no_rule", "deny_rule", "path_dot_segment", "overloaded", "x"])
statuses = st.sampled_from([400, 403, 503])


@settings(max_examples=300, deadline=None)
@given(decision_id=ids, reason=reasons, code=codes, http_status=statuses)
def test_templated_denial_equals_direct_build(decision_id, reason, code, http_status) -> None:
    outcome = Outcome(False, decision_id, http_status, code, reason)
    templated = service._deny(outcome)
    rpc = service._RPC_CODES.get(code)
    if rpc is None:
        rpc = code_pb2.INVALID_ARGUMENT if http_status == 400 else code_pb2.PERMISSION_DENIED
    assert templated == service._deny_message((rpc, http_status, reason), decision_id)
    parsed = external_auth_pb2.CheckResponse.FromString(templated)
    assert parsed.status.code == rpc
    assert parsed.denied_response.status.code == http_status
    assert json.loads(parsed.denied_response.body)["decision_id"] == decision_id
    headers = {h.header.key: h.header.value for h in parsed.denied_response.headers}
    assert headers[service.DECISION_HEADER] == decision_id


@settings(max_examples=200, deadline=None)
@given(decision_id=ids)
def test_templated_allow_equals_direct_build(decision_id) -> None:
    templated = service._allow_bytes(decision_id)
    assert templated == service._allow_message(None, decision_id)
    parsed = external_auth_pb2.CheckResponse.FromString(templated)
    assert parsed.status.code == code_pb2.OK
    assert parsed.ok_response.headers[0].header.value == decision_id


def test_reason_containing_the_sentinel_is_built_directly() -> None:
    templates = service._Templates()
    key = (code_pb2.PERMISSION_DENIED, 403, "z" * 16)
    first = templates.render(key, "0123456789abcdef", service._deny_message)
    assert first == service._deny_message(key, "0123456789abcdef")
    assert templates._parts[(key, 16)] is None  # refused as a template, not mis-split


def test_shapes_beyond_the_limit_are_built_directly() -> None:
    templates = service._Templates(limit=2)
    for i in range(5):
        key = (code_pb2.DEADLINE_EXCEEDED, 503, f"not evaluated: {i}.0 ms left")
        out = templates.render(key, "0123456789abcdef", service._deny_message)
        assert out == service._deny_message(key, "0123456789abcdef")
    assert len(templates._parts) == 2


def test_non_ascii_decision_id_is_built_directly() -> None:
    assert service._allow_bytes("é" * 8) == service._allow_message(None, "é" * 8)
