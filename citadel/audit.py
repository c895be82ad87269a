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

from citadel.errors import AuditError

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditSink",
    "FileSink",
    "StreamSink",
    "VerifyReport",
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


class AuditLog:
    """A hash-chained stream of audit records; thread-safe; fails closed."""

    def __init__(
        self,
        sink: AuditSink,
        *,
        name: str,
        clock: Callable[[], float] = time.time,
        stream_id: str | None = None,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._lock = threading.Lock()
        self.name = name
        self.stream_id = stream_id or uuid.uuid4().hex
        self._seq = 0
        self._prev = GENESIS
        self.records_written = 0
        self.write_failures = 0
        self.record(
            "audit.header",
            {
                "name": name,
                "version": FORMAT_VERSION,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            },
        )

    def record(self, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record; raise ``AuditError`` if it could not be written."""
        with self._lock:
            rec: dict[str, Any] = {
                "seq": self._seq,
                "ts": _timestamp(self._clock()),
                "stream": self.stream_id,
                "kind": kind,
            }
            for key, value in fields.items():
                rec[key] = _clip(value)
            rec["prev"] = self._prev
            try:
                body = json.dumps(rec, separators=(",", ":"), ensure_ascii=True, default=str)
            except (TypeError, ValueError) as exc:
                self.write_failures += 1
                raise AuditError(f"audit record could not be encoded: {exc}") from exc
            raw = body.encode()
            digest = hashlib.sha256(raw[:-1]).hexdigest()
            line = raw[:-1] + _HASH_MARK + digest.encode() + b'"}\n'
            try:
                self._sink.write(line)
            except (OSError, ValueError) as exc:
                self.write_failures += 1
                raise AuditError(f"audit log write failed: {exc}") from exc
            self._seq += 1
            self._prev = digest
            self.records_written += 1
            rec["hash"] = digest
            return rec

    def close(self) -> None:
        with self._lock:
            self._sink.close()


def open_audit_log(
    target: str | Path | None,
    *,
    name: str,
    max_bytes: int | None = None,
    fsync: bool = False,
    clock: Callable[[], float] = time.time,
) -> AuditLog:
    """``-`` or ``None`` means stdout; anything else is a file path."""
    if target is None or str(target) == "-":
        return AuditLog(StreamSink(), name=name, clock=clock)
    return AuditLog(FileSink(target, max_bytes=max_bytes, fsync=fsync), name=name, clock=clock)


# ---------------------------------------------------------------- reading and verifying


def read_records(paths: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Parsed records of one or more files, in order; lines that are not JSON are skipped."""
    for path in paths:
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    yield rec


@dataclass
class VerifyReport:
    files: list[str]
    records: int = 0
    streams: dict[str, int] = field(default_factory=dict)
    problem: str | None = None
    problem_file: str | None = None
    problem_line: int | None = None

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


def verify_files(paths: Iterable[str | Path]) -> VerifyReport:
    """Check every stream's chain across the given files (pass rotated files oldest first).

    Reports the first record that was altered (hash mismatch), deleted (sequence gap),
    inserted (a record whose ``prev`` does not match its predecessor) or reordered
    (sequence going backwards).
    """
    files = [str(p) for p in paths]
    report = VerifyReport(files=files)
    last: dict[str, tuple[int, str]] = {}

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
                except ValueError:
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
                if stream not in last:
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
                else:
                    last_seq, last_hash = last[stream]
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
                last[stream] = (seq, claimed)
                report.streams[stream] = seq + 1
    return report
