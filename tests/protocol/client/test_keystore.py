"""The on-disk device keystore (protocol/client/keystore.py, crypto.md §13)."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import msgspec
import pytest

from protocol.client import keystore as ks
from protocol.client.keystore import (
    AlreadyInitialisedError,
    ClientState,
    CorruptKeystoreError,
    DeviceKeys,
    InsecurePermissionsError,
    KdfParams,
    Keystore,
    KeystoreError,
    KeystorePayload,
    NotInitialisedError,
    NotProtectedError,
    PassphraseRequiredError,
    WrongPassphraseError,
)
from protocol.client.localdb import DB_FILE, LocalDB, StateRolledBackError, TamperedRowError
from protocol.client.store import ClientStore

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")

PASSPHRASE = "tröt horse battery staple"


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


def store(home: Path, passphrase: str | None = PASSPHRASE) -> Keystore:
    return Keystore(home, passphrase=passphrase)


def write_v1_home(home: Path, *, cursor: int | None = None) -> None:
    """A home as the first client version left it: plaintext device.json (and state.json)."""
    home.mkdir(mode=0o700, parents=True)
    ks._atomic_write(home / ks.KEY_FILE, msgspec.json.encode(make_keys()))
    if cursor is not None:
        ks._atomic_write(home / ks.STATE_FILE, msgspec.json.encode(ClientState(inbox_cursor=cursor)))


# -- the protected (format 2) home ----------------------------------------------------------


def test_create_sets_private_permissions_even_with_a_lax_umask(home: Path) -> None:
    old = os.umask(0o000)
    try:
        keystore = store(home)
        keystore.create(make_keys())
        keystore.save_cursor(1)
    finally:
        os.umask(old)
    assert mode(home) == 0o700
    assert mode(home / ks.KEYSTORE_FILE) == 0o600
    assert mode(home / DB_FILE) == 0o600
    assert not (home / ks.KEY_FILE).exists()


def test_round_trip_with_a_fresh_instance(home: Path) -> None:
    assert not store(home).exists()
    store(home).create(make_keys())
    loaded = store(home)
    assert loaded.exists()
    assert loaded.is_protected()
    assert loaded.load() == make_keys()
    assert len(loaded.unlock().dek) == 32


def test_file_layout_follows_the_spec(home: Path) -> None:
    store(home).create(make_keys())
    data = (home / ks.KEYSTORE_FILE).read_bytes()
    assert data[:4] == b"TLKS"
    assert data[4] == 1
    assert data[5] == 1
    iterations, memory_kib, lanes = struct.unpack(">IIB", data[22:31])
    assert KdfParams(iterations, memory_kib, lanes) == ks.kdf_profile()
    # Nothing secret or identifying in clear.
    assert b"s" * 32 not in data
    assert b"b" * 32 not in data
    assert b"laptop" not in data
    # Rebuild the file from its parts with the pure functions: the same bytes come out.
    header, nonce, ciphertext = ks.parse_keystore(data)
    assert header.raw == data[:31]
    assert nonce == data[31:55]
    kek = ks.derive_kek(PASSPHRASE, header.salt, KdfParams(iterations, memory_kib, lanes))
    payload = ks.open_keystore(header, nonce, ciphertext, kek)
    assert ks.seal_keystore(header.raw, kek, payload, nonce) == data


def test_passphrase_is_nfc_normalised(home: Path) -> None:
    store(home, "cafe\u0301").create(make_keys())  # decomposed é
    assert store(home, "caf\u00e9").load() == make_keys()  # composed é


def test_default_profile_is_rfc9106_second_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ks.INSECURE_KDF_ENV, raising=False)
    monkeypatch.delenv(ks.KDF_PROFILE_ENV, raising=False)
    assert ks.kdf_profile() == KdfParams(iterations=3, memory_kib=65536, lanes=4)
    monkeypatch.setenv(ks.INSECURE_KDF_ENV, "1")
    assert ks.kdf_profile() == ks.KDF_TEST
    monkeypatch.setenv(ks.INSECURE_KDF_ENV, "yes")
    with pytest.raises(KeystoreError, match="set it to 1"):
        ks.kdf_profile()
    # The variable it replaced is refused rather than silently ignored (a script meant to opt in).
    monkeypatch.delenv(ks.INSECURE_KDF_ENV)
    monkeypatch.setenv(ks.KDF_PROFILE_ENV, "test")
    with pytest.raises(KeystoreError, match="no longer read"):
        ks.kdf_profile()


def test_weak_keystore_is_refused_without_the_explicit_opt_in(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ks.INSECURE_KDF_ENV, "1")
    store(home).create(make_keys())
    assert store(home).insecure_kdf_marked()
    monkeypatch.delenv(ks.INSECURE_KDF_ENV)

    def no_kdf(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the KDF ran on a refused keystore")

    monkeypatch.setattr(ks, "derive_kek", no_kdf)
    with pytest.raises(ks.WeakKdfError, match=r"t=1 m=8 KiB.*RFC 9106"):
        store(home).load()
    monkeypatch.undo()
    monkeypatch.setenv(ks.INSECURE_KDF_ENV, "1")
    keystore = store(home)
    assert keystore.load() == make_keys()
    # Re-wrapped at full cost (the variable unset): the mark goes, and the home opens without the opt-in.
    monkeypatch.delenv(ks.INSECURE_KDF_ENV)
    keystore.change_passphrase("a much better passphrase")
    assert not keystore.insecure_kdf_marked()
    header = ks.parse_keystore((home / ks.KEYSTORE_FILE).read_bytes())[0]
    assert header.params == ks.KDF_DEFAULT
    assert store(home, "a much better passphrase").load() == make_keys()


def test_argon2id_matches_rfc9106_vector() -> None:
    """RFC 9106 §5.3 (Argon2id, with secret and associated data) through the same library."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    tag = Argon2id(
        salt=b"\x02" * 16, length=32, iterations=3, lanes=4, memory_cost=32, ad=b"\x04" * 12, secret=b"\x03" * 8
    ).derive(b"\x01" * 32)
    assert tag.hex() == "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"


