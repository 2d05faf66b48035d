"""The home's public identity (protocol/client/identity.py): written by the keystore, kept equal to the keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from protocol.client.identity import IDENTITY_FILE, PublicIdentity, encode_identity, read_identity
from protocol.client.keystore import Keystore
from tests.protocol.client.test_keystore import make_keys

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")

KEYS = make_keys()
EXPECTED = PublicIdentity(address=KEYS.address, relay_url=KEYS.relay_url)


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHERLESS_INSECURE_KDF", "1")


def test_create_writes_it_private_and_it_holds_no_secret(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Keystore(home, passphrase="p").create(KEYS)
    assert read_identity(home) == EXPECTED
    assert EXPECTED.account_address == f"{'a' * 32}@127.0.0.1:1"
    path = home / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert data == encode_identity(KEYS.address, KEYS.relay_url)
    for secret in (KEYS.signing_seed, KEYS.box_private_key, KEYS.signing_seed.hex().encode()):
        assert secret not in data


def test_an_older_home_gains_it_and_a_wrong_copy_is_corrected_on_unlock(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Keystore(home, passphrase="p").create(KEYS)
    (home / IDENTITY_FILE).unlink()  # a home made before the public copy existed
    assert read_identity(home) is None
    assert Keystore(home, passphrase="p").load() == KEYS
    assert read_identity(home) == EXPECTED
    (home / IDENTITY_FILE).write_bytes(encode_identity("x.y@elsewhere", "http://elsewhere"))
    Keystore(home, passphrase="p").load()
    assert read_identity(home) == EXPECTED


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"format": 2, "address": "d.a@r", "relay_url": "u"}',
        b'{"format": 1, "address": "no-device@r", "relay_url": "u"}',
        b'{"format": 1, "address": 5, "relay_url": "u"}',
        b"\xff\xfe",
    ],
)
def test_a_bad_copy_reads_as_none(tmp_path: Path, data: bytes) -> None:
    tmp_path.chmod(0o700)
    (tmp_path / IDENTITY_FILE).write_bytes(data)
    (tmp_path / IDENTITY_FILE).chmod(0o600)
    assert read_identity(tmp_path) is None


def test_a_home_others_can_enter_is_not_trusted(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    (tmp_path / IDENTITY_FILE).write_bytes(encode_identity(KEYS.address, KEYS.relay_url))
    (tmp_path / IDENTITY_FILE).chmod(0o600)
    assert read_identity(tmp_path) == EXPECTED
    tmp_path.chmod(0o755)
    assert read_identity(tmp_path) is None
