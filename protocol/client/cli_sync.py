"""The offline-first commands behind ``tetherless sync|send|history|outbox`` (docs/account-log.md §13).

``commands.py`` registers the parsers and calls these. They share one
:class:`~protocol.client.store.ClientStore` per home (in ``state.db``) with
the :class:`~protocol.client.sync.SyncEngine`.

Output contract kept from the first client: ``sync`` prints each newly
received message once (plain ``[time] sender: text`` or a JSON object with
``cursor``, ``id`` (envelope id), ``from``, ``sent_at``, ``sent_at_ms``,
``content_type``, ``text``, ``message_id``); ``send`` prints the envelope id of
each recipient device, or ``queued (offline; local id N)`` when the relay
cannot be reached (exit 0, the ``sync`` engine delivers it later). Status lines
go to stderr only with ``--status`` (or when stderr is a terminal), so scripts
that expect a silent stderr keep working.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import random
import re
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from ..errors import TetherlessError
from .http import TransportError, collapse_single_group
from .keystore import DeviceKeys, Keystore, KeystoreError
from .localdb import LocalDB
from .sdk import BINARY_CONTENT_TYPE, TEXT_CONTENT_TYPE, RelayClient
from .sessions import recover_home_from_rollback
from .store import ClientStore, HistoryMessage, default_dek
from .sync import (
    DEFAULT_ROTATE_AFTER_RECORDS,
    DEFAULT_ROTATE_AFTER_SECONDS,
    EXIT_OK,
    RetryError,
    RevokedError,
    Status,
    SyncEngine,
    format_status,
    status_json,
)

DEFAULT_SYNC_TIMEOUT = 30.0
EXIT_FAILURE = 1


def open_store(keystore: Keystore, keys: DeviceKeys) -> ClientStore:
    """The home's client store: in the keystore's ``state.db`` when it has a DEK, else a DEK from the device seed."""
    try:
        db = keystore.local_db()
    except KeystoreError:
        db = LocalDB.open(keystore.home, default_dek(Path(keystore.home), keys.signing_seed))
    store = ClientStore(db)
    if store.cursor("inbox_received") == 0:
        # One-time import of the first client's inbox cursor (§8).
        try:
            legacy = keystore.load_state().inbox_cursor
        except KeystoreError:
            legacy = 0
        if legacy:
            with store.transaction():
                store.set_cursor("inbox_received", legacy)
                store.set_cursor("inbox_acked", legacy)
    return store


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_received(message: HistoryMessage, cursor: int | None, envelope_id: bytes | None, *, as_json: bool) -> str:
    text = message.text
    if as_json:
        record: dict[str, object] = {
            "cursor": cursor,
            "id": (envelope_id or message.msg_key).hex(),
            "from": message.sender,
            "sent_at": _iso(message.sent_at_ms),
            "sent_at_ms": message.sent_at_ms,
            "content_type": message.content_type,
            "text": text,
            "message_id": message.message_uid.hex(),
        }
        if text is None:
            record["body_base64"] = base64.b64encode(message.body).decode("ascii")
        return json.dumps(record, ensure_ascii=False)
    stamp = dt.datetime.fromtimestamp(message.sent_at_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    shown = text if text is not None else f"<{len(message.body)} bytes of {message.content_type}>"
    return f"[{stamp}] {message.sender}: {shown}"


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def make_engine(keys: DeviceKeys, store: ClientStore, **options: Any) -> SyncEngine:
    return SyncEngine(
        keys,
        store,
        max_backoff=_env_float("TETHERLESS_SYNC_MAX_BACKOFF", 60.0),
        poll_seconds=_env_float("TETHERLESS_SYNC_POLL_SECONDS", 1.0),
        holdback_seconds=_env_float("TETHERLESS_HOLDBACK_SECONDS", 6 * 3600.0),
        rotate_after_records=int(_env_float("TETHERLESS_LOG_ROTATE_RECORDS", DEFAULT_ROTATE_AFTER_RECORDS)),
        rotate_after_seconds=_env_float("TETHERLESS_LOG_ROTATE_SECONDS", DEFAULT_ROTATE_AFTER_SECONDS),
        rng=random.Random(),
        **options,
    )


async def run_sync(args: argparse.Namespace, keystore: Keystore, keys: DeviceKeys) -> int:
    """``sync [--follow] [--json] [--timeout S] [--status] [--recover-rollback]``."""
    if getattr(args, "recover_rollback", False):
        recover_home_from_rollback(keystore)  # before open_store: it would refuse the restored state.db
        print(
            "tetherless: recovered from a restored copy: every session starts afresh; "
            "history that was logged since the copy comes back from the account log",
            file=sys.stderr,
            flush=True,
        )
    store = open_store(keystore, keys)
    out = sys.stdout

    def on_message(message: HistoryMessage, cursor: int | None, envelope_id: bytes | None) -> None:
        out.write(format_received(message, cursor, envelope_id, as_json=args.json) + "\n")
        out.flush()

    show_status = bool(getattr(args, "status", False)) or sys.stderr.isatty()

    def on_status(status: Status) -> None:
        if not show_status:
            return
        line = json.dumps(status_json(status)) if args.json else format_status(status)
        print(line, file=sys.stderr, flush=True)

    engine = make_engine(keys, store, on_message=on_message, on_status=on_status)
    timeout = args.timeout if args.timeout is not None else DEFAULT_SYNC_TIMEOUT
    if not args.follow:
        code = await engine.run(follow=False, timeout=timeout)
        _report_refusals(engine, as_json=args.json)
        if code == 3 and engine.last_failure.startswith("log_"):
            # The relay answers, but the account log cannot be written safely (account-log.md §5.4).
            print(f"tetherless: error: {engine.last_failure} (gave up after {timeout:g} s)", file=sys.stderr)
        elif code == 3:
            print(
                f"tetherless: error: cannot reach the relay at {keys.relay_url} (gave up after {timeout:g} s)",
                file=sys.stderr,
                flush=True,
            )
        elif code == 4:
            print("tetherless: error: device_revoked: this device was removed from its account", file=sys.stderr)
        return code
    result = EXIT_OK
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, collapse_single_group():
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            async def run() -> None:
                nonlocal result
                result = await engine.run(follow=True)
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(run)
    _report_refusals(engine, as_json=args.json)
    if result == 4:
        print("tetherless: error: device_revoked: this device was removed from its account", file=sys.stderr)
    return result


def _report_refusals(engine: SyncEngine, *, as_json: bool = False) -> None:
    """One stderr line per record or message the engine refused or found missing (account-log.md §4.6, §18.1);
    with ``--json`` each is also a ``{"warning": CODE, "detail": LINE}`` line on stdout."""
    for line in engine.refusals:
        print(f"tetherless: warning: {line}", file=sys.stderr, flush=True)
    if as_json:
        for warning in engine.warnings:
            sys.stdout.write(json.dumps(warning) + "\n")
        sys.stdout.flush()


async def run_send(keystore: Keystore, keys: DeviceKeys, address: str, message: str | bytes) -> int:
    """``send``: enqueue, then one flush attempt; prints envelope ids, or ``queued (…)`` when offline."""
    store = open_store(keystore, keys)
    if isinstance(message, str):
        body, content_type = message.encode("utf-8"), TEXT_CONTENT_TYPE
    else:
        body, content_type = message, BINARY_CONTENT_TYPE
    peer = address.split(".", 1)[-1] if "." in address.split("@", 1)[0] else address
    entry = store.enqueue(address, content_type, body, peer=peer)
    engine = make_engine(keys, store)
    try:
        async with RelayClient.connect(
            keys.relay_url, keys=keys, max_attempts=1, request_timeout_seconds=15, local_db=store.db
        ) as client:
            engine.client = client
            await engine.enable_sessions()
            await engine.flush_outbox(only=entry.local_id)
            current = store.outbox_entry(entry.local_id)
            assert current is not None
            if current.state == "failed":
                print(f"tetherless: error: {current.last_error}", file=sys.stderr, flush=True)
                return EXIT_FAILURE
            if current.state == "queued":  # e.g. the recipient has no prekeys now: `sync` retries it
                print(f"queued ({current.last_error}; local id {entry.local_id})", flush=True)
                return EXIT_OK
            ids = [e[4] for e in store.envelopes(entry.local_id) if e[4] is not None]
            for envelope_id in ids:
                print(envelope_id.hex(), flush=True)
            try:  # best effort: log it now when the account key is known; the engine does it otherwise
                with trio.move_on_after(5):
                    await engine.append_pending()
            except (RetryError, TetherlessError, TransportError):
                pass
    except (RetryError, TransportError) as exc:
        print(f"queued (offline; local id {entry.local_id})", flush=True)
        del exc
    except RevokedError:
        print("tetherless: error: device_revoked: this device was removed from its account", file=sys.stderr)
        return 4
    return EXIT_OK


async def publish_prekeys(keystore: Keystore, keys: DeviceKeys) -> None:
    """Publish a new format-2 device's prekeys (``PUT /v1/prekeys``) so others can start sessions with it
    at once (crypto.md §7.2); a device that joined with a link code keeps the prekeys it offered then.

    Best effort: a failure is reported on stderr and ``sync`` publishes them later (the engine does it on
    every connection). Format-1 devices and unprotected homes have no sessions: nothing to do.
    """
    if keys.list_format < 2 or not keystore.is_protected():
        return
    try:
        async with RelayClient.connect(
            keys.relay_url, keys=keys, max_attempts=2, request_timeout_seconds=15, local_db=keystore.local_db()
        ) as client:
            await client.enable_sessions()
    except (TetherlessError, TransportError) as exc:
        print(f"tetherless: warning: prekeys not published yet ({exc}); `tetherless sync` retries", file=sys.stderr)


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now_ms: int) -> tuple[int, int]:
    """``--since WHEN`` → (position, ms): ``@position``, a duration (``2h``, ``7d``) or an ISO date/time."""
    if text.startswith("@") and text[1:].isdigit():
        return int(text[1:]), 0
    match = _DURATION.match(text)
    if match:
        return 0, now_ms - int(match.group(1)) * _UNITS[match.group(2)] * 1000
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"--since: not a date, duration or @position: {text!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return 0, int(when.timestamp() * 1000)


def history_json(message: HistoryMessage) -> dict[str, Any]:
    record: dict[str, Any] = {
        "position": message.log_position,
        "direction": message.direction,
        "message_id": base64.b32encode(message.message_uid).decode().rstrip("=").lower(),
        "sender": message.sender,
        "recipients": message.recipients,
        "pair_seq": message.pair_seq,
        "sent_at_ms": message.sent_at_ms,
        "relay_sent_at_ms": message.relay_sent_at_ms,
        "content_type": message.content_type,
        "text": message.text,
        "late": message.late,
        "writer": message.writer,
        "authenticated": message.authenticated,
    }
    if message.text is None:
        record["body_b64"] = base64.b64encode(message.body).decode("ascii")
    return record


def print_history(store: ClientStore, *, as_json: bool, since: str | None, peer: str | None, limit: int | None) -> None:
    position, since_ms = parse_since(since, store.now_ms()) if since else (0, 0)
    for message in store.history(since_position=position, since_ms=since_ms, limit=limit):
        if (
            peer
            and peer not in message.recipients
            and message.sender != peer
            and not message.sender.endswith("." + peer)
            and not any(r.endswith("." + peer) for r in message.recipients)
        ):
            continue
        if as_json:
            print(json.dumps(history_json(message), ensure_ascii=False))
            continue
        stamp = dt.datetime.fromtimestamp(message.sent_at_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        shown = message.text if message.text is not None else f"<{len(message.body)} bytes of {message.content_type}>"
        if message.direction == "sent":
            print(f"{stamp}  → {', '.join(message.recipients):<40} {shown}")
        else:
            print(f"{stamp}  ← {message.sender:<40} {shown}")
    sys.stdout.flush()


def print_outbox(store: ClientStore, *, as_json: bool) -> None:
    for entry in store.outbox():
        row = {
            "local_id": entry.local_id,
            "state": entry.state,
            "recipient": entry.recipient,
            "attempts": entry.attempts,
            "next_attempt": _iso(entry.next_attempt_at_ms) if entry.next_attempt_at_ms else None,
            "last_error": entry.last_error,
        }
        if as_json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(
                f"{entry.local_id:>6}  {entry.state:<7} {entry.recipient}  {entry.attempts}  "
                f"{row['next_attempt'] or '-'}  {entry.last_error or '-'}"
            )
    sys.stdout.flush()


__all__ = [
    "DEFAULT_SYNC_TIMEOUT",
    "format_received",
    "open_store",
    "parse_since",
    "print_history",
    "print_outbox",
    "publish_prekeys",
    "run_send",
    "run_sync",
]