def test_wrong_passphrase(home: Path) -> None:
    store(home).create(make_keys())
    with pytest.raises(WrongPassphraseError, match="wrong passphrase"):
        store(home, "not it").load()


def test_missing_passphrase(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store(home).create(make_keys())
    monkeypatch.delenv(ks.PASSPHRASE_ENV, raising=False)
    with pytest.raises(PassphraseRequiredError, match="TETHERLESS_PASSPHRASE"):
        store(home, None).load()
    monkeypatch.setenv(ks.PASSPHRASE_ENV, PASSPHRASE)
    assert store(home, None).load() == make_keys()


def test_passphrase_callable_is_asked_once_and_only_when_needed(home: Path) -> None:
    asked: list[int] = []

    def ask() -> str:
        asked.append(1)
        return PASSPHRASE

    store(home).create(make_keys())
    keystore = Keystore(home, passphrase=ask)
    assert keystore.exists()
    assert asked == []
    keystore.load()
    keystore.load_state()
    keystore.save_cursor(4)
    assert asked == [1]


@pytest.mark.parametrize("offset", [0, 4, 5, 8, 22, 30, 40, -1])
def test_any_changed_byte_is_refused(home: Path, offset: int) -> None:
    store(home).create(make_keys())
    path = home / ks.KEYSTORE_FILE
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises((WrongPassphraseError, CorruptKeystoreError)):
        store(home).load()


def test_lowered_kdf_cost_in_the_header_is_refused(home: Path) -> None:
    """An attacker who rewrites the header (e.g. iterations) breaks the AEAD: the header is the AD."""
    store(home).create(make_keys())
    path = home / ks.KEYSTORE_FILE
    data = path.read_bytes()
    header, nonce, ciphertext = ks.parse_keystore(data)
    assert header.params is not None
    cheaper = ks.passphrase_header(header.salt, KdfParams(header.params.iterations + 1, 8, 1))
    path.write_bytes(cheaper + nonce + ciphertext)
    with pytest.raises(WrongPassphraseError):
        store(home).load()


@pytest.mark.parametrize(
    "data",
    [b"", b"TLKS", b"XXXX\x01\x01" + b"\0" * 80, b"TLKS\x02\x01" + b"\0" * 80, b"TLKS\x01\x09" + b"\0" * 80],
)
def test_corrupt_keystore_files(home: Path, data: bytes) -> None:
    store(home).create(make_keys())
    (home / ks.KEYSTORE_FILE).write_bytes(data)
    with pytest.raises(CorruptKeystoreError):
        store(home).load()


def test_absurd_kdf_parameters_are_refused_before_deriving(home: Path) -> None:
    store(home).create(make_keys())
    header = ks.passphrase_header(b"\0" * 16, KdfParams(iterations=3, memory_kib=2**31, lanes=4))
    (home / ks.KEYSTORE_FILE).write_bytes(header + b"\0" * 64)
    with pytest.raises(CorruptKeystoreError, match="out of range"):
        store(home).load()


def test_keyring_method_without_keyring_is_a_clear_error(home: Path) -> None:
    if ks.keyring_available():  # pragma: no cover - depends on the machine
        pytest.skip("a real keyring backend is installed")
    home.mkdir(parents=True, mode=0o700)
    data = ks.keyring_header("tetherless:" + "d" * 32) + b"\0" * 24 + b"\0" * 64
    ks._atomic_write(home / ks.KEYSTORE_FILE, data)
    with pytest.raises(ks.KeyringUnavailableError, match="keyring"):
        store(home).load()
    with pytest.raises(ks.KeyringUnavailableError):
        Keystore(home / "other", passphrase=PASSPHRASE).create(make_keys(), use_keyring=True)


def test_repr_hides_secrets() -> None:
    text = repr(make_keys()) + repr(KeystorePayload(dek=b"k" * 32, keys=make_keys()))
    assert "sss" not in text
    assert "bbb" not in text
    assert "kkk" not in text


def test_refuses_to_overwrite(home: Path) -> None:
    store(home).create(make_keys())
    with pytest.raises(AlreadyInitialisedError):
        store(home).create(make_keys())


def test_load_without_device(home: Path) -> None:
    with pytest.raises(NotInitialisedError, match="device init"):
        store(home).load()


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o660, 0o666])
def test_refuses_open_keystore_file(home: Path, bad_mode: int) -> None:
    store(home).create(make_keys())
    (home / ks.KEYSTORE_FILE).chmod(bad_mode)
    with pytest.raises(InsecurePermissionsError, match="chmod 600"):
        store(home).load()


