"""The on-disk device keystore (protocol/client/keystore.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from protocol.client import keystore as ks
from protocol.client.keystore import (
    AlreadyInitialisedError,
    ClientState,
    CorruptKeystoreError,
    DeviceKeys,
    InsecurePermissionsError,
    Keystore,
    NotInitialisedError,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


def make_keys() -> DeviceKeys:
    return DeviceKeys(
        signing_seed=b"s" * 32,
        box_private_key=b"b" * 32,
        relay_url="http://127.0.0.1:1",
        account_id="a" * 32,
        device_id="d" * 32,
        address=f"{'d' * 32}.{'a' * 32}@127.0.0.1:1",
        device_name="laptop",
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "home"


def test_create_sets_private_permissions_even_with_a_lax_umask(home: Path) -> None:
    old = os.umask(0o000)
    try:
        Keystore(home).create(make_keys())
    finally:
        os.umask(old)
    assert mode(home) == 0o700
    assert mode(home / ks.KEY_FILE) == 0o600


def test_round_trip(home: Path) -> None:
    store = Keystore(home)
    assert not store.exists()
    store.create(make_keys())
    assert store.exists()
    loaded = store.load()
    assert loaded == make_keys()
    assert len(loaded.sign_public_key) == 32
    assert len(loaded.box_public_key) == 32


def test_repr_hides_secrets() -> None:
    text = repr(make_keys())
    assert "sss" not in text
    assert "bbb" not in text
    assert "laptop" not in text or "address" in text


def test_refuses_to_overwrite(home: Path) -> None:
    Keystore(home).create(make_keys())
    with pytest.raises(AlreadyInitialisedError):
        Keystore(home).create(make_keys())


def test_load_without_device(home: Path) -> None:
    with pytest.raises(NotInitialisedError, match="device init"):
        Keystore(home).load()


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o660, 0o666])
def test_refuses_open_key_file(home: Path, bad_mode: int) -> None:
    Keystore(home).create(make_keys())
    (home / ks.KEY_FILE).chmod(bad_mode)
    with pytest.raises(InsecurePermissionsError, match="chmod 600"):
        Keystore(home).load()


@pytest.mark.parametrize("bad_mode", [0o750, 0o705, 0o777])
def test_refuses_open_home(home: Path, bad_mode: int) -> None:
    Keystore(home).create(make_keys())
    home.chmod(bad_mode)
    try:
        with pytest.raises(InsecurePermissionsError, match="chmod 700"):
            Keystore(home).load()
    finally:
        home.chmod(0o700)


def test_create_refuses_an_existing_open_home(tmp_path: Path) -> None:
    home = tmp_path / "shared"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    (home / "other").write_text("x")
    with pytest.raises(InsecurePermissionsError):
        Keystore(home).create(make_keys())
    assert not (home / ks.KEY_FILE).exists()


def test_corrupt_file(home: Path) -> None:
    Keystore(home).create(make_keys())
    (home / ks.KEY_FILE).write_bytes(b"{not json")
    with pytest.raises(CorruptKeystoreError):
        Keystore(home).load()


def test_state_defaults_and_cursor_never_moves_back(home: Path) -> None:
    store = Keystore(home)
    store.create(make_keys())
    assert store.load_state() == ClientState()
    store.save_cursor(10)
    store.save_cursor(5)
    assert store.load_state().inbox_cursor == 10
    assert mode(home / ks.STATE_FILE) == 0o600


def test_atomic_write_leaves_old_file_when_writing_fails(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Keystore(home)
    store.create(make_keys())
    store.save_cursor(7)

    def broken_fsync(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(ks.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        store.save_cursor(8)
    monkeypatch.undo()
    assert store.load_state().inbox_cursor == 7
    # No temporary file is left behind.
    assert sorted(p.name for p in home.iterdir()) == [ks.KEY_FILE, ks.STATE_FILE]


def test_atomic_write_replaces_via_rename(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Keystore(home)
    store.create(make_keys())
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renames.append((Path(src).name, Path(dst).name))
        # The temporary file is complete and private before it takes the name.
        assert mode(Path(src)) == 0o600
        real_replace(src, dst)

    monkeypatch.setattr(ks.os, "replace", spy)
    store.save_cursor(3)
    assert len(renames) == 1
    assert renames[0][1] == ks.STATE_FILE
    assert renames[0][0].endswith(".tmp")
