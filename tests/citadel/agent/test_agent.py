"""The agent against a scriptable CA peer over real TLS on loopback."""

from __future__ import annotations

import asyncio
import random
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from citadel.agent.agent import Agent, AgentConfig, GiveUp
from citadel.agent.files import KEY_FILE, read_set
from citadel.agent.renew import Backoff, RenewalPolicy
from citadel.agent.sds import ROOTCA, WORKLOAD_CERT
from tests.citadel.agent.fakeca import Script, start_fake_ca
from tests.citadel.agent.pki import MiniCA
from tests.citadel.agent.test_keys import K8S, _jwt

TOKEN = _jwt({"sub": "system:serviceaccount:shop:cart", "kubernetes.io": K8S})
WANT = "spiffe://cluster.local/ns/shop/sa/cart"


@pytest.fixture(scope="module")
def pki() -> MiniCA:
    return MiniCA.create()


def _config(tmp: Path, port: int, **kw: object) -> AgentConfig:
    (tmp / "token").write_text(TOKEN)
    return AgentConfig(
        ca_address=f"127.0.0.1:{port}",
        ca_root=tmp / "roots.pem",
        token_file=tmp / "token",
        out_dir=tmp / "out",
        backoff_initial=0.05,
        backoff_max=0.2,
        **kw,  # type: ignore[arg-type]
    )


async def _with_ca(pki: MiniCA, tmp: Path, script: Script, body, **kw):
    server, port, ca = await start_fake_ca(pki, script, tmp / "roots.pem")
    agent = Agent(_config(tmp, port, **kw), rng=random.Random(7))
    try:
        return await body(agent, ca)
    finally:
        await agent.close()
        await server.stop(0)


def test_fetch_writes_a_verified_matching_set(pki, tmp_path):
    async def body(agent: Agent, ca) -> None:
        svid = await agent.fetch_once()
        assert str(svid.spiffe_id) == WANT
        assert ca.authorizations == [f"Bearer {TOKEN}"]
        files = read_set(tmp_path / "out")
        leaf = x509.load_pem_x509_certificates(files.svid_pem)[0]
        key = serialization.load_pem_private_key(files.key_pem, None)
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        assert leaf.public_key().public_bytes(
            serialization.Encoding.DER, pub
        ) == key.public_key().public_bytes(serialization.Encoding.DER, pub)
        # svid.pem is leaf + intermediate (no root); bundle.pem is the root.
        assert len(x509.load_pem_x509_certificates(files.svid_pem)) == 2
        assert x509.load_pem_x509_certificates(files.bundle_pem) == [pki.root]
        mode = (tmp_path / "out" / KEY_FILE).resolve().stat().st_mode
        assert stat.S_IMODE(mode) == 0o600
        snap = agent.store.snapshot()
        assert set(snap.resources) == {WORKLOAD_CERT, ROOTCA}
        assert agent.health()["ready"] is True

    asyncio.run(_with_ca(pki, tmp_path, Script(), body))


def test_token_file_is_reread_on_every_request(pki, tmp_path):
    async def body(agent: Agent, ca) -> None:
        await agent.fetch()
        rotated = _jwt({"sub": "system:serviceaccount:shop:cart", "kubernetes.io": K8S, "n": 2})
        (tmp_path / "token").write_text(rotated + "\n")
        await agent.fetch()
        assert ca.authorizations == [f"Bearer {TOKEN}", f"Bearer {rotated}"]

    asyncio.run(_with_ca(pki, tmp_path, Script(), body))


@pytest.mark.parametrize(
    ("step", "words"),
    [
        pytest.param("wrong_key", "public key", id="leaf-for-another-key"),
        pytest.param("wrong_id", "expected", id="unexpected-spiffe-id"),
        pytest.param("two_uris", "exactly one URI SAN", id="two-uri-sans"),
        pytest.param("other_ca", "does not verify", id="chain-from-another-ca"),
        pytest.param("unauthenticated", "UNAUTHENTICATED", id="token-refused"),
        pytest.param("denied", "is --trust-domain the CA's trust domain", id="identity-refused"),
    ],
)
def test_bad_answers_are_refused_without_retry_and_nothing_written(pki, tmp_path, step, words):
    async def body(agent: Agent, ca) -> None:
        with pytest.raises(GiveUp, match=words):
            await agent.fetch_once()
        assert len(ca.calls) == 1
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
        assert agent.svid is None

    asyncio.run(_with_ca(pki, tmp_path, Script(steps=[step]), body))


