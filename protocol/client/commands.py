"""The client half of the ``tetherless`` command line.

``relay/cli.py`` (the one front door) owns the top-level parser and its
global ``--home`` option; it calls :func:`register_commands` to add::

    device init --relay URL [--name NAME] [--ca-file PEM] [--recovery-key-file FILE] [--no-recovery-key]
    device link|approve|list|revoke|recovery-key|protect    (protocol.client.cli_devices)
    whoami [--account]
    send ADDRESS [--text TEXT]
    sync [--follow] [--json]
    log snapshot [--json] | log retention [forever|DAYS] [--json]    (protocol.client.snapshots)

and then ``args.func(args)``, which returns the exit code: 0 on success, 2
for a usage error (also: no passphrase source for an encrypted home), 4 when
this device was revoked, 1 for anything else. Every failure prints exactly one line
to stderr (``tetherless: error: <code>: <detail>`` for relay errors) and no
traceback (set ``TETHERLESS_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import getpass
import json
import os
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TextIO

import trio

from .. import log, recovery
from ..errors import ErrorCode, RemoteError, TetherlessError, UnknownRemoteError
from ..ids import Address
from . import cli_sync, snapshots
from .chains import DeviceRevokedError
from .http import ConnectError, Origin, TransportError
from .keystore import (
    INSECURE_KDF_ENV,
    PASSPHRASE_ENV,
    AlreadyInitialisedError,
    DeviceKeys,
    Keystore,
    KeystoreError,
    insecure_kdf,
)
from .localdb import LocalDBError
from .sdk import InboxItem, ReceivedMessage, RejectedMessage, RelayClient

PROG: Final = "tetherless"
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_REVOKED: Final = 4  # this device was removed from its account's device list (docs/account-log.md §13)


class UsageError(Exception):
    """A bad argument the parser could not catch (exit status 2)."""


def resolve_home(arg: str | None) -> Path:
    """The client's home directory: ``--home``, else ``$TETHERLESS_HOME``, else a per-user data directory."""
    if arg:
        return Path(arg).expanduser()
    env = os.environ.get("TETHERLESS_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "tetherless"


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client subcommands to the front door's subparsers (each sets ``func``)."""
    device = subparsers.add_parser("device", help="manage this device")
    device_commands = device.add_subparsers(dest="device_command", metavar="COMMAND", required=True)
    init = device_commands.add_parser("init", help="create an account and its first device on a relay")
    init.add_argument("--relay", required=True, metavar="URL", help="relay base URL, e.g. http://127.0.0.1:8080")
    init.add_argument("--name", default=None, help="device name shown to your other devices (default: host name)")
    init.add_argument("--ca-file", default=None, metavar="PEM", help="CA certificate(s) to trust for an https relay")
    init.add_argument(
        "--recovery-key-file",
        default=None,
        metavar="FILE",
        help="write the new recovery key to FILE (0600) instead of showing it on the terminal",
    )
    init.add_argument("--no-recovery-key", action="store_true", help="create the account without a recovery key")
    init.add_argument("--list-format", type=int, choices=(1, 2, 3), default=3, help=argparse.SUPPRESS)
    init.set_defaults(func=cmd_device_init)
    from . import cli_devices  # the rest of `device …` (client-state)

    cli_devices.register(device_commands)

    whoami = subparsers.add_parser("whoami", help="print this device's address")
    whoami.add_argument("--account", action="store_true", help="print the account's address (reaches every device)")
    whoami.set_defaults(func=cmd_whoami)

    send = subparsers.add_parser("send", help="send a message (from --text or stdin)")
    send.add_argument("address", metavar="ADDRESS", help="device.account@relay, or account@relay for every device")
    send.add_argument("--text", default=None, help="the message; without it, stdin is read")
    send.set_defaults(func=cmd_send)

    sync = subparsers.add_parser("sync", help="print and acknowledge pending messages")
    sync.add_argument("--follow", action="store_true", help="keep streaming new messages until interrupted")
    sync.add_argument("--json", action="store_true", help="one JSON object per line")
    sync.add_argument("--timeout", type=float, default=None, metavar="S", help="give up (exit 3) when unreachable")
    sync.add_argument("--status", action="store_true", help="status lines on stderr at each state change")
    sync.add_argument(
        "--recover-rollback",
        action="store_true",
        help="after a 'restored from an older copy' error: start every session afresh, then sync",
    )
    sync.set_defaults(func=cmd_sync)

    history = subparsers.add_parser("history", help="show the local message history (no network)")
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    history.add_argument("--since", default=None, metavar="WHEN", help="ISO date/time, duration (2h, 7d) or @position")
    history.add_argument("--with", dest="peer", default=None, metavar="ADDRESS", help="only messages with ADDRESS")
    history.add_argument("--limit", type=int, default=None, metavar="N")
    history.set_defaults(func=cmd_history)

    outbox = subparsers.add_parser("outbox", help="show messages waiting to be sent or logged")
    outbox.add_argument("--json", action="store_true", help="one JSON object per line")
    outbox.set_defaults(func=cmd_outbox)

    # -- log snapshots and retention (helper "log-snapshots"; protocol/client/snapshots.py, account-log.md §6, §13)
    log_parser = subparsers.add_parser("log", help="the account log: snapshots and retention")
    log_commands = log_parser.add_subparsers(dest="log_command", required=True, metavar="COMMAND")
    snapshot = log_commands.add_parser("snapshot", help="sync, then write a snapshot of the history at the log cursor")
    snapshot.add_argument("--json", action="store_true", help="print the result as one JSON object")
    snapshot.add_argument("--part-bytes", type=int, default=None, help=argparse.SUPPRESS)  # tests: smaller parts
    snapshot.set_defaults(func=cmd_log_snapshot)
    retention = log_commands.add_parser("retention", help="print or set the account log's retention")
    retention.add_argument("value", nargs="?", default=None, metavar="forever|DAYS", help="set it (omit: print)")
    retention.add_argument("--json", action="store_true", help="print the result as one JSON object")
    retention.set_defaults(func=cmd_log_retention)


# -- error reporting -------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _warn_insecure_kdf() -> None:
    # On every command, so nobody keeps real keys under test-only Argon2id costs without being told. Only on a
    # terminal: scripts and tests that opted in read stderr as "one line per error" (the home carries a mark).
    if insecure_kdf() and sys.stderr.isatty():
        print(
            f"{PROG}: warning: {INSECURE_KDF_ENV}=1: keystores use test-only Argon2id costs "
            "(a passphrase is as cheap to guess as a plain hash); never use this for real keys",
            file=sys.stderr,
            flush=True,
        )


def _run(
    args: argparse.Namespace, main: Callable[[], Awaitable[int]], relay_url: Callable[[], str | None] = lambda: None
) -> int:
    """Run ``main`` under trio and turn every failure into one stderr line and an exit code."""
    try:
        _warn_insecure_kdf()
        return trio.run(main)
    except KeyboardInterrupt:
        return 130
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except DeviceRevokedError as exc:
        _error(f"{exc.code.value}: {exc.detail}")
        return EXIT_REVOKED
    except RemoteError as exc:
        if exc.code is ErrorCode.DEVICE_REVOKED:
            _error(f"{exc.code.value}: this device was revoked from its account and stops here ({exc.detail})")
            return EXIT_REVOKED
        _error(f"{exc.code.value}: {exc.detail}" if exc.detail else exc.code.value)
    except UnknownRemoteError as exc:
        _error(f"the relay answered HTTP {exc.http_status} without a problem document")
    except TetherlessError as exc:
        _error(f"{exc.code.value}: {exc.detail}" if exc.detail else exc.code.value)
    except ConnectError as exc:
        where = f" at {relay_url()}" if relay_url() else ""
        _error(f"cannot reach the relay{where}: {exc}")
    except TransportError as exc:
        _error(f"connection to the relay failed: {exc}")
    except (KeystoreError, LocalDBError) as exc:
        _error(str(exc))
    except BrokenPipeError:
        # stdout went away (e.g. `| head`): nothing more to print, and Python
        # must not complain while flushing it at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except Exception as exc:
        if os.environ.get("TETHERLESS_DEBUG"):
            traceback.print_exc()
        _error(f"internal: {exc.__class__.__name__}: {exc}")
    return EXIT_FAILURE


def passphrase_source(args: argparse.Namespace, *, confirm: bool = False) -> Callable[[], str]:
    """Where the keystore's passphrase comes from, asked only when needed.

    ``--passphrase-file FILE`` (its first line), else ``$TETHERLESS_PASSPHRASE``,
    else a prompt when stdin is a terminal (twice with ``confirm``), else a
    :class:`UsageError` (exit 2) saying how to provide one.
    """

    def source() -> str:
        path = getattr(args, "passphrase_file", None)
        if path:
            try:
                text = Path(path).expanduser().read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot read --passphrase-file {path}: {exc}") from exc
            lines = text.splitlines()
            return lines[0] if lines else ""
        env = os.environ.get(PASSPHRASE_ENV)
        if env is not None:
            return env
        if sys.stdin.isatty():
            first = getpass.getpass("Passphrase for this device's keys: ")
            if confirm and getpass.getpass("Repeat the passphrase: ") != first:
                raise UsageError("the passphrases do not match")
            return first
        raise UsageError(
            f"a passphrase is needed: use --passphrase-file FILE or set {PASSPHRASE_ENV} (stdin is not a terminal)"
        )

    return source


def open_keystore(args: argparse.Namespace, *, confirm: bool = False) -> Keystore:
    """The home's :class:`Keystore` with the CLI's passphrase source."""
    return Keystore(resolve_home(getattr(args, "home", None)), passphrase=passphrase_source(args, confirm=confirm))


def _load(args: argparse.Namespace) -> tuple[Keystore, DeviceKeys]:
    keystore = open_keystore(args)
    return keystore, keystore.load()


# -- commands ------------------------------------------------------------------------------


def cmd_device_init(args: argparse.Namespace) -> int:
    """``device init --relay URL [--name NAME]``: register, store the keys, print the address."""
    home = resolve_home(getattr(args, "home", None))
    relay_url = str(args.relay).rstrip("/")
    name = args.name if args.name is not None else socket.gethostname()

    async def main() -> int:
        try:
            Origin.parse(relay_url)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if len(name) > 64:
            raise UsageError("--name is at most 64 characters")
        if Keystore(home).exists():
            raise AlreadyInitialisedError(f"a device already exists in {home}")
        # Ask for the passphrase before the account exists on the relay.
        keystore = Keystore(home, passphrase=passphrase_source(args, confirm=True)())
        secret = None
        if args.list_format >= 2 and not args.no_recovery_key:
            secret = os.urandom(recovery.SECRET_BYTES)
        async with RelayClient.connect(relay_url, ca_file=args.ca_file) as client:
            keys = await client.register(name, keystore=keystore, list_format=args.list_format, recovery_secret=secret)
        await cli_sync.publish_prekeys(keystore, keys)
        print(keys.address, flush=True)
        if secret is not None:
            from . import cli_devices

            text = recovery.new_recovery_secret(secret)
            cli_devices.show_recovery_key(text, args.recovery_key_file)
            cli_devices.remember_new_recovery_key(keystore, keys, text)  # account-log.md §5.7
        return EXIT_OK

    return _run(args, main, lambda: relay_url)


def cmd_whoami(args: argparse.Namespace) -> int:
    """``whoami``: print this device's address (no network)."""

    async def main() -> int:
        _, keys = _load(args)
        print(keys.account_address if getattr(args, "account", False) else keys.address, flush=True)
        return EXIT_OK

    return _run(args, main)


def _read_message(text: str | None) -> str | bytes:
    if text is not None:
        return text
    data = sys.stdin.buffer.read()
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        return data  # not text: send the bytes as they are
    # `echo hi | tetherless send …` should send "hi", not "hi\n".
    return decoded[:-1] if decoded.endswith("\n") else decoded


def cmd_send(args: argparse.Namespace) -> int:
    """``send ADDRESS [--text TEXT]``: print the envelope id (hex), one line per recipient device."""
    relay_url: str | None = None

    async def main() -> int:
        nonlocal relay_url
        try:
            Address.parse(args.address)
        except TetherlessError as exc:
            raise UsageError(f"not an address: {args.address!r} (expected device.account@relay)") from exc
        keystore, keys = _load(args)
        relay_url = keys.relay_url
        message = _read_message(args.text)
        # Offline-first (docs/account-log.md §10): enqueue, then one flush attempt.
        return await cli_sync.run_send(keystore, keys, args.address, message)

    return _run(args, main, lambda: relay_url)


def cmd_history(args: argparse.Namespace) -> int:
    """``history [--json] [--since WHEN] [--with ADDRESS] [--limit N]``: the local store only."""

    async def main() -> int:
        keystore, keys = _load(args)
        try:
            snapshots.print_history(  # cli_sync.print_history plus retention gap markers (log-snapshots)
                cli_sync.open_store(keystore, keys),
                as_json=args.json,
                since=args.since,
                peer=args.peer,
                limit=args.limit,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        return EXIT_OK

    return _run(args, main)


def cmd_log_snapshot(args: argparse.Namespace) -> int:
    """``log snapshot [--json]``: sync, then write (or finish) a snapshot at the log cursor (account-log.md §6.1)."""

    async def main() -> int:
        keystore, keys = _load(args)
        if args.part_bytes is not None and not 1 <= args.part_bytes <= log.SNAPSHOT_PART_BYTES:
            raise UsageError(f"--part-bytes must be between 1 and {log.SNAPSHOT_PART_BYTES}")
        return await snapshots.run_log_snapshot(keystore, keys, as_json=args.json, part_bytes=args.part_bytes)

    return _run(args, main)


def cmd_log_retention(args: argparse.Namespace) -> int:
    """``log retention [forever|DAYS] [--json]``: print or set the account log's retention (§6.2)."""

    async def main() -> int:
        if args.value is not None:
            try:
                snapshots.parse_retention(args.value)
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
        keystore, keys = _load(args)
        return await snapshots.run_log_retention(keystore, keys, args.value, as_json=args.json)

    return _run(args, main)


def cmd_outbox(args: argparse.Namespace) -> int:
    """``outbox [--json]``: every entry not yet logged (exit 0 when empty)."""

    async def main() -> int:
        keystore, keys = _load(args)
        cli_sync.print_outbox(cli_sync.open_store(keystore, keys), as_json=args.json)
        return EXIT_OK

    return _run(args, main)


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_message(message: ReceivedMessage, *, as_json: bool) -> str:
    """One line (plain) or one JSON object (``--json``) for a received message."""
    text = message.text
    if as_json:
        record: dict[str, object] = {
            "cursor": message.cursor,
            "id": message.id.hex(),
            "from": message.sender,
            "sent_at": _iso(message.sent_at_ms),
            "sent_at_ms": message.sent_at_ms,
            "content_type": message.content_type,
            "text": text,
            "message_id": message.message_id.hex(),
        }
        if text is None:
            record["body_base64"] = base64.b64encode(message.body).decode("ascii")
        return json.dumps(record, ensure_ascii=False)
    stamp = dt.datetime.fromtimestamp(message.sent_at_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    shown = text if text is not None else f"<{len(message.body)} bytes of {message.content_type}>"
    return f"[{stamp}] {message.sender}: {shown}"


def _emit(item: InboxItem, out: TextIO, *, as_json: bool) -> None:
    if isinstance(item, RejectedMessage):
        # Reported, not printed as a message; the caller acknowledges it so it
        # does not block the inbox.
        print(
            f"{PROG}: warning: dropped an invalid message (id {item.id.hex()}, cursor {item.cursor}): "
            f"{item.code.value}: {item.detail}",
            file=sys.stderr,
            flush=True,
        )
        return
    out.write(format_message(item, as_json=as_json) + "\n")


def cmd_sync(args: argparse.Namespace) -> int:
    """``sync [--follow] [--json] [--timeout S] [--status]``: run the sync engine (docs/account-log.md §11).

    Prints each newly received message once, after its local commit; inbox
    envelopes are acknowledged only once their messages are in the account log.
    Without ``--follow`` it exits 0 when quiescent, 3 when the relay stays
    unreachable past ``--timeout``, 4 when this device was revoked.
    """
    relay_url: str | None = None

    async def main() -> int:
        nonlocal relay_url
        keystore, keys = _load(args)
        relay_url = keys.relay_url
        return await cli_sync.run_sync(args, keystore, keys)

    return _run(args, main, lambda: relay_url)


__all__ = ["format_message", "register_commands", "resolve_home"]
