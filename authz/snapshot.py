"""One read of a policy directory: its content fingerprint and the bytes a load parses.

The reloader fingerprints the directory to tell a real change from a no-op event or poll;
the load then needs the same model and policy bytes again, and their revision hash. Read
and hashed once here, a reload of a 10,000-row ``policy.csv`` reads the file once and
hashes it once (~0.6 ms per SHA-256 pass of its megabyte) and parses exactly the bytes
that were fingerprinted, even if the file changes again meanwhile.

Reads resolve ``..data`` once, so the model and the policy always come from the same
ConfigMap generation even if a swap lands between the two reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from authz.policy import MODEL_FILE, POLICY_FILE, PolicyBytes
from authz.policytests import find_test_files

__all__ = ["DATA_LINK", "EMPTY", "MISSING", "Snapshot", "dir_state", "resolve_dir", "snapshot"]

DATA_LINK = "..data"
#: Fingerprints of a directory with nothing to load.
MISSING = "missing"
EMPTY = "empty"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one look at a policy directory saw."""

    #: Content hash of everything a load reads (model, policy, test files), or
    #: MISSING / EMPTY.
    fingerprint: str
    #: The directory read (``..data``'s target, if any), and the model and policy bytes
    #: as read there (None when either could not be read: the load reads and reports it).
    real: Path | None = None
    files: PolicyBytes | None = None


def resolve_dir(policy_dir: str | Path) -> Path:
    """The directory to read one consistent generation from (``..data``'s target if any)."""
    d = Path(policy_dir)
    data = d / DATA_LINK
    if data.is_symlink() or data.is_dir():
        with contextlib.suppress(OSError):
            return Path(os.path.realpath(data))
    return d


def dir_state(policy_dir: Path) -> str | None:
    """MISSING or EMPTY when there is nothing to load, else None."""
    if not policy_dir.is_dir():
        return MISSING
    if not (policy_dir / MODEL_FILE).exists() and not (policy_dir / POLICY_FILE).exists():
        return EMPTY
    return None


def snapshot(policy_dir: str | Path) -> Snapshot:
    """Fingerprint the directory and keep the model and policy bytes it hashed. The
    policy is hashed as the revision hashes it, so a load of these bytes need not hash
    them again."""
    d = Path(policy_dir)
    state = dir_state(d)
    if state:
        return Snapshot(state)
    real = resolve_dir(d)
    read: dict[str, bytes] = {}
    h = hashlib.sha256()
    for name in (MODEL_FILE, POLICY_FILE):
        try:
            read[name] = (real / name).read_bytes()
        except OSError as exc:
            h.update(f"{name}\0<unreadable {type(exc).__name__}>\0".encode())
    files = None
    if len(read) == 2:
        files = PolicyBytes.of(read[MODEL_FILE], read[POLICY_FILE])
        h.update(b"policy\0" + files.digest.encode() + b"\0")
    for path in find_test_files(real):
        h.update(str(path.name).encode() + b"\0")
        try:
            h.update(path.read_bytes())
        except OSError as exc:
            h.update(f"<unreadable {type(exc).__name__}>".encode())
        h.update(b"\0")
    return Snapshot(h.hexdigest(), real, files)
