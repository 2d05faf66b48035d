"""``tetherless doctor [--json] [--ca-file PEM] [--timeout S]``: is this device working, and if not, what to do.

One line per check, ``ok`` / ``warn`` / ``fail`` / ``skip`` (not checked: an earlier check failed, or the keys
stayed locked), what was found and what to do. Exit 0 when nothing failed (warnings included), 1 otherwise;
``--json`` prints one object ``{"ok": …, "checks": [{"check", "level", "detail", "hint"}]}``. The checks, in
order: the home and its keystore, the relay (reachable, TLS trust, clock skew), this device on its account's
list, prekeys on the relay, the outbox, ``state.db`` integrity. The verdicts and the relay probes are the SDK's
(:mod:`protocol.client.health`); this module only runs them and prints. Nothing secret is printed: no
passphrase, key, token or message.

Without a passphrase (none given, stdin not a terminal) the checks that need the keys are skipped and the
others use the home's public identity (``identity.json``).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sqlite3
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec
import trio

from protocol.client import health
from protocol.client.chains import DeviceListRejectedError
from protocol.client.health import Level, Verdict
from protocol.client.home import open_store
from protocol.client.http import ConnectError, NotTLSError, TLSRequiredError, TLSTrustError, TransportError
from protocol.client.identity import read_identity
from protocol.client.keystore import (
    DeviceKeys,
    Keystore,
    KeystoreError,
    PassphraseRequiredError,
    WrongPassphraseError,
)
from protocol.client.localdb import DB_FILE, LocalDBError
from protocol.client.outbox import outbox_view
from protocol.client.sdk import RelayClient
from protocol.errors import RemoteError, TetherlessError, UnknownRemoteError
from protocol.ids import Address
from tetherless_cli.exits import EXIT_FAILURE, EXIT_OK, UsageError
from tetherless_cli.home import open_keystore
from tetherless_cli.home_path import resolve_home

#: What a failed network request can raise (each becomes a ``fail`` line, never a traceback).
_NETWORK_ERRORS = (TransportError, TetherlessError, UnknownRemoteError, msgspec.MsgspecError, trio.TooSlowError)
_LOCAL_ERRORS = (LocalDBError, KeystoreError, sqlite3.Error, OSError)


@dataclass(frozen=True, slots=True)
class Check:
    """One printed line: which check, and its verdict."""

    name: str
    verdict: Verdict


@dataclass(slots=True)
class _Home:
    """What the checks learn about the home as they go."""

    keystore: Keystore
    keys: DeviceKeys | None = None
    address: str | None = None
    relay_url: str | None = None


def format_check(check: Check) -> str:
    """``ok    relay     http://… answers`` plus `` → what to do`` when there is something to do."""
    verdict = check.verdict
    line = f"{verdict.level.value:<5} {check.name:<9} {verdict.detail}"
    return f"{line} → {verdict.hint}" if verdict.hint else line


def check_json(check: Check) -> dict[str, str]:
    return {
        "check": check.name,
        "level": check.verdict.level.value,
        "detail": check.verdict.detail,
        "hint": check.verdict.hint,
    }


def _skip(why: str) -> Verdict:
    return Verdict(Level.SKIP, f"not checked: {why}")


def _unlock(state: _Home) -> tuple[Verdict, Verdict]:
    """The ``home`` and ``keystore`` checks; fills ``state`` with what could be read."""
    home = state.keystore.home
    identity = read_identity(home)
    if identity is not None:
        state.address, state.relay_url = identity.address, identity.relay_url
    if not state.keystore.exists():
        return (
            Verdict(Level.FAIL, f"no device in {home}", "run `tetherless device init --relay URL`, or pass --home DIR"),
            _skip("no home"),
        )
    if not os.access(home, os.R_OK | os.X_OK):
        return Verdict(
            Level.FAIL, f"{home} is not readable by this user", f"check its owner and mode (chmod 700 {home})"
        ), _skip("home")
    found = Verdict(Level.OK, str(home))
    try:
        state.keys = state.keystore.load()
    except (UsageError, PassphraseRequiredError):
        return found, Verdict(
            Level.WARN,
            "locked: the outbox and prekey checks need the passphrase",
            "give it with --passphrase-file FILE or TETHERLESS_PASSPHRASE (or run at a terminal)",
        )
    except WrongPassphraseError as exc:
        return found, Verdict(Level.FAIL, f"does not unlock: {exc}", "check the passphrase (or the keyring)")
    except KeystoreError as exc:
        return found, Verdict(Level.FAIL, str(exc))
    state.address, state.relay_url = state.keys.address, state.keys.relay_url
    verdict = Verdict(Level.OK, "unlocked")
    if not state.keystore.is_protected():
        verdict = Verdict(
            Level.WARN, "unlocked, but the keys are NOT encrypted at rest", "run `tetherless device protect`"
        )
    return found, verdict


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_verdict(url: str, ca_file: str | None) -> Verdict:
    if urlsplit(url).scheme == "https":
        return Verdict(Level.OK, f"certificate trusted ({f'CA file {ca_file}' if ca_file else 'system CAs'})")
    if _is_loopback(url):
        return Verdict(Level.OK, "not used (plain http to this machine)")
    return Verdict(
        Level.WARN,
        "plain http across the network: session tokens travel unencrypted (messages stay end-to-end encrypted)",
        "serve the relay with --tls-cert/--tls-key and use an https:// URL",
    )


