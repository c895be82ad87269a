"""The hash-chained audit trail: records written, tampering of each kind detected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from citadel.audit import AuditLog, FileSink, open_audit_log, verify_files
from citadel.errors import AuditError


def _write(path: Path, n: int) -> list[str]:
    log = open_audit_log(path, name="test")
    for i in range(n):
        log.record("decision", {"i": i, "path": f"/p/{i}"})
    log.close()
    return path.read_text().splitlines(keepends=True)


def test_records_chain_and_verify(tmp_path: Path) -> None:
    p = tmp_path / "audit.log"
    lines = _write(p, 10)
    assert len(lines) == 12  # header, 10 records, the closing record
    assert (os.stat(p).st_mode & 0o777) == 0o600
    first = json.loads(lines[0])
    assert first["kind"] == "audit.header" and first["seq"] == 0
    report = verify_files([p])
    assert report.ok and report.records == 12
    assert json.loads(lines[-1])["kind"] == "audit.close" and not report.warnings


@pytest.mark.parametrize(
    ("defect", "edit", "expect"),
    [
        ("altered_field", lambda ls: [*ls[:3], ls[3].replace("/p/2", "/p/X"), *ls[4:]], "altered"),
        ("deleted_record", lambda ls: ls[:3] + ls[4:], "deleted"),
        ("reordered_records", lambda ls: [*ls[:3], ls[4], ls[3], *ls[5:]], "deleted"),
        ("duplicated_record", lambda ls: [*ls[:4], ls[3], *ls[4:]], "reordered"),
        ("truncated_line", lambda ls: [*ls[:3], ls[3][:20] + "\n", *ls[4:]], "not valid JSON"),
        ("deleted_header", lambda ls: ls[1:], "missing"),
    ],
)
def test_tampering_is_detected(tmp_path: Path, defect: str, edit, expect: str) -> None:
    p = tmp_path / "audit.log"
    lines = _write(p, 8)
    p.write_text("".join(edit(lines)))
    report = verify_files([p])
    assert not report.ok
    assert expect in report.problem


def test_inserted_forged_record_with_valid_own_hash_is_detected(tmp_path: Path) -> None:
    p = tmp_path / "audit.log"
    lines = _write(p, 5)
    # A forger who recomputes the record's own hash still cannot fix the chain.
    forged = tmp_path / "forged.log"
    flog = AuditLog(FileSink(forged), name="x", stream_id=json.loads(lines[0])["stream"])
    for _ in range(3):
        flog.record("decision", {"i": 99})
    flog.close()
    f_lines = forged.read_text().splitlines(keepends=True)
    p.write_text("".join([*lines[:3], f_lines[3], *lines[4:]]))
    assert not verify_files([p]).ok


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    p = tmp_path / "audit.log"
    log = open_audit_log(p, name="test")

    def work() -> None:
        for i in range(500):
            log.record("decision", {"i": i})

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    report = verify_files([p])
    assert report.ok and report.records == 8 * 500 + 2


def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    p = tmp_path / "audit.log"
    log = AuditLog(FileSink(p, max_bytes=4000), name="test")
    for i in range(100):
        log.record("decision", {"i": i})
    log.close()
    files = [*sorted(tmp_path.glob("audit.log.*")), p]
    assert len(files) > 2
    assert verify_files(files).ok
    assert not verify_files(files[1:]).ok  # the first file is missing


class _FailingSink:
    def __init__(self) -> None:
        self.fail = False
        self.lines: list[bytes] = []

    def write(self, line: bytes) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.lines.append(line)

    def close(self) -> None:
        pass


def test_failed_write_raises_and_leaves_no_gap(tmp_path: Path) -> None:
    sink = _FailingSink()
    log = AuditLog(sink, name="t")
    log.record("a", {})
    sink.fail = True
    with pytest.raises(AuditError, match="No space left"):
        log.record("b", {})
    sink.fail = False
    log.record("c", {})
    p = tmp_path / "a.log"
    p.write_bytes(b"".join(sink.lines))
    assert verify_files([p]).ok


def test_audit_verify_cli_exit_codes(tmp_path: Path) -> None:
    p = tmp_path / "audit.log"
    lines = _write(p, 4)
    cli = [sys.executable, "-m", "citadel.cli", "audit", "verify"]
    ok = subprocess.run([*cli, str(p)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    p.write_text("".join(lines[:2] + lines[3:]))
    bad = subprocess.run([*cli, str(p)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "deleted" in bad.stderr


@pytest.mark.parametrize("via", ["record", "append"])
def test_oversized_values_are_clipped_and_the_chain_verifies(tmp_path: Path, via: str) -> None:
    from citadel.audit import MAX_FIELD_CHARS

    path = tmp_path / "audit.jsonl"
    log = open_audit_log(str(path), name="t")
    long_value, short_value = "a" * (MAX_FIELD_CHARS + 500), "b" * 40
    getattr(log, via)("t.event", {"big": long_value, "small": short_value, "n": 3})
    # A record whose whole encoding is long but whose values are each short: not clipped.
    many = {f"f{i}": "c" * 100 for i in range(30)}
    getattr(log, via)("t.event", many)
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    event, wide = records[1], records[2]
    assert event["big"] == "a" * MAX_FIELD_CHARS + "...[500 more chars]"
    assert event["small"] == short_value and event["n"] == 3
    assert all(wide[f"f{i}"] == "c" * 100 for i in range(30))
    assert verify_files([path]).ok
