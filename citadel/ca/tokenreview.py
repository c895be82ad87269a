"""Token authentication by asking the Kubernetes API (``authentication.k8s.io/v1`` TokenReview).

Why TokenReview as well as offline JWKS: only the API server knows that a token's pod has been
deleted or its service account recreated, so TokenReview refuses tokens JWKS would accept. The
cost is a network dependency on the path to every certificate, which shapes this module:

- The official ``kubernetes`` client, configured from a kubeconfig or in-cluster, into its own
  ``Configuration`` (never the process-wide default, so nothing else in the process can change
  where tokens are sent). urllib3 retries are off: a dead API must fail within our deadline,
  not after three silent reconnects.
- The blocking client runs in a dedicated, bounded thread pool; a semaphore (released only when
  the worker thread really finishes) bounds calls in flight, and the whole review - queueing
  included - has one hard deadline. Past it the caller gets ``Unavailable`` and nothing is
  issued.
- Sidecars renew in storms (every pod of a rollout at once), so successful reviews are cached
  by the token's fingerprint for at most ``cache_ttl`` and never past the token's own ``exp``,
  and concurrent reviews of one token share one API call. A token whose pod was deleted can
  therefore still authenticate for up to ``cache_ttl``; keep it short.
- Refusals say why (not authenticated, wrong audience, not a service account) without ever
  echoing the token; API failures say the API was unreachable, and 401/403 from the API name
  the RBAC the CA needs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from citadel.ca.tokens import (
    DEFAULT_AUDIENCE,
    Caller,
    check_token_shape,
    parse_service_account_username,
    token_fingerprint,
)
from citadel.errors import AuthenticationError, ConfigError, Unavailable
from citadel.logs import get_logger

__all__ = [
    "POD_NAME_EXTRA",
    "POD_UID_EXTRA",
    "SERVICE_ACCOUNTS_GROUP",
    "TokenReviewAuthenticator",
]

SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
_NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
_RBAC_HINT = (
    "the CA's own service account needs a ClusterRoleBinding to the ClusterRole "
    "system:auth-delegator (and a valid kubeconfig or in-cluster token)"
)
_MAX_DETAIL = 200

_log = get_logger("citadel.ca.tokenreview")


def _sanitize(text: object, token: str) -> str:
    """External text (API errors) made safe to show: no token, one line, bounded."""
    s = str(text)
    if token:
        s = s.replace(token, "[token]")
    s = "".join(ch if ch.isprintable() else " " for ch in s)
    s = " ".join(s.split())
    return s if len(s) <= _MAX_DETAIL else s[: _MAX_DETAIL - 3] + "..."


def _unverified_exp(token: str) -> float | None:
    """The JWT ``exp`` claim, read without verification and used only to bound the cache
    (the API server vouched for the token; we never extend trust beyond its own expiry)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def _build_api_client(kubeconfig: str | None, *, max_concurrency: int) -> k8s.ApiClient:
    cfg = k8s.Configuration()
    try:
        if kubeconfig is None:
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:
            k8s_config.load_kube_config(
                config_file=kubeconfig, client_configuration=cfg, persist_config=False
            )
    except (ConfigException, OSError, ValueError) as exc:
        where = f"kubeconfig {kubeconfig}" if kubeconfig else "in-cluster service account"
        hint = "" if kubeconfig else " (not running in a pod? pass --kubeconfig FILE)"
        raise ConfigError(
            f"cannot configure the Kubernetes client from the {where}: {_sanitize(exc, '')}{hint}"
        ) from None
    cfg.retries = 0  # fail within our deadline; the caller (istio-agent) retries
    cfg.connection_pool_maxsize = max_concurrency
    return k8s.ApiClient(configuration=cfg)


