"""`citadel ca ...`: create or validate a CA, and serve Istio's CA protocol."""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives import hashes
from rich.console import Console

from citadel import eventloop
from citadel.audit import open_audit_log
from citadel.ca.authority import (
    KEY_TYPES,
    Authority,
    cacerts_dir,
    init_authority,
    load_authority,
)
from citadel.ca.limits import (
    DEFAULT_IDENTITY_BURST,
    DEFAULT_IDENTITY_RATE,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MIN_TIME_LEFT,
    DEFAULT_RATE,
    Limits,
)
from citadel.ca.server import (
    DEFAULT_DNS_NAMES,
    DEFAULT_LISTEN,
    CAConfig,
    RunningCA,
    parse_listen,
    serve_ca,
)
from citadel.ca.service import AccessLists
from citadel.ca.tokens import DEFAULT_AUDIENCE, TokenAuthenticator
from citadel.commands.options import AuditSigningKey, EventLoop
from citadel.durations import format_duration, parse_duration
from citadel.errors import AuthorityError, CitadelError, ConfigError
from citadel.logs import configure_logging

app = typer.Typer(no_args_is_help=True, help="Certificate authority: init and serve.")

KeyType = enum.Enum("KeyType", {k.replace("-", "_"): k for k in KEY_TYPES}, type=str)  # type: ignore[misc]


class SelfCheck(enum.StrEnum):
    chain = "chain"
    full = "full"
    issuer = "issuer"


class TokenAuth(enum.StrEnum):
    jwks = "jwks"
    tokenreview = "tokenreview"


StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        help="State directory; the CA lives in DIR/cacerts (or DIR itself if it holds "
        "Istio's cacerts files).",
    ),
]


PassphraseFile = Annotated[
    Path | None,
    typer.Option(
        "--key-passphrase-file",
        help="Read the passphrase of ca-key.pem (encrypted PKCS#8) from this file.",
    ),
]
PassphraseEnv = Annotated[
    str | None,
    typer.Option(
        "--key-passphrase-env",
        help="Read the passphrase of ca-key.pem from this environment variable (its name).",
    ),
]
AllowGroupReadable = Annotated[
    bool,
    typer.Option(
        "--allow-group-readable-key",
        help="Accept ca-key.pem readable by its group (a Kubernetes Secret mounted with "
        "fsGroup and defaultMode 0440). Never accepts other-readable or writable keys.",
    ),
]


def _passphrase(file: Path | None, env: str | None) -> bytes | None:
    """The key passphrase from a file or an environment variable; never echoed."""
    if file is not None and env is not None:
        raise ConfigError("give --key-passphrase-file or --key-passphrase-env, not both")
    if file is not None:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --key-passphrase-file {file}: {exc.strerror}") from None
        value = raw.rstrip(b"\r\n")
        if not value:
            raise ConfigError(f"--key-passphrase-file {file} is empty")
        return value
    if env is not None:
        text = os.environ.get(env)
        if not text:
            # The name is not echoed either: people paste the secret where its name belongs.
            raise ConfigError("the variable named by --key-passphrase-env is unset or empty")
        return text.encode()
    return None


#: Set only inside a ``--workers`` child process (each is a fresh spawned interpreter):
#: tells the supervisor this worker serves, and turns SO_REUSEPORT on for it.
_worker_ready: Callable[[], None] | None = None


def _ca_worker(params: dict[str, Any], ready: Callable[[], None]) -> None:
    """One ``--workers`` process: the ordinary single-process ``serve``, port shared."""
    global _worker_ready
    _worker_ready = ready
    try:
        serve(**params, workers=1)
    except typer.Exit as exc:  # its error is already printed; the supervisor reports the code
        sys.exit(exc.exit_code)


def _supervise(params: dict[str, Any], workers: int) -> int:
    """Run ``workers`` CA processes on one port; the exit code of the set."""
    from citadel.workers import run_workers

    console = Console(stderr=True)
    configure_logging(level=params["log_level"])
    try:
        host, port = parse_listen(params["listen"])
        if params["bundle_listen"] is not None:
            raise ConfigError("--bundle-listen cannot be combined with --workers yet")
        return run_workers(
            _ca_worker, [(params,)] * workers, host=host, port=port, grace_s=5.0,
            name="ca-worker",
        )  # fmt: skip
    except CitadelError as exc:
        raise _err(console, exc.message, 2) from None


