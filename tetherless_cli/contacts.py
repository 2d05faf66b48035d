"""``tetherless contact add|list|remove``: short names for addresses (SDK: :mod:`protocol.client.contacts`).

Also the one place that formats an address for people: :func:`labelled` gives ``alice (3kqx…@relay)`` for an
address with a contact name and the address unchanged otherwise; ``send``, ``sync``, ``history`` and
``outbox`` use it (their ``--json`` output keeps the address fields as they were and adds the name).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Final

from protocol.client import contacts
from protocol.client.home import open_store
from protocol.client.store import ClientStore
from protocol.errors import TetherlessError
from protocol.ids import Address
from tetherless_cli.exits import EXIT_OK, UsageError
from tetherless_cli.home import load

#: Characters of an id kept in a shortened address (a name is shown beside it, so a prefix is enough).
SHORT_ID_CHARS: Final = 6
#: No names (the default of the formatting functions: every address shown as it is).
NO_NAMES: Final = contacts.Directory(())


def abbreviate(address: str) -> str:
    """``3kqx2a….7fmb4c…@relay`` for ``<device>.<account>@relay``: every id cut to its first characters."""
    try:
        parsed = Address.parse(address)
    except TetherlessError:  # not an address: shown as it is
        return address
    ids = [i for i in (parsed.device, parsed.account) if i]
    return ".".join(i[:SHORT_ID_CHARS] + "…" for i in ids) + "@" + parsed.relay


def labelled(names: contacts.Directory, address: str) -> str:
    """``name (short address)`` when ``address`` (or its account) has a contact name, else ``address``."""
    name = names.name_of(address)
    return address if name is None else f"{name} ({abbreviate(address)})"


def label(store: ClientStore, address: str) -> str | None:
    """``name (short address)`` for an address with a contact name, else None (one command, one address)."""
    names = directory(store)
    return labelled(names, address) if names.name_of(address) is not None else None


def directory(store: ClientStore) -> contacts.Directory:
    """The contact names for one command's output."""
    return contacts.Directory.load(store)


def resolve_recipient(store: ClientStore, text: str) -> str:
    """``send``'s ADDRESS argument: an address, or a contact name (one line suggesting ``contact list`` when
    it is neither: :class:`UsageError`, exit 2)."""
    try:
        return contacts.resolve(store, text)
    except contacts.ContactError as exc:
        raise UsageError(str(exc)) from exc


async def cmd_contact_add(args: argparse.Namespace) -> int:
    """``contact add NAME ADDRESS [--replace]``: exit 2 for a bad name or address, 1 when the name is taken (the
    front door's one line: :data:`tetherless_cli.main.LOCAL_ERRORS`)."""
    keystore, keys = load(args)
    contact = contacts.add(open_store(keystore, keys), args.name, args.address, replace=args.replace)
    print(f"{contact.name}: {contact.address}", flush=True)
    return EXIT_OK


async def cmd_contact_list(args: argparse.Namespace) -> int:
    """``contact list [--json]``: ``NAME  ADDRESS`` per contact, sorted by name (nothing when there are none)."""
    keystore, keys = load(args)
    entries = contacts.contacts(open_store(keystore, keys))
    if args.json:
        for contact in entries:
            print(json.dumps({"name": contact.name, "address": contact.address}, ensure_ascii=False))
    elif entries:
        width = max(len(c.name) for c in entries)
        for contact in entries:
            print(f"{contact.name.ljust(width)}  {contact.address}")
    sys.stdout.flush()
    return EXIT_OK


async def cmd_contact_remove(args: argparse.Namespace) -> int:
    """``contact remove NAME``: exit 1 when there is no such contact."""
    keystore, keys = load(args)
    contact = contacts.remove(open_store(keystore, keys), args.name)
    print(f"removed {contact.name} ({contact.address})", flush=True)
    return EXIT_OK


__all__ = [
    "NO_NAMES",
    "abbreviate",
    "cmd_contact_add",
    "cmd_contact_list",
    "cmd_contact_remove",
    "directory",
    "label",
    "labelled",
    "resolve_recipient",
]