def _connect_failure(url: str, exc: Exception, ca_file: str | None) -> tuple[Verdict, Verdict]:
    """The ``relay`` and ``tls`` verdicts of a probe that failed."""
    if isinstance(exc, TLSTrustError):
        where = f"the CA file {ca_file} does not vouch for it" if ca_file else "no CA file given"
        return (
            Verdict(Level.FAIL, f"cannot talk to {url}: its TLS certificate is not trusted"),
            Verdict(
                Level.FAIL,
                f"{exc} ({where})",
                "pass the relay's CA certificate: `tetherless doctor --ca-file PEM` tries one; `device init` / "
                "`device link --ca-file PEM` keeps it for the home",
            ),
        )
    if isinstance(exc, NotTLSError | TLSRequiredError):
        return Verdict(Level.FAIL, f"cannot talk to {url}"), Verdict(Level.FAIL, str(exc), "fix the URL's scheme")
    if isinstance(exc, trio.TooSlowError):
        return Verdict(Level.FAIL, f"no answer from {url} in time", "is the relay overloaded?"), _skip("relay")
    if isinstance(exc, ConnectError):
        return (
            Verdict(Level.FAIL, f"cannot reach the relay at {url}: {exc}", "is it running, and is the URL right?"),
            _skip("relay unreachable"),
        )
    return (
        Verdict(Level.FAIL, f"the relay at {url} did not answer as a Tetherless relay: {exc}", "check the URL"),
        _skip("relay"),
    )


async def _relay_checks(state: _Home, ca_file: str | None, timeout: float) -> list[Check]:
    url = state.relay_url
    if url is None:
        why = "the relay URL is sealed in the keystore (no identity.json)"
        return [Check(name, _skip(why)) for name in ("relay", "tls", "clock", "device", "prekeys")]
    try:
        probe = await health.probe_relay(url, ca_file=ca_file, timeout_seconds=timeout)
    except _NETWORK_ERRORS as exc:
        relay, tls = _connect_failure(url, exc, ca_file)
        skipped = [Check(name, _skip("relay not reached")) for name in ("clock", "device", "prekeys")]
        return [Check("relay", relay), Check("tls", tls), *skipped]
    own_relay = Address.parse(state.address).relay if state.address else None
    relay = Verdict(Level.OK, f"{url} answers (relay {probe.well_known.relay})")
    if own_relay is not None and probe.well_known.relay.lower() != own_relay:
        relay = Verdict(
            Level.WARN,
            f"{url} answers as relay {probe.well_known.relay}, but this device's address is at {own_relay}",
            "check the URL the home was made with",
        )
    checks = [
        Check("relay", relay),
        Check("tls", _tls_verdict(url, ca_file)),
        Check("clock", health.skew_verdict(probe.skew_seconds)),
    ]
    device_ok = False
    if state.address is None:
        checks.append(Check("device", _skip("address unknown")))
    else:
        verdict = await _device_verdict(url, state.address, ca_file, timeout)
        device_ok = verdict.level is Level.OK
        checks.append(Check("device", verdict))
    if state.keys is None:
        checks.append(Check("prekeys", _skip("keys locked")))
    elif not device_ok:
        checks.append(Check("prekeys", _skip("device not on its list")))
    else:
        checks.append(Check("prekeys", await _prekey_verdict(state.keys, ca_file, timeout)))
    return checks