def test_transient_failures_are_retried_with_backoff(pki, tmp_path):
    async def body(agent: Agent, ca) -> None:
        await agent.fetch_once()
        assert len(ca.calls) == 3
        assert agent.failures == 2

    asyncio.run(_with_ca(pki, tmp_path, Script(steps=["unavailable", "unavailable"]), body))


def test_retry_hint_of_resource_exhausted_is_honoured(pki, tmp_path):
    async def body(agent: Agent, ca) -> None:
        await agent.fetch_once()
        assert len(ca.calls) == 2
        # Our own backoff would wait <= 0.2 s; the CA asked for 0.4 s.
        assert ca.calls[1] - ca.calls[0] >= 0.4

    asyncio.run(_with_ca(pki, tmp_path, Script(steps=["exhausted"]), body))


def test_agents_sharing_a_channel_keep_their_own_identities(pki, tmp_path):
    """A shared channel (the renewal-storm bench puts thousands of agents on a few) carries
    each agent's own token; closing an agent leaves the channel to its owner."""
    other = _jwt(
        {
            "sub": "system:serviceaccount:shop:pay",
            "kubernetes.io": {**K8S, "serviceaccount": {"name": "pay"}},
        }
    )

    async def run() -> None:
        server, port, ca = await start_fake_ca(pki, Script(), tmp_path / "roots.pem")
        creds = grpc.ssl_channel_credentials((tmp_path / "roots.pem").read_bytes())
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)
        agents = []
        for name, token in (("cart", TOKEN), ("pay", other)):
            d = tmp_path / name
            d.mkdir()
            cfg = _config(d, port)
            cfg.token_file.write_text(token)
            (d / "roots.pem").write_bytes((tmp_path / "roots.pem").read_bytes())
            agents.append(Agent(cfg, channel=channel))
        try:
            got = [str((await a.fetch_once()).spiffe_id) for a in agents]
            assert got == [WANT, "spiffe://cluster.local/ns/shop/sa/pay"]
            assert ca.authorizations == [f"Bearer {TOKEN}", f"Bearer {other}"]
            await agents[0].close()
            await agents[1].fetch_once()  # the shared channel still works
        finally:
            await agents[1].close()
            await channel.close()
            await server.stop(0)

    asyncio.run(run())


def test_once_gives_up_after_max_attempts_with_a_clear_message(pki, tmp_path):
    async def body(agent: Agent, ca) -> None:
        with pytest.raises(GiveUp, match=r"gave up after 3 attempt\(s\).*unavailable"):
            await agent.fetch_once()
        assert len(ca.calls) == 3

    asyncio.run(_with_ca(pki, tmp_path, Script(steps=["unavailable"] * 10), body, max_attempts=3))


def test_bundle_change_rewrites_bundle_and_pushes_rootca(pki, tmp_path):
    async def body(agent: Agent, ca) -> None:
        await agent.fetch()
        assert await agent.refresh_bundle() is False
        before = agent.store.snapshot()
        extra = MiniCA.create()
        (tmp_path / "roots.pem").write_bytes(pki.root_pem() + extra.root_pem())
        first_seq = agent.bundle_sequence
        assert await agent.refresh_bundle() is True
        assert agent.bundle_sequence > first_seq
        files = read_set(tmp_path / "out")
        assert x509.load_pem_x509_certificates(files.bundle_pem) == [pki.root, extra.root]
        after = agent.store.snapshot()
        assert after.digests[ROOTCA] != before.digests[ROOTCA]
        assert after.digests[WORKLOAD_CERT] == before.digests[WORKLOAD_CERT]

    asyncio.run(_with_ca(pki, tmp_path, Script(), body))


def test_renewal_loop_rotates_and_keeps_serving_through_an_outage(pki, tmp_path):
    async def body(agent: Agent, ca) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.renew_forever(stop))
        while agent.renewals < 2:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
        ca.script.steps = ["unavailable"] * 1000  # CA goes away
        while agent.failures == 0:  # (a request already in flight may still succeed)
            assert not task.done(), task.exception()
            await asyncio.sleep(0.02)
        serial = agent.svid.serial
        await asyncio.sleep(1.0)
        assert agent.svid.serial == serial  # the old certificate keeps serving
        assert not task.done()
        stop.set()
        await task
        fr = agent.scheduled_fractions
        assert all(0.4 <= f <= 0.6 for f in fr)
        assert len({round(f, 6) for f in fr}) == len(fr)  # jitter: no two alike

    asyncio.run(_with_ca(pki, tmp_path, Script(ttl=timedelta(seconds=2)), body))


