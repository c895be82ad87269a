"""TokenReviewAuthenticator through the official kubernetes client against a real TLS server.

Every test goes over a loopback socket to ``tests.citadel.k8s_api`` via a kubeconfig, exactly
as the CA does in production; nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from citadel.ca.tokenreview import TokenReviewAuthenticator
from citadel.ca.tokens import MAX_TOKEN_BYTES, TokenAuthenticator
from citadel.errors import AuthenticationError, ConfigError, Unavailable
from tests.citadel.k8s_api import FakeKubeApi, Fault, Identity, running_k8s_api
from tests.conftest import free_port

Factory = Callable[..., TokenReviewAuthenticator]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubeApi]:
    with running_k8s_api(tmp_path_factory.mktemp("k8s-api")) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(api: FakeKubeApi) -> None:
    api.reset()


@pytest.fixture
def kubeconfig(api: FakeKubeApi, tmp_path: Path) -> Path:
    return api.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def make_auth(kubeconfig: Path) -> Iterator[Factory]:
    made: list[TokenReviewAuthenticator] = []

    def make(**kw: Any) -> TokenReviewAuthenticator:
        kw.setdefault("kubeconfig", str(kubeconfig))
        auth = TokenReviewAuthenticator(**kw)
        made.append(auth)
        return auth

    yield make
    for auth in made:
        auth.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def jwt_shaped(*, exp: float | None, ns: str = "default", sa: str = "web") -> str:
    """Looks like a projected token (the test API server only looks it up in its table)."""

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims: dict[str, Any] = {"sub": f"system:serviceaccount:{ns}:{sa}", "aud": ["istio-ca"]}
    if exp is not None:
        claims["exp"] = int(exp)
    sig = secrets.token_urlsafe(32)
    return f"{b64({'alg': 'RS256', 'kid': 'k1'})}.{b64(claims)}.{sig}"


def opaque() -> str:
    return "tok-" + secrets.token_urlsafe(24)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- success ------------------------------------------------------------------------------
def test_authenticated_service_account_caller_fields(api: FakeKubeApi, make_auth: Factory):
    exp = time.time() + 3600
    token = api.add(
        jwt_shaped(exp=exp, ns="shop", sa="checkout"),
        Identity.service_account("shop", "checkout", pod_name="checkout-7d9f", pod_uid="p-123"),
    )
    auth = make_auth()
    assert isinstance(auth, TokenAuthenticator)
    assert auth.name == "tokenreview"
    caller = run(auth.authenticate(token))
    assert (caller.namespace, caller.service_account) == ("shop", "checkout")
    assert caller.subject == "system:serviceaccount:shop:checkout"
    assert caller.audiences == ("istio-ca",)
    assert (caller.pod_name, caller.pod_uid) == ("checkout-7d9f", "p-123")
    assert caller.authenticator == "tokenreview"
    assert caller.expires_at == datetime.fromtimestamp(int(exp), UTC)
    assert caller.extra["serviceaccount_uid"]
    # The wire request is a real TokenReview with our audiences.
    body = api.last_body
    assert body is not None
    assert body["apiVersion"] == "authentication.k8s.io/v1"
    assert body["kind"] == "TokenReview"
    assert body["spec"] == {"token": token, "audiences": ["istio-ca"]}


def test_no_pod_in_extra_and_opaque_token(api: FakeKubeApi, make_auth: Factory):
    token = api.add(opaque(), Identity.service_account("default", "web"))
    caller = run(make_auth().authenticate(token))
    assert (caller.pod_name, caller.pod_uid, caller.expires_at) == (None, None, None)


def test_any_configured_audience_is_enough(api: FakeKubeApi, make_auth: Factory):
    token = api.add(opaque(), Identity.service_account("a", "b", audiences=["spire", "other"]))
    caller = run(make_auth(audiences=("istio-ca", "spire")).authenticate(token))
    assert caller.audiences == ("spire",)
    assert api.last_body is not None
    assert api.last_body["spec"]["audiences"] == ["istio-ca", "spire"]


# --- refusals: the token is bad ---------------------------------------------------------
SA = "system:serviceaccount:default:web"
REFUSED = [
    pytest.param(None, "not authenticated", id="unknown-token"),
    pytest.param(
        Identity.service_account("default", "web", audiences=["vault"]),
        "not authenticated",
        id="wrong-audience",
    ),
    pytest.param(
        Identity.service_account("default", "web", audiences=["vault"], audience_aware=False),
        "audiences do not include istio-ca",
        id="audience-unaware-answer-with-foreign-audience",
    ),
    pytest.param(
        Identity(
            username=SA, groups=("system:serviceaccounts",), audiences=(), audience_aware=False
        ),
        "audiences do not include",
        id="authenticated-without-audiences",
    ),
    pytest.param(
        Identity(username="alice@example.com", groups=("system:authenticated",)),
        "service account",
        id="not-a-service-account",
    ),
    pytest.param(
        Identity(username="system:serviceaccount:default", groups=("system:serviceaccounts",)),
        "system:serviceaccount:<ns>:<sa>",
        id="service-account-username-without-name",
    ),
    pytest.param(
        Identity(username=SA, groups=("system:authenticated",)),
        "system:serviceaccounts group",
        id="missing-serviceaccounts-group",
    ),
]


@pytest.mark.parametrize(("identity", "expect"), REFUSED)
def test_refused_tokens(
    api: FakeKubeApi, make_auth: Factory, identity: Identity | None, expect: str
):
    token = opaque()
    if identity is not None:
        api.add(token, identity)
    with pytest.raises(AuthenticationError) as info:
        run(make_auth().authenticate(token))
    assert info.value.status == "UNAUTHENTICATED"
    assert expect in info.value.message
    assert token not in str(info.value)
    assert api.count(token) == 1


@pytest.mark.parametrize(
    "token",
    [pytest.param("", id="empty"), pytest.param("x" * (MAX_TOKEN_BYTES + 1), id="oversized")],
)
def test_shape_refused_without_api_call(api: FakeKubeApi, make_auth: Factory, token: str):
    with pytest.raises(AuthenticationError):
        run(make_auth().authenticate(token))
    assert api.count() == 0


# --- the API is down or refuses us ------------------------------------------------------
@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        pytest.param(Fault(status=500), "HTTP 500", id="http-500"),
        pytest.param(Fault(status=503), "HTTP 503", id="http-503"),
        pytest.param(Fault(status=429), "HTTP 429", id="http-429-throttled"),
        pytest.param(Fault(drop=True), "closed the connection", id="connection-dropped"),
    ],
)
def test_api_failures_are_unavailable(
    api: FakeKubeApi, make_auth: Factory, fault: Fault, expect: str
):
    token = api.add(opaque(), Identity.service_account("default", "web"))
    auth = make_auth()
    with api.fault(fault), pytest.raises(Unavailable) as info:
        run(auth.authenticate(token))
    assert info.value.status == "UNAVAILABLE"
    assert info.value.message.startswith("Kubernetes API unreachable: ")
    assert info.value.message.endswith("nothing issued")
    assert expect in info.value.message
    assert api.count(token) == 1  # retries are off: one attempt, fail fast
    # Failures are not cached: once the API is back the same token works.
    assert run(auth.authenticate(token)).service_account == "web"


def test_timeout_fails_within_deadline(api: FakeKubeApi, make_auth: Factory):
    token = api.add(opaque(), Identity.service_account("default", "web"))
    auth = make_auth(timeout=0.5)
    with api.fault(Fault(delay=5)):
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            run(auth.authenticate(token))
        elapsed = time.monotonic() - started
    assert "within 0.5s" in info.value.message
    assert elapsed < 2.0, f"took {elapsed:.2f}s for a 0.5s deadline"


def test_deadline_covers_waiting_for_a_slot(api: FakeKubeApi, make_auth: Factory):
    """With every slot stuck on a slow API, a new review still fails by its deadline."""
    tokens = [api.add(opaque(), Identity.service_account("default", f"w{i}")) for i in range(3)]
    auth = make_auth(timeout=0.5, max_concurrency=1)

    async def all_of_them() -> list[Any]:
        return await asyncio.gather(*(auth.authenticate(t) for t in tokens), return_exceptions=True)

    with api.fault(Fault(delay=5)):
        started = time.monotonic()
        results = run(all_of_them())
        elapsed = time.monotonic() - started
    assert all(isinstance(r, Unavailable) for r in results), results
    assert elapsed < 2.0
    assert api.count() == 1  # the others never reached the API


def test_unreachable_port(api: FakeKubeApi, make_auth: Factory, tmp_path: Path):
    dead = api.kubeconfig(tmp_path / "dead", port=free_port())
    auth = make_auth(kubeconfig=str(dead), timeout=2)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        run(auth.authenticate(opaque()))
    assert "cannot connect to https://127.0.0.1:" in info.value.message
    assert time.monotonic() - started < 2.5


def test_wrong_server_ca_is_unavailable(api: FakeKubeApi, make_auth: Factory, tmp_path: Path):
    with running_k8s_api(tmp_path / "other") as other:
        foreign = other.kubeconfig(tmp_path / "foreign", port=api.port)
    auth = make_auth(kubeconfig=str(foreign))
    with pytest.raises(Unavailable) as info:
        run(auth.authenticate(api.add(opaque(), Identity.service_account("a", "b"))))
    assert "TLS" in info.value.message
    assert api.count() == 0


def test_rbac_forbidden_names_auth_delegator(api: FakeKubeApi, make_auth: Factory):
    token = api.add(opaque(), Identity.service_account("default", "web"))
    forbidden = Fault(
        status=403,
        message='tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:'
        'citadel:citadel-ca" cannot create resource "tokenreviews" in API group '
        '"authentication.k8s.io" at the cluster scope',
    )
    with api.fault(forbidden), pytest.raises(Unavailable) as info:
        run(make_auth().authenticate(token))
    msg = info.value.message
    assert "HTTP 403" in msg
    assert "system:auth-delegator" in msg
    assert "cannot create resource" in msg
    assert info.value.reason == "kubernetes_forbidden"


def test_bad_client_credentials_401(api: FakeKubeApi, make_auth: Factory, tmp_path: Path):
    wrong = api.kubeconfig(tmp_path / "wrong-token", token="not-the-ca-token")
    with pytest.raises(Unavailable) as info:
        run(make_auth(kubeconfig=str(wrong)).authenticate(opaque()))
    assert "HTTP 401" in info.value.message
    assert "system:auth-delegator" in info.value.message


# --- cache ------------------------------------------------------------------------------
def test_cache_hit_makes_no_second_call(api: FakeKubeApi, make_auth: Factory):
    token = api.add(jwt_shaped(exp=time.time() + 3600), Identity.service_account("d", "w"))
    auth = make_auth()
    first = run(auth.authenticate(token))
    second = run(auth.authenticate(token))
    assert first == second
    assert api.count(token) == 1


def test_refusals_are_not_cached(api: FakeKubeApi, make_auth: Factory):
    auth = make_auth()
    token = opaque()
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            run(auth.authenticate(token))
    assert api.count(token) == 2
    assert auth.cache_len() == 0


def test_cache_never_outlives_token_exp(api: FakeKubeApi, make_auth: Factory):
    clock = FakeClock()
    token = api.add(jwt_shaped(exp=clock.now + 5), Identity.service_account("d", "w"))
    auth = make_auth(clock=clock, cache_ttl=60)
    run(auth.authenticate(token))
    clock.now += 4.9
    run(auth.authenticate(token))
    assert api.count(token) == 1
    clock.now += 0.2  # past exp, well inside cache_ttl
    run(auth.authenticate(token))
    assert api.count(token) == 2


def test_cache_ttl_bounds_opaque_tokens(api: FakeKubeApi, make_auth: Factory):
    clock = FakeClock()
    token = api.add(opaque(), Identity.service_account("d", "w"))
    auth = make_auth(clock=clock, cache_ttl=10)
    run(auth.authenticate(token))
    clock.now += 9
    run(auth.authenticate(token))
    assert api.count(token) == 1
    clock.now += 2
    run(auth.authenticate(token))
    assert api.count(token) == 2


def test_already_expired_token_is_not_cached(api: FakeKubeApi, make_auth: Factory):
    clock = FakeClock()
    token = api.add(jwt_shaped(exp=clock.now - 1), Identity.service_account("d", "w"))
    auth = make_auth(clock=clock)
    run(auth.authenticate(token))
    run(auth.authenticate(token))
    assert api.count(token) == 2


def test_cache_is_lru_bounded(api: FakeKubeApi, make_auth: Factory):
    a, b, c = (api.add(opaque(), Identity.service_account("d", n)) for n in "abc")
    auth = make_auth(cache_size=2)
    for t in (a, b, a, c):  # a was used after b, so b is the one evicted
        run(auth.authenticate(t))
    assert auth.cache_len() == 2
    run(auth.authenticate(a))
    run(auth.authenticate(b))
    assert (api.count(a), api.count(b)) == (1, 2)


# --- concurrency --------------------------------------------------------------------------
def test_single_flight_under_50_concurrent_calls(api: FakeKubeApi, make_auth: Factory):
    token = api.add(opaque(), Identity.service_account("d", "w", pod_name="p"))
    auth = make_auth()

    async def storm() -> list[Any]:
        return await asyncio.gather(*(auth.authenticate(token) for _ in range(50)))

    with api.fault(Fault(delay=0.3)):  # slow enough that all 50 overlap
        callers = run(storm())
    assert api.count(token) == 1
    assert len({(c.namespace, c.service_account, c.pod_name) for c in callers}) == 1


def test_single_flight_shares_failures_too(api: FakeKubeApi, make_auth: Factory):
    token = api.add(opaque(), Identity.service_account("d", "w"))
    auth = make_auth()

    async def storm() -> list[Any]:
        return await asyncio.gather(
            *(auth.authenticate(token) for _ in range(50)), return_exceptions=True
        )

    with api.fault(Fault(status=500, delay=0.3)):
        results = run(storm())
    assert all(isinstance(r, Unavailable) for r in results)
    assert api.count(token) == 1


def test_many_distinct_tokens_with_bounded_concurrency(api: FakeKubeApi, make_auth: Factory):
    tokens = [api.add(opaque(), Identity.service_account("d", f"sa{i}")) for i in range(40)]
    auth = make_auth(max_concurrency=4)

    async def storm() -> list[Any]:
        return await asyncio.gather(*(auth.authenticate(t) for t in tokens))

    callers = run(storm())
    assert [c.service_account for c in callers] == [f"sa{i}" for i in range(40)]
    assert api.count() == 40


# --- the token never leaks ----------------------------------------------------------------
LEAKY = [
    pytest.param(None, Fault(review_error="invalid token {token}"), id="status-error-echoes"),
    pytest.param(None, Fault(status=500, message="boom {token}"), id="5xx-message-echoes"),
    pytest.param(None, Fault(status=403, message="forbidden {token}"), id="403-message-echoes"),
    pytest.param(None, Fault(delay=3), id="timeout"),
    pytest.param(None, Fault(drop=True), id="dropped"),
    pytest.param(None, None, id="unknown-token"),
    pytest.param(Identity.service_account("d", "w", audiences=["x"]), None, id="wrong-audience"),
    pytest.param(Identity(username="alice"), None, id="not-a-service-account"),
]


@pytest.mark.parametrize(("identity", "fault"), LEAKY)
def test_token_never_in_errors_or_logs(
    api: FakeKubeApi,
    make_auth: Factory,
    caplog: pytest.LogCaptureFixture,
    identity: Identity | None,
    fault: Fault | None,
):
    token = jwt_shaped(exp=time.time() + 600)
    if identity is not None:
        api.add(token, identity)
    auth = make_auth(timeout=0.5)
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        if fault is not None:
            api.set_fault(fault)
        with pytest.raises((AuthenticationError, Unavailable)) as info:
            run(auth.authenticate(token))
        api.set_fault(None)
    signature = token.rsplit(".", 1)[1]
    exc = info.value
    texts = [str(exc), repr(exc), exc.message, repr(exc.args), repr(exc.__cause__)]
    texts += [repr(e) for e in events]
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert token not in text
        assert signature not in text
    assert events, "expected a log event for the refusal"


# --- configuration --------------------------------------------------------------------------
def test_bad_configuration_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ConfigError, match="kubeconfig"):
        TokenReviewAuthenticator(kubeconfig=str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="--kubeconfig"):
        TokenReviewAuthenticator()
    with pytest.raises(ConfigError, match="audience"):
        TokenReviewAuthenticator(kubeconfig=str(tmp_path / "missing"), audiences=())
    with pytest.raises(ConfigError, match="timeout"):
        TokenReviewAuthenticator(kubeconfig=str(tmp_path / "missing"), timeout=0)
