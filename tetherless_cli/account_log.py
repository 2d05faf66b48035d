"""``tetherless log snapshot|retention``: the account log's snapshots and retention (account-log.md §6)."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from protocol import log
from protocol.client.home import make_engine, open_store
from protocol.client.http import TLSSetupError, TransportError
from protocol.client.keystore import DeviceKeys, Keystore
from protocol.client.snapshots import SnapshotError, SnapshotWritten, retention, set_retention, write_snapshot
from protocol.client.sync import RetryError, RevokedError, SyncEngine
from protocol.messages import LogRetention
from tetherless_cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_REVOKED, EXIT_UNREACHABLE, UsageError
from tetherless_cli.home import load
from tetherless_cli.messages import REVOKED_LINE


async def run_log_command(
    keystore: Keystore, keys: DeviceKeys, action: Callable[[SyncEngine], Awaitable[int]], *, drain: bool
) -> int:
    """Connect an engine for one command (after a drain when ``drain``), run ``action``; exit 3 when the relay
    stays unreachable, 4 when this device was revoked, 2 (main.report) when its TLS does not match the URL or CA."""
    store = open_store(keystore, keys)
    engine = make_engine(keys, store)
    try:
        async with engine.connected(drain=drain):
            return await action(engine)
    except TLSSetupError:
        raise  # not "unreachable": the URL or the trusted CA is wrong, and retrying fixes nothing
    except (RetryError, TransportError) as exc:
        print(f"tetherless: error: cannot reach the relay at {keys.relay_url} ({exc})", file=sys.stderr, flush=True)
        return EXIT_UNREACHABLE
    except RevokedError:
        print(REVOKED_LINE, file=sys.stderr)
        return EXIT_REVOKED
    except SnapshotError as exc:
        print(f"tetherless: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    finally:
        store.db.close()


async def cmd_log_snapshot(args: argparse.Namespace) -> int:
    """``log snapshot [--json]``: sync to the head, then write (or finish) a snapshot at the cursor (§6.1)."""
    keystore, keys = load(args)
    if args.part_bytes is not None and not 1 <= args.part_bytes <= log.SNAPSHOT_PART_BYTES:
        raise UsageError(f"--part-bytes must be between 1 and {log.SNAPSHOT_PART_BYTES}")
    part_bytes = args.part_bytes or log.SNAPSHOT_PART_BYTES

    async def action(engine: SyncEngine) -> int:
        written = await write_snapshot(engine, part_bytes=part_bytes)
        print(json.dumps(snapshot_json(written)) if args.json else describe_snapshot(written), flush=True)
        return EXIT_OK

    return await run_log_command(keystore, keys, action, drain=True)


async def cmd_log_retention(args: argparse.Namespace) -> int:
    """``log retention [forever|DAYS] [--json]``: print, or set and print, the account log's retention (§6.2)."""
    value: str | None = args.value
    days: int | None = None
    if value is not None:
        try:
            days = parse_retention(value)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    keystore, keys = load(args)

    async def action(engine: SyncEngine) -> int:
        policy = await (retention(engine) if value is None else set_retention(engine, days))
        if args.json:
            print(json.dumps(retention_json(policy)), flush=True)
        else:
            text = describe_retention(policy)
            print(text if value is None else text.replace("retention:", "retention set to", 1), flush=True)
        return EXIT_OK

    return await run_log_command(keystore, keys, action, drain=False)


def parse_retention(value: str) -> int | None:
    """``forever`` → None, ``DAYS`` (a positive integer, ``30`` or ``30d``) → days; raises ValueError."""
    text = value.strip().lower()
    if text == "forever":
        return None
    if text.endswith("d"):
        text = text[:-1]
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"retention: expected `forever` or a number of days (1 or more), not {value!r}")
    return int(text)


def describe_retention(policy: LogRetention) -> str:
    if policy.mode == "forever":
        what = "forever (the relay deletes nothing but superseded snapshots)"
    else:
        days = f"{policy.days} day" + ("" if policy.days == 1 else "s")
        what = (
            f"{days} (the relay deletes records committed more than {days} ago,"
            " except the newest snapshot and key records)"
        )
    changed = ""
    if policy.updated_at_ms:
        stamp = dt.datetime.fromtimestamp(policy.updated_at_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        changed = f"; last changed {stamp} UTC"
    return f"retention: {what}; horizon: log position {policy.horizon}{changed}"


def retention_json(policy: LogRetention) -> dict[str, Any]:
    return {"mode": policy.mode, "days": policy.days, "horizon": policy.horizon, "updated_at_ms": policy.updated_at_ms}


def snapshot_json(written: SnapshotWritten) -> dict[str, Any]:
    return {
        "snapshot_id": written.snapshot_id.hex(),
        "covers": written.covers,
        "parts": written.parts,
        "messages": written.messages,
        "position": written.position,
        "duplicate": written.duplicate,
    }


def describe_snapshot(written: SnapshotWritten) -> str:
    again = " (already stored)" if written.duplicate else ""
    return (
        f"snapshot {base64.b32encode(written.snapshot_id).decode().rstrip('=').lower()} covers log positions"
        f" 1-{written.covers}: {written.messages} messages in {written.parts} parts, manifest at position"
        f" {written.position}{again}"
    )


__all__ = ["cmd_log_retention", "cmd_log_snapshot", "parse_retention"]
