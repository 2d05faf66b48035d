"""Contacts: short names a person gives addresses, kept in this device's ``state.db`` (docs/account-log.md §8).

``send alice`` instead of ``send 3kq…@relay.example``, and every output shows ``alice (3kq…@relay)`` next to
the address. The rules, decided here without I/O (:func:`check_name`, :func:`fold`) and unit-tested without
processes:

- a name is not an address: no ``@`` and no ``:`` (so a name can never be mistaken for one, and
  ``relay:port`` forms stay addresses), 1 to :data:`MAX_NAME_CHARS` printable characters, no space at either
  end;
- names are unique and looked up without regard to case or Unicode width (``Alice``, ``ALICE`` and
  full-width ``Alice`` are one name: NFKC, then case folding); the spelling given is the one shown;
- one name per address (so an address shows one name), an account address or one device's address;
- adding a name that exists needs ``replace=True``.

Storage: table ``contacts`` (migration 3 of :mod:`protocol.client.store`): the row key is a keyed hash of the
folded name and ``address_index`` a keyed hash of the address (:meth:`LocalDB.blind`); the name and the
address are sealed together in ``entry``. A stolen disk shows how many contacts there are, not who.

Local only: contacts are not synced to the account's other devices (each device keeps its own; a log record
for them is future work, account-log.md §8). No printing: :mod:`tetherless_cli.contacts` formats.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from typing import Final

import msgspec

from ..errors import TetherlessError
from ..ids import Address
from .store import CONTACTS_TABLE, ClientStore

#: The longest name, in characters (after NFC normalisation): a label, not a note.
MAX_NAME_CHARS: Final = 64
_FORBIDDEN: Final = ("@", ":")


class ContactError(Exception):
    """A contact operation that cannot be done; the message is one line for a person."""


class InvalidContactError(ContactError):
    """A name or address that breaks a rule of the module doc."""


class ContactExistsError(ContactError):
    """The name is taken (add it with ``replace``), or the address already has another name."""


class UnknownContactError(ContactError):
    """No contact of that name."""


class Contact(msgspec.Struct, frozen=True):
    """One contact: ``name`` as it was given (NFC), ``address`` in its canonical form (relay lower case)."""

    name: str
    address: str


class _Entry(msgspec.Struct, frozen=True, array_like=True):
    """The sealed ``entry`` column."""

    name: str
    address: str


def fold(name: str) -> str:
    """The form names are compared in: NFKC, then case folding. Pure."""
    return unicodedata.normalize("NFKC", name).casefold()


def check_name(name: str) -> str:
    """The name as stored (NFC), or :class:`InvalidContactError` saying which rule it breaks. Pure."""
    shown = unicodedata.normalize("NFC", name)
    if not shown:
        raise InvalidContactError("a contact name cannot be empty")
    if len(shown) > MAX_NAME_CHARS:
        raise InvalidContactError(f"a contact name has at most {MAX_NAME_CHARS} characters ({len(shown)} given)")
    # Checked on the folded form too: a full-width at sign (U+FF20) folds to "@".
    if any(c in shown or c in fold(shown) for c in _FORBIDDEN):
        raise InvalidContactError(f"a contact name cannot contain '@' or ':' (it would look like an address): {name!r}")
    if not shown.isprintable():
        raise InvalidContactError(f"a contact name cannot contain control characters or line breaks: {name!r}")
    if shown != shown.strip():
        raise InvalidContactError(f"a contact name cannot start or end with a space: {name!r}")
    return shown


def check_address(address: str) -> str:
    """The canonical form of ``address`` (``device.account@relay`` or ``account@relay``), or
    :class:`InvalidContactError`. Pure."""
    try:
        return str(Address.parse(address))
    except TetherlessError as exc:
        raise InvalidContactError(
            f"not an address: {address[:100]!r} (expected device.account@relay or account@relay)"
        ) from exc


def is_address(text: str) -> bool:
    """Whether ``text`` is meant as an address rather than a name (it has an ``@``; names never do). Pure."""
    return "@" in text


def _name_index(store: ClientStore, name: str) -> bytes:
    return store.db.blind("contact-name", fold(name))


def _address_index(store: ClientStore, address: str) -> bytes:
    return store.db.blind("contact-address", address)


def _open(store: ClientStore, name_index: bytes, blob: bytes) -> Contact:
    entry = msgspec.msgpack.decode(store.db.open_column(CONTACTS_TABLE, name_index, "entry", blob), type=_Entry)
    return Contact(name=entry.name, address=entry.address)


def get(store: ClientStore, name: str) -> Contact | None:
    """The contact called ``name`` (any case), or None. Reads only; raises
    :class:`~protocol.client.localdb.TamperedRowError` for a row changed outside tetherless."""
    index = _name_index(store, name)
    row = store.db.execute(f"SELECT entry FROM {CONTACTS_TABLE} WHERE name_index = ?", (index,)).fetchone()
    return None if row is None else _open(store, index, row[0])


def add(store: ClientStore, name: str, address: str, *, replace: bool = False) -> Contact:
    """Save ``name`` for ``address``; returns the contact as stored.

    Raises :class:`InvalidContactError` (a rule of the module doc), :class:`ContactExistsError` when the name
    is taken and ``replace`` is false, or when the address already has another name (remove that one first).
    One transaction: a cancellation or crash leaves the old contact or the new one. Idempotent: adding the same
    name and address again (any ``replace``) changes nothing.
    """
    shown, canonical = check_name(name), check_address(address)
    name_index, address_index = _name_index(store, shown), _address_index(store, canonical)
    with store.transaction():
        existing = get(store, shown)
        if existing is not None and existing.address == canonical and (existing.name == shown or not replace):
            return existing
        if existing is not None and not replace:
            raise ContactExistsError(
                f"a contact named {existing.name!r} exists ({existing.address}); add it with --replace to change it"
            )
        row = store.db.execute(
            f"SELECT name_index, entry FROM {CONTACTS_TABLE} WHERE address_index = ?", (address_index,)
        ).fetchone()
        if row is not None and row[0] != name_index:
            other = _open(store, row[0], row[1])
            raise ContactExistsError(f"{canonical} is already saved as {other.name!r}; remove that name first")
        entry = msgspec.msgpack.encode(_Entry(name=shown, address=canonical))
        store.db.execute(
            f"INSERT OR REPLACE INTO {CONTACTS_TABLE} (name_index, address_index, entry) VALUES (?, ?, ?)",
            (name_index, address_index, store.db.seal_column(CONTACTS_TABLE, name_index, "entry", entry)),
        )
    return Contact(name=shown, address=canonical)


def remove(store: ClientStore, name: str) -> Contact:
    """Delete the contact called ``name`` (any case) and return it; :class:`UnknownContactError` when there is
    none. Not idempotent by design: removing a name that is not there is reported."""
    with store.transaction():
        contact = get(store, name)
        if contact is None:
            raise UnknownContactError(f"no contact named {name!r}; `tetherless contact list` shows them")
        store.db.execute(f"DELETE FROM {CONTACTS_TABLE} WHERE name_index = ?", (_name_index(store, name),))
    return contact


def contacts(store: ClientStore) -> list[Contact]:
    """Every contact, sorted by folded name. Reads only; raises
    :class:`~protocol.client.localdb.TamperedRowError` for a row changed outside tetherless."""
    rows = store.db.execute(f"SELECT name_index, entry FROM {CONTACTS_TABLE}").fetchall()
    return sorted((_open(store, index, blob) for index, blob in rows), key=lambda c: (fold(c.name), c.name))


def resolve(store: ClientStore, text: str) -> str:
    """What ``send TEXT`` sends to: ``text`` itself when it is an address (checked by the caller), else the
    address of the contact of that name. Raises :class:`UnknownContactError`, whose message points to
    ``tetherless contact list``. Reads only."""
    if is_address(text):
        return text
    contact = get(store, text)
    if contact is None:
        raise UnknownContactError(
            f"{text!r} is neither an address nor a contact name; `tetherless contact list` shows the names"
        )
    return contact.address


class Directory:
    """Names for addresses, read once (a few rows) for a command's output: :meth:`name_of`."""

    def __init__(self, entries: Iterable[Contact]) -> None:
        self._by_address = {c.address: c.name for c in entries}

    @classmethod
    def load(cls, store: ClientStore) -> Directory:
        """Every contact of ``store``. Raises what :func:`contacts` raises."""
        return cls(contacts(store))

    def name_of(self, address: str) -> str | None:
        """The contact name of ``address``: its own, else (for a device address) its account's; None when it
        has none or is not an address. Pure."""
        try:
            parsed = Address.parse(address)
        except TetherlessError:
            return None
        exact = self._by_address.get(str(parsed))
        if exact is not None or not parsed.device:
            return exact
        return self._by_address.get(f"{parsed.account}@{parsed.relay}")

    def __len__(self) -> int:
        return len(self._by_address)


__all__ = [
    "MAX_NAME_CHARS",
    "Contact",
    "ContactError",
    "ContactExistsError",
    "Directory",
    "InvalidContactError",
    "UnknownContactError",
    "add",
    "check_address",
    "check_name",
    "contacts",
    "fold",
    "get",
    "is_address",
    "remove",
    "resolve",
]
