"""The agent against the real CA on loopback: --once, renewal, outages, health."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import TrustDomain as PyTrustDomain
from spiffe import X509Bundle, X509Svid

from citadel.agent.agent import Agent, AgentConfig, GiveUp
from citadel.agent.files import KEY_FILE, SVID_FILE, read_set
from citadel.agent.run import start_agent
from citadel.spiffe import TrustDomain
from tests.citadel.agent.ca_harness import CaHarness
from tests.conftest import free_port

PUB = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CaHarness:
    harness = CaHarness(tmp_path_factory.mktemp("ca"))
    harness.start()
    yield harness
    harness.close()


def _token(ca: CaHarness, tmp: Path, sa: str = "web", **kw) -> Path:
    path = tmp / f"{sa}.token"
    path.write_text(ca.token("shop", sa, **kw))
    return path


def _cli(ca: CaHarness, tmp: Path, token: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable, "-m", "citadel.cli", "agent",
            "--ca-address", ca.address, "--ca-root", str(ca.root_path),
            "--token-file", str(token), "--out-dir", str(tmp / "out"), "--once",
            "--log-level", "warning", *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def _matches(files) -> bool:
    leaf = x509.load_pem_x509_certificates(files.svid_pem)[0]
    key = serialization.load_pem_private_key(files.key_pem, None)
    return leaf.public_key().public_bytes(*PUB) == key.public_key().public_bytes(*PUB)


def test_once_writes_a_valid_svid(ca, tmp_path):
    token = _token(ca, tmp_path)
    proc = _cli(ca, tmp_path, token, "--ttl", "10m")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    key_mode = stat.S_IMODE((out / KEY_FILE).resolve().stat().st_mode)
    assert key_mode == 0o600
    # The independent SPIFFE library accepts what we wrote, through the visible names.
    svid = X509Svid.load(str(out / SVID_FILE), str(out / KEY_FILE), serialization.Encoding.PEM)
    assert str(svid.spiffe_id) == "spiffe://cluster.local/ns/shop/sa/web"
    bundle = X509Bundle.load(
        PyTrustDomain("cluster.local"), str(out / "bundle.pem"), serialization.Encoding.PEM
    )
    assert [c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities] == [
        x509.load_pem_x509_certificate(ca.root_path.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    ]
    leaf, *inter = svid.cert_chain
    PolicyBuilder().store(Store(list(bundle.x509_authorities))).build_client_verifier().verify(
        leaf, inter
    )
    lifetime = leaf.not_valid_after_utc - datetime.now(UTC)
    assert 500 < lifetime.total_seconds() <= 600
    assert _matches(read_set(out))
    assert token.read_text() not in proc.stderr + proc.stdout


@pytest.mark.parametrize("key_type", ["ec-p384", "rsa-2048"])
def test_other_key_types(ca, tmp_path, key_type):
    agent = Agent(
        AgentConfig(
            ca_address=ca.address,
            ca_root=ca.root_path,
            token_file=_token(ca, tmp_path),
            out_dir=tmp_path / "out",
            key_type=key_type,
        )
    )

    async def go():
        try:
            return await agent.fetch_once()
        finally:
            await agent.close()

    svid = asyncio.run(go())
    assert _matches(read_set(tmp_path / "out"))
    assert svid.leaf.public_key().key_size == {"ec-p384": 384, "rsa-2048": 2048}[key_type]


def test_once_refused_exits_nonzero_at_once_with_a_clear_message(ca, tmp_path):
    token = _token(ca, tmp_path, audiences=("not-the-ca",))
    proc = _cli(ca, tmp_path, token)
    assert proc.returncode == 1
    assert "UNAUTHENTICATED" in proc.stderr and "no certificate written" in proc.stderr
    assert token.read_text() not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("token_kw", "words"),
    [
        pytest.param({"extra_claims": {"exp": 1}}, "UNAUTHENTICATED", id="expired-token"),
        pytest.param(
            {"issuer_url": "https://evil.example"}, "UNAUTHENTICATED", id="unknown-issuer"
        ),
    ],
)
def test_permanent_refusals_are_not_retried(ca, tmp_path, token_kw, words):
    agent = Agent(
        AgentConfig(
            ca_address=ca.address,
            ca_root=ca.root_path,
            token_file=_token(ca, tmp_path, **token_kw),
            out_dir=tmp_path / "out",
            backoff_initial=1.0,
        )
    )

    async def go() -> None:
        try:
            with pytest.raises(GiveUp, match=words):
                await agent.fetch_once()
        finally:
            await agent.close()

    asyncio.run(go())
    assert agent.failures == 1
    assert not (tmp_path / "out").exists()


def test_once_gives_up_when_the_ca_never_answers(ca, tmp_path):
    token = _token(ca, tmp_path)
    dead = f"127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [
            sys.executable, "-m", "citadel.cli", "agent", "--ca-address", dead,
            "--ca-root", str(ca.root_path), "--token-file", str(token),
            "--out-dir", str(tmp_path / "out"), "--once", "--max-attempts", "2",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "gave up after 2 attempt(s)" in proc.stderr
    assert "unavailable" in proc.stderr


def test_ca_down_at_boot_then_up(tmp_path):
    harness = CaHarness(tmp_path / "ca")  # not started: the CA is down
    try:
        agent = Agent(
            AgentConfig(
                ca_address=harness.address,
                ca_root=harness.root_path,
                token_file=_token(harness, tmp_path),
                out_dir=tmp_path / "out",
                backoff_initial=0.1,
                backoff_max=0.5,
                max_attempts=50,
                max_retry_seconds=30,
            )
        )

        async def go() -> None:
            task = asyncio.create_task(agent.fetch_once())
            await asyncio.sleep(1.0)
            assert not task.done() and agent.failures >= 2
            await asyncio.to_thread(harness.start)
            svid = await asyncio.wait_for(task, 15)
            assert str(svid.spiffe_id).endswith("/ns/shop/sa/web")
            await agent.close()

        asyncio.run(go())
        assert _matches(read_set(tmp_path / "out"))
    finally:
        harness.close()


def _reader(out: Path, stop: threading.Event, seen: set[int], bad: list[str]) -> None:
    """Reads like a consumer would (resolve ..data once) and checks every set it sees."""
    while not stop.is_set():
        try:
            files = read_set(out)
        except FileNotFoundError:
            time.sleep(0.001)
            continue
        leaf = x509.load_pem_x509_certificates(files.svid_pem)[0]
        if not _matches(files):
            bad.append(f"key does not match certificate {leaf.serial_number:x}")
        roots = x509.load_pem_x509_certificates(files.bundle_pem)
        try:
            PolicyBuilder().store(Store(roots)).time(
                leaf.not_valid_before_utc
            ).build_client_verifier().verify(
                leaf, x509.load_pem_x509_certificates(files.svid_pem)[1:]
            )
        except Exception as exc:
            bad.append(f"chain does not verify to bundle.pem: {exc}")
        seen.add(leaf.serial_number)


def test_renewal_rotates_several_times_always_consistent_with_jitter(ca, tmp_path):
    out = tmp_path / "out"
    config = AgentConfig(
        ca_address=ca.address,
        ca_root=ca.root_path,
        token_file=_token(ca, tmp_path),
        out_dir=out,
        ttl_seconds=3,
        backoff_initial=0.1,
        backoff_max=0.5,
    )
    stop = threading.Event()
    seen: set[int] = set()
    bad: list[str] = []

    async def go() -> Agent:
        running = await start_agent(config, admin=("127.0.0.1", 0))
        try:
            while running.agent.svid is None:
                await asyncio.sleep(0.02)
            reader = threading.Thread(target=_reader, args=(out, stop, seen, bad))
            reader.start()
            async with httpx.AsyncClient() as http:
                r = await http.get(f"http://127.0.0.1:{running.admin_port}/readyz")
                assert r.status_code == 200 and r.json()["status"] == "ready"
                r = await http.get(f"http://127.0.0.1:{running.admin_port}/healthz")
                assert r.status_code == 200
            deadline = time.monotonic() + 20
            while running.agent.renewals < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.to_thread(reader.join)
            return running.agent
        finally:
            stop.set()
            await running.close()

    agent = asyncio.run(go())
    assert agent.renewals >= 3
    assert bad == []
    assert len(seen) >= 3  # the reader saw several generations, all consistent
    fractions = agent.scheduled_fractions
    assert all(0.4 <= f <= 0.6 for f in fractions)
    assert len({round(f, 6) for f in fractions}) == len(fractions)  # jittered
    assert len([d for d in out.iterdir() if d.name.startswith("..2")]) <= 2  # pruned


def test_ca_down_during_renewal_old_cert_serves_until_expiry(tmp_path):
    harness = CaHarness(tmp_path / "ca")
    harness.start()
    out = tmp_path / "out"
    config = AgentConfig(
        ca_address=harness.address,
        ca_root=harness.root_path,
        token_file=_token(harness, tmp_path),
        out_dir=out,
        ttl_seconds=3,
        backoff_initial=0.1,
        backoff_max=0.3,
    )

    async def go() -> None:
        running = await start_agent(config, admin=("127.0.0.1", 0))
        url = f"http://127.0.0.1:{running.admin_port}"
        try:
            while running.agent.svid is None:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(harness.stop)
            svid = running.agent.svid
            files = read_set(out)
            async with httpx.AsyncClient() as http:
                # Past the renewal time, before expiry: still serving, still ready.
                while datetime.now(UTC) < running.agent.renew_at:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                assert running.agent.failures > 0
                assert running.agent.svid is svid and read_set(out) == files
                assert (await http.get(f"{url}/readyz")).status_code == 200
                # After expiry: not ready, and at risk.
                while datetime.now(UTC) < svid.not_after:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.1)
                r = await http.get(f"{url}/readyz")
                assert r.status_code == 503 and r.json()["reason"] == "certificate expired"
                r = await http.get(f"{url}/healthz")
                assert r.status_code == 503 and r.json()["status"] == "at-risk"
                assert read_set(out) == files  # never replaced by nothing
                # The CA comes back: the agent recovers by itself.
                await asyncio.to_thread(harness.start)
                deadline = time.monotonic() + 10
                while running.agent.svid is svid and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert running.agent.svid is not svid
                assert (await http.get(f"{url}/readyz")).status_code == 200
        finally:
            await running.close()

    try:
        asyncio.run(go())
    finally:
        harness.close()
        os.sync()


def test_wrong_trust_domain_is_refused_with_a_clear_message(ca, tmp_path):
    agent = Agent(
        AgentConfig(
            ca_address=ca.address,
            ca_root=ca.root_path,
            token_file=_token(ca, tmp_path),
            out_dir=tmp_path / "out",
            trust_domain=TrustDomain("other.example"),
        )
    )

    async def go() -> None:
        try:
            with pytest.raises(
                GiveUp,
                match=r"trust domain cluster.local, not other.example \(set --trust-domain\)",
            ):
                await agent.fetch_once()
        finally:
            await agent.close()

    asyncio.run(go())
    assert agent.failures == 1