@pytest.mark.parametrize("bad_mode", [0o750, 0o705, 0o777])
def test_refuses_open_home(home: Path, bad_mode: int) -> None:
    store(home).create(make_keys())
    home.chmod(bad_mode)
    try:
        with pytest.raises(InsecurePermissionsError, match="chmod 700"):
            store(home).load()
    finally:
        home.chmod(0o700)


def test_create_refuses_an_existing_open_home(tmp_path: Path) -> None:
    home = tmp_path / "shared"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    (home / "other").write_text("x")
    with pytest.raises(InsecurePermissionsError):
        store(home).create(make_keys())
    assert not (home / ks.KEYSTORE_FILE).exists()


def test_state_lives_sealed_in_the_local_db(home: Path) -> None:
    keystore = store(home)
    keystore.create(make_keys())
    assert keystore.load_state() == ClientState()
    keystore.save_cursor(10)
    keystore.save_cursor(5)
    keystore.close()
    again = store(home)
    assert again.load_state().inbox_cursor == 10
    assert not (home / ks.STATE_FILE).exists()
    assert mode(home / DB_FILE) == 0o600


def test_change_passphrase(home: Path) -> None:
    keystore = store(home)
    keystore.create(make_keys())
    keystore.save_cursor(3)
    dek = keystore.unlock().dek
    keystore.change_passphrase("new words entirely")
    with pytest.raises(WrongPassphraseError):
        store(home).load()
    moved = store(home, "new words entirely")
    assert moved.unlock().dek != dek  # the data key rotated with the passphrase …
    assert moved.load_state().inbox_cursor == 3  # … and state.db was re-sealed under it
    assert not moved.unlock().previous_dek
    old_db = LocalDB.open(home, dek)  # the old keystore and old passphrase would give this: it opens nothing
    with pytest.raises(TamperedRowError):
        old_db.get(ks.STATE_TABLE, "state")
    old_db.close()


def test_dek_rotation_reseals_every_sealed_column(home: Path) -> None:
    keystore = store(home)
    keystore.create(make_keys())
    db = keystore.local_db()
    client = ClientStore(db)
    with client.transaction():
        client.put_epoch_key(1, b"k" * 32, b"src")
    db.put("session_state", b"sid", b"ratchet state")
    keystore.change_passphrase("next")
    again = store(home, "next")
    reopened = ClientStore(again.local_db())
    assert reopened.epoch_key(1) == b"k" * 32
    assert again.local_db().get("session_state", b"sid") == b"ratchet state"


