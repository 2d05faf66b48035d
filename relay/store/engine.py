"""What differs between SQLite and PostgreSQL, in one place (the topic modules in ``sql/`` are written once over it).

The SQL in ``relay/store/sql/`` is written with ``?`` placeholders and the
syntax both engines share (``INSERT … ON CONFLICT … DO NOTHING / DO UPDATE``
upserts, ``DELETE … RETURNING``, which SQLite has since 3.35). An
:class:`Engine` supplies the rest:

- parameter style (:meth:`Engine.q`);
- row locking (:attr:`Engine.lock_rows`): PostgreSQL serialises concurrent
  writers of one row with ``FOR UPDATE``; SQLite needs nothing, its single
  writer thread already runs one write at a time;
- sets of values (:meth:`Engine.chunks`, :meth:`Engine.one_of`): one
  ``= ANY(array)`` parameter on PostgreSQL, ``IN (?, …)`` lists of at most
  500 on SQLite (its bound-parameter limit);
- bulk writes (:meth:`Engine.insert_many`, :meth:`Engine.update_many`): the
  hot path of a send. SQLite's fastest is ``executemany`` (one prepared
  statement); PostgreSQL's is one statement over ``unnest`` of arrays (one
  round trip, where ``executemany`` costs one per row);
- inbox cursors (:attr:`Engine.inbox_counter`): SQLite's
  ``AUTOINCREMENT`` ``seq`` is in commit order because one thread writes;
  PostgreSQL takes cursors from ``devices.last_seq`` under the row lock
  (docs/decisions/0003-postgres-cursors.md);
- wake-ups and revocation notices (:meth:`Engine.notify`): ``pg_notify``
  inside the transaction, delivered to every replica on commit; SQLite has
  one process, which wakes its own streams and clears its own session cache,
  so nothing is sent;
- the range of values a column can hold (:meth:`Engine.storable`);
- a new device's number (:attr:`Engine.next_device_no`, migration 0008):
  PostgreSQL's identity column; SQLite, whose ``devices`` table has no
  rowid, takes the next one under its single writer;
- finding expired envelopes (:attr:`Engine.expiry_buckets`, migration 0009):
  SQLite's cursors are one append-ordered sequence, so a small table of
  (expiry hour → first and last cursor) replaces an index on the expiry
  time; PostgreSQL's cursors are per device and keep the index;
- an envelope's content digest in SQL (:attr:`Engine.content_digest`,
  :func:`relay.store.inbox_rules.content_digest`): PostgreSQL's ``sha256``;
  SQLite calls the Python function its connections register.

Engines hold no connection and import no driver: a connection is anything
with the DB-API ``execute`` / ``cursor().executemany`` both drivers provide.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final

INBOX_CHANNEL: Final = "tetherless_inbox"
LOG_CHANNEL: Final = "tetherless_log"
# Payload: a device id whose sessions a committed transaction revoked
# (docs/decisions/0013-revocation-across-replicas.md).
REVOCATION_CHANNEL: Final = "tetherless_revocations"
MAX_I64: Final = 2**63 - 1
_CHUNK = 500  # SQLite's bound-parameter limit is 999 on old builds; 500 leaves room for the other parameters


def clamp(value: int) -> int:
    """A value beyond the 64-bit integer range behaves like its ends (absurd input never reaches a driver error)."""
    return max(-MAX_I64, min(value, MAX_I64))


class RetryTransaction(Exception):  # noqa: N818 (a signal to the backend, not an error a caller sees)
    """Raised inside a write when a concurrent transaction won a race the SQL detected (e.g. an
    ``ON CONFLICT DO NOTHING`` that inserted fewer rows than the plan expected).

    The backend rolls the transaction back and runs it again; the retry reads
    the winner's committed rows. Only PostgreSQL can raise it (SQLite has one
    writer); a backend that gives up raises :class:`~relay.store.base.StoreUnavailableError`.
    """


class Engine:
    """The differences between database engines; see the module docstring. Two instances: SQLITE, POSTGRES."""

    name: str = ""
    lock_rows: str = ""  # appended to a SELECT that must hold its rows until commit
    inbox_counter: str | None = None  # the devices column cursors are taken from, or None: the engine assigns seq
    greatest: str = "max"  # two-argument maximum
    # The value of devices.device_no in an INSERT (the inbox's integer key for a device).
    next_device_no: str = "(SELECT coalesce(max(device_no), 0) + 1 FROM devices)"
    # Whether expired envelopes are found through inbox_expiry_buckets (else through the inbox_expiry index).
    expiry_buckets: bool = False
    # SQL for relay.store.inbox_rules.content_digest of the column ``ciphertext``.
    content_digest: str = "tetherless_content_digest(ciphertext)"

    def q(self, sql: str) -> str:
        """``sql`` with the engine's placeholders (written with ``?``)."""
        return sql

    def chunks(self, values: Sequence[Any]) -> Iterator[list[Any]]:
        """``values`` in as few slices as the engine allows one :meth:`one_of` to take (none for no values)."""
        for start in range(0, len(values), _CHUNK):
            yield list(values[start : start + _CHUNK])

    def one_of(self, column: str, values: Sequence[Any], sql_type: str) -> tuple[str, tuple[Any, ...]]:
        """A condition "``column`` is one of ``values``" (one slice of :meth:`chunks`) and its parameters."""
        return f"{column} IN ({','.join('?' * len(values))})", tuple(values)

    def fetch_in(
        self, conn: Any, sql: str, params: Sequence[Any], column: str, values: Sequence[Any], sql_type: str
    ) -> list[Any]:
        """The rows of ``sql`` (written with ``?``; ``{one_of}`` marks where "``column`` is one of ``values``"
        goes, after every other parameter) over every slice of ``values``: none for no values."""
        rows: list[Any] = []
        for chunk in self.chunks(values):
            condition, extra = self.one_of(column, chunk, sql_type)
            rows.extend(conn.execute(self.q(sql.format(one_of=condition)), (*params, *extra)).fetchall())
        return rows

    def execute_in(
        self, conn: Any, sql: str, params: Sequence[Any], column: str, values: Sequence[Any], sql_type: str
    ) -> int:
        """Like :meth:`fetch_in` for a write; returns the rows it changed."""
        changed = 0
        for chunk in self.chunks(values):
            condition, extra = self.one_of(column, chunk, sql_type)
            changed += conn.execute(self.q(sql.format(one_of=condition)), (*params, *extra)).rowcount
        return changed

    def insert_many(
        self,
        conn: Any,
        table: str,
        columns: Sequence[tuple[str, str]],
        rows: Sequence[Sequence[Any]],
        *,
        on_conflict: str = "",
    ) -> int:
        """Insert ``rows`` (values in ``columns`` order; each column is (name, SQL type)) in list order.

        ``on_conflict``: e.g. ``"ON CONFLICT DO NOTHING"``. Returns the rows
        inserted. Rows take AUTOINCREMENT / serial values in list order.
        """
        if not rows:
            return 0
        head = f"INSERT INTO {table} ({', '.join(name for name, _ in columns)})"
        return self._insert_rows(conn, head, [sql_type for _, sql_type in columns], rows, on_conflict)

    def insert_new(
        self, conn: Any, table: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]], *, race: str
    ) -> None:
        """Insert rows the caller read to be absent (primary keys not stored), or raise :class:`RetryTransaction`
        (with ``race`` as its message) when another transaction committed one of them since: under
        PostgreSQL's read committed, a row lock the caller does not hold cannot keep them out."""
        if self.insert_many(conn, table, columns, rows, on_conflict="ON CONFLICT DO NOTHING") != len(rows):
            raise RetryTransaction(race)

    def update_many(
        self,
        conn: Any,
        table: str,
        key: tuple[str, str],
        columns: Sequence[tuple[str, str]],
        rows: Sequence[Sequence[Any]],
    ) -> None:
        """``UPDATE table SET columns… WHERE key = …`` per row; each row is (key, *column values)."""
        if rows:
            self._update_rows(conn, table, key, columns, rows)

    def _insert_rows(self, conn: Any, head: str, types: Sequence[str], rows: Sequence[Sequence[Any]], tail: str) -> int:
        cur = conn.cursor()
        cur.executemany(f"{head} VALUES ({', '.join('?' * len(types))}) {tail}", list(rows))
        return int(cur.rowcount)

    def _update_rows(
        self,
        conn: Any,
        table: str,
        key: tuple[str, str],
        columns: Sequence[tuple[str, str]],
        rows: Sequence[Sequence[Any]],
    ) -> None:
        sets = ", ".join(f"{name} = ?" for name, _ in columns)
        conn.cursor().executemany(f"UPDATE {table} SET {sets} WHERE {key[0]} = ?", [(*row[1:], row[0]) for row in rows])

    def notify(self, conn: Any, channel: str, payloads: Sequence[str]) -> None:
        """Wake listeners of ``channel`` in every process when (and only if) the transaction commits."""

    def storable(self, text: str) -> bool:
        """Whether a text column can hold ``text`` (a lookup of one that cannot finds nothing)."""
        return True