async def _device_verdict(url: str, address: str, ca_file: str | None, timeout: float) -> Verdict:
    """This device on its account's verified list (read without keys: the list is public, the chain verified
    from its genesis here)."""
    parsed = Address.parse(address)
    try:
        async with RelayClient.connect(url, ca_file=ca_file, max_attempts=1, request_timeout_seconds=timeout) as client:
            entries = await client.devices(parsed.account, fresh=True)
    except DeviceListRejectedError as exc:
        return Verdict(
            Level.FAIL,
            f"the account's device list does not verify: {exc.detail}",
            "do not trust this relay's answers; see docs/crypto.md §3.5",
        )
    except _NETWORK_ERRORS as exc:
        return Verdict(Level.FAIL, f"cannot read the account's device list: {exc}")
    if all(entry.device_id != parsed.device for entry in entries):
        return Verdict(
            Level.FAIL,
            f"this device was removed from the device list of {parsed.account}@{parsed.relay} (revoked)",
            "it can no longer send or receive; link a new home to the account (`tetherless device link`)",
        )
    return Verdict(Level.OK, f"on the account's device list ({len(entries)} devices)")


async def _prekey_verdict(keys: DeviceKeys, ca_file: str | None, timeout: float) -> Verdict:
    try:
        async with RelayClient.connect(
            keys.relay_url, keys=keys, ca_file=ca_file, max_attempts=1, request_timeout_seconds=timeout
        ) as client:
            counts = await client.prekey_counts()
    except RemoteError as exc:
        return Verdict(Level.FAIL, f"the relay refused: {exc.code.value}: {exc.detail}")
    except _NETWORK_ERRORS as exc:
        return Verdict(Level.FAIL, f"cannot read the prekey counts: {exc}")
    return health.prekey_verdict(counts)


def _state_checks(state: _Home) -> list[Check]:
    """``outbox`` (needs the keys) and ``state.db`` (PRAGMA quick_check: needs no key)."""
    path = state.keystore.home / DB_FILE
    if not path.exists():
        missing = "no state.db yet (the first send or sync makes it)"
        return [Check("outbox", Verdict(Level.OK, "empty")), Check("state.db", Verdict(Level.OK, missing))]
    try:
        problems = health.quick_check(path)
    except sqlite3.Error as exc:
        integrity = Verdict(Level.FAIL, f"{path} cannot be opened: {exc}", "restore it from a backup")
    else:
        integrity = (
            Verdict(Level.OK, "PRAGMA quick_check: ok")
            if problems == ["ok"]
            else Verdict(
                Level.FAIL,
                f"PRAGMA quick_check: {problems[0]}",
                "restore state.db from a backup, or link this device anew",
            )
        )
    if state.keys is None:
        outbox = _skip("keys locked")
    elif integrity.level is Level.FAIL:
        outbox = _skip("state.db is damaged")
    else:
        try:
            store = open_store(state.keystore, state.keys)
            try:
                outbox = health.outbox_verdict(outbox_view(store))
            finally:
                store.db.close()
        except _LOCAL_ERRORS as exc:
            outbox = Verdict(Level.FAIL, f"cannot open the local state: {exc}")
    return [Check("outbox", outbox), Check("state.db", integrity)]


async def run_checks(args: argparse.Namespace) -> list[Check]:
    """Every check of the module doc, in order. Raises nothing for what it checks (each failure is a line)."""
    state = _Home(keystore=open_keystore(args))
    home, keystore = _unlock(state)
    checks = [Check("home", home), Check("keystore", keystore)]
    if home.level is Level.FAIL:
        names = ("relay", "tls", "clock", "device", "prekeys", "outbox", "state.db")
        return [*checks, *(Check(name, _skip("no home")) for name in names)]
    ca_file = args.ca_file or (state.keys.ca_file if state.keys else None)
    args.relay_url = state.relay_url
    checks += await _relay_checks(state, ca_file, args.timeout)
    return [*checks, *_state_checks(state)]


async def cmd_doctor(args: argparse.Namespace) -> int:
    """``doctor``: exit 0 when no check failed, 1 otherwise."""
    args.home = str(resolve_home(getattr(args, "home", None)))
    checks = await run_checks(args)
    failed = any(c.verdict.level is Level.FAIL for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [check_json(c) for c in checks]}, ensure_ascii=False))
    else:
        for check in checks:
            print(format_check(check))
    sys.stdout.flush()
    return EXIT_FAILURE if failed else EXIT_OK


__all__ = ["Check", "check_json", "cmd_doctor", "format_check", "run_checks"]