class TokenReviewAuthenticator:
    """Verifies service-account tokens with the Kubernetes TokenReview API."""

    name = "tokenreview"

    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
        timeout: float = 5.0,
        cache_size: int = 10_000,
        cache_ttl: float = 60.0,
        max_concurrency: int = 32,
        clock: Callable[[], float] = time.time,
        api_client: k8s.ApiClient | None = None,
    ) -> None:
        if isinstance(audiences, str):
            audiences = (audiences,)
        if not audiences or not all(isinstance(a, str) and a for a in audiences):
            raise ConfigError("tokenreview needs at least one non-empty audience")
        if timeout <= 0:
            raise ConfigError("tokenreview timeout must be positive")
        if cache_size < 0 or cache_ttl < 0:
            raise ConfigError("tokenreview cache size and TTL must not be negative")
        if max_concurrency < 1:
            raise ConfigError("tokenreview max_concurrency must be at least 1")
        self.audiences: tuple[str, ...] = tuple(dict.fromkeys(audiences))
        self.timeout = float(timeout)
        self._cache_size = cache_size
        self._cache_ttl = float(cache_ttl)
        self._max_concurrency = max_concurrency
        self._clock = clock
        self._owns_client = api_client is None
        if api_client is None:
            api_client = _build_api_client(kubeconfig, max_concurrency=max_concurrency)
        self._api_client = api_client
        self._server = str(getattr(api_client.configuration, "host", "") or "")
        self._api = k8s.AuthenticationV1Api(api_client)
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="tokenreview"
        )
        self._cache: OrderedDict[str, tuple[float, Caller]] = OrderedDict()
        self._cache_lock = threading.Lock()
        # Per event loop: asyncio primitives belong to the loop that created them.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._inflight: dict[str, asyncio.Future[Caller]] = {}

    # --- public ---------------------------------------------------------------------
    async def authenticate(self, token: str) -> Caller:
        check_token_shape(token)
        key = token_fingerprint(token)
        cached = self._cache_get(key)
        if cached is not None:
            return cached
        inflight = self._loop_state()
        task = inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._review(token, key))
            inflight[key] = task
            task.add_done_callback(lambda t, k=key: self._settle(inflight, k, t))
        # shield: one caller giving up must not cancel the review the others wait on.
        return await asyncio.shield(task)

    def cache_len(self) -> int:
        with self._cache_lock:
            return len(self._cache)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._owns_client:
            self._api_client.close()

    # --- the review -----------------------------------------------------------------
    async def _review(self, token: str, key: str) -> Caller:
        try:
            async with asyncio.timeout(self.timeout):
                review = await self._call_in_pool(token)
        except TimeoutError:
            raise self._unavailable(f"no answer within {self.timeout:g}s", "timeout") from None
        except ApiException as exc:
            raise self._api_error(exc, token) from None
        except urllib3.exceptions.HTTPError as exc:
            raise self._unavailable(self._transport_detail(exc, token), "transport") from None
        except Exception as exc:  # fail closed on anything the client throws
            raise self._unavailable(
                f"unexpected {type(exc).__name__}: {_sanitize(exc, token)}", "client"
            ) from None
        try:
            caller = self._check(review, token)
        except AuthenticationError as exc:
            _log.info("tokenreview refused", reason=exc.reason, token_id=key[:16])
            raise
        self._cache_put(key, token, caller)
        return caller

    async def _call_in_pool(self, token: str) -> Any:
        """Run the blocking client in our pool; the slot is released when the worker
        thread finishes, not when the caller stops waiting, so threads stay bounded."""
        loop = asyncio.get_running_loop()
        slots = self._slots
        assert slots is not None
        await slots.acquire()

        def release(_: Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(slots.release)

        try:
            cf = self._executor.submit(self._create_review, token)
        except BaseException:
            slots.release()
            raise
        cf.add_done_callback(release)
        return await asyncio.wrap_future(cf)

    def _create_review(self, token: str) -> Any:
        body = k8s.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=k8s.V1TokenReviewSpec(token=token, audiences=list(self.audiences)),
        )
        return self._api.create_token_review(body, _request_timeout=self.timeout)

    def _check(self, review: Any, token: str) -> Caller:
        status = getattr(review, "status", None)
        if status is None:
            raise self._unavailable("the TokenReview answer had no status", "bad_answer")
        if status.authenticated is not True:
            why = "token was not authenticated by the Kubernetes API"
            if status.error:
                why += f" ({_sanitize(status.error, token)})"
            raise AuthenticationError(why, reason="token_rejected")
        user = status.user
        username = (user.username if user else None) or ""
        namespace, service_account = parse_service_account_username(username)
        groups = (user.groups if user else None) or []
        if SERVICE_ACCOUNTS_GROUP not in groups:
            raise AuthenticationError(
                f"token's user is not in the {SERVICE_ACCOUNTS_GROUP} group",
                reason="not_service_account",
            )
        granted = tuple(a for a in (status.audiences or []) if a in self.audiences)
        if not granted:
            raise AuthenticationError(
                "token is not for this CA: its audiences do not include "
                f"{', '.join(self.audiences)}",
                reason="wrong_audience",
            )
        extra: dict[str, list[str]] = (user.extra if user else None) or {}

        def first(name: str) -> str | None:
            values = extra.get(name) or []
            return values[0] if values and values[0] else None

        details = {
            k: v
            for k, v in (("serviceaccount_uid", user.uid), ("node_name", first(_NODE_NAME_EXTRA)))
            if v
        }
        exp = _unverified_exp(token)
        return Caller(
            namespace=namespace,
            service_account=service_account,
            subject=username,
            audiences=granted,
            pod_name=first(POD_NAME_EXTRA),
            pod_uid=first(POD_UID_EXTRA),
            expires_at=datetime.fromtimestamp(exp, UTC) if exp is not None else None,
            authenticator=self.name,
            extra=details,
        )

    # --- errors ---------------------------------------------------------------------
    def _unavailable(self, detail: str, kind: str) -> Unavailable:
        _log.warning("kubernetes api unavailable", kind=kind, detail=detail, server=self._server)
        return Unavailable(
            f"Kubernetes API unreachable: {detail}, nothing issued",
            reason="kubernetes_unavailable",
        )

    def _api_error(self, exc: ApiException, token: str) -> Unavailable:
        code = exc.status or 0
        message = ""
        try:
            body = json.loads(exc.body) if exc.body else None
            if isinstance(body, dict) and isinstance(body.get("message"), str):
                message = _sanitize(body["message"], token)
        except (ValueError, TypeError):
            pass
        if code in (401, 403):
            _log.error("kubernetes api refused the CA", status=code, detail=message)
            what = (
                "did not accept the CA's own credentials"
                if code == 401
                else "forbade the CA's TokenReview"
            )
            return Unavailable(
                f"Kubernetes API {what} (HTTP {code}{': ' + message if message else ''}); "
                f"{_RBAC_HINT}; nothing issued",
                reason="kubernetes_forbidden",
            )
        if code == 0:  # the client reports TLS failures as status 0
            return self._unavailable(f"TLS failure ({_sanitize(exc.reason, token)})", "tls")
        reason = _sanitize(exc.reason or "", token)
        detail = f"HTTP {code} {reason}".strip() + (f" - {message}" if message else "")
        if code == 429:
            detail += " (the API server is throttling the CA)"
        return self._unavailable(detail, f"http_{code}")

    def _transport_detail(self, exc: urllib3.exceptions.HTTPError, token: str) -> str:
        cause: BaseException = exc
        if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
            cause = exc.reason
        where = self._server or "the API server"
        if isinstance(cause, urllib3.exceptions.NewConnectionError | ConnectionError):
            return f"cannot connect to {where}"
        if isinstance(cause, urllib3.exceptions.TimeoutError):
            return f"no answer from {where} within {self.timeout:g}s"
        if isinstance(cause, urllib3.exceptions.ProtocolError):
            return f"{where} closed the connection without an answer"
        if isinstance(cause, urllib3.exceptions.SSLError):
            return f"TLS failure talking to {where}"
        return f"{type(cause).__name__} talking to {where}: {_sanitize(cause, token)}"

    # --- single-flight and cache ----------------------------------------------------
    def _loop_state(self) -> dict[str, asyncio.Future[Caller]]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._slots = asyncio.Semaphore(self._max_concurrency)
            self._inflight = {}
        return self._inflight

    @staticmethod
    def _settle(
        inflight: dict[str, asyncio.Future[Caller]], key: str, task: asyncio.Future[Caller]
    ) -> None:
        if inflight.get(key) is task:
            del inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" noise if every waiter left

    def _cache_get(self, key: str) -> Caller | None:
        if not self._cache_size:
            return None
        now = self._clock()
        with self._cache_lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            if now >= entry[0]:
                del self._cache[key]
                return None
            self._cache.move_to_end(key)
            return entry[1]

    def _cache_put(self, key: str, token: str, caller: Caller) -> None:
        if not self._cache_size or not self._cache_ttl:
            return
        now = self._clock()
        lifetime = self._cache_ttl
        exp = _unverified_exp(token)
        if exp is not None:
            lifetime = min(lifetime, exp - now)
        if lifetime <= 0:
            return
        with self._cache_lock:
            self._cache[key] = (now + lifetime, caller)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