class _SQLite(Engine):
    name = "sqlite"
    expiry_buckets = True


class _Postgres(Engine):
    name = "postgres"
    lock_rows = " FOR UPDATE"
    inbox_counter = "last_seq"
    greatest = "greatest"
    next_device_no = "DEFAULT"
    content_digest = "substr(sha256(ciphertext), 1, 8)"

    def q(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def chunks(self, values: Sequence[Any]) -> Iterator[list[Any]]:
        if values:
            yield list(values)

    def one_of(self, column: str, values: Sequence[Any], sql_type: str) -> tuple[str, tuple[Any, ...]]:
        return f"{column} = ANY(?::{sql_type}[])", (list(values),)

    def _insert_rows(self, conn: Any, head: str, types: Sequence[str], rows: Sequence[Sequence[Any]], tail: str) -> int:
        # unnest keeps array order, and a serial default is taken row by row in that order.
        cur = conn.execute(f"{head} SELECT * FROM unnest({_arrays(types)}) {tail}", _by_column(rows))
        return int(cur.rowcount)

    def _update_rows(
        self,
        conn: Any,
        table: str,
        key: tuple[str, str],
        columns: Sequence[tuple[str, str]],
        rows: Sequence[Sequence[Any]],
    ) -> None:
        aliases = [f"c{i}" for i in range(len(columns))]
        sets = ", ".join(f"{name} = t.{alias}" for (name, _), alias in zip(columns, aliases, strict=True))
        conn.execute(
            f"UPDATE {table} SET {sets} FROM unnest({_arrays([key[1], *(t for _, t in columns)])})"
            f" AS t(k, {', '.join(aliases)}) WHERE {key[0]} = t.k",
            _by_column(rows),
        )

    def notify(self, conn: Any, channel: str, payloads: Sequence[str]) -> None:
        if payloads:
            conn.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (channel, list(payloads))).fetchall()

    def storable(self, text: str) -> bool:
        return "\x00" not in text  # PostgreSQL text cannot hold NUL


def _arrays(types: Sequence[str]) -> str:
    return ", ".join(f"%s::{sql_type}[]" for sql_type in types)


def _by_column(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)]


SQLITE: Final[Engine] = _SQLite()
POSTGRES: Final[Engine] = _Postgres()
