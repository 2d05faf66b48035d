"""What every part of the sync engine shares (docs/decisions/0011-sync-engine-parts.md): the engine's exceptions,
:func:`guarded` (relay errors as the engine retries them), :class:`Report` (what a run warns about), and the
:class:`Relay` port, the relay calls the parts make (the coordinator implements it over the current connection)."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

import msgspec

from ... import device_list
from ...errors import ErrorCode, RemoteError, TetherlessError, UnknownRemoteError
from ...messages import (
    AppendRequest,
    AppendResponse,
    DeviceEntry,
    LogPage,
    LogRecord,
    LogRetention,
    OutboundEnvelope,
    SendResponse,
    WellKnown,
)
from ..chains import DeviceRevokedError
from ..http import TransportError
from ..keystore import DeviceKeys
from ..outbox import describe
from ..sdk import InboxBatch, Outgoing, Recipients, SealedEnvelope, Sent
from ..sessions import SessionManager
from ..store import ClientStore, HistoryMessage

logger = logging.getLogger("protocol.client.sync")

T = TypeVar("T")

#: Called after the commit for each newly stored received message: (message, inbox cursor, envelope id).
OnMessage = Callable[[HistoryMessage, int | None, bytes | None], None]


class RevokedError(Exception):
    """403 ``device_revoked``: stop syncing for good."""


class RetryError(Exception):
    """A failure that a reconnect may fix (transport, 5xx, 429); ``retry_after`` is a floor in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class LogRekeyError(RetryError):
    """``log_rekey_required`` (client side, account-log.md §5.4): the newest epoch may not be written under
    (a removed device holds it, or it is due for rotation) and the relay did not accept the new epoch's key
    record. Nothing is appended; the outbox and pending records stay; the engine retries after a backoff."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"log_rekey_required: {reason}")


async def guarded(awaitable: Awaitable[T]) -> T:
    """Await a relay call, turning every ``retryable`` error (docs/cli.md "Errors": transport errors, 5xx, 429,
    ``unavailable``) into :class:`RetryError` and ``device_revoked`` into :class:`RevokedError`; the rest stays as
    it is — a TLS set-up error among them (retrying does not fix a wrong URL scheme or an untrusted certificate).
    Idempotent over its own results (a :class:`RetryError` passes through unchanged); cancellation propagates."""
    try:
        return await awaitable
    except TransportError as exc:
        if not exc.retryable:
            raise
        raise RetryError(str(exc) or type(exc).__name__) from exc
    except RemoteError as exc:
        if exc.code is ErrorCode.DEVICE_REVOKED:
            raise RevokedError() from exc
        if exc.retryable:
            raise RetryError(exc.code.value, exc.retry_after_seconds) from exc
        raise
    except DeviceRevokedError as exc:  # our own verified device list no longer has this device
        raise RevokedError() from exc
    except UnknownRemoteError as exc:
        if exc.retryable:
            raise RetryError(f"HTTP {exc.http_status}") from exc
        raise


async def raise_guarded(exc: BaseException) -> None:
    """Raise ``exc`` as :func:`guarded` would have turned it (for errors caught to be classified first)."""

    async def again() -> None:
        raise exc

    await guarded(again())


class Report:
    """What one engine run refused or warns about, for the command line (stderr, ``sync --json``).

    ``refusals``: one line per record refused (account-log.md §4.6, §5.4) or epoch without a key (§5.5);
    ``warnings``: the same, structured (``{"warning": code, "detail": line}``, §18.1); ``rejected``: how many
    records, envelopes and session messages were refused."""

    def __init__(self) -> None:
        self.refusals: list[str] = []
        self.warnings: list[dict[str, str]] = []
        self.rejected = 0

    def warn(self, code: str, line: str) -> None:
        """Report ``line`` once per run (stderr, and ``sync --json``) under the stable ``code`` (§18.1)."""
        if line in self.refusals:
            return
        logger.warning("%s", line)
        self.refusals.append(line)
        self.warnings.append({"warning": code, "detail": line})

    def refuse(self, record: LogRecord, exc: TetherlessError) -> None:
        """A record this client will not trust (§5.4, §4.6): skipped, counted and reported, never applied."""
        line = f"refused log record at position {record.position} (epoch {record.epoch}): {describe(exc)}"
        self.rejected += 1
        self.warn(exc.code.value, line)


class Relay(Protocol):
    """The relay calls the engine's parts make, over the coordinator's current connection to the home relay.

    Each method raises what the SDK raises for that call (``RemoteError``, ``UnknownRemoteError``,
    ``TransportError``, ``DeviceRevokedError``, ``TetherlessError`` for a list that does not verify); the parts
    wrap the calls whose failures end the step in :func:`guarded`. The ``log_*`` and ``retention`` calls are
    guarded already (by the coordinator's ``_Relay``). Reads are idempotent; ``log_append`` and
    ``send_envelopes`` are idempotent per record id / idempotency key. Cancellation aborts the request."""

    @property
    def connection(self) -> object | None:
        """The current connection, compared by identity only (a new one: what was checked once per connection is
        checked again); None while not connected."""

    @property
    def sessions(self) -> SessionManager | None: ...

    async def log_page(self, after: int, limit: int) -> LogPage: ...

    async def log_append(self, request: AppendRequest) -> AppendResponse: ...

    async def snapshot_page(self, snapshot_id: bytes, after: int, limit: int) -> LogPage: ...

    async def retention(self) -> LogRetention: ...

    async def set_retention(self, policy: LogRetention) -> LogRetention: ...

    async def device_chain(self, account_id: str) -> device_list.VerifiedChain: ...

    async def list_at(self, account_id: str, version: int) -> list[DeviceEntry] | None: ...

    async def recovery_backup_hash_at(self, account_id: str, version: int) -> bytes | None: ...

    async def inbox_page(self, after: int) -> InboxBatch: ...

    async def ack(self, up_to: int) -> Any: ...

    async def well_known(self) -> WellKnown: ...

    async def resolve_recipients(self, recipient: str) -> Recipients:
        """:meth:`RelayClient.resolve_recipients` without fan-out (the engine logs what it sends: this account's
        other devices read it from the log); the result may be empty."""

    def seal_envelopes(
        self,
        recipients: Recipients,
        *,
        message_id: Callable[[str], bytes],
        sent_at_ms: int,
        content_type: str,
        body: bytes,
    ) -> list[SealedEnvelope]:
        """:meth:`RelayClient.seal_envelopes`: local only; v2 advances the ratchets (call it inside the
        transaction that stores the result)."""

    async def send_envelopes(self, envelopes: list[OutboundEnvelope]) -> SendResponse: ...

    async def send_many(self, messages: Iterable[Outgoing]) -> list[Sent]: ...


class Context(msgspec.Struct, frozen=True):
    """What every part is built with: this device's keys and store, the relay port, the run's :class:`Report`, and
    the randomness and clock the engine was given (tests inject them)."""

    keys: DeviceKeys
    store: ClientStore
    relay: Relay
    report: Report
    random_bytes: Callable[[int], bytes] = os.urandom
    wall_clock: Callable[[], float] = time.time
    rng: random.Random = msgspec.field(default_factory=random.Random)


class Part:
    """A part of the engine: it keeps the :class:`Context` it was built with; what else it uses it is given as
    constructor arguments (docs/decisions/0011-sync-engine-parts.md)."""

    def __init__(self, ctx: Context) -> None:
        self._keys = ctx.keys
        self._store = ctx.store
        self._relay = ctx.relay
        self._report = ctx.report
        self._random_bytes = ctx.random_bytes
        self._wall_clock = ctx.wall_clock
        self._rng = ctx.rng


__all__ = [
    "Context",
    "LogRekeyError",
    "OnMessage",
    "Part",
    "Relay",
    "Report",
    "RetryError",
    "RevokedError",
    "guarded",
    "raise_guarded",
]
