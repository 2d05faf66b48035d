"""What ``tetherless doctor`` checks, as data: read-only probes of the relay and the home, and the verdicts.

The command line (:mod:`tetherless_cli.doctor`) prints; this module decides. The verdicts are pure functions of
what was read (:func:`skew_verdict`, :func:`prekey_verdict`, :func:`outbox_verdict`), unit-tested without
processes; the probes read and never write (no prekey upload, no token kept, no outbox change):

- :func:`probe_relay` — ``GET /.well-known/tetherless`` (:meth:`RelayClient.probe`): reachable, TLS trusted, and
  the relay's clock (its ``Date`` header) against ours;
- :meth:`RelayClient.prekey_counts <protocol.client.sdk.RelayClient.prekey_counts>` — ``GET /v1/prekeys``, no
  upload (one-time prekeys left on the relay);
- :func:`quick_check` — ``PRAGMA quick_check`` of ``state.db`` (no key needed: it checks pages, not contents).

Why the clock matters (:data:`SKEW_WARN_SECONDS`, :data:`SKEW_FAIL_SECONDS`): the relay's auth challenges and
session tokens expire by the relay's clock (a device minutes off renews a token the relay already considers
expired, or is refused), signed prekeys are rotated by age (docs/crypto.md §7.2), and the times this device
signs into messages and log records (sent_at, ``created_at_ms``) are what other devices order and rotate by.

Every request goes through :class:`~protocol.client.sdk.RelayClient` (route paths, errors and retries in one place).
"""

from __future__ import annotations

import email.utils
import enum
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from ..messages import PrekeyCounts, WellKnown
from .outbox import OutboxState, OutboxView
from .sdk import RelayClient

#: Clock skew against the relay that is worth a warning, and that breaks things (module doc).
SKEW_WARN_SECONDS: Final = 30.0
SKEW_FAIL_SECONDS: Final = 300.0
#: Below this many one-time prekeys of a kind, ``sync`` uploads more (protocol.client.sessions.LOW_WATER).
PREKEY_LOW_WATER: Final = 25


class Level(enum.StrEnum):
    """One check's outcome. ``skip``: not checked, because an earlier check failed or keys were not unlocked."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A check's level, what was found (``detail``) and what to do (``hint``, empty when nothing)."""

    level: Level
    detail: str
    hint: str = ""


@dataclass(frozen=True, slots=True)
class RelayProbe:
    """What ``GET /.well-known/tetherless`` told: the relay's document, and its clock minus ours (seconds;
    None when it sent no usable ``Date``). ``skew_seconds`` is measured against the middle of the request."""

    well_known: WellKnown
    skew_seconds: float | None


