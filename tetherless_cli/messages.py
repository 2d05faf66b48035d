"""``tetherless send|sync|history|outbox``: the offline-first message commands (docs/account-log.md §10-§13).

They share one :class:`~protocol.client.store.ClientStore` per home (in ``state.db``) with the
:class:`~protocol.client.sync.SyncEngine`.

Output contract kept from the first client: ``sync`` prints each newly
received message once (plain ``[time] sender: text`` or a JSON object with
``cursor``, ``id`` (envelope id), ``from``, ``sent_at``, ``sent_at_ms``,
``content_type``, ``text``, ``message_id``); ``send`` prints the message id
once delivered, or ``queued (offline; local id N, message id ID)`` when the relay
cannot be reached (exit 0, the ``sync`` engine delivers it later). Status lines
go to stderr only with ``--status`` (or when stderr is a terminal), so scripts
that expect a silent stderr keep working.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import re
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from protocol.client import outbox
from protocol.client.contacts import Directory, is_address
from protocol.client.home import make_engine, open_store
from protocol.client.http import TLSSetupError, TransportError, collapse_single_group
from protocol.client.keystore import DeviceKeys, Keystore
from protocol.client.sdk import BINARY_CONTENT_TYPE, TEXT_CONTENT_TYPE, RelayClient
from protocol.client.sessions import recover_home_from_rollback
from protocol.client.snapshots import Gap, gaps
from protocol.client.store import ClientStore, HistoryMessage, OutboxEntry
from protocol.client.sync import (
    RetryError,
    RevokedError,
    Status,
    SyncEngine,
    SyncOutcome,
    format_status,
    status_json,
)
from protocol.errors import TetherlessError
from protocol.ids import Address
from protocol.payload import FILE_CONTENT_TYPE
from tetherless_cli.contacts import NO_NAMES, directory, label, labelled, resolve_recipient
from tetherless_cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_REVOKED, EXIT_UNREACHABLE, UsageError
from tetherless_cli.home import load

DEFAULT_SYNC_TIMEOUT = 30.0
_E = TypeVar("_E")
REVOKED_LINE = "tetherless: error: device_revoked: this device was removed from its account"


# -- send -----------------------------------------------------------------------------------------------------


def message_id_text(message_uid: bytes) -> str:
    """THE printed form of a message id (docs/cli.md "Message ids"): the message's ``message_uid`` — the same for
    every recipient device, in the sender's and every recipient's history — as unpadded lowercase base32. ``send``
    prints it, ``sync --json`` and ``history --json`` show it as ``message_id``."""
    return base64.b32encode(message_uid).decode("ascii").rstrip("=").lower()


def read_message(text: str | None) -> str | bytes:
    """``--text``, else stdin: text when it is UTF-8 (one trailing newline dropped), else the bytes as they are."""
    if text is not None:
        return text
    data = sys.stdin.buffer.read()
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        return data  # not text: send the bytes as they are
    # `echo hi | tetherless send …` should send "hi", not "hi\n".
    return decoded[:-1] if decoded.endswith("\n") else decoded


async def cmd_send(args: argparse.Namespace) -> int:
    """``send ADDRESS [--text TEXT]``: print the message id (:func:`message_id_text`) once it is delivered."""
    try:
        if is_address(args.address):  # else a contact name, resolved in run_send
            Address.parse(args.address)
    except TetherlessError as exc:
        raise UsageError(f"not an address: {args.address!r} (expected device.account@relay)") from exc
    keystore, keys = load(args)
    args.relay_url = keys.relay_url
    if getattr(args, "file", None) is not None:
        from tetherless_cli.blobs import run_send_file  # here: a text `send` imports no media code

        return await run_send_file(args, keystore, keys)
    message = read_message(args.text)
    # Offline-first (docs/account-log.md §10): enqueue, then one flush attempt.
    return await run_send(keystore, keys, args.address, message)


async def run_send(keystore: Keystore, keys: DeviceKeys, address: str, message: str | bytes) -> int:
    """``send``: enqueue, then one flush attempt; prints the message id, or ``queued (…)`` when offline.

    Every outcome line names the message id (:func:`message_id_text`): the id alone on stdout once delivered,
    ``queued … (REASON; local id N, message id ID)`` while it waits, and the failure line on stderr.
    """
    store = open_store(keystore, keys)
    address = resolve_recipient(store, address)  # a contact name becomes its address
    contact = label(store, address)  # "alice (3kqx…@relay)", or None: shown next to the address
    if isinstance(message, str):
        body, content_type = message.encode("utf-8"), TEXT_CONTENT_TYPE
    else:
        body, content_type = message, BINARY_CONTENT_TYPE
    # Refused before anything is queued: empty, or larger than the relay's envelope limit (the error names it).
    entry = outbox.enqueue(store, address, content_type, body)
    return await deliver(keys, store, entry, contact)


async def deliver(keys: DeviceKeys, store: ClientStore, entry: OutboxEntry, contact: str | None) -> int:
    """``send``'s one flush attempt of the queued ``entry`` (to ``contact``, a label or None), and its outcome line:
    the message id alone on stdout once delivered, ``queued … (REASON; local id N, message id ID)`` while it waits,
    the failure line on stderr. Returns the exit status."""
    to = f" for {contact}" if contact else ""
    ids = f"local id {entry.local_id}, message id {message_id_text(entry.message_uid)}"  # `outbox` / `history`
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
            shown = outbox.view(current, store.now_ms())
            if shown.state is outbox.OutboxState.FAILED:  # it stays in `tetherless outbox` until cancelled
                print(f"tetherless: error: {shown.reason}{to} ({ids})", file=sys.stderr, flush=True)
                return EXIT_FAILURE
            if shown.state is not outbox.OutboxState.DELIVERED:  # e.g. no prekeys, or its relay is down: `sync` retries
                print(f"queued{to} ({shown.reason or 'sending'}; {ids})", flush=True)
                return EXIT_OK
            print(message_id_text(entry.message_uid), flush=True)
            if contact:  # stdout stays the message id alone; the name goes to stderr
                print(f"sent to {contact}", file=sys.stderr, flush=True)
            try:  # best effort: log it now when the account key is known; the engine does it otherwise
                with trio.move_on_after(5):
                    await engine.append_pending()
            except (RetryError, TetherlessError, TransportError):
                pass
    except TLSSetupError:
        raise  # not "offline": the relay URL or its CA is wrong, and waiting fixes nothing (the entry stays queued)
    except (RetryError, TransportError) as exc:
        print(f"queued{to} (offline; {ids})", flush=True)
        del exc
    except RevokedError:
        print(REVOKED_LINE, file=sys.stderr)
        return EXIT_REVOKED
    return EXIT_OK


# -- sync -----------------------------------------------------------------------------------------------------

#: How a sync engine's outcome becomes the exit status (the one place; the codes are tetherless_cli.exits').
SYNC_EXIT_CODES: dict[SyncOutcome, int] = {
    SyncOutcome.DONE: EXIT_OK,
    SyncOutcome.HOME_UNREACHABLE: EXIT_UNREACHABLE,
    SyncOutcome.REVOKED: EXIT_REVOKED,
}


def sync_exit_code(outcome: SyncOutcome) -> int:
    """The exit status of a command that ended with ``outcome`` (0, 3 or 4: docs/decisions/0010-cli-package.md)."""
    return SYNC_EXIT_CODES[outcome]


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def file_json(message: HistoryMessage) -> dict[str, Any] | None:
    """A file message's ``file`` object (``name``, ``size``, ``content_type``, and ``ref``: what ``blob get``
    takes, the message id — never the key), ``{"error": …}`` for a file message that does not decode, None for
    any other message."""
    if message.content_type != FILE_CONTENT_TYPE:
        return None
    from protocol.client.blobs import file_ref  # here: only a file message needs the media code

    ref = file_ref(message)
    if ref is None:
        return {"error": "malformed file message", "ref": None}
    return {
        "name": ref.name,
        "size": ref.size,
        "content_type": ref.content_type,
        "ref": message_id_text(message.message_uid),
    }


def _shown_body(message: HistoryMessage, text: str | None) -> str:
    """The plain form of a message's body: its text, a file's name and ``blob get`` reference, or its size."""
    if text is not None:
        return text
    file = file_json(message)
    if file is not None and file.get("ref"):
        return (
            f"<file {file['name']} ({file['size']} bytes, {file['content_type']}): tetherless blob get {file['ref']}>"
        )
    if file is not None:
        return "<a malformed file message>"
    return f"<{len(message.body)} bytes of {message.content_type}>"


def format_received(
    message: HistoryMessage,
    cursor: int | None,
    envelope_id: bytes | None,
    *,
    as_json: bool,
    names: Directory = NO_NAMES,
) -> str:
    """One line (plain) or one JSON object (``--json``) for a message ``sync`` received; ``names`` shows the
    sender's contact name (plain: ``alice (3kqx…@relay)``; JSON: ``from_contact``, null without one)."""
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
            "message_id": message_id_text(message.message_uid),
            "from_contact": names.name_of(message.sender),
        }
        file = file_json(message)
        if file is not None:
            record["file"] = file  # never the body: it holds the file's key
        elif text is None:
            record["body_base64"] = base64.b64encode(message.body).decode("ascii")
        return json.dumps(record, ensure_ascii=False)
    stamp = dt.datetime.fromtimestamp(message.sent_at_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"[{stamp}] {labelled(names, message.sender)}: {_shown_body(message, text)}"


async def cmd_sync(args: argparse.Namespace) -> int:
    """``sync [--follow] [--json] [--timeout S] [--status]``: run the sync engine (docs/account-log.md §11).

    Prints each newly received message once, after its local commit; inbox
    envelopes are acknowledged only once their messages are in the account log.
    Without ``--follow`` it exits 0 when quiescent, 3 when the relay stays
    unreachable past ``--timeout``, 4 when this device was revoked.
    """
    keystore, keys = load(args)
    args.relay_url = keys.relay_url
    return await run_sync(args, keystore, keys)


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
    from protocol.client.blobs import unfinished_uploads  # a `send --file` stopped mid-upload: finish it first

    if unfinished_uploads(store.db):
        from tetherless_cli.blobs import resume_pending

        await resume_pending(keys, store)
    out = sys.stdout
    names = directory(store)
    from tetherless_cli.progress import CatchUpProgress  # here: only `sync` draws it

    progress = CatchUpProgress(sys.stderr, start_position=store.cursor("log"))  # draws only at a terminal
    shares_terminal = progress.enabled and out.isatty()  # else the messages never cross the progress line

    def on_message(message: HistoryMessage, cursor: int | None, envelope_id: bytes | None) -> None:
        if shares_terminal:
            progress.clear()
        out.write(format_received(message, cursor, envelope_id, as_json=args.json, names=names) + "\n")
        out.flush()
        if progress.enabled:
            progress.update(store.cursor("log"), engine.log_head, message=True)

    show_status = bool(getattr(args, "status", False)) or sys.stderr.isatty()

    def on_status(status: Status) -> None:
        progress.clear()
        if not show_status:
            return
        line = json.dumps(status_json(status)) if args.json else format_status(status)
        print(line, file=sys.stderr, flush=True)

    engine = make_engine(keys, store, on_message=on_message, on_status=on_status)
    timeout = args.timeout if args.timeout is not None else DEFAULT_SYNC_TIMEOUT
    if not args.follow:
        outcome = await engine.run(follow=False, timeout=timeout)
        report_refusals(engine, as_json=args.json)
        if outcome is SyncOutcome.HOME_UNREACHABLE and engine.last_failure.startswith("log_"):
            # The relay answers, but the account log cannot be written safely (account-log.md §5.4).
            print(f"tetherless: error: {engine.last_failure} (gave up after {timeout:g} s)", file=sys.stderr)
        elif outcome is SyncOutcome.HOME_UNREACHABLE:
            print(
                f"tetherless: error: cannot reach the relay at {keys.relay_url} (gave up after {timeout:g} s)"
                + (f": {engine.last_failure}" if engine.last_failure else ""),
                file=sys.stderr,
                flush=True,
            )
        elif outcome is SyncOutcome.REVOKED:
            print(REVOKED_LINE, file=sys.stderr)
        return sync_exit_code(outcome)
    result = SyncOutcome.DONE
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
    report_refusals(engine, as_json=args.json)
    if result is SyncOutcome.REVOKED:
        print(REVOKED_LINE, file=sys.stderr)
    return sync_exit_code(result)


def report_refusals(engine: SyncEngine, *, as_json: bool = False) -> None:
    """One stderr line per record or message the engine refused or found missing (account-log.md §4.6, §18.1);
    with ``--json`` each is also a ``{"warning": CODE, "detail": LINE}`` line on stdout."""
    for line in engine.refusals:
        print(f"tetherless: warning: {line}", file=sys.stderr, flush=True)
    if as_json:
        for warning in engine.warnings:
            sys.stdout.write(json.dumps(warning) + "\n")
        sys.stdout.flush()


# -- history --------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now_ms: int) -> tuple[int, int]:
    """``--since WHEN`` → (position, ms): ``@position``, a duration (``2h``, ``7d``) or an ISO date/time.
    Raises ValueError for anything else."""
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


def history_json(message: HistoryMessage, names: Directory = NO_NAMES) -> dict[str, Any]:
    """One ``history --json`` line; ``sender_contact`` / ``recipient_contacts``: the contact names of ``names``
    (null where an address has none)."""
    record: dict[str, Any] = {
        "position": message.log_position,
        "direction": message.direction,
        "message_id": message_id_text(message.message_uid),
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
        "sender_contact": names.name_of(message.sender),
        "recipient_contacts": [names.name_of(r) for r in message.recipients],
    }
    file = file_json(message)
    if file is not None:
        record["file"] = file  # never the body: it holds the file's key
    elif message.text is None:
        record["body_b64"] = base64.b64encode(message.body).decode("ascii")
    return record


def gap_line(gap: Gap) -> str:
    """The plain ``history`` line for a stretch of the log retention removed (account-log.md §6.2)."""
    return (
        f"---- up to {gap.positions} older records removed by retention (log positions {gap.after + 1}-{gap.upto};"
        " no snapshot covers them) ----"
    )


def gap_json(gap: Gap) -> dict[str, Any]:
    return {"gap": "retention", "after": gap.after, "upto": gap.upto, "positions": gap.positions}


def _involves(message: HistoryMessage, peer: str) -> bool:
    """Whether ``peer`` (a device or an account address) sent or received ``message``."""
    return (
        peer in message.recipients
        or message.sender == peer
        or message.sender.endswith("." + peer)
        or any(r.endswith("." + peer) for r in message.recipients)
    )


def print_history(store: ClientStore, *, as_json: bool, since: str | None, peer: str | None, limit: int | None) -> None:
    """The local history in log order, with the retention gaps where they fall. ``limit``: only the newest ``limit``
    messages (after ``since`` and ``peer``), still oldest first, with only the gaps among them. Raises ValueError
    (``--since``), and :class:`UsageError` for a ``--with`` that is neither an address nor a contact name."""
    position, since_ms = parse_since(since, store.now_ms()) if since else (0, 0)
    names = directory(store)
    peer = resolve_recipient(store, peer) if peer else peer
    # The peer is sealed in each row, so the store tests it on opened rows (newest first when limited): the filter
    # runs before the limit, and no older row is opened once the newest `limit` are found.
    involves: Callable[[HistoryMessage], bool] | None = (lambda m: _involves(m, peer)) if peer else None
    selected = store.history(since_position=position, since_ms=since_ms, newest=limit, where=involves)
    if limit is not None and selected and selected[0].log_position is not None:
        position = max(position, selected[0].log_position)  # gaps older than the window are not shown
    pending_gaps = [g for g in gaps(store) if g.upto > position]

    def emit_gaps(before: int | None) -> None:
        while pending_gaps and (before is None or pending_gaps[0].upto < before):
            gap = pending_gaps.pop(0)
            print(json.dumps(gap_json(gap)) if as_json else gap_line(gap))

    for message in selected:
        emit_gaps(message.log_position)
        if as_json:
            print(json.dumps(history_json(message, names), ensure_ascii=False))
            continue
        stamp = dt.datetime.fromtimestamp(message.sent_at_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        shown = _shown_body(message, message.text)
        if message.direction == "sent":
            print(f"{stamp}  → {', '.join(labelled(names, r) for r in message.recipients):<40} {shown}")
        else:
            print(f"{stamp}  ← {labelled(names, message.sender):<40} {shown}")
    emit_gaps(None)
    sys.stdout.flush()


async def cmd_history(args: argparse.Namespace) -> int:
    """``history [--json] [--since WHEN] [--with ADDRESS] [--limit N]``: the local store only."""
    keystore, keys = load(args)
    try:
        print_history(open_store(keystore, keys), as_json=args.json, since=args.since, peer=args.peer, limit=args.limit)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return EXIT_OK


# -- outbox ---------------------------------------------------------------------------------------------------


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def outbox_json(entry: outbox.OutboxView, names: Directory = NO_NAMES) -> dict[str, Any]:
    """One ``outbox --json`` object (docs/account-log.md §13); ``contact``: the recipient's contact name."""
    return {
        "local_id": entry.local_id,
        "recipient": entry.recipient,
        "contact": names.name_of(entry.recipient),
        "state": entry.state.value,
        "stored_state": entry.stored_state,
        "reason_code": entry.reason_code or None,
        "reason": entry.reason or None,
        "destination": entry.destination or None,
        "next_attempt": _iso(entry.next_attempt_at_ms) if entry.next_attempt_at_ms else None,
        "attempts": entry.attempts,
        "created": _iso(entry.created_at_ms),
        "last_error": entry.reason,  # the name of the first client's field
    }


def _reason_column(entry: outbox.OutboxView) -> str:
    reason = entry.reason or "-"
    if entry.destination and entry.destination not in reason:
        reason = f"{entry.destination} unreachable: {reason}"
    if entry.next_attempt_at_ms:
        reason += f" (next attempt {_when(entry.next_attempt_at_ms)} UTC)"
    return reason


def print_outbox(store: ClientStore, *, as_json: bool) -> None:
    """Every outbox entry not yet logged: headed columns, or one JSON object per line; nothing when empty."""
    entries = outbox.outbox_view(store)
    names = directory(store)
    if as_json:
        for entry in entries:
            print(json.dumps(outbox_json(entry, names), ensure_ascii=False))
    elif entries:
        header = ("ID", "TO", "STATE", "REASON / NEXT ATTEMPT", "CREATED (UTC)")
        rows = [
            (str(e.local_id), labelled(names, e.recipient), e.state.value, _reason_column(e), _when(e.created_at_ms))
            for e in entries
        ]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
        for row in (header, *rows):
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    sys.stdout.flush()


async def cmd_outbox(args: argparse.Namespace) -> int:
    """``outbox [--json]``: every entry not yet logged (exit 0, also when empty)."""
    keystore, keys = load(args)
    print_outbox(open_store(keystore, keys), as_json=args.json)
    return EXIT_OK


async def cmd_outbox_retry(args: argparse.Namespace) -> int:
    """``outbox retry ID``: a failed or waiting entry is sent again at the next ``sync`` (exit 1: no such entry)."""
    return await _change_outbox(
        args, outbox.retry, lambda e: f"{e.state.value}: local id {e.local_id} (`tetherless sync` sends it)"
    )


async def cmd_outbox_cancel(args: argparse.Namespace) -> int:
    """``outbox cancel ID``: remove an entry the relay has not accepted (exit 1: no such entry, or already sent)."""
    return await _change_outbox(args, outbox.cancel, lambda e: f"cancelled: local id {e.local_id} to {e.recipient}")


async def _change_outbox(
    args: argparse.Namespace, change: Callable[[ClientStore, int], _E], done: Callable[[_E], str]
) -> int:
    keystore, keys = load(args)
    entry = change(open_store(keystore, keys), args.local_id)  # OutboxError: main.report's one line, exit 1
    print(done(entry), flush=True)
    return EXIT_OK


__all__ = [
    "DEFAULT_SYNC_TIMEOUT",
    "SYNC_EXIT_CODES",
    "cmd_history",
    "cmd_outbox",
    "cmd_outbox_cancel",
    "cmd_outbox_retry",
    "cmd_send",
    "cmd_sync",
    "deliver",
    "file_json",
    "format_received",
    "message_id_text",
    "outbox_json",
    "parse_since",
    "print_history",
    "print_outbox",
    "report_refusals",
    "run_send",
    "run_sync",
    "sync_exit_code",
]
