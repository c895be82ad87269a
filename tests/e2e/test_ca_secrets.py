"""A whole CA session through the real CLI, every byte of output scanned for secrets.

Short commands run in-process through typer's runner (the same command functions, output
captured); the server and a start-up that must fail run as real processes.

init (encrypted key) -> dev issuer -> tokens -> serve (debug logging, audit to a file) ->
grants and refusals -> SIGTERM, plus the start-ups that must fail (no passphrase, a wrong
one, a group-readable key without the opt-in). Everything the CA and the CLI printed,
logged or audited is collected, and none of it may contain a bearer token (or its
signature), the passphrase, or any fragment of the CA's or the token issuer's private key.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from citadel.ca._proto import ca_pb2, ca_pb2_grpc
from citadel.cli import app
from tests.citadel.test_issuance import make_csr
from tests.conftest import free_port

ENV_NAME = "CITADEL_TEST_CA_PASSPHRASE"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """In-process, for commands that do not configure logging (never ``ca serve``)."""
    assert args[:2] != ("ca", "serve")
    r = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)


def _process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "citadel.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _pem_fragments(pem: bytes) -> list[str]:
    """The base64 body lines of a PEM block (each is a chunk of key material)."""
    return [
        line.strip()
        for line in pem.decode().splitlines()
        if line.strip() and not line.startswith("-----") and ":" not in line
    ]


def _der_fragments(der: bytes, size: int = 24) -> list[str]:
    """Windows of the DER's base64 at several alignments (a key may be re-encoded)."""
    out = []
    for shift in range(3):
        b64 = base64.b64encode(der[shift:]).decode()
        out += [b64[i : i + size] for i in range(8, len(b64) - size, size)]
    return out


def _call(stub: Any, csr: str, token: str) -> grpc.StatusCode:
    try:
        stub.CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=csr),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=10,
        )
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def test_no_secret_in_any_output_of_a_full_session(tmp_path: Path) -> None:
    state = tmp_path / "state"
    passphrase = "pp-" + secrets.token_hex(16)
    wrong = "wrong-" + secrets.token_hex(16)
    pass_file = tmp_path / "passphrase"
    pass_file.write_text(passphrase + "\n")
    pass_file.chmod(0o600)
    outputs: list[str] = []

    def keep(r: subprocess.CompletedProcess[str], *, stdout: bool = True) -> str:
        outputs.extend([r.stderr] + ([r.stdout] if stdout else []))
        return r.stdout

    r = _cli("ca", "init", "--state-dir", str(state), "--key-passphrase-file", str(pass_file))
    keep(r)
    assert r.returncode == 0, r.stderr
    assert "encrypted" in r.stderr
    key_path = state / "cacerts" / "ca-key.pem"
    assert key_path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    keep(_cli("dev", "issuer-init", "--state-dir", str(state)))
    tokens = []
    for ns, sa in (("default", "web"), ("shop", "cart")):
        r = _cli(
            "dev", "token", "--state-dir", str(state), "--namespace", ns, "--service-account", sa
        )
        assert r.returncode == 0, r.stderr
        keep(r, stdout=False)  # its stdout IS the token, by design
        tokens.append(r.stdout.strip())
    web, cart = tokens

    # Start-ups that must fail, clearly, without echoing anything secret.
    jwks = str(state / "dev-issuer" / "jwks.json")
    serve = ["ca", "serve", "--state-dir", str(state), "--jwks-file", jwks]
    r = _cli("ca", "init", "--state-dir", str(state))  # validates the existing CA
    keep(r)
    assert r.returncode == 1 and "is encrypted; give its passphrase" in r.stderr
    r = _process(
        *serve, "--key-passphrase-env", ENV_NAME, "--listen", f"127.0.0.1:{free_port()}",
        env={ENV_NAME: wrong},
    )  # fmt: skip
    keep(r)
    assert r.returncode == 1 and "passphrase is wrong" in r.stderr
    key_path.chmod(0o640)
    r = _cli("ca", "init", "--state-dir", str(state), "--key-passphrase-file", str(pass_file))
    keep(r)
    assert r.returncode == 1 and "--allow-group-readable-key" in r.stderr
    r = _cli(
        "ca", "init", "--state-dir", str(state), "--key-passphrase-env", ENV_NAME,
        "--allow-group-readable-key", env={ENV_NAME: passphrase},
    )  # fmt: skip
    keep(r)
    assert r.returncode == 0 and "using existing" in r.stderr, r.stderr
    key_path.chmod(0o600)

    # The real session.
    port, audit = free_port(), tmp_path / "audit.log"
    out_path, err_path = tmp_path / "serve.out", tmp_path / "serve.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "citadel.cli", *serve,
                "--listen", f"127.0.0.1:{port}", "--key-passphrase-env", ENV_NAME,
                "--audit-log", str(audit), "--log-level", "debug",
            ],
            stdout=out,
            stderr=err,
            env={**os.environ, ENV_NAME: passphrase, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        root = (state / "cacerts" / "root-cert.pem").read_bytes()
        with grpc.secure_channel(
            f"localhost:{port}", grpc.ssl_channel_credentials(root_certificates=root)
        ) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
            good = make_csr().decode()
            web_csr = make_csr(
                sans=[x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/web")]
            ).decode()
            head, payload, sig = web.split(".")
            flipped = f"{head}.{payload}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"
            codes = [
                _call(stub, good, web),
                _call(stub, web_csr, web),
                _call(stub, good, cart),
                _call(stub, web_csr, cart),  # cart's token replayed for web's identity
                _call(stub, good, flipped),
                _call(stub, good, web + "x"),
                _call(stub, good, web[:-10]),
                _call(stub, "not a csr " + web, web),
            ]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    ok, denied, unauth, invalid = (
        grpc.StatusCode.OK,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert codes == [ok, ok, ok, denied, unauth, unauth, unauth, invalid]
    outputs += [out_path.read_text(), err_path.read_text(), audit.read_text()]
    assert "ca.serving" in outputs[-2] and "ca.stopped" in outputs[-2], "debug logs captured"

    # What must appear nowhere.
    ca_key = serialization.load_pem_private_key(key_path.read_bytes(), passphrase.encode())
    ca_der = ca_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    dev_pem = (state / "dev-issuer" / "key.pem").read_bytes()
    dev_der = serialization.load_pem_private_key(dev_pem, None).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    forbidden = {
        "passphrase": [passphrase, wrong],
        "token": [web, cart, flipped, web[:-10]] + [t.split(".")[2] for t in tokens],
        "ca key (encrypted PEM)": _pem_fragments(key_path.read_bytes()),
        "ca key (DER)": _der_fragments(ca_der),
        "ca key (scalar)": [format(ca_key.private_numbers().private_value, "x")],  # type: ignore[union-attr]
        "dev issuer key (PEM)": _pem_fragments(dev_pem),
        "dev issuer key (DER)": _der_fragments(dev_der),
    }
    corpus = "\n".join(outputs)
    assert len(corpus) > 2000, "there was output to scan"
    for what, needles in forbidden.items():
        for needle in needles:
            assert needle not in corpus, f"{what} leaked into output"
