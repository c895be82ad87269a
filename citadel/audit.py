"""The audit trail shared by the CA and the decision service.

One JSON object per line. Every record of a stream carries a sequence number and the
SHA-256 hash of the previous record, so deleting, inserting, editing or reordering a
record breaks the chain and ``verify`` names the first place it broke. A stream starts
with an ``audit.header`` record naming it; several processes (workers, services) may
append to one file, each with its own stream, because every record is a single
``write(2)`` on an ``O_APPEND`` descriptor and so never interleaves with another's.

Writing is synchronous on purpose: the caller only proceeds (issues the certificate,
allows the request) once ``record`` has returned, and a failed write raises
``AuditError`` so the caller fails closed. State advances only after a successful
write, so a failed record leaves no gap in the chain.

The record's hash covers the exact bytes of the line before its ``hash`` member, so
verification never depends on re-serialising JSON the same way twice.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from citadel.errors import AuditError, ConfigError

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditSink",
    "FileSink",
    "StreamSink",
    "VerifyReport",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "open_audit_log",
    "read_records",
    "verify_files",
]

GENESIS = "0" * 64
FORMAT_VERSION = 1
MAX_FIELD_CHARS = 2048
_HASH_MARK = b',"hash":"'


class AuditSink(Protocol):
    def write(self, line: bytes) -> None: ...
    def close(self) -> None: ...


class FileSink:
    """Appends to a file (mode 0600) with one ``write`` per line; rotates by size.

    Rotation renames the full file to ``<name>.<utc-stamp>.<pid>`` and starts a new one.
    Other processes appending to the same path notice the new inode and reopen, so a
    stream's chain simply continues in the next file; ``verify`` reads them in order.
    """

    def __init__(self, path: str | Path, *, max_bytes: int | None = None, fsync: bool = False):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._fd = -1
        self._ino = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._ino, self._size = fd, st.st_ino, st.st_size

    def _maybe_rotate(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._open()
            return
        if st.st_ino != self._ino:  # someone else rotated
            self._open()
            return
        self._size = st.st_size
        if self.max_bytes is not None and self._size >= self.max_bytes:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path, self.path.with_name(f"{self.path.name}.{stamp}.{os.getpid()}"))
            self._open()

    def write(self, line: bytes) -> None:
        if self.max_bytes is not None and self._size + len(line) > self.max_bytes:
            self._maybe_rotate()
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(f"short write to audit log ({written} of {len(line)} bytes)")
        self._size += written
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StreamSink:
    """Writes to a binary stream (stdout in a cluster, where the log pipeline collects it)."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer

    def write(self, line: bytes) -> None:
        self._stream.write(line)
        self._stream.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + f"...[{len(value) - MAX_FIELD_CHARS} more chars]"
    return value


def _timestamp(now: float) -> str:
    return (
        datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    )


# One encoder, built once: ``json.dumps`` with keyword arguments builds a new JSONEncoder
# and ``encode`` a new C encoder on every call (~2-3 µs a record). No circular check:
# records are flat values. Same bytes as ``json.dumps(..., separators=(",", ":"))``.
_json_encoder = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=True, default=str, check_circular=False
)
_c_encoder = (
    json.encoder.c_make_encoder(
        None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    if json.encoder.c_make_encoder is not None
    else None
)


def _encode(value: Any) -> str:
    if _c_encoder is not None:
        return "".join(_c_encoder(value, 0))
    return _json_encoder.encode(value)


_RESERVED = frozenset({"seq", "ts", "stream", "kind", "prev", "hash", "sig"})


class _Clock:
    """ISO-8601 UTC timestamps with the per-second prefix formatted once per second.

    ``datetime.isoformat`` cost ~7 µs a record on a loaded box; records in one second
    share everything up to the fraction.
    """

    __slots__ = ("_prefix", "_sec")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def __call__(self, now: float) -> str:
        sec = int(now)
        us = round((now - sec) * 1_000_000)
        if us >= 1_000_000:
            sec, us = sec + 1, us - 1_000_000
        if sec != self._sec:
            self._sec = sec
            self._prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._prefix}{us:06d}Z"


# ---------------------------------------------------------------- signed checkpoints

