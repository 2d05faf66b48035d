"""Operator commands for federation: ``admin federation`` (peer state, retry now) and ``admin relay-key rotate``."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import trio

from relay.relay_keys import rotate
from relay.store import PeerState, PostgresStore, SQLiteStore, Store
from tetherless_cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

DAY_MS = 86_400_000


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _open(args: argparse.Namespace) -> Store:
    if args.database:
        return await PostgresStore.open(args.database)
    path = Path(args.data)
    if not (path / "relay.sqlite3").exists():
        raise SystemExit(f"tetherless: error: no relay database in {path}")
    return await SQLiteStore.open(path)


def format_peers(states: list[PeerState], now_ms: int) -> str:
    """The ``admin federation`` table (``failed``: envelopes that failed for good, kept until they expire or
    ``admin federation retry``; the last error says why)."""
    header = (
        f"{'peer':<32} {'queued':>7} {'failed':>6} {'delivered':>9} {'failures':>8}  {'next attempt':<20}"
        f" {'last success':<20} last error"
    )
    lines = [header]
    for s in states:
        next_attempt = "now" if s.next_attempt_at_ms <= now_ms else _when(s.next_attempt_at_ms)
        lines.append(
            f"{s.peer:<32} {s.queued:>7} {s.failed:>6} {s.delivered:>9} {s.failures:>8}  {next_attempt:<20}"
            f" {_when(s.last_success_at_ms):<20} {s.last_error or '-'}"
        )
    return "\n".join(lines)


def cmd_federation(args: argparse.Namespace) -> int:
    async def main() -> int:
        store = await _open(args)
        try:
            if args.action == "retry":
                count = await store.federation_retry_now(args.peer.lower() if args.peer else None)
                print(f"retrying {count} peer(s) now (a running relay picks this up within its poll interval)")
                return EXIT_OK
            states = await store.federation_peer_states()
            print(format_peers(states, int(time.time() * 1000)) if states else "no federation peers yet")
            return EXIT_OK
        finally:
            await store.close()

    from relay.store import StoreUnavailableError
    from relay.store.base import StartupRefusedError

    try:
        return trio.run(main)
    except StartupRefusedError as exc:  # another relay's database, or a schema newer than this code
        print(f"tetherless: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailableError as exc:
        print(f"tetherless: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def cmd_relay_key_rotate(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if not data.exists():
        print(f"tetherless: error: no data directory {data}")
        return EXIT_FAILURE
    retired, new = rotate(data, overlap_ms=int(args.overlap_days * DAY_MS), now_ms=int(time.time() * 1000))
    print(
        f"new relay key {new.key_id}; {retired.key_id} stays valid for verification"
        f" until {_when(retired.valid_until_ms)}"
    )
    print("restart the relay to sign with the new key")
    print(
        "with several replicas (PostgreSQL): put the new key file into the Secret every replica mounts"
        " and restart them all; a replica with other keys refuses to start"
    )
    return EXIT_OK