def test_dek_rotation_interrupted_is_finished_on_next_open(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keystore = store(home)
    keystore.create(make_keys())
    keystore.save_cursor(9)
    keystore.local_db().put("session_state", b"sid", b"ratchet state")

    def crash(self: LocalDB, new_dek: bytes, own_tables: object) -> int:
        raise OSError("power cut")

    monkeypatch.setattr(LocalDB, "rekey", crash)
    with pytest.raises(OSError, match="power cut"):
        keystore.change_passphrase("next")
    monkeypatch.undo()
    interrupted = store(home, "next")
    assert interrupted.unlock().previous_dek  # the keystore knows both keys: nothing is lost
    assert interrupted.load_state().inbox_cursor == 9  # the next open finishes the re-sealing
    assert not store(home, "next").unlock().previous_dek
    assert interrupted.local_db().get("session_state", b"sid") == b"ratchet state"


def test_atomic_write_leaves_old_file_when_writing_fails(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keystore = store(home)
    keystore.create(make_keys())
    before = (home / ks.KEYSTORE_FILE).read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        keystore.change_passphrase("other")
    monkeypatch.undo()
    assert (home / ks.KEYSTORE_FILE).read_bytes() == before
    assert store(home).load() == make_keys()
    assert sorted(p.name for p in home.iterdir() if p.name.endswith(".tmp")) == []


# -- format-1 homes ------------------------------------------------------------------------


def test_v1_home_is_still_read(home: Path) -> None:
    write_v1_home(home, cursor=9)
    keystore = Keystore(home, passphrase=None)  # no passphrase needed for a plaintext home
    assert keystore.exists()
    assert not keystore.is_protected()
    assert keystore.load() == make_keys()
    assert keystore.load_state().inbox_cursor == 9
    keystore.save_cursor(11)
    assert Keystore(home).load_state().inbox_cursor == 11
    with pytest.raises(NotProtectedError, match="device protect"):
        keystore.local_db()


@pytest.mark.parametrize("bad_mode", [0o640, 0o604])
def test_v1_permission_checks_kept(home: Path, bad_mode: int) -> None:
    write_v1_home(home)
    (home / ks.KEY_FILE).chmod(bad_mode)
    with pytest.raises(InsecurePermissionsError, match="chmod 600"):
        Keystore(home).load()


def test_v1_corrupt_file(home: Path) -> None:
    write_v1_home(home)
    (home / ks.KEY_FILE).write_bytes(b"{not json")
    with pytest.raises(CorruptKeystoreError):
        Keystore(home).load()


def test_protect_migrates_a_v1_home(home: Path) -> None:
    write_v1_home(home, cursor=42)
    store(home).protect()
    assert sorted(p.name for p in home.iterdir() if not p.name.startswith(DB_FILE)) == [
        "identity.json",  # the public copy whoami reads (protocol/client/identity.py)
        ks.KEYSTORE_FILE,
    ]
    migrated = store(home)
    assert migrated.is_protected()
    assert migrated.load() == make_keys()
    assert migrated.load_state().inbox_cursor == 42
    with pytest.raises(KeystoreError, match="already protected"):
        store(home).protect()


def test_protect_finishes_after_a_crash_between_writing_and_deleting(home: Path) -> None:
    write_v1_home(home, cursor=5)
    keystore = store(home)
    keystore._remove_plaintext = lambda: None  # type: ignore[method-assign]  # "crash" before deleting
    keystore.protect()
    assert (home / ks.KEY_FILE).exists()
    assert (home / ks.KEYSTORE_FILE).exists()
    store(home).protect()  # the next run checks both hold the same device, then deletes the plaintext
    assert not (home / ks.KEY_FILE).exists()
    assert not (home / ks.STATE_FILE).exists()
    assert store(home).load_state().inbox_cursor == 5


def test_protect_without_a_device(home: Path) -> None:
    with pytest.raises(NotInitialisedError):
        store(home).protect()


def test_protect_keeps_a_state_db_made_by_the_sync_engine_readable(home: Path) -> None:
    """A format-1 home synced by the offline engine has a state.db sealed under the seed-derived DEK."""
    from protocol.client.localdb import LocalDB
    from protocol.client.store import default_dek

    write_v1_home(home)
    dek = default_dek(home, make_keys().signing_seed)
    assert ks.legacy_dek(make_keys().signing_seed) == dek
    db = LocalDB.open(home, dek)
    db.put("history_messages_x", 1, b"synced before protect")
    db.close()
    store(home).protect()
    assert store(home).local_db().get("history_messages_x", 1) == b"synced before protect"


def test_keystore_bytes_are_pinned() -> None:
    """A fixed salt, nonce, passphrase and test-profile cost give fixed bytes (the file format must not drift)."""
    import hashlib

    params = KdfParams(iterations=1, memory_kib=8, lanes=1)
    kek = ks.derive_kek(PASSPHRASE, bytes(range(16)), params)
    assert kek.hex() == "63d1c9c951f30f8e67e06f52b187aeed44cb68686794fcf9108b8c53be59b07e"
    header = ks.passphrase_header(bytes(range(16)), params)
    data = ks.seal_keystore(header, kek, KeystorePayload(dek=b"k" * 32, keys=make_keys()), bytes(range(100, 124)))
    assert len(data) == 475
    assert hashlib.sha256(data).hexdigest() == "d926aeb83663c1750f49bfec31b650841e879978cd20d8275ce866951710e4c3"
    header_parsed, nonce, ciphertext = ks.parse_keystore(data)
    assert ks.open_keystore(header_parsed, nonce, ciphertext, kek).dek == b"k" * 32


# -- the long-term ML-KEM key (format-3 device lists, crypto.md §3.6) -------------------------------


def test_a_home_made_before_format_3_gets_its_kem_key_on_first_need(home: Path) -> None:
    """The keystore bytes of a home made by the code before format 3 are pinned above: this home has them."""
    from protocol import handshake

    store(home).create(make_keys())
    before = (home / ks.KEYSTORE_FILE).read_bytes()
    assert store(home).load().kem_seed == b""
    seed = bytes(range(64))
    keys = store(home).ensure_kem_key(seed)
    assert keys.kem_seed == seed
    assert keys.kem_public_key == handshake.mlkem_public(seed)
    after = (home / ks.KEYSTORE_FILE).read_bytes()
    assert ks.parse_keystore(after)[0].raw == ks.parse_keystore(before)[0].raw  # same header: no new KDF run
    assert after != before
    reopened = store(home).load()
    assert reopened == keys
    assert store(home).ensure_kem_key(b"\x01" * 64).kem_seed == seed  # idempotent: the first key stays
    assert store(home, "wrong passphrase").exists()
    with pytest.raises(WrongPassphraseError):
        store(home, "wrong passphrase").load()
    assert store(home).load_state() == ClientState()  # state.db still opens: same DEK


def test_ensure_kem_key_in_a_format_1_home_and_bad_seeds(home: Path) -> None:
    write_v1_home(home)
    with pytest.raises(ValueError, match="64 bytes"):
        store(home).ensure_kem_key(b"short")
    keys = store(home).ensure_kem_key(b"\x02" * 64)
    assert store(home).load().kem_seed == keys.kem_seed == b"\x02" * 64
    assert mode(home / ks.KEY_FILE) == 0o600


def test_keys_with_a_kem_seed_are_pinned_too() -> None:
    """``kem_seed`` is encoded after the older fields, only when set; older fields stay encoded as before."""
    plain = msgspec.msgpack.decode(msgspec.msgpack.encode(make_keys()))
    assert "kem_seed" not in plain
    assert (plain["ca_file"], plain["list_format"], plain["format_version"]) == (None, 1, 1)
    with_seed = msgspec.msgpack.decode(msgspec.msgpack.encode(msgspec.structs.replace(make_keys(), kem_seed=b"k" * 64)))
    assert list(with_seed) == [*plain, "kem_seed"]
    assert "kem_seed" not in repr(msgspec.structs.replace(make_keys(), kem_seed=b"k" * 64))


# -- rollback of state.db (crypto.md §13.2) -----------------------------------------------------


def _reopen(home: Path) -> Keystore:
    keystore = store(home)
    keystore.local_db()
    keystore.close()
    return keystore


def test_an_older_state_db_put_back_is_refused(home: Path) -> None:
    keystore = store(home)
    keystore.create(make_keys())
    keystore.save_cursor(1)
    keystore.close()
    saved = {name: (home / name).read_bytes() for name in (DB_FILE,)}
    later = store(home)
    later.save_cursor(2)
    later.close()
    for name, data in saved.items():
        (home / name).write_bytes(data)
    with pytest.raises(StateRolledBackError, match="older than this device's keystore"):
        store(home).local_db()
    recovered = store(home)
    recovered.recover_from_rollback()
    assert recovered.load_state().inbox_cursor == 1  # the restored state is accepted as it is
    recovered.close()
    _reopen(home)  # and the home opens normally again


def test_deleting_the_generation_row_does_not_turn_the_check_off(home: Path) -> None:
    keystore = store(home)
    keystore.create(make_keys())
    keystore.save_cursor(1)
    keystore.close()
    _reopen(home)
    db = LocalDB.open(home, store(home).unlock().dek)
    db.delete("local_meta", "generation")
    db.close()
    with pytest.raises(StateRolledBackError):
        store(home).local_db()


def test_the_generation_survives_a_concurrent_keystore_change(home: Path) -> None:
    """Two processes: one opened state.db, another added a key meanwhile; recording the generation keeps it."""
    first = store(home)
    first.create(make_keys())
    first.unlock()
    other = store(home)
    other.ensure_kem_key(b"\x01" * 64)
    first.local_db()
    assert store(home).load().kem_seed == b"\x01" * 64
    assert store(home).unlock().state_generation == 1