def test_health_at_risk_when_renewal_overdue(pki, tmp_path):
    now = [datetime.now(UTC)]

    async def body(agent: Agent, ca) -> None:
        agent._clock = lambda: now[0]
        assert agent.health() == agent.health() | {"ready": False, "at_risk": False}
        svid = await agent.fetch()
        assert agent.health()["ready"] and not agent.health()["at_risk"]
        now[0] = svid.not_before + (svid.not_after - svid.not_before) * 0.85
        assert agent.health() == agent.health() | {"ready": True, "reason": "renewal overdue"}
        now[0] = svid.not_after + timedelta(seconds=1)
        assert agent.health() == agent.health() | {"ready": False, "at_risk": True}

    asyncio.run(_with_ca(pki, tmp_path, Script(), body))


def test_renewal_time_is_half_life_with_bounded_jitter():
    policy = RenewalPolicy()
    nb = datetime(2025, 1, 1, tzinfo=UTC)
    na = nb + timedelta(hours=1)
    rng = random.Random(1)
    times = [(policy.renew_at(nb, na, rng=rng) - nb).total_seconds() for _ in range(500)]
    assert min(times) >= 1440 and max(times) <= 2160
    assert max(times) - min(times) > 500  # actually spread


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"fraction": 1.2}, id="fraction-past-end"),
        pytest.param({"jitter": 0.6}, id="jitter-wider-than-lifetime"),
        pytest.param({"at_risk_fraction": 0.5}, id="at-risk-before-renewal"),
    ],
)
def test_renewal_policy_refuses_nonsense(kw):
    with pytest.raises(ValueError):
        RenewalPolicy(**kw)


def test_backoff_grows_is_capped_and_jittered():
    b = Backoff(initial=1, maximum=8, rng=random.Random(3))
    delays = [b.next_delay() for _ in range(8)]
    assert 0.5 <= delays[0] <= 1
    assert all(4 <= d <= 8 for d in delays[4:])
    assert len(set(delays)) == len(delays)
    assert 20 <= b.next_delay(floor=20) <= 30
    b.reset()
    assert b.next_delay() <= 1


def test_a_shed_wave_does_not_come_back_as_one_wave():
    """10,000 agents shed in the same second with ``retry-after: 1`` come back spread
    over [1, 1.5] s, not all at +1 s (which the CA would shed again)."""
    rng = random.Random(5)
    delays = [Backoff(initial=0.5, maximum=5, rng=rng).next_delay(floor=1.0) for _ in range(10_000)]
    assert min(delays) >= 1.0 and max(delays) <= 1.5
    buckets = [0] * 5
    for d in delays:
        buckets[min(4, int((d - 1.0) / 0.1))] += 1
    assert max(buckets) < 0.25 * len(delays), buckets
    # Without a hint (or a hint below our own backoff) the hint changes nothing.
    assert 0.25 <= Backoff(initial=0.5, rng=rng).next_delay(floor=0.1) <= 0.5
    # A hint beyond four times our maximum is capped there (a confused CA cannot park us).
    assert Backoff(initial=0.5, maximum=5, rng=rng).next_delay(floor=3600) <= 30


@pytest.mark.parametrize(
    ("path", "health", "status", "word"),
    [
        pytest.param("/readyz", {"ready": True, "at_risk": False}, 200, "ready", id="ready"),
        pytest.param("/readyz", {"ready": False, "at_risk": False}, 503, "not-ready", id="no-cert"),
        pytest.param("/healthz", {"ready": True, "at_risk": False}, 200, "ok", id="healthy"),
        pytest.param("/healthz", {"ready": True, "at_risk": True}, 503, "at-risk", id="overdue"),
        pytest.param("/nope", {"ready": True, "at_risk": False}, 404, None, id="unknown-path"),
    ],
)
def test_admin_routes(path, health, status, word):
    from citadel.agent.health import route

    got_status, body = route(path, health)
    assert got_status == status
    assert body.get("status") == word


def test_an_unwritable_out_dir_is_retried_then_reported_not_a_crash(pki, tmp_path):
    (tmp_path / "blocked").write_text("a file where the out dir should be")

    async def body(agent: Agent, ca) -> None:
        object.__setattr__(agent.config, "out_dir", tmp_path / "blocked")
        with pytest.raises(GiveUp, match=r"gave up after 2 attempt\(s\).*unexpected"):
            await agent.fetch_once()
        assert agent.svid is None  # never published what could not be written
        stop = asyncio.Event()
        task = asyncio.create_task(agent.renew_forever(stop))
        await asyncio.sleep(0.3)
        assert not task.done() and agent.failures >= 3  # the loop survives and retries
        stop.set()
        await task

    asyncio.run(_with_ca(pki, tmp_path, Script(), body, max_attempts=2))
