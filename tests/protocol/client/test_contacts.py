"""Contacts (protocol/client/contacts.py): the rules, the sealed storage, migration 3; and the doctor's verdicts
(protocol/client/health.py). No processes: a real ``state.db`` in tmp_path."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.client import contacts, health
from protocol.client import store as store_module
from protocol.client.contacts import (
    MAX_NAME_CHARS,
    ContactExistsError,
    Directory,
    InvalidContactError,
    UnknownContactError,
)
from protocol.client.health import Level
from protocol.client.localdb import LocalDB, TamperedRowError
from protocol.client.outbox import OutboxState, OutboxView
from protocol.client.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SEALED_COLUMNS,
    ClientStore,
    migrate,
    schema_version,
)
from protocol.messages import PrekeyCounts

DEK = bytes(range(32))
ACCOUNT = "a" * 32
DEVICE = "d" * 32
OTHER = "b" * 32
BOB = f"{ACCOUNT}@relay.example"
BOB_PHONE = f"{DEVICE}.{ACCOUNT}@relay.example"
CAROL = f"{OTHER}@relay.example"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ClientStore]:
    db = LocalDB.open(tmp_path / "home", DEK)
    try:
        yield ClientStore(db)
    finally:
        db.close()


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "empty"),
        ("bob@home", "'@'"),
        ("relay:8080", "':'"),
        ("bob\uff20home", "'@'"),  # full-width at sign: NFKC folds it to "@"
        ("x" * (MAX_NAME_CHARS + 1), f"at most {MAX_NAME_CHARS}"),
        ("bob\nsmith", "control"),
        ("bob\x1b[31m", "control"),
        (" bob", "space"),
        ("bob ", "space"),
    ],
)
def test_names_that_break_a_rule_are_refused(store: ClientStore, name: str, rule: str) -> None:
    with pytest.raises(InvalidContactError, match=rule):
        contacts.check_name(name)
    with pytest.raises(InvalidContactError):
        contacts.add(store, name, BOB)
    assert contacts.contacts(store) == []


def test_names_that_follow_the_rules(store: ClientStore) -> None:
    assert contacts.check_name("x" * MAX_NAME_CHARS) == "x" * MAX_NAME_CHARS
    assert contacts.check_name("Bob Smith") == "Bob Smith"
    assert contacts.check_name("Zoë") == "Zoë"
    assert contacts.check_name("Zoe\u0308") == "Zoë"  # stored NFC


def test_a_bad_address_is_refused_and_the_relay_is_canonical(store: ClientStore) -> None:
    for address in ("bob", "not-an-id@relay.example", f"{ACCOUNT}@bad relay", ""):
        with pytest.raises(InvalidContactError, match="not an address"):
            contacts.add(store, "bob", address)
    assert contacts.add(store, "bob", f"{ACCOUNT}@Relay.Example").address == BOB


def test_lookup_is_case_insensitive_and_shows_the_spelling_given(store: ClientStore) -> None:
    contacts.add(store, "Bob", BOB)
    for spelling in ("bob", "BOB", "Bob", "\uff22\uff4f\uff42"):  # full-width "Bob" is the same name
        found = contacts.get(store, spelling)
        assert found == contacts.Contact(name="Bob", address=BOB)
    assert contacts.resolve(store, "bOb") == BOB
    assert contacts.resolve(store, CAROL) == CAROL  # an address is left as it is
    assert contacts.get(store, "bobby") is None


def test_a_taken_name_needs_replace_and_an_address_has_one_name(store: ClientStore) -> None:
    contacts.add(store, "bob", BOB)
    assert contacts.add(store, "BOB", BOB) == contacts.Contact("bob", BOB)  # the same again: nothing changes
    with pytest.raises(ContactExistsError, match="--replace"):
        contacts.add(store, "Bob", CAROL)
    assert contacts.get(store, "bob") == contacts.Contact("bob", BOB)
    with pytest.raises(ContactExistsError, match="already saved as 'bob'"):
        contacts.add(store, "robert", BOB)
    assert contacts.add(store, "Bob", CAROL, replace=True) == contacts.Contact("Bob", CAROL)
    assert contacts.contacts(store) == [contacts.Contact("Bob", CAROL)]
    contacts.add(store, "robert", BOB)  # BOB is free again
    assert contacts.add(store, "ROBERT", BOB, replace=True).name == "ROBERT"  # a new spelling, with replace
    assert [c.name for c in contacts.contacts(store)] == ["Bob", "ROBERT"]


def test_remove_and_unknown_names(store: ClientStore) -> None:
    contacts.add(store, "bob", BOB)
    with pytest.raises(UnknownContactError, match="contact list"):
        contacts.resolve(store, "carol")
    assert contacts.remove(store, "BOB") == contacts.Contact("bob", BOB)
    with pytest.raises(UnknownContactError, match="no contact named 'bob'"):
        contacts.remove(store, "bob")
    assert contacts.contacts(store) == []


def test_the_directory_names_a_device_by_its_account() -> None:
    names = Directory([contacts.Contact("bob", BOB), contacts.Contact("carol's phone", f"{DEVICE}.{OTHER}@r.example")])
    assert names.name_of(BOB) == "bob"
    assert names.name_of(BOB_PHONE) == "bob"  # a device of bob's account
    assert names.name_of(f"{DEVICE}.{OTHER}@r.example") == "carol's phone"
    assert names.name_of(CAROL) is None  # carol's account is not her phone
    assert names.name_of("garbage") is None
    exact = Directory([contacts.Contact("bob", BOB), contacts.Contact("bob's phone", BOB_PHONE)])
    assert exact.name_of(BOB_PHONE) == "bob's phone"


def test_names_and_addresses_are_sealed_on_disk(store: ClientStore, tmp_path: Path) -> None:
    contacts.add(store, "Bartholomew", BOB)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = b"".join(p.read_bytes() for p in (tmp_path / "home").iterdir() if p.name.startswith("state.db"))
    assert b"Bartholomew" not in raw
    assert ACCOUNT.encode() not in raw
    assert b"relay.example" not in raw


def test_a_row_moved_to_another_name_is_tampering(store: ClientStore) -> None:
    contacts.add(store, "bob", BOB)
    contacts.add(store, "carol", CAROL)
    bob_entry = store.db.execute(
        "SELECT entry FROM contacts WHERE name_index = ?", (store.db.blind("contact-name", "bob"),)
    ).fetchone()[0]
    store.db.execute(
        "UPDATE contacts SET entry = ? WHERE name_index = ?", (bob_entry, store.db.blind("contact-name", "carol"))
    )
    with pytest.raises(TamperedRowError):
        contacts.get(store, "carol")


def test_contacts_survive_a_dek_rotation(store: ClientStore) -> None:
    assert "contacts" in SEALED_COLUMNS
    contacts.add(store, "bob", BOB)
    new_dek = bytes(range(1, 33))
    store.db.rekey(new_dek, SEALED_COLUMNS)
    assert contacts.get(store, "bob") == contacts.Contact("bob", BOB)


def test_migration_3_adds_the_table_to_a_schema_2_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A home at schema 2 (what the client before contacts wrote) gains the table and keeps its rows."""
    home = tmp_path / "home"
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:2])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    old = ClientStore(LocalDB.open(home, DEK))
    entry = old.enqueue(BOB_PHONE, "text/plain", b"queued before contacts existed", peer=BOB)
    assert schema_version(old.db) == 2
    assert old.db.execute("SELECT name FROM sqlite_master WHERE name = 'contacts'").fetchone() is None
    old.db.close()
    monkeypatch.undo()

    db = LocalDB.open(home, DEK)
    assert migrate(db) == len(MIGRATIONS) - 2  # step 3 and every later one
    assert schema_version(db) == SCHEMA_VERSION
    new = ClientStore(db)
    assert new.outbox_entry(entry.local_id) == entry
    contacts.add(new, "bob", BOB)
    assert contacts.resolve(new, "bob") == BOB
    db.execute("PRAGMA user_version = 2")  # put back: the table exists, so step 3 refuses instead of guessing
    with pytest.raises(TamperedRowError, match="migration 3"):
        migrate(db)
    db.close()