def server_skew_seconds(date_header: str | None, local_seconds: float) -> float | None:
    """The relay's clock minus ours from an HTTP ``Date`` (one-second resolution), or None when it is missing
    or unparsable. Pure."""
    if not date_header:
        return None
    try:
        when = email.utils.parsedate_to_datetime(date_header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp() - local_seconds


async def probe_relay(
    relay_url: str,
    *,
    ca_file: str | None = None,
    timeout_seconds: float = 10.0,
    wall_clock: Callable[[], float] = time.time,
) -> RelayProbe:
    """One connection and one unauthenticated, unretried ``GET /.well-known/tetherless``
    (:meth:`RelayClient.probe`), all within ``timeout_seconds``. Read-only; idempotent.

    Raises :class:`~protocol.client.http.ConnectError` — its subclasses
    :class:`~protocol.client.http.TLSTrustError` (certificate not trusted), ``NotTLSError`` (https to a plain
    port), ``TLSRequiredError`` (http to a TLS port) — and other ``TransportError``\\ s, ``RemoteError`` /
    ``UnknownRemoteError`` for an error answer, ``msgspec.ValidationError`` for a document that is not a relay's,
    ``trio.TooSlowError`` past ``timeout_seconds``. Cancellation closes the connection.
    """
    with trio.fail_after(timeout_seconds):
        async with RelayClient.connect(
            relay_url, ca_file=ca_file, max_attempts=1, request_timeout_seconds=timeout_seconds, wall_clock=wall_clock
        ) as client:
            answer = await client.probe()
    return RelayProbe(answer.well_known, server_skew_seconds(answer.date, answer.local_seconds))


def quick_check(db_path: Path) -> list[str]:
    """``PRAGMA quick_check`` of ``db_path``: ``["ok"]`` for a sound file, else SQLite's problem lines (at most
    10). Opens the file without creating it (``mode=rw``: SQLite needs write access to a WAL file's index even to
    read), changes nothing. Raises ``sqlite3.Error`` when the file cannot be opened or is not a database."""
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=rw", uri=True, timeout=5)
    try:
        return [str(row[0]) for row in conn.execute("PRAGMA quick_check(10)").fetchall()]
    finally:
        conn.close()


# -- verdicts (pure) ----------------------------------------------------------------------------------------


def skew_verdict(skew_seconds: float | None) -> Verdict:
    """Clock skew against the relay: ok up to :data:`SKEW_WARN_SECONDS`, fail beyond :data:`SKEW_FAIL_SECONDS`."""
    if skew_seconds is None:
        return Verdict(Level.WARN, "the relay sent no Date header: clock not compared")
    size = abs(skew_seconds)
    way = "behind" if skew_seconds > 0 else "ahead of"
    detail = f"this clock is {size:.0f} s {way} the relay's" if size >= 1 else "within 1 s of the relay's"
    if size > SKEW_FAIL_SECONDS:
        return Verdict(
            Level.FAIL,
            detail,
            "set this machine's clock (enable NTP): tokens and auth challenges expire by the relay's clock, and "
            "prekeys and signed message times are dated by this one",
        )
    if size > SKEW_WARN_SECONDS:
        return Verdict(Level.WARN, detail, "enable NTP: beyond 5 minutes authentication starts failing")
    return Verdict(Level.OK, detail)


def prekey_verdict(counts: PrekeyCounts) -> Verdict:
    """Prekeys on the relay: fail without a signed prekey (nobody can start a session with this device), warn
    below the top-up mark or with no one-time keys left (sessions then use the last-resort key)."""
    detail = f"{counts.x25519_one_time} X25519 and {counts.mlkem_one_time} ML-KEM one-time prekeys on the relay"
    if counts.signed_prekey_id is None:
        return Verdict(
            Level.FAIL,
            "no signed prekey on the relay: others cannot start a session with this device",
            "run `tetherless sync` (it publishes them)",
        )
    low = min(counts.x25519_one_time, counts.mlkem_one_time)
    if low == 0:
        return Verdict(
            Level.WARN,
            detail + " (new sessions fall back to the last-resort key)",
            "run `tetherless sync` (it uploads more)",
        )
    if low < PREKEY_LOW_WATER:
        return Verdict(Level.WARN, detail, "run `tetherless sync` (it uploads more)")
    return Verdict(Level.OK, detail)


def outbox_verdict(entries: list[OutboxView]) -> Verdict:
    """The outbox: warn for failed or retrying entries (each waits for a person or a relay, nothing else is
    held up by them: account-log.md §10), ok otherwise."""
    failed = sum(1 for e in entries if e.state is OutboxState.FAILED)
    retrying = sum(1 for e in entries if e.state is OutboxState.RETRYING)
    waiting = len(entries) - failed - retrying
    detail = f"{len(entries)} entries: {failed} failed, {retrying} retrying, {waiting} queued or sending"
    if not entries:
        return Verdict(Level.OK, "empty")
    if failed:
        return Verdict(
            Level.WARN, detail, "see `tetherless outbox`; `outbox retry ID` or `outbox cancel ID` each failed one"
        )
    if retrying:
        destinations = sorted({e.destination for e in entries if e.state is OutboxState.RETRYING and e.destination})
        where = f" (unreachable: {', '.join(destinations)})" if destinations else ""
        return Verdict(Level.WARN, detail + where, "`tetherless sync` retries them; `tetherless outbox` says why")
    return Verdict(Level.OK, detail, "" if not waiting else "`tetherless sync` sends them")


__all__ = [
    "PREKEY_LOW_WATER",
    "SKEW_FAIL_SECONDS",
    "SKEW_WARN_SECONDS",
    "Level",
    "RelayProbe",
    "Verdict",
    "outbox_verdict",
    "prekey_verdict",
    "probe_relay",
    "quick_check",
    "server_skew_seconds",
    "skew_verdict",
]
