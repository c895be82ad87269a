"""Signed checkpoints and closing records: truncation, forgery and re-chaining are caught."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from typer.testing import CliRunner

from citadel.audit import (
    AuditLog,
    FileSink,
    load_public_key,
    load_signing_key,
    open_audit_log,
    verify_files,
)
from citadel.commands.audit import app as audit_app
from citadel.errors import AuditError, ConfigError

_HASH = b',"hash":"'
_PREV = re.compile(rb'"prev":"[0-9a-f]{64}"')


def _keys():
    return {
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ec_p256": ec.generate_private_key(ec.SECP256R1()),
    }


@pytest.fixture(params=["ed25519", "ec_p256"])
def key(request):
    return _keys()[request.param]


def _signed_log(path: Path, key, n: int, *, every: int = 5, close: bool = True) -> list[bytes]:
    log = open_audit_log(
        path, name="t", signing_key=key, checkpoint_every=every, checkpoint_interval_s=None
    )
    for i in range(n):
        log.record("decision", {"i": i, "path": f"/p/{i}"})
    if close:
        log.close()
    return path.read_bytes().splitlines(keepends=True)


def _kinds(lines: list[bytes]) -> list[str]:
    return [json.loads(x)["kind"] for x in lines]


def _rechain(lines: list[bytes]) -> list[bytes]:
    """What a forger without the key does: fix every prev and hash after an edit."""
    out, prev = [], "0" * 64
    for line in lines:
        body = line[: line.rfind(_HASH)]
        matches = list(_PREV.finditer(body))
        m = matches[-1]
        body = body[: m.start()] + f'"prev":"{prev}"'.encode() + body[m.end() :]
        prev = hashlib.sha256(body).hexdigest()
        out.append(body + _HASH + prev.encode() + b'"}\n')
    return out


def test_checkpoints_every_n_records_and_signed_close(tmp_path: Path, key) -> None:
    p = tmp_path / "a.log"
    lines = _signed_log(p, key, 12, every=5)
    kinds = _kinds(lines)
    # header + 12 records + a checkpoint after each 5 (the header counts) + close
    assert kinds.count("audit.checkpoint") == 2 and kinds[-1] == "audit.close"
    report = verify_files([p], public_key=key.public_key(), require_closed=True)
    assert report.ok, report.problem
    assert report.checkpoints_verified == 3 and not report.warnings
    assert verify_files([p]).ok  # the chain alone verifies without the key too


def test_header_names_the_key(tmp_path: Path, key) -> None:
    p = tmp_path / "a.log"
    header = json.loads(_signed_log(p, key, 1)[0])
    assert header["key_id"] and header["alg"].startswith(("ed25519", "ecdsa-"))


def test_tail_truncation_after_last_checkpoint_is_reported(tmp_path: Path, key) -> None:
    p = tmp_path / "a.log"
    lines = _signed_log(p, key, 12, every=5)
    last_cp = max(i for i, k in enumerate(_kinds(lines)) if k == "audit.checkpoint")
    p.write_bytes(b"".join(lines[:-3]))  # two records and the close cut off
    report = verify_files([p], public_key=key.public_key())
    assert report.ok  # a cut leaves a valid chain: that is what the close is for
    (warning,) = report.warnings
    unproven = len(lines) - 3 - last_cp - 1
    assert f"{unproven} record(s) after its last signed checkpoint (seq {last_cp})" in warning
    strict = verify_files([p], public_key=key.public_key(), require_closed=True)
    assert not strict.ok and "tail may have been truncated" in strict.problem


def test_truncation_of_closed_stream_without_key_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    log = open_audit_log(p, name="t")
    for i in range(4):
        log.record("decision", {"i": i})
    log.close()
    lines = p.read_bytes().splitlines(keepends=True)
    assert _kinds(lines)[-1] == "audit.close"
    assert verify_files([p], require_closed=True).ok
    p.write_bytes(b"".join(lines[:-2]))
    report = verify_files([p])
    assert report.ok and "no closing record" in report.warnings[0]
    assert not verify_files([p], require_closed=True).ok


def test_forged_unsigned_close_after_truncation_is_caught(tmp_path: Path, key) -> None:
    p = tmp_path / "a.log"
    lines = _signed_log(p, key, 12, every=5)
    # cut the tail, then forge an unsigned close that chains (no key needed for that)
    cut = lines[:-3]
    last = json.loads(cut[-1])
    forged = AuditLog(FileSink(tmp_path / "f.log"), name="x", stream_id=last["stream"])
    forged._seq, forged._prev = last["seq"] + 1, last["hash"]
    forged.close()
    close_line = (tmp_path / "f.log").read_bytes().splitlines(keepends=True)[-1]
    p.write_bytes(b"".join([*cut, close_line]))
    assert verify_files([p]).ok  # without the key the forgery is invisible...
    report = verify_files([p], public_key=key.public_key())
    assert not report.ok and "not signed" in report.problem  # ...with it, it is not


@pytest.mark.parametrize(
    "defect",
    ["edited_then_rechained", "signature_bytes_flipped", "signature_garbage", "kid_swapped"],
)
def test_signature_forgery_is_caught(tmp_path: Path, key, defect: str) -> None:
    p = tmp_path / "a.log"
    lines = _signed_log(p, key, 12, every=5)
    cp = next(i for i, k in enumerate(_kinds(lines)) if k == "audit.checkpoint")
    if defect == "edited_then_rechained":
        lines[2] = lines[2].replace(b"/p/1", b"/p/X")
        lines = _rechain(lines)
        assert verify_files_bytes(tmp_path, lines).ok  # the chain alone is fooled
    elif defect == "signature_bytes_flipped":
        m = re.search(rb'"sig":"([^"]+)"', lines[cp])
        sig = bytearray(m.group(1))
        sig[5] = ord("A") if sig[5] != ord("A") else ord("B")
        lines[cp] = lines[cp].replace(m.group(1), bytes(sig))
        lines = _rechain(lines)
    elif defect == "signature_garbage":
        lines[cp] = re.sub(rb'"sig":"[^"]+"', b'"sig":"!!notbase64!!"', lines[cp])
        lines = _rechain(lines)
    else:
        lines[cp] = re.sub(rb'"key_id":"[0-9a-f]+"', b'"key_id":"0000000000000000"', lines[cp])
        lines = _rechain(lines)
    p.write_bytes(b"".join(lines))
    report = verify_files([p], public_key=key.public_key())
    assert not report.ok
    assert "signature does not verify" in report.problem or "another key" in report.problem
    assert report.problem_line == cp + 1


def verify_files_bytes(tmp_path: Path, lines: list[bytes]):
    q = tmp_path / "probe.log"
    q.write_bytes(b"".join(lines))
    return verify_files([q])


def test_checkpoints_from_another_key_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _signed_log(p, ed25519.Ed25519PrivateKey.generate(), 6, every=3)
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    report = verify_files([p], public_key=other)
    assert not report.ok and "another key" in report.problem


def test_unsigned_log_fails_verification_with_a_key(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    log = open_audit_log(p, name="t")
    log.record("decision", {"i": 1})
    log.close()
    report = verify_files([p], public_key=ed25519.Ed25519PrivateKey.generate().public_key())
    assert not report.ok and "not signed" in report.problem


def test_record_appended_after_close_is_caught(tmp_path: Path, key) -> None:
    p = tmp_path / "a.log"
    lines = _signed_log(p, key, 3, every=100)
    extra = lines[1].replace(b"/p/0", b"/p/Z")
    lines = _rechain([*lines, extra])
    p.write_bytes(b"".join(lines))
    report = verify_files([p])
    assert not report.ok and "after the closing record" in report.problem


def test_checkpoint_by_time_with_injected_clock(tmp_path: Path, key) -> None:
    now = [1_000_000.0]
    p = tmp_path / "a.log"
    log = AuditLog(FileSink(p), name="t", clock=lambda: now[0], signing_key=key,
                   checkpoint_every=None, checkpoint_interval_s=3600)  # fmt: skip
    log.record("decision", {"i": 0})
    now[0] += 3599
    log.record("decision", {"i": 1})
    assert log.checkpoints_written == 0
    now[0] += 2
    log.record("decision", {"i": 2})
    assert log.checkpoints_written == 1
    log.close()
    assert verify_files([p], public_key=key.public_key(), require_closed=True).ok


def test_idle_stream_gets_its_checkpoint_from_the_timer(tmp_path: Path, key) -> None:
    p = tmp_path / "a.log"
    log = open_audit_log(p, name="t", signing_key=key, checkpoint_every=None,
                         checkpoint_interval_s=0.1)  # fmt: skip
    log.record("decision", {"i": 0})
    deadline = time.monotonic() + 5
    while log.checkpoints_written == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert log.checkpoints_written >= 1
    n = log.checkpoints_written
    time.sleep(0.3)
    assert log.checkpoints_written == n  # nothing new, no new checkpoint
    log.close()
    report = verify_files([p], public_key=key.public_key(), require_closed=True)
    assert report.ok, report.problem


def test_rotation_keeps_checkpoints_verifiable(tmp_path: Path, key) -> None:
    p = tmp_path / "a.log"
    log = AuditLog(FileSink(p, max_bytes=3000), name="t", signing_key=key,
                   checkpoint_every=7, checkpoint_interval_s=None)  # fmt: skip
    for i in range(60):
        log.record("decision", {"i": i})
    log.close()
    files = [*sorted(tmp_path.glob("a.log.*")), p]
    assert len(files) > 2
    report = verify_files(files, public_key=key.public_key(), require_closed=True)
    assert report.ok and report.checkpoints_verified >= 8


def test_checkpoint_write_failure_does_not_fail_the_record(tmp_path: Path, key) -> None:
    class Sink:
        def __init__(self) -> None:
            self.lines: list[bytes] = []

        def write(self, line: bytes) -> None:
            if b"audit.checkpoint" in line:
                raise OSError(28, "No space left on device")
            self.lines.append(line)

        def close(self) -> None:
            pass

    sink = Sink()
    log = AuditLog(sink, name="t", signing_key=key, checkpoint_every=2, checkpoint_interval_s=None)
    for i in range(5):
        log.record("decision", {"i": i})
    assert log.checkpoint_failures >= 2 and log.checkpoints_written == 0
    log.close()
    p = tmp_path / "a.log"
    p.write_bytes(b"".join(sink.lines))
    assert verify_files([p], public_key=key.public_key(), require_closed=True).ok


def test_reserved_field_names_and_closed_log_refused(tmp_path: Path) -> None:
    log = open_audit_log(tmp_path / "a.log", name="t")
    for reserved in ("seq", "prev", "hash", "stream", "sig"):
        with pytest.raises(AuditError, match="reserved"):
            log.record("decision", {reserved: "x"})
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.record("decision", {"i": 1})
    assert verify_files([tmp_path / "a.log"], require_closed=True).ok


def test_record_bytes_unchanged_by_the_fast_encoder(tmp_path: Path) -> None:
    """The on-disk format is what json.dumps gave before the hot path was optimised."""
    p = tmp_path / "a.log"
    log = AuditLog(FileSink(p), name="t", clock=lambda: 1_700_000_000.123456, stream_id="s1")
    fields = {"a": "x" * 3000, "b": [1, None, True], "c": '\u00e9"\\', "d": Path("/x"), "e": 1.5}
    log.record("decision", fields)
    line = p.read_bytes().splitlines()[1]
    body = line[: line.rfind(_HASH)]
    rec = json.loads(line)
    expect = {"seq": 1, "ts": "2023-11-14T22:13:20.123456Z", "stream": "s1", "kind": "decision",
              **{k: rec[k] for k in fields}, "prev": rec["prev"]}  # fmt: skip
    assert body + b"}" == json.dumps(expect, separators=(",", ":"), ensure_ascii=True).encode()
    assert rec["a"].endswith("...[952 more chars]") and rec["d"] == "/x"


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


@pytest.mark.parametrize(
    ("defect", "content", "mode", "words"),
    [
        ("group_readable", "ed25519", 0o640, "chmod 600"),
        ("rsa_key", "rsa", 0o600, "Ed25519 or EC"),
        ("not_pem", "garbage", 0o600, "not an unencrypted PEM"),
    ],
)
def test_signing_key_refused(tmp_path: Path, defect, content, mode, words) -> None:
    p = tmp_path / "k.pem"
    if content == "ed25519":
        data = _pem_private(ed25519.Ed25519PrivateKey.generate())
    elif content == "rsa":
        data = _pem_private(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    else:
        data = b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"
    p.write_bytes(data)
    os.chmod(p, mode)
    with pytest.raises(ConfigError, match=words):
        load_signing_key(p)


def test_cli_keygen_and_verify_with_public_key(tmp_path: Path) -> None:
    runner = CliRunner()

    def cli(*args: str):
        return runner.invoke(audit_app, [str(a) for a in args])

    key = tmp_path / "audit-key.pem"
    gen = cli("keygen", "--out", key)
    assert gen.exit_code == 0, gen.output
    assert (os.stat(key).st_mode & 0o777) == 0o600
    assert cli("keygen", "--out", key).exit_code == 2  # never overwrites a key
    pub = tmp_path / "audit-key.pem.pub"
    assert load_public_key(pub)
    p = tmp_path / "a.log"
    lines = _signed_log(p, load_signing_key(key), 8, every=3)
    ok = cli("verify", "--public-key", pub, p)
    assert ok.exit_code == 0 and "signed checkpoint(s) verified" in ok.stderr, ok.output
    p.write_bytes(b"".join(lines[:-1]))
    warn = cli("verify", "--public-key", pub, p)
    assert warn.exit_code == 0 and "no closing record" in warn.stderr
    strict = cli("verify", "--public-key", pub, "--require-closed", p)
    assert strict.exit_code == 1 and "truncated" in strict.stderr
    p.write_bytes(b"".join(_rechain([lines[0], lines[1].replace(b"/p/0", b"/p/9"), *lines[2:]])))
    forged = cli("verify", "--public-key", pub, p)
    assert forged.exit_code == 1 and "signature does not verify" in forged.stderr
    assert cli("verify", "--public-key", p, p).exit_code == 2  # not a key: usage error