# -- the doctor's verdicts (pure) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("skew", "level"),
    [
        (0.0, Level.OK),
        (-30.0, Level.OK),
        (31.0, Level.WARN),
        (-299.0, Level.WARN),
        (301.0, Level.FAIL),
        (None, Level.WARN),
    ],
)
def test_clock_skew_thresholds(skew: float | None, level: Level) -> None:
    verdict = health.skew_verdict(skew)
    assert verdict.level is level
    if level is Level.FAIL:
        assert "NTP" in verdict.hint
        assert "tokens" in verdict.hint


def test_skew_from_a_date_header() -> None:
    assert health.server_skew_seconds("Mon, 07 Dec 2026 08:00:00 GMT", 1_796_630_400.0 - 45) == 45.0
    assert health.server_skew_seconds(None, 0.0) is None
    assert health.server_skew_seconds("yesterday", 0.0) is None


def test_prekey_verdicts() -> None:
    full = PrekeyCounts(x25519_one_time=50, mlkem_one_time=50, signed_prekey_id=1, last_resort_id=2)
    assert health.prekey_verdict(full).level is Level.OK
    low = PrekeyCounts(x25519_one_time=3, mlkem_one_time=50, signed_prekey_id=1, last_resort_id=2)
    assert health.prekey_verdict(low).level is Level.WARN
    none_left = PrekeyCounts(x25519_one_time=0, mlkem_one_time=0, signed_prekey_id=1, last_resort_id=2)
    assert "last-resort" in health.prekey_verdict(none_left).detail
    unsigned = PrekeyCounts(x25519_one_time=50, mlkem_one_time=50)
    assert health.prekey_verdict(unsigned).level is Level.FAIL


def _view(local_id: int, state: OutboxState, destination: str = "") -> OutboxView:
    return OutboxView(local_id, BOB, state, "queued", "", "", destination, 0, 0, 0)


def test_outbox_verdicts() -> None:
    assert health.outbox_verdict([]).level is Level.OK
    assert health.outbox_verdict([_view(1, OutboxState.QUEUED)]).level is Level.OK
    retrying = health.outbox_verdict([_view(1, OutboxState.RETRYING, "b.test"), _view(2, OutboxState.QUEUED)])
    assert (retrying.level, "b.test" in retrying.detail) == (Level.WARN, True)
    failed = health.outbox_verdict([_view(1, OutboxState.FAILED)])
    assert failed.level is Level.WARN
    assert "1 failed" in failed.detail
    assert "outbox cancel" in failed.hint


def test_quick_check(tmp_path: Path, store: ClientStore) -> None:
    assert health.quick_check(store.db.path) == ["ok"]
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(sqlite3.Error):
        health.quick_check(junk)
    with pytest.raises(sqlite3.Error):
        health.quick_check(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()
