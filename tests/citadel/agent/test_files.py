from __future__ import annotations

import os
import stat
import threading

from citadel.agent.files import (
    BUNDLE_FILE,
    DATA_LINK,
    KEY_FILE,
    SVID_FILE,
    FileSet,
    read_set,
    write_set,
)


def _set(i: int) -> FileSet:
    return FileSet(svid_pem=b"cert %d" % i, key_pem=b"key %d" % i, bundle_pem=b"bundle %d" % i)


def test_layout_modes_and_symlinks(tmp_path):
    gen = write_set(tmp_path, _set(1))
    assert os.readlink(tmp_path / DATA_LINK) == gen.name
    for name in (SVID_FILE, KEY_FILE, BUNDLE_FILE):
        assert os.readlink(tmp_path / name) == f"{DATA_LINK}/{name}"
    assert stat.S_IMODE((gen / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((gen / SVID_FILE).stat().st_mode) == 0o644
    assert (tmp_path / KEY_FILE).read_bytes() == b"key 1"
    assert read_set(tmp_path) == _set(1)


def test_key_mode_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        gen = write_set(tmp_path, _set(1))
    finally:
        os.umask(old)
    assert stat.S_IMODE((gen / KEY_FILE).stat().st_mode) == 0o600


def test_old_generations_are_pruned_keeping_the_previous(tmp_path):
    gens = [write_set(tmp_path, _set(i)) for i in range(5)]
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    assert left == sorted([gens[-2].name, gens[-1].name])
    assert read_set(tmp_path) == _set(4)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_replaces_plain_files_from_an_older_layout(tmp_path):
    (tmp_path / SVID_FILE).write_bytes(b"stale")
    write_set(tmp_path, _set(7))
    assert (tmp_path / SVID_FILE).is_symlink()
    assert (tmp_path / SVID_FILE).read_bytes() == b"cert 7"


def test_concurrent_reader_never_sees_a_mixed_set(tmp_path):
    write_set(tmp_path, _set(0))
    stop = threading.Event()
    mixed: list[FileSet] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            s = read_set(tmp_path)
            reads += 1
            n = s.svid_pem.split()[1]
            if s.key_pem.split()[1] != n or s.bundle_pem.split()[1] != n:
                mixed.append(s)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(1, 120):
        write_set(tmp_path, _set(i))
    stop.set()
    t.join()
    assert reads > 0
    assert mixed == []