def _err(console: Console, message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def _fingerprint(authority: Authority) -> str:
    return authority.root.fingerprint(hashes.SHA256()).hex(":").upper()


def _describe(console: Console, authority: Authority, verb: str) -> None:
    now = datetime.now(UTC)
    console.print(
        f"[green]{verb}[/] CA for trust domain [bold]{authority.trust_domain.name}[/] "
        f"({authority.key_type})"
    )
    d = authority.directory
    console.print(f"  root:        {d}/root-cert.pem  (SHA-256 {_fingerprint(authority)[:47]}...)")
    console.print(f"  signing:     {d}/ca-cert.pem, key {d}/ca-key.pem (0600)")
    console.print(f"  chain:       {d}/cert-chain.pem")
    left = authority.remaining(now)
    console.print(
        f"  valid until: {authority.not_after:%Y-%m-%d %H:%M} UTC "
        f"({format_duration(timedelta(days=left.days)) if left.days else format_duration(left)})"
    )


@app.command("init")
def init(
    state_dir: StateDir = Path(".citadel"),
    trust_domain: Annotated[
        str, typer.Option("--trust-domain", help="SPIFFE trust domain, e.g. cluster.local.")
    ] = "cluster.local",
    key_type: Annotated[
        KeyType, typer.Option("--key-type", help="Key type of root and intermediate.")
    ] = KeyType.ec_p256,  # type: ignore[attr-defined]
    key_passphrase_file: PassphraseFile = None,
    key_passphrase_env: PassphraseEnv = None,
    allow_group_readable_key: AllowGroupReadable = False,
) -> None:
    """Create a root and signing intermediate in Istio's cacerts layout (or validate an
    existing one and use it as is). With a passphrase, ca-key.pem is encrypted PKCS#8."""
    console = Console(stderr=True)
    target = cacerts_dir(state_dir)
    try:
        passphrase = _passphrase(key_passphrase_file, key_passphrase_env)
        if target.exists() and any(target.iterdir()):
            authority = load_authority(
                target,
                trust_domain=trust_domain,
                passphrase=passphrase,
                allow_group_readable_key=allow_group_readable_key,
            )
            _describe(console, authority, "using existing")
            return
        with console.status(f"generating {key_type.value} keys..."):
            authority = init_authority(
                target,
                trust_domain=trust_domain,
                key_type=key_type.value,
                passphrase=passphrase,
            )
    except CitadelError as exc:
        raise _err(console, exc.message) from None
    except OSError as exc:
        raise _err(console, f"{exc.filename or target}: {exc.strerror}") from None
    _describe(console, authority, "created")
    if passphrase:
        console.print("  ca-key.pem is encrypted; give the same passphrase option to ca serve")
    console.print(
        f"next: citadel ca serve --state-dir {state_dir} --token-auth jwks --jwks-file FILE"
    )


def _seconds(console: Console, flag: str, text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise _err(console, f"{flag}: {exc}", 2) from None


def _authenticator(
    *,
    token_auth: TokenAuth,
    jwks_file: Path | None,
    oidc_issuer: str | None,
    oidc_ca_file: Path | None,
    issuers: list[str] | None,
    kubeconfig: Path | None,
    audiences: list[str],
    leeway: timedelta,
    timeout: timedelta,
    state_dir: Path,
) -> TokenAuthenticator:
    if token_auth is TokenAuth.jwks:
        if jwks_file is None and oidc_issuer is None:
            hint = state_dir / "dev-issuer" / "jwks.json"
            extra = f" (dev tokens: --jwks-file {hint})" if hint.exists() else ""
            raise ConfigError(f"--token-auth jwks needs --jwks-file F or --oidc-issuer URL{extra}")
        from citadel.ca.jwks import JwksAuthenticator

        return JwksAuthenticator(
            jwks_file=jwks_file,
            oidc_issuer=oidc_issuer,
            ca_file=oidc_ca_file,
            issuers=issuers or None,
            audiences=audiences,
            leeway=leeway,
        )
    if jwks_file is not None or oidc_issuer is not None:
        raise ConfigError("--jwks-file/--oidc-issuer only apply to --token-auth jwks")
    from citadel.ca.tokenreview import TokenReviewAuthenticator

    return TokenReviewAuthenticator(
        kubeconfig=str(kubeconfig) if kubeconfig else None,
        audiences=audiences,
        timeout=timeout.total_seconds(),
    )


@app.command("serve")
def serve(
    state_dir: StateDir = Path(".citadel"),
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to serve on.")] = (
        DEFAULT_LISTEN
    ),
    token_auth: Annotated[
        TokenAuth, typer.Option("--token-auth", help="How callers' tokens are verified.")
    ] = TokenAuth.jwks,
    jwks_file: Annotated[
        Path | None, typer.Option("--jwks-file", help="JWKS of the token issuer (jwks).")
    ] = None,
    oidc_issuer: Annotated[
        str | None, typer.Option("--oidc-issuer", help="OIDC issuer URL; keys via discovery.")
    ] = None,
    oidc_ca_file: Annotated[
        Path | None,
        typer.Option("--oidc-ca-file", help="CA bundle for the OIDC issuer's TLS (jwks)."),
    ] = None,
    issuer: Annotated[
        list[str] | None,
        typer.Option("--issuer", help="Trusted token issuer (repeatable; jwks)."),
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option("--kubeconfig", help="Kubeconfig (tokenreview; else in-cluster).")
    ] = None,
    audience: Annotated[
        list[str] | None,
        typer.Option(
            "--audience", help=f"Accepted token audience (repeatable; {DEFAULT_AUDIENCE})."
        ),
    ] = None,
    default_ttl: Annotated[str, typer.Option("--default-ttl", help="Default SVID TTL.")] = "1h",
    max_ttl: Annotated[str, typer.Option("--max-ttl", help="Longer requests are clamped.")] = "24h",
    backdate: Annotated[str, typer.Option("--backdate", help="NotBefore backdate.")] = "30s",
    leeway: Annotated[str, typer.Option("--leeway", help="Token clock leeway (jwks).")] = "30s",
    self_check: Annotated[
        SelfCheck,
        typer.Option(
            "--self-check",
            help="How each leaf is proven before it is returned. chain: to the root, the chain "
            "walked once at start and its validity checked per leaf (one ECDSA verify); full: "
            "walked leaf to root every time; issuer: against the signing cert only.",
        ),
    ] = SelfCheck.chain,
    timeout: Annotated[
        str, typer.Option("--tokenreview-timeout", help="Kubernetes API deadline.")
    ] = "5s",
    audit_log: Annotated[
        str, typer.Option("--audit-log", help="Audit JSON lines: a FILE, or - for stdout.")
    ] = "-",
    audit_signing_key: AuditSigningKey = None,
    event_loop: EventLoop = "auto",
    insecure_plaintext: Annotated[
        bool, typer.Option("--insecure-plaintext", help="Serve without TLS (never in production).")
    ] = False,
    dns_name: Annotated[
        list[str] | None,
        typer.Option("--dns-name", help="Serving certificate SAN (repeatable; IPs allowed)."),
    ] = None,
    bundle_listen: Annotated[
        str | None, typer.Option("--bundle-listen", help="HOST:PORT for HTTPS GET /bundle.")
    ] = None,
    trust_domain: Annotated[
        str | None, typer.Option("--trust-domain", help="Only if ca-cert.pem has no SPIFFE ID.")
    ] = None,
    allow_namespace: Annotated[list[str] | None, typer.Option("--allow-namespace")] = None,
    deny_namespace: Annotated[list[str] | None, typer.Option("--deny-namespace")] = None,
    allow_service_account: Annotated[
        list[str] | None, typer.Option("--allow-service-account", help="NS/NAME (repeatable).")
    ] = None,
    deny_service_account: Annotated[
        list[str] | None, typer.Option("--deny-service-account", help="NS/NAME (repeatable).")
    ] = None,
    rate_limit: Annotated[
        float,
        typer.Option(
            "--rate-limit",
            help="Requests per second this process accepts before shedding with "
            "RESOURCE_EXHAUSTED and a retry hint (checked before the token; 0 = off).",
        ),
    ] = DEFAULT_RATE,
    rate_limit_burst: Annotated[
        float | None,
        typer.Option("--rate-limit-burst", help="Bucket size of --rate-limit (default: 1 s)."),
    ] = None,
    rate_limit_per_identity: Annotated[
        float,
        typer.Option(
            "--rate-limit-per-identity",
            help="Requests per second per verified service account (0 = off).",
        ),
    ] = DEFAULT_IDENTITY_RATE,
    rate_limit_per_identity_burst: Annotated[
        float | None,
        typer.Option(
            "--rate-limit-per-identity-burst",
            help=f"Bucket size per service account (default {DEFAULT_IDENTITY_BURST:g} at the "
            "default rate, else 20 s worth): room for a rollout of many replicas.",
        ),
    ] = None,
    max_in_flight: Annotated[
        int,
        typer.Option("--max-in-flight", help="Calls in progress at once; more are shed."),
    ] = DEFAULT_MAX_IN_FLIGHT,
    min_time_left: Annotated[
        float,
        typer.Option(
            "--min-time-left",
            help="Seconds of its deadline a call must have left when the CA gets to it; "
            "less (it queued behind a storm) is shed with a retry hint instead of issuing "
            "a certificate the caller gave up on. 0: no floor.",
        ),
    ] = DEFAULT_MIN_TIME_LEFT,
    key_passphrase_file: PassphraseFile = None,
    key_passphrase_env: PassphraseEnv = None,
    allow_group_readable_key: AllowGroupReadable = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            help="Processes sharing the port (SO_REUSEPORT), each loading the authority and "
            "keeping its own audit stream and rate limiter: limits are per worker, so the "
            "effective global rate is N x --rate-limit.",
        ),
    ] = 1,
) -> None:
    """Serve istio.v1.auth.IstioCertificateService/CreateCertificate (TLS by default),
    plus gRPC health and reflection. SIGTERM/SIGINT drain in-flight calls and exit 0."""
    if workers > 1:
        params = {k: v for k, v in locals().items() if k != "workers"}
        raise typer.Exit(_supervise(params, workers))
    console = Console(stderr=True)
    configure_logging(level=log_level)
    durations = {
        flag: _seconds(console, flag, text)
        for flag, text in (
            ("--default-ttl", default_ttl),
            ("--max-ttl", max_ttl),
            ("--backdate", backdate),
            ("--leeway", leeway),
            ("--tokenreview-timeout", timeout),
        )
    }
    for flag, values in (
        ("--allow-service-account", allow_service_account),
        ("--deny-service-account", deny_service_account),
    ):
        for v in values or ():
            if v.count("/") != 1:
                raise _err(console, f"{flag} takes NAMESPACE/NAME (got {v!r})", 2)
    audiences = audience or [DEFAULT_AUDIENCE]
    try:
        authenticator = _authenticator(
            token_auth=token_auth,
            jwks_file=jwks_file,
            oidc_issuer=oidc_issuer,
            oidc_ca_file=oidc_ca_file,
            issuers=issuer,
            kubeconfig=kubeconfig,
            audiences=audiences,
            leeway=durations["--leeway"],
            timeout=durations["--tokenreview-timeout"],
            state_dir=state_dir,
        )
        limits = Limits(
            rate=rate_limit,
            burst=rate_limit_burst,
            identity_rate=rate_limit_per_identity,
            identity_burst=rate_limit_per_identity_burst,
            max_in_flight=max_in_flight,
            min_time_left=min_time_left,
        )
        directory = cacerts_dir(state_dir)
        authority = load_authority(
            directory,
            trust_domain=trust_domain,
            passphrase=_passphrase(key_passphrase_file, key_passphrase_env),
            allow_group_readable_key=allow_group_readable_key,
        )
        audit = open_audit_log(audit_log, name="citadel-ca", signing_key=audit_signing_key)
    except AuthorityError as exc:
        raise _err(console, exc.message) from None
    except CitadelError as exc:
        raise _err(console, exc.message) from None
    except OSError as exc:
        raise _err(console, f"{exc.filename or ''}: {exc.strerror}") from None

    config = CAConfig(
        cacerts_dir=directory,
        authenticator=authenticator,
        audit=audit,
        listen=listen,
        trust_domain=trust_domain,
        default_ttl=durations["--default-ttl"],
        max_ttl=durations["--max-ttl"],
        backdate=durations["--backdate"],
        self_check=self_check.value,
        insecure_plaintext=insecure_plaintext,
        dns_names=tuple(dns_name or DEFAULT_DNS_NAMES),
        bundle_listen=bundle_listen,
        access=AccessLists.build(
            allow_namespaces=allow_namespace or (),
            deny_namespaces=deny_namespace or (),
            allow_service_accounts=allow_service_account or (),
            deny_service_accounts=deny_service_account or (),
        ),
        authority=authority,
        limits=limits,
        reuse_port=_worker_ready is not None,
    )

    def ready(running: RunningCA) -> None:
        if _worker_ready is not None:
            _worker_ready()
        mode = "[yellow]PLAINTEXT[/]" if not running.tls else "TLS"
        console.print(
            f"[green]citadel CA[/] serving istio.v1.auth.IstioCertificateService on "
            f"[bold]{running.address}[/] ({mode}), trust domain "
            f"{running.authority.trust_domain.name}, tokens via {authenticator.name} "
            f"(audience {', '.join(audiences)})"
        )
        console.print(
            "  limits: "
            + (f"{limits.rate:g} req/s" if limits.rate else "no global rate limit")
            + ", "
            + (
                f"{limits.identity_rate:g}/s per identity "
                f"(burst {limits.effective_identity_burst:g})"
                if limits.identity_rate
                else "no per-identity limit"
            )
            + f", at most {limits.max_in_flight} in flight"
        )
        if running.tls:
            console.print(f"  clients verify with {directory / 'root-cert.pem'}")
        left = running.authority.remaining(datetime.now(UTC))
        if left < timedelta(days=30):
            console.print(
                f"  [yellow]warning:[/] the CA chain expires in {format_duration(left)}; "
                "certificates will be cut short to its expiry - rotate ca-cert.pem"
            )
        console.print("  Ctrl-C or SIGTERM drains in-flight calls and stops")

    try:
        eventloop.run(serve_ca(config, on_ready=ready), event_loop=event_loop)
    except CitadelError as exc:
        raise _err(console, exc.message) from None
    finally:
        audit.close()
    console.print("citadel CA stopped")
