"""The agent's core: fetch, verify, publish, renew, refresh the bundle.

One ``Agent`` owns the current SVID and trust bundle and is the only writer of the output
set and of the SDS store, so files and Envoy always see the same pair. Every failure on the
path to a new certificate leaves the current one in place: a certificate is replaced only
by one that verified, and it keeps being served until it actually expires.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from citadel.agent.client import BundleInfo, CaClient, FetchError
from citadel.agent.files import FileSet, write_set
from citadel.agent.keys import KeyType, build_csr, expected_spiffe_id, generate_key
from citadel.agent.renew import Backoff, RenewalPolicy
from citadel.agent.sds import SecretStore
from citadel.agent.verify import BadResponse, Svid, certs_pem, load_pem_certs, verify_chain
from citadel.errors import CitadelError, ConfigError
from citadel.logs import get_logger
from citadel.spiffe import TrustDomain

__all__ = ["Agent", "AgentConfig", "GiveUp"]

_log = get_logger("citadel.agent")


def _unexpected(exc: BaseException) -> CitadelError:
    """A bug or an environment fault (disk full, ...): logged by type, retried like others."""
    _log.error("unexpected error", error_type=type(exc).__name__, error=str(exc)[:300])
    return CitadelError(f"unexpected {type(exc).__name__}: {str(exc)[:300]}")


class GiveUp(CitadelError):
    """``--once`` could not get a certificate within its attempts/time budget."""

    reason = "agent_gave_up"


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentConfig:
    ca_address: str
    ca_root: Path
    token_file: Path
    out_dir: Path
    trust_domain: TrustDomain = field(default_factory=lambda: TrustDomain("cluster.local"))
    key_type: KeyType = KeyType.EC_P256
    #: Requested lifetime; ``None`` lets the CA choose its default.
    ttl_seconds: int | None = None
    ca_server_name: str | None = None
    renewal: RenewalPolicy = field(default_factory=RenewalPolicy)
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: ``--once`` budget: whichever runs out first.
    max_attempts: int = 10
    max_retry_seconds: float = 60.0
    request_timeout: float = 10.0
    #: Bundle poll period; ``None`` follows the CA's ``refresh_hint`` (clamped).
    bundle_poll_seconds: float | None = None


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        store: SecretStore | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """``channel``: a TLS channel to the CA shared with other agents (benches, tests);
        by default each agent opens its own."""
        self.config = config
        self._channel = channel
        self.store = store or SecretStore()
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        try:
            self._ca_root_pem = config.ca_root.read_bytes()
            self._ca_roots = tuple(load_pem_certs(self._ca_root_pem, what=str(config.ca_root)))
        except (OSError, BadResponse) as exc:
            raise ConfigError(f"cannot load --ca-root {config.ca_root}: {exc}") from None
        self._client: CaClient | None = None
        self.svid: Svid | None = None
        self.bundle: tuple[x509.Certificate, ...] = ()
        self.bundle_sequence: int | None = None
        self.bundle_refresh_hint: float = 0.0
        self.renew_at: datetime | None = None
        self.valid_from: datetime | None = None
        self.renewals = 0
        self.failures = 0
        self.last_error: str | None = None
        #: Lifetime fraction at which each renewal was scheduled (observable jitter).
        self.scheduled_fractions: list[float] = []

    # -- plumbing ------------------------------------------------------------------------

    @property
    def client(self) -> CaClient:
        if self._client is None:
            self._client = CaClient(
                address=self.config.ca_address,
                ca_root_pem=self._ca_root_pem,
                token_file=self.config.token_file,
                server_name=self.config.ca_server_name,
                timeout=self.config.request_timeout,
                channel=self._channel,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def trust_anchors(self) -> tuple[x509.Certificate, ...]:
        """The CA's published bundle when we have one, else ``--ca-root``."""
        return self.bundle or self._ca_roots

    # -- one fetch -----------------------------------------------------------------------

    def _apply_bundle(self, info: BundleInfo | None) -> bool:
        if info is None:  # a CA without the bundle service (e.g. istiod): trust --ca-root
            return False
        if info.trust_domain != self.config.trust_domain.name:
            raise BadResponse(
                f"the CA's bundle is for trust domain {info.trust_domain}, "
                f"not {self.config.trust_domain} (set --trust-domain)"
            )
        self.bundle_refresh_hint = info.refresh_hint
        changed = info.authorities != self.bundle
        self.bundle = info.authorities
        self.bundle_sequence = info.sequence
        return changed

    async def fetch(self) -> Svid:
        """One attempt: bundle, key, CSR, CreateCertificate, verify, publish."""
        client = self.client
        if not self.bundle:
            self._apply_bundle(await client.get_bundle())
        token = client.read_token()
        expected = expected_spiffe_id(token, self.config.trust_domain)
        key = generate_key(self.config.key_type)
        csr = build_csr(key=key, spiffe_id=expected)
        try:
            chain = await client.create_certificate(
                csr, token=token, ttl_seconds=self.config.ttl_seconds
            )
        except FetchError as exc:
            if expected is not None and exc.code in ("PERMISSION_DENIED", "INVALID_ARGUMENT"):
                exc.message = (
                    f"{exc.message} (this agent asked for {expected}: "
                    "is --trust-domain the CA's trust domain?)"
                )
                exc.args = (exc.message,)
            raise
        svid = verify_chain(
            cert_chain=chain,
            key=key,
            roots=self.trust_anchors(),
            trust_domain=self.config.trust_domain,
            expected_id=expected,
            now=self._clock(),
        )
        await self._publish(svid)
        return svid

    async def _publish(self, svid: Svid) -> None:
        bundle_pem = certs_pem(self.trust_anchors())
        # fsyncs take milliseconds: off the event loop, so SDS streams keep flowing.
        await asyncio.to_thread(
            write_set,
            self.config.out_dir,
            FileSet(svid_pem=svid.chain_pem(), key_pem=svid.key_pem(), bundle_pem=bundle_pem),
            now=self._clock(),
        )
        self.svid = svid
        self.store.set_bundle(bundle_pem=bundle_pem)
        self.store.set_certificate(chain_pem=svid.chain_pem(), key_pem=svid.key_pem())
        # The life that counts starts when we got it: CAs backdate NotBefore (Istio by
        # 2 min), and half of a backdated short lifetime can already be in the past.
        self.valid_from = max(svid.not_before, min(self._clock(), svid.not_after))
        self.renew_at = self.config.renewal.renew_at(self.valid_from, svid.not_after, rng=self._rng)
        self.scheduled_fractions.append(
            (self.renew_at - self.valid_from) / (svid.not_after - self.valid_from)
        )
        _log.info(
            "certificate published",
            spiffe_id=str(svid.spiffe_id),
            serial=f"{svid.serial:x}",
            not_after=svid.not_after.isoformat(),
            renew_at=self.renew_at.isoformat(),
            out_dir=str(self.config.out_dir),
        )

    async def refresh_bundle(self) -> bool:
        """Poll the CA's bundle; on change, rewrite the set and push ``ROOTCA``."""
        changed = self._apply_bundle(await self.client.get_bundle())
        if changed:
            _log.info("trust bundle changed", sequence=self.bundle_sequence)
            bundle_pem = certs_pem(self.trust_anchors())
            if self.svid is not None:
                await asyncio.to_thread(
                    write_set,
                    self.config.out_dir,
                    FileSet(
                        svid_pem=self.svid.chain_pem(),
                        key_pem=self.svid.key_pem(),
                        bundle_pem=bundle_pem,
                    ),
                    now=self._clock(),
                )
            self.store.set_bundle(bundle_pem=bundle_pem)
        return changed

    # -- retry policies ------------------------------------------------------------------

    def _note_failure(self, exc: CitadelError, delay: float | None) -> None:
        self.failures += 1
        self.last_error = exc.message
        _log.warning(
            "certificate request failed",
            error=exc.message,
            code=getattr(exc, "code", exc.reason),
            retry_in=None if delay is None else round(delay, 3),
            current_expires=self.svid.not_after.isoformat() if self.svid else None,
        )

    async def fetch_once(self) -> Svid:
        """``--once``: bounded retries for transient failures; permanent ones end it now."""
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max, rng=self._rng)
        deadline = time.monotonic() + self.config.max_retry_seconds
        attempts = 0
        while True:
            attempts += 1
            try:
                try:
                    return await self.fetch()
                except (CitadelError, asyncio.CancelledError):
                    raise
                except Exception as raw:  # OSError writing files, a runtime fault: retry
                    unexpected = _unexpected(raw)
                    raise FetchError(
                        unexpected.message, code="UNEXPECTED", transient=True
                    ) from None
            except FetchError as exc:
                if not exc.transient:
                    self._note_failure(exc, None)
                    raise GiveUp(exc.message) from None
                delay = backoff.next_delay(floor=exc.retry_after or 0.0)
                left = deadline - time.monotonic()
                if attempts >= self.config.max_attempts or delay > left:
                    self._note_failure(exc, None)
                    raise GiveUp(
                        f"gave up after {attempts} attempt(s) in "
                        f"{self.config.max_retry_seconds - max(left, 0):.1f}s: {exc.message}"
                    ) from None
                self._note_failure(exc, delay)
                await asyncio.sleep(delay)
            except CitadelError as exc:  # a bad answer or bad local setup: no retry helps
                self._note_failure(exc, None)
                raise GiveUp(exc.message) from None

    # -- long-running --------------------------------------------------------------------

    async def _wait(self, stop: asyncio.Event, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if asked to stop."""
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
        except TimeoutError:
            return stop.is_set()
        return True

    async def renew_forever(self, stop: asyncio.Event) -> None:
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max, rng=self._rng)
        while not stop.is_set():
            now = self._clock()
            if self.svid is not None and self.renew_at is not None and now < self.renew_at:
                if await self._wait(stop, (self.renew_at - now).total_seconds()):
                    return
                continue
            try:
                first = self.svid is None
                await self.fetch()
                backoff.reset()
                self.last_error = None
                if not first:
                    self.renewals += 1
            except Exception as raw:  # the loop must outlive any single failure
                exc = raw if isinstance(raw, CitadelError) else _unexpected(raw)
                retry_after = exc.retry_after if isinstance(exc, FetchError) else None
                delay = backoff.next_delay(floor=retry_after or 0.0)
                self._note_failure(exc, delay)
                if self.svid is not None and self.svid.expired(self._clock()):
                    _log.error(
                        "certificate expired and could not be renewed",
                        spiffe_id=str(self.svid.spiffe_id),
                        expired_at=self.svid.not_after.isoformat(),
                    )
                if await self._wait(stop, delay):
                    return

    async def poll_bundle_forever(self, stop: asyncio.Event) -> None:
        backoff = Backoff(1.0, 60.0, rng=self._rng)
        while not stop.is_set():
            period = self.config.bundle_poll_seconds
            if period is None:
                period = min(max(self.bundle_refresh_hint or 300.0, 5.0), 3600.0)
            delay = period * self._rng.uniform(0.9, 1.1)
            try:
                if self.svid is not None or self.bundle:
                    await self.refresh_bundle()
                backoff.reset()
            except Exception as raw:
                exc = raw if isinstance(raw, CitadelError) else _unexpected(raw)
                delay = backoff.next_delay()
                _log.warning("trust bundle refresh failed", error=exc.message, retry_in=delay)
            if await self._wait(stop, delay):
                return

    # -- health --------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        now = self._clock()
        svid = self.svid
        ready = svid is not None and not svid.expired(now)
        at_risk = False
        reason = "ok"
        if svid is None:
            reason = "no certificate yet"
        elif svid.expired(now):
            at_risk, reason = True, "certificate expired"
        elif now >= self.config.renewal.at_risk_at(
            self.valid_from or svid.not_before, svid.not_after
        ):
            at_risk, reason = True, "renewal overdue"
        return {
            "ready": ready,
            "at_risk": at_risk,
            "reason": reason,
            "spiffe_id": str(svid.spiffe_id) if svid else None,
            "serial": f"{svid.serial:x}" if svid else None,
            "not_after": svid.not_after.isoformat() if svid else None,
            "renew_at": self.renew_at.isoformat() if self.renew_at else None,
            "renewals": self.renewals,
            "failures": self.failures,
            "last_error": self.last_error,
            "bundle_sequence": self.bundle_sequence,
        }
