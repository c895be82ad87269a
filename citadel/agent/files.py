"""The output set (``svid.pem``, ``svid-key.pem``, ``bundle.pem``), always written as one.

The scheme is the one kubelet uses for ConfigMap and Secret volumes, so every tool that
already copes with a rotating mounted Secret copes with this directory::

    out-dir/
      ..2025_01_02_03_04_05.123456_ab12/   one generation: the three real files
      ..data -> ..2025_01_02_03_04_05.123456_ab12
      svid.pem     -> ..data/svid.pem
      svid-key.pem -> ..data/svid-key.pem    (0600; the generation dir is 0755)
      bundle.pem   -> ..data/bundle.pem

A new set is written (and fsynced) into a fresh generation directory, then a new ``..data``
symlink is renamed over the old one: ``rename(2)`` is atomic, so at every instant
``..data`` names a complete, matching set. A reader that needs the key and the certificate
to match resolves ``..data`` once and reads both files from that directory
(``read_set`` does exactly that); opening the two visible names one after the other can
straddle a swap, exactly as with a mounted Secret. The previous generation is kept so a
reader in the middle of a read never hits a vanished file; older ones are removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = [
    "BUNDLE_FILE",
    "DATA_LINK",
    "KEY_FILE",
    "SVID_FILE",
    "FileSet",
    "read_set",
    "write_set",
]

SVID_FILE = "svid.pem"
KEY_FILE = "svid-key.pem"
BUNDLE_FILE = "bundle.pem"
DATA_LINK = "..data"
_KEEP_GENERATIONS = 2


@dataclass(frozen=True, slots=True)
class FileSet:
    svid_pem: bytes
    key_pem: bytes
    bundle_pem: bytes


def _write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what we promise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _generation_dirs(out_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in out_dir.iterdir()
        if p.name.startswith("..") and p.name != DATA_LINK and not p.is_symlink() and p.is_dir()
    )


def write_set(out_dir: Path, files: FileSet, *, now: datetime | None = None) -> Path:
    """Publish ``files`` as the current set; returns the new generation directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now(UTC)).strftime("%Y_%m_%d_%H_%M_%S.%f")
    gen = out_dir / f"..{stamp}_{secrets.token_hex(2)}"
    gen.mkdir(mode=0o755)
    try:
        os.chmod(gen, 0o755)  # noqa: S103 (public certs; the key file itself is 0600)
        _write_file(gen / SVID_FILE, files.svid_pem, 0o644)
        _write_file(gen / KEY_FILE, files.key_pem, 0o600)
        _write_file(gen / BUNDLE_FILE, files.bundle_pem, 0o644)
        _fsync_dir(gen)
        tmp_link = out_dir / f"..data_tmp_{secrets.token_hex(4)}"
        os.symlink(gen.name, tmp_link)
        os.replace(tmp_link, out_dir / DATA_LINK)  # the one atomic step
    except BaseException:
        shutil.rmtree(gen, ignore_errors=True)
        raise
    for name in (SVID_FILE, KEY_FILE, BUNDLE_FILE):
        visible = out_dir / name
        target = f"{DATA_LINK}/{name}"
        if visible.is_symlink() and os.readlink(visible) == target:
            continue
        tmp = out_dir / f".{name}.tmp_{secrets.token_hex(4)}"
        os.symlink(target, tmp)
        os.replace(tmp, visible)
    _fsync_dir(out_dir)
    _prune(out_dir, keep=gen)
    return gen


def _prune(out_dir: Path, *, keep: Path) -> None:
    gens = [g for g in _generation_dirs(out_dir) if g != keep]
    # Names sort by time; keep the newest previous generation for readers mid-read.
    for old in gens[: max(0, len(gens) - (_KEEP_GENERATIONS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in out_dir.glob("..data_tmp_*"):
        with contextlib.suppress(OSError):
            stray.unlink()


def read_set(out_dir: Path, *, attempts: int = 5) -> FileSet:
    """Read one consistent set: resolve ``..data`` once, then read inside that generation."""
    last_error: OSError | None = None
    for _ in range(attempts):
        try:
            gen = out_dir / os.readlink(out_dir / DATA_LINK)
            return FileSet(
                svid_pem=(gen / SVID_FILE).read_bytes(),
                key_pem=(gen / KEY_FILE).read_bytes(),
                bundle_pem=(gen / BUNDLE_FILE).read_bytes(),
            )
        except FileNotFoundError as exc:  # pruned between readlink and open: try again
            last_error = exc
    assert last_error is not None
    raise last_error