SIG_CONTEXT = b"citadel-audit-checkpoint-v1\x00"
_SIG_MARK = b',"sig":"'
SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def key_id(public_key: PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the key's SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def _alg(key: SigningKey | PublicKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    return f"ecdsa-{key.curve.name}-sha256"


def _sign(key: SigningKey, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(SIG_CONTEXT + data)
    return key.sign(SIG_CONTEXT + data, ec.ECDSA(hashes.SHA256()))


def _verify_sig(key: PublicKey, sig: bytes, data: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, SIG_CONTEXT + data)
        else:
            key.verify(sig, SIG_CONTEXT + data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def load_signing_key(path: str | Path) -> SigningKey:
    """An unencrypted PEM Ed25519 or EC private key, readable by its owner only.

    Refused (``ConfigError``): a key group/others can read (``chmod 600``), RSA or any
    other type, or a file that is not a PEM private key.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read audit signing key {p}: {exc.strerror}") from exc
    if mode & 0o077:
        raise ConfigError(
            f"audit signing key {p} is readable by group or others (mode {mode & 0o777:o}); "
            f"run: chmod 600 {p}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"audit signing key {p} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(f"audit signing key {p} must be Ed25519 or EC (got {type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> PublicKey:
    """A PEM public key or certificate holding the Ed25519/EC key checkpoints are signed with."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read public key {p}: {exc.strerror}") from exc
    key: Any
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{p} is not a PEM public key or certificate") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(f"public key {p} must be Ed25519 or EC (got {type(key).__name__})")
    return key


class AuditLog:
    """A hash-chained stream of audit records; thread-safe; fails closed.

    With a ``signing_key``, a signed ``audit.checkpoint`` record is written every
    ``checkpoint_every`` records and/or every ``checkpoint_interval_s`` seconds (also when
    the stream is idle), and ``close`` writes a signed ``audit.close``. A checkpoint's
    signature covers its own line up to the signature, ``prev`` included, so through the
    chain it vouches for every earlier record of the stream: a forger who rewrites records
    must re-sign, and one who cuts the tail cannot forge the closing record. Without a key
    the closing record is still written (unsigned), so a truncated tail of a cleanly
    closed stream shows as a stream that never closed.
    """

    def __init__(
        self,
        sink: AuditSink,
        *,
        name: str,
        clock: Callable[[], float] = time.time,
        stream_id: str | None = None,
        signing_key: SigningKey | None = None,
        checkpoint_every: int | None = 1000,
        checkpoint_interval_s: float | None = 60.0,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._ts = _Clock()
        self._lock = threading.Lock()
        self.name = name
        self.stream_id = stream_id or uuid.uuid4().hex
        sid = _encode(self.stream_id).replace("%", "%%")
        self._head = '{"seq":%d,"ts":"%s","stream":' + sid + ',"kind":%s,'
        self._kinds: dict[str, str] = {}
        self._seq = 0
        self._prev = GENESIS
        self._closed = False
        self.records_written = 0
        self.write_failures = 0
        self.checkpoints_written = 0
        self.checkpoint_failures = 0
        self._signing_key = signing_key
        self._key_fields: dict[str, str] = {}
        self._every = checkpoint_every if signing_key is not None else None
        self._interval = checkpoint_interval_s if signing_key is not None else None
        self._since_cp = 0
        self._last_cp_at = clock()
        self._timer_stop = threading.Event()
        self._timer: threading.Thread | None = None
        if signing_key is not None:
            kid, alg = key_id(signing_key.public_key()), _alg(signing_key)
            self._key_fields = {"alg": alg, "key_id": kid}
        header: dict[str, Any] = {
            "name": name,
            "version": FORMAT_VERSION,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        if signing_key is not None:
            header["key_id"], header["alg"] = kid, alg
        self.record("audit.header", header)
        if self._interval:
            self._timer = threading.Thread(
                target=self._tick, name=f"audit-checkpoint-{name}", daemon=True
            )
            self._timer.start()

    # ------------------------------------------------------------ writing

    def _body(self, kind: str, fields: Mapping[str, Any], now: float) -> str:
        """The record's JSON up to and including ``prev``, without the closing brace."""
        k = self._kinds.get(kind)
        if k is None:
            k = self._kinds[kind] = _encode(kind)
        head = self._head % (self._seq, self._ts(now), k)
        if not fields:
            return f'{head}"prev":"{self._prev}"'
        if not _RESERVED.isdisjoint(fields):
            raise AuditError(
                f"audit fields may not use reserved names {sorted(_RESERVED & set(fields))}"
            )
        try:
            encoded = _encode(fields)
            # No value can be longer than the whole encoding, so the clip scan (a Python
            # loop over every field) runs only for the rare record that might need it.
            if len(encoded) > MAX_FIELD_CHARS and any(
                v.__class__ is str and len(v) > MAX_FIELD_CHARS for v in fields.values()
            ):
                encoded = _encode({k2: _clip(v2) for k2, v2 in fields.items()})
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit record could not be encoded: {exc}") from exc
        if encoded[0] != "{":  # a Mapping that is not a dict and encoded otherwise
            raise AuditError("audit record fields did not encode as an object")
        return f'{head}{encoded[1:-1]},"prev":"{self._prev}"'

    def _emit(self, body: bytes) -> str:
        """Hash, write, advance the chain; raise ``AuditError`` and change nothing on failure."""
        digest = hashlib.sha256(body).hexdigest()
        try:
            self._sink.write(body + _HASH_MARK + digest.encode() + b'"}\n')
        except (OSError, ValueError) as exc:
            raise AuditError(f"audit log write failed: {exc}") from exc
        self._seq += 1
        self._prev = digest
        return digest

    def record(self, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record; raise ``AuditError`` if it could not be written."""
        seq, digest = self._write(kind, fields)
        rec: dict[str, Any] = {"seq": seq, "stream": self.stream_id, "kind": kind}
        rec.update(fields)
        rec["hash"] = digest
        return rec

    def append(self, kind: str, fields: Mapping[str, Any]) -> None:
        """``record`` for hot paths that do not need the record back (one dict fewer)."""
        self._write(kind, fields)

    def _write(self, kind: str, fields: Mapping[str, Any]) -> tuple[int, str]:
        with self._lock:
            if self._closed:
                self.write_failures += 1
                raise AuditError("audit log is closed")
            now = self._clock()
            seq = self._seq
            try:
                digest = self._emit(self._body(kind, fields, now).encode())
            except AuditError:
                self.write_failures += 1
                raise
            self.records_written += 1
            if self._signing_key is not None:
                self._since_cp += 1
                if (self._every and self._since_cp >= self._every) or (
                    self._interval and now - self._last_cp_at >= self._interval
                ):
                    self._checkpoint_locked("audit.checkpoint", now)
        return seq, digest

    def _checkpoint_locked(self, kind: str, now: float) -> bool:
        """Write a (signed, if we have a key) checkpoint; failures are counted, not raised.

        The record that triggered it is already on disk; if the sink broke, the next
        ``record`` fails and its caller fails closed.
        """
        fields: dict[str, Any] = {"records": self._seq}
        if self._signing_key is not None:
            fields.update(self._key_fields)
            signed = self._body(kind, fields, now).encode()
            sig = base64.b64encode(_sign(self._signing_key, signed))
            raw = signed + _SIG_MARK + sig + b'"'
        else:
            raw = self._body(kind, fields, now).encode()
        try:
            self._emit(raw)
        except AuditError as exc:
            self.checkpoint_failures += 1
            _warn(f"audit {kind} not written: {exc.message}")
            return False
        self.checkpoints_written += 1
        self._since_cp = 0
        self._last_cp_at = now
        return True

    def checkpoint(self) -> bool:
        """Write a signed checkpoint now (no-op without a key or with nothing new)."""
        with self._lock:
            if self._closed or self._signing_key is None or self._since_cp == 0:
                return False
            return self._checkpoint_locked("audit.checkpoint", self._clock())

    def _tick(self) -> None:
        assert self._interval
        while not self._timer_stop.wait(self._interval):
            with self._lock:
                if self._closed:
                    return
                now = self._clock()
                if self._since_cp and now - self._last_cp_at >= self._interval * 0.999:
                    self._checkpoint_locked("audit.checkpoint", now)

    def close(self) -> None:
        """Write the closing record (signed with a key) and close the sink; idempotent."""
        self._timer_stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(Exception):
                self._checkpoint_locked("audit.close", self._clock())
            self._sink.close()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(5)


def _warn(message: str) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(f"citadel audit: {message}\n")


def open_audit_log(
    target: str | Path | None,
    *,
    name: str,
    max_bytes: int | None = None,
    fsync: bool = False,
    clock: Callable[[], float] = time.time,
    signing_key: SigningKey | str | Path | None = None,
    checkpoint_every: int | None = 1000,
    checkpoint_interval_s: float | None = 60.0,
) -> AuditLog:
    """``-`` or ``None`` means stdout; anything else is a file path.

    ``signing_key`` (a key or a PEM file, see ``load_signing_key``) turns on signed
    checkpoints every ``checkpoint_every`` records / ``checkpoint_interval_s`` seconds.
    """
    key = signing_key
    if isinstance(key, str | Path):
        key = load_signing_key(key)
    sink: AuditSink
    if target is None or str(target) == "-":
        sink = StreamSink()
    else:
        sink = FileSink(target, max_bytes=max_bytes, fsync=fsync)
    return AuditLog(
        sink,
        name=name,
        clock=clock,
        signing_key=key,
        checkpoint_every=checkpoint_every,
        checkpoint_interval_s=checkpoint_interval_s,
    )


# ---------------------------------------------------------------- reading and verifying


def read_records(paths: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Parsed records of one or more files, in order; lines that are not JSON are skipped."""
    for path in paths:
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except (ValueError, RecursionError):  # deep nesting is not a record either
                    continue
                if isinstance(rec, dict):
                    yield rec


@dataclass
class StreamStatus:
    """What verification learned about one stream (for the tail-truncation report)."""

    name: str | None = None
    records: int = 0
    closed: bool = False
    #: seq of the last checkpoint whose signature verified (None: none).
    last_signed: int | None = None

    @property
    def unproven(self) -> int:
        """Records after the last verified checkpoint: a cut there leaves no trace."""
        if self.last_signed is None:
            return self.records
        return self.records - self.last_signed - 1


@dataclass
class VerifyReport:
    files: list[str]
    records: int = 0
    streams: dict[str, int] = field(default_factory=dict)
    problem: str | None = None
    problem_file: str | None = None
    problem_line: int | None = None
    #: Per stream: closed or not, last signed checkpoint.
    status: dict[str, StreamStatus] = field(default_factory=dict)
    #: Streams that never closed: still written to, crashed, or their tail was cut.
    warnings: list[str] = field(default_factory=list)
    checkpoints_verified: int = 0

    @property
    def ok(self) -> bool:
        return self.problem is None


def _line_digest(raw: bytes) -> tuple[str | None, str]:
    """(claimed hash, recomputed hash) of one line."""
    stripped = raw.rstrip(b"\r\n")
    idx = stripped.rfind(_HASH_MARK)
    if idx < 0 or not stripped.endswith(b'"}'):
        return None, ""
    claimed = stripped[idx + len(_HASH_MARK) : -2].decode("ascii", "replace")
    return claimed, hashlib.sha256(stripped[:idx]).hexdigest()


def _signed_part(raw: bytes) -> tuple[bytes, bytes] | None:
    """(signed bytes, signature) of a checkpoint line, or None if it has no signature."""
    stripped = raw.rstrip(b"\r\n")
    end = stripped.rfind(_HASH_MARK)
    idx = stripped.rfind(_SIG_MARK, 0, end)
    if idx < 0 or end < 0 or stripped[end - 1 : end] != b'"':
        return None
    try:
        sig = base64.b64decode(stripped[idx + len(_SIG_MARK) : end - 1], validate=True)
    except (binascii.Error, ValueError):
        return stripped[:idx], b""
    return stripped[:idx], sig


_META_KINDS = ("audit.checkpoint", "audit.close")


def verify_files(
    paths: Iterable[str | Path],
    *,
    public_key: PublicKey | None = None,
    require_closed: bool = False,
) -> VerifyReport:
    """Check every stream's chain across the given files (pass rotated files oldest first).

    Reports the first record that was altered (hash mismatch), deleted (sequence gap),
    inserted (a record whose ``prev`` does not match its predecessor) or reordered
    (sequence going backwards), and any record after a stream's closing record.

    With ``public_key``, every checkpoint's signature must verify against it, and a
    closing record must be signed (an unsigned one is what a forger who cut the tail
    would write). A stream that never closed is a warning naming how many records
    follow its last verified checkpoint; ``require_closed`` makes it a problem.
    """
    files = [str(p) for p in paths]
    report = VerifyReport(files=files)
    last: dict[str, tuple[int, str]] = {}
    kid = key_id(public_key) if public_key is not None else None

    def fail(msg: str, fname: str, lineno: int) -> VerifyReport:
        report.problem, report.problem_file, report.problem_line = msg, fname, lineno
        return report

    for fname in files:
        with open(fname, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except (ValueError, RecursionError):
                    return fail("record is not valid JSON (altered or truncated)", fname, lineno)
                if not isinstance(rec, dict):
                    return fail("record is not a JSON object (altered)", fname, lineno)
                claimed, actual = _line_digest(raw)
                if claimed is None or claimed != rec.get("hash") or claimed != actual:
                    return fail("record hash does not match its content (altered)", fname, lineno)
                stream, seq, prev = rec.get("stream"), rec.get("seq"), rec.get("prev")
                if not isinstance(stream, str) or not isinstance(seq, int):
                    return fail("record lacks stream or seq (altered)", fname, lineno)
                report.records += 1
                st = report.status.get(stream)
                if st is None:
                    if seq == 0 and prev != GENESIS:
                        return fail("stream header does not start the chain", fname, lineno)
                    if seq == 0 and rec.get("kind") != "audit.header":
                        return fail("stream does not begin with its header record", fname, lineno)
                    if seq != 0:
                        return fail(
                            f"stream {stream[:12]} starts at seq {seq}: records 0..{seq - 1} are "
                            "missing (deleted, or an earlier file was not given)",
                            fname,
                            lineno,
                        )
                    st = report.status[stream] = StreamStatus(name=rec.get("name"))
                else:
                    last_seq, last_hash = last[stream]
                    if st.closed:
                        return fail(
                            f"record after the closing record of stream {stream[:12]} "
                            "(appended after close)",
                            fname,
                            lineno,
                        )
                    if seq <= last_seq:
                        return fail(
                            f"seq {seq} after {last_seq} in stream {stream[:12]} (reordered, "
                            "duplicated or inserted)",
                            fname,
                            lineno,
                        )
                    if seq != last_seq + 1:
                        return fail(
                            f"seq jumps from {last_seq} to {seq} in stream {stream[:12]} "
                            f"({seq - last_seq - 1} record(s) deleted)",
                            fname,
                            lineno,
                        )
                    if prev != last_hash:
                        return fail(
                            "record does not chain to its predecessor (inserted or replaced)",
                            fname,
                            lineno,
                        )
                kind = rec.get("kind")
                if kind in _META_KINDS:
                    problem = _check_checkpoint(raw, rec, public_key, kid, seq)
                    if problem:
                        return fail(problem, fname, lineno)
                    if public_key is not None:
                        st.last_signed = seq
                        report.checkpoints_verified += 1
                    if kind == "audit.close":
                        st.closed = True
                last[stream] = (seq, claimed)
                st.records = seq + 1
                report.streams[stream] = seq + 1
    for stream, st in report.status.items():
        if st.closed:
            continue
        if public_key is not None:
            where = (
                f"after its last signed checkpoint (seq {st.last_signed})"
                if st.last_signed is not None
                else "and none is covered by a signed checkpoint"
            )
            msg = (
                f"stream {stream[:12]} ({st.name}) has no closing record: {st.unproven} "
                f"record(s) {where} are unproven; its tail may have been truncated (or the "
                "writer is still running or crashed)"
            )
        else:
            msg = (
                f"stream {stream[:12]} ({st.name}) has no closing record: the writer is still "
                "running, crashed, or the tail was truncated"
            )
        report.warnings.append(msg)
    if require_closed and report.ok and report.warnings:
        report.problem = report.warnings[0]
        report.problem_file = files[-1] if files else None
    return report


def _check_checkpoint(
    raw: bytes, rec: dict[str, Any], public_key: PublicKey | None, kid: str | None, seq: int
) -> str | None:
    """Why a checkpoint/close record is bad, or None."""
    if rec.get("records") != seq:
        return "checkpoint does not count the records before it (altered)"
    if public_key is None:
        return None
    signed = _signed_part(raw)
    if signed is None:
        return (
            f"{rec.get('kind')} record is not signed: written without a key, or forged by "
            "someone who cut the records after it"
        )
    if rec.get("key_id") != kid:
        return f"checkpoint signed by another key (key_id {rec.get('key_id')}, expected {kid})"
    data, sig = signed
    if not sig or not _verify_sig(public_key, sig, data):
        return "checkpoint signature does not verify (forged or altered)"
    return None
