"""The client half of the ``tetherless`` command line.

``relay/cli.py`` (the one front door) owns the top-level parser and its
global ``--home`` option; it calls :func:`register_commands` to add::

    device init --relay URL [--name NAME] [--ca-file PEM]
    whoami
    send ADDRESS [--text TEXT]
    sync [--follow] [--json]

and then ``args.func(args)``, which returns the exit code: 0 on success, 2
for a usage error, 1 for anything else. Every failure prints exactly one line
to stderr (``tetherless: error: <code>: <detail>`` for relay errors) and no
traceback (set ``TETHERLESS_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TextIO

import trio

from ..errors import ErrorCode, RemoteError, TetherlessError, UnknownRemoteError
from ..ids import Address
from .http import ConnectError, Origin, TransportError, collapse_single_group
from .keystore import DeviceKeys, Keystore, KeystoreError
from .sdk import InboxItem, ReceivedMessage, RejectedMessage, RelayClient

PROG: Final = "tetherless"
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2


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
    init.set_defaults(func=cmd_device_init)

    whoami = subparsers.add_parser("whoami", help="print this device's address")
    whoami.set_defaults(func=cmd_whoami)

    send = subparsers.add_parser("send", help="send a message (from --text or stdin)")
    send.add_argument("address", metavar="ADDRESS", help="device.account@relay, or account@relay for every device")
    send.add_argument("--text", default=None, help="the message; without it, stdin is read")
    send.set_defaults(func=cmd_send)

    sync = subparsers.add_parser("sync", help="print and acknowledge pending messages")
    sync.add_argument("--follow", action="store_true", help="keep streaming new messages until interrupted")
    sync.add_argument("--json", action="store_true", help="one JSON object per line")
    sync.set_defaults(func=cmd_sync)


# -- error reporting -------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _run(
    args: argparse.Namespace, main: Callable[[], Awaitable[int]], relay_url: Callable[[], str | None] = lambda: None
) -> int:
    """Run ``main`` under trio and turn every failure into one stderr line and an exit code."""
    try:
        return trio.run(main)
    except KeyboardInterrupt:
        return 130
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except RemoteError as exc:
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
    except KeystoreError as exc:
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


def _load(args: argparse.Namespace) -> tuple[Keystore, DeviceKeys]:
    keystore = Keystore(resolve_home(getattr(args, "home", None)))
    return keystore, keystore.load()


# -- commands ------------------------------------------------------------------------------


def cmd_device_init(args: argparse.Namespace) -> int:
    """``device init --relay URL [--name NAME]``: register, store the keys, print the address."""
    keystore = Keystore(resolve_home(getattr(args, "home", None)))
    relay_url = str(args.relay).rstrip("/")
    name = args.name if args.name is not None else socket.gethostname()

    async def main() -> int:
        try:
            Origin.parse(relay_url)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if len(name) > 64:
            raise UsageError("--name is at most 64 characters")
        async with RelayClient.connect(relay_url, ca_file=args.ca_file) as client:
            keys = await client.register(name, keystore=keystore)
        print(keys.address, flush=True)
        return EXIT_OK

    return _run(args, main, lambda: relay_url)


def cmd_whoami(args: argparse.Namespace) -> int:
    """``whoami``: print this device's address (no network)."""

    async def main() -> int:
        _, keys = _load(args)
        print(keys.address, flush=True)
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
        _, keys = _load(args)
        relay_url = keys.relay_url
        message = _read_message(args.text)
        async with RelayClient.connect(keys.relay_url, keys=keys) as client:
            sent = await client.send(args.address, message)
        if not sent:
            raise TetherlessError(ErrorCode.UNKNOWN_RECIPIENT, "that account has no other device to send to")
        for receipt in sent:
            print(receipt.id.hex(), flush=True)
        return EXIT_OK

    return _run(args, main, lambda: relay_url)


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
    """``sync [--follow] [--json]``: print pending messages, acknowledging only what was printed and flushed."""
    relay_url: str | None = None

    async def drain_and_follow() -> None:
        nonlocal relay_url
        keystore, keys = _load(args)
        relay_url = keys.relay_url
        out = sys.stdout
        async with RelayClient.connect(keys.relay_url, keys=keys) as client:
            after = keystore.load_state().inbox_cursor
            if after:
                # A previous run printed up to here; its acknowledgement may not have arrived.
                await client.ack(up_to=after)

            async def processed(cursor: int) -> None:
                out.flush()  # printed and flushed before the ack: at-least-once, never lost
                keystore.save_cursor(cursor)
                await client.ack(up_to=cursor)

            while True:
                batch = await client.fetch(after=after)
                for item in batch.items:
                    _emit(item, out, as_json=args.json)
                if batch.items:
                    await processed(max(item.cursor for item in batch.items))
                after = max(after, batch.next_cursor)
                if not batch.more:
                    break
            if args.follow:
                async with client.stream(after=after) as inbox:
                    async for item in inbox:
                        _emit(item, out, as_json=args.json)
                        await processed(item.cursor)

    async def main() -> int:
        if not args.follow:
            await drain_and_follow()
            return EXIT_OK
        # --follow runs until SIGINT/SIGTERM, which end it cleanly (exit 0).
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, collapse_single_group():
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                async def run() -> None:
                    await drain_and_follow()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                nursery.start_soon(run)
        return EXIT_OK

    return _run(args, main, lambda: relay_url)


__all__ = ["format_message", "register_commands", "resolve_home"]
