"""The CA key at rest: file modes, the Kubernetes fsGroup opt-in, passphrase encryption."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from citadel.ca.authority import CA_KEY, init_authority, load_authority
from citadel.commands.ca import _passphrase
from citadel.errors import AuthorityError, ConfigError

PASS = b"correct horse battery staple 7f3a"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("plain") / "cacerts"
    init_authority(d, trust_domain="cluster.local")
    return d


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("enc") / "cacerts"
    init_authority(d, trust_domain="cluster.local", passphrase=PASS)
    return d


def _copy(src: Path, dst: Path, mode: int) -> Path:
    shutil.copytree(src, dst)
    os.chmod(dst / CA_KEY, mode)
    return dst


MODES = [
    # (id, mode, loads without the opt-in, loads with it)
    ("owner-only-0600", 0o600, True, True),
    ("owner-read-0400", 0o400, True, True),
    ("fsgroup-secret-0440", 0o440, False, True),
    ("group-read-0640", 0o640, False, True),
    ("group-write-0660", 0o660, False, False),
    ("group-exec-0610", 0o610, False, False),
    ("other-read-0644", 0o644, False, False),
    ("other-only-0604", 0o604, False, False),
    ("secret-default-mode-0644", 0o644, False, False),
]


@pytest.mark.parametrize(
    ("mode", "plain_ok", "opt_in_ok"), [m[1:] for m in MODES], ids=[m[0] for m in MODES]
)
def test_key_file_modes(plain: Path, tmp_path: Path, mode: int, plain_ok: bool, opt_in_ok: bool):
    d = _copy(plain, tmp_path / "c", mode)
    for allow, ok in ((False, plain_ok), (True, opt_in_ok)):
        if ok:
            assert load_authority(d, allow_group_readable_key=allow).key is not None
        else:
            with pytest.raises(AuthorityError, match="accessible by group or others") as info:
                load_authority(d, allow_group_readable_key=allow)
            hint = "--allow-group-readable-key" in info.value.message
            assert hint == (not allow and mode & 0o077 == 0o040), "hint only where it helps"


def test_encrypted_key_written_and_loaded(encrypted: Path) -> None:
    pem = (encrypted / CA_KEY).read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert (encrypted / CA_KEY).stat().st_mode & 0o777 == 0o600
    assert load_authority(encrypted, passphrase=PASS).key_type == "ec-p256"


@pytest.mark.parametrize(
    ("which", "passphrase", "fragment"),
    [
        ("encrypted", None, "is encrypted; give its passphrase with --key-passphrase-file"),
        ("encrypted", b"wrong-passphrase-123", "the passphrase is wrong"),
        ("plain", b"surplus-passphrase-456", "is not encrypted, but a passphrase was given"),
    ],
    ids=["encrypted-without-passphrase", "wrong-passphrase", "passphrase-for-plain-key"],
)
def test_passphrase_errors_never_echo_it(
    plain: Path, encrypted: Path, which: str, passphrase: bytes | None, fragment: str
) -> None:
    with pytest.raises(AuthorityError) as info:
        load_authority(encrypted if which == "encrypted" else plain, passphrase=passphrase)
    assert fragment in info.value.message
    for secret in (PASS, passphrase or b"\0"):
        assert secret.decode() not in str(info.value)


def test_empty_passphrase_refused_at_init(tmp_path: Path) -> None:
    with pytest.raises(AuthorityError, match="empty"):
        init_authority(tmp_path / "c", trust_domain="cluster.local", passphrase=b"")


def test_passphrase_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "pass"
    f.write_bytes(PASS + b"\n")
    assert _passphrase(f, None) == PASS  # a trailing newline (echo > file) is not part of it
    monkeypatch.setenv("CITADEL_CA_KEY_PASSPHRASE", PASS.decode())
    assert _passphrase(None, "CITADEL_CA_KEY_PASSPHRASE") == PASS
    assert _passphrase(None, None) is None
    with pytest.raises(ConfigError, match="not both"):
        _passphrase(f, "CITADEL_CA_KEY_PASSPHRASE")
    with pytest.raises(ConfigError, match="unset or empty") as info:
        _passphrase(None, "s3cret-pasted-as-a-name")
    assert "s3cret" not in info.value.message
    f.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="empty"):
        _passphrase(f, None)
