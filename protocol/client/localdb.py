"""The client's local database: ``<home>/state.db``, secrets sealed row by row (crypto.md §13).

Usage::

    db = LocalDB.open(home, dek)                  # dek: 32 bytes from the keystore
    with db.transaction():
        db.put("session_state", peer_address, codec.encode(state))
    blob = db.get("session_state", peer_address)  # bytes | None

Every client module keeps its tables here (names prefixed by topic:
``session_*``, ``log_*``, ``history_*``, ``outbox_*``, ``device_*``). Two
ways to use it:

- the **sealed key-value tables** (:meth:`put`, :meth:`get`, :meth:`delete`,
  :meth:`keys`, :meth:`items`, and :meth:`put_struct` / :meth:`get_struct` for
  msgspec structs): table ``T`` has columns ``key`` (the primary key, kept as
  the given ``str``/``bytes``/``int``) and ``value`` (the sealed blob);
- **own tables** through :meth:`execute` (plain ``sqlite3``) or :attr:`db` (a
  ``sqlite_utils.Database``, imported on first use), sealing each secret column with :meth:`seal` and opening it
  with :meth:`open` (alias :meth:`unseal`).

Rows that name a peer are keyed by :meth:`blind` (an HMAC under the file's
sealed index key), and key-value tables whose rows are checks are **guarded
sets** (:meth:`guard_set`, :meth:`put_member`, :meth:`delete_member`,
:meth:`check_members`): a row deleted behind tetherless's back is reported as
tampering rather than turning its check off (crypto.md §13.3).

Sealing is ``XAEAD(DEK, random 24-byte nonce, value, aad = layout("local-row",
table, *pk))`` stored as ``nonce ‖ ciphertext`` (crypto.md §13): a blob only
opens under its own table and primary key, so a row copied or moved to another
key, a changed byte or a different DEK fails with :class:`TamperedRowError`
(never silently wrong data).

Durability: WAL with ``synchronous=FULL``, so a committed transaction survives
a power cut. :meth:`transaction` is ``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled
back on an exception) and nests (inner ones are savepoints); outside one,
each write commits on its own. The file is created 0600 in a 0700 home
directory, and opening refuses a database that other users can read.

Blocking (small local writes); call from trio directly or via
``trio.to_thread.run_sync``. One ``LocalDB`` per process and home.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar, overload

import msgspec
import nacl.bindings
import nacl.exceptions

from ..errors import LocalErrorCode
from ..signing import layout

if TYPE_CHECKING:
    import sqlite_utils

DB_FILE: Final = "state.db"
DEK_BYTES: Final = 32
NONCE_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
TAG_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
ROW_DOMAIN: Final = "local-row"

PkField = str | bytes | int
Pk = PkField | tuple[PkField, ...]
#: An own table's sealed columns for :meth:`LocalDB.rekey`: its primary-key columns, and per sealed column
#: ``(SQL column, label)`` where the value was sealed with :meth:`LocalDB.seal_column` under that label.
SealedColumns = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]
META_TABLE: Final = "local_meta"
_DEK_CHECK: Final = "dek_check"
_GENERATION: Final = "generation"
_INDEX_KEY: Final = "index_key"
_SET_PREFIX: Final = "set:"
INDEX_KEY_BYTES: Final = 32
#: Length of a keyed hash (:meth:`LocalDB.blind`): 128 bits, no collisions among a home's rows.
BLIND_BYTES: Final = 16
S = TypeVar("S", bound=msgspec.Struct)

_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class LocalDBError(Exception):
    """Base of local database problems; the message is meant for the user. ``code``: a stable
    :class:`~protocol.errors.LocalErrorCode` where one applies."""

    code: ClassVar[LocalErrorCode | None] = None


class TamperedRowError(LocalDBError):
    """Local state was changed outside tetherless: a sealed value does not open (changed bytes, moved to
    another row, another key), or rows of a guarded set were deleted or added (:meth:`LocalDB.check_members`).
    The message starts with ``local state tampered:``."""

    code = LocalErrorCode.LOCAL_STATE_TAMPERED

    def __init__(self, detail: str) -> None:
        super().__init__(f"local state tampered: {detail}")


class StateRolledBackError(LocalDBError):
    """The local state is older than evidence kept apart from it (crypto.md §13.2): an old ``state.db`` or an
    old copy of the whole home was put back. Nothing may be sent on the restored sessions (their ratchet
    keys were used already); ``tetherless sync --recover-rollback`` starts them afresh."""

    code = LocalErrorCode.LOCAL_STATE_ROLLED_BACK
    RECOVERY: Final = (
        "Run `tetherless sync --recover-rollback` to start every session afresh; queued messages go out then "
        "(docs/crypto.md §13.2)"
    )


def row_ad(table: str, pk: Pk) -> bytes:
    """The associated data binding a sealed value to its row: ``layout("local-row", table, *pk)``."""
    fields = pk if isinstance(pk, tuple) else (pk,)
    return layout(ROW_DOMAIN, table, *fields)


def seal_value(dek: bytes, table: str, pk: Pk, value: bytes, nonce: bytes) -> bytes:
    """``nonce ‖ XChaCha20-Poly1305(dek, nonce, value, row_ad(table, pk))`` (pure: the nonce is passed in)."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    return _seal_ad(dek, row_ad(table, pk), value, nonce)


def _seal_ad(dek: bytes, ad: bytes, value: bytes, nonce: bytes) -> bytes:
    return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(value, ad, nonce, dek)


def open_value(dek: bytes, table: str, pk: Pk, blob: bytes) -> bytes:
    """Inverse of :func:`seal_value`; raises :class:`TamperedRowError`."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise TamperedRowError(f"local row {table}/{_pk_text(pk)} is truncated")
    nonce, ciphertext = blob[:NONCE_BYTES], blob[NONCE_BYTES:]
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, row_ad(table, pk), nonce, dek)
    except nacl.exceptions.CryptoError:
        raise TamperedRowError(
            f"local row {table}/{_pk_text(pk)} does not decrypt: it was changed, moved from another row, "
            "or the database belongs to another key"
        ) from None


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so that a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (the directory entry must be synced too)."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _SetDigest(msgspec.Struct, frozen=True, array_like=True):
    """A guarded set's count of keys and XOR of their keyed tags (:meth:`LocalDB.guard_set`)."""

    count: int
    xor: bytes


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _column_pk(pk: Pk, column: str) -> tuple[PkField, ...]:
    return (*pk, column) if isinstance(pk, tuple) else (pk, column)


@functools.cache
def _column_field(column: str) -> bytes:
    """The layout bytes of the trailing ``column`` field of a column's AD: ``row_ad(t, (*pk, c))`` is
    ``row_ad(t, pk) + _column_field(c)`` (layout is a concatenation of fields). Few distinct columns: cached."""
    return layout(ROW_DOMAIN, column)[len(layout(ROW_DOMAIN)) :]


def _pk_text(pk: Pk) -> str:
    fields = pk if isinstance(pk, tuple) else (pk,)
    return ",".join(f.hex()[:16] if isinstance(f, bytes) else str(f)[:40] for f in fields)


def _check_table(table: str) -> str:
    if not _TABLE_NAME.match(table):
        raise ValueError(f"bad local table name {table!r} (lowercase letters, digits, _)")
    return table


def _check_private(path: Path, what: str) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise LocalDBError(
            f"{what} {path} is accessible by other users (mode {mode:04o}); "
            f"run: chmod {'700' if path.is_dir() else '600'} {path}"
        )


class _OpenMethod:
    """``LocalDB.open(home, dek)`` opens a database; ``db.open(table, pk, blob)`` opens a sealed value."""

    @overload
    def __get__(self, obj: None, owner: type[LocalDB]) -> Callable[[str | os.PathLike[str], bytes], LocalDB]: ...

    @overload
    def __get__(self, obj: LocalDB, owner: type[LocalDB]) -> Callable[[str, Pk, bytes], bytes]: ...

    def __get__(self, obj: LocalDB | None, owner: type[LocalDB]) -> Callable[..., Any]:
        if obj is None:
            return owner.connect
        return obj.unseal


class LocalDB:
    """One home's ``state.db``, opened with its DEK. See the module doc."""

    open = _OpenMethod()

    def __init__(self, conn: sqlite3.Connection, dek: bytes, path: Path) -> None:
        if len(dek) != DEK_BYTES:
            raise ValueError(f"the DEK must be {DEK_BYTES} bytes")
        self._conn = conn
        self._dek = bytes(dek)
        self.path = path
        self._depth = 0
        self._kv_tables: set[str] = set()
        self._index_key: bytes | None = None
        #: Transactions and savepoints rolled back so far: a cache of rows read from this file (e.g. the
        #: counters of ``ClientStore.page``) is stale once this moves.
        self.rollbacks = 0

    @functools.cached_property
    def db(self) -> sqlite_utils.Database:
        """A ``sqlite_utils.Database`` over this connection (same transactions as :meth:`execute`); the same
        object on every access.

        Imported and built on first use, not in ``__init__``: importing sqlite_utils (click, pluggy, dateutil)
        and building a ``Database`` (which scans every installed distribution's entry points for plugins)
        cost ~140 ms of CPU, more than a third of a whole ``tetherless send`` (docs/performance.md "CLI
        start-up"), and the SDK itself uses only :meth:`execute`."""
        import sqlite_utils  # deferred: see the docstring

        return sqlite_utils.Database(self._conn)

    @classmethod
    def connect(cls, home: str | os.PathLike[str], dek: bytes) -> LocalDB:
        """Open (creating if needed) ``<home>/state.db`` with ``dek``. Raises :class:`LocalDBError` on bad modes."""
        if len(dek) != DEK_BYTES:
            raise ValueError(f"the DEK must be {DEK_BYTES} bytes")
        home_path = Path(home)
        home_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(home_path, "home directory")
        path = home_path / DB_FILE
        if not path.exists():
            # Create it private before SQLite does (SQLite gives -wal/-shm the same mode).
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
            os.close(fd)
        _check_private(path, "local database")
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            # Deleted rows and rewritten tables (a migration) leave zeros, not old clear columns, in free pages.
            conn.execute("PRAGMA secure_delete=ON")
        except BaseException:
            conn.close()
            raise
        return cls(conn, dek, path)

    def close(self) -> None:
        """Close the connection. Idempotent."""
        with contextlib.suppress(sqlite3.ProgrammingError):
            self._conn.close()

    def __enter__(self) -> LocalDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalDB(path={str(self.path)!r})"  # never the DEK

    # -- sealing ------------------------------------------------------------------------

    def seal(self, table: str, pk: Pk, value: bytes) -> bytes:
        """Seal ``value`` for row ``pk`` of ``table`` (fresh random nonce)."""
        return seal_value(self._dek, table, pk, bytes(value), os.urandom(NONCE_BYTES))

    def unseal(self, table: str, pk: Pk, blob: bytes) -> bytes:
        """Open a blob sealed for row ``pk`` of ``table``; raises :class:`TamperedRowError`."""
        return open_value(self._dek, table, pk, bytes(blob))

    def seal_column(self, table: str, pk: Pk, column: str, value: bytes) -> bytes:
        """Seal one column of an own table's row: the AD names the column too, so columns cannot be swapped."""
        return self.seal(table, _column_pk(pk, column), value)

    def open_column(self, table: str, pk: Pk, column: str, blob: bytes) -> bytes:
        """Inverse of :meth:`seal_column`; raises :class:`TamperedRowError`."""
        return self.unseal(table, _column_pk(pk, column), blob)

    def seal_columns(self, table: str, pk: Pk, values: Mapping[str, bytes]) -> dict[str, bytes]:
        """:meth:`seal_column` for several columns of one row: byte for byte the same format (each column its
        own AD and a fresh nonce; :meth:`open_column` opens each), cheaper because the row's part of the AD is
        laid out once (a page of log records seals five columns per message, account-log.md §14.1). No side
        effect; fresh nonces, so each call gives other bytes; raises nothing for well-typed input."""
        row = row_ad(table, pk)
        nonces = os.urandom(NONCE_BYTES * len(values))
        sealed: dict[str, bytes] = {}
        for i, (column, value) in enumerate(values.items()):
            nonce = nonces[i * NONCE_BYTES : (i + 1) * NONCE_BYTES]
            sealed[column] = _seal_ad(self._dek, row + _column_field(column), bytes(value), nonce)
        return sealed

    # -- rotating the DEK ----------------------------------------------------------------------

    def dek_check_opens(self) -> bool:
        """True when the check row written by :meth:`rekey` opens under this DEK (False: absent or another key)."""
        self._kv(META_TABLE)
        row = self._conn.execute(f'SELECT value FROM "{META_TABLE}" WHERE key = ?', (_DEK_CHECK,)).fetchone()
        if row is None:
            return False
        try:
            self.unseal(META_TABLE, _DEK_CHECK, row[0])
        except TamperedRowError:
            return False
        return True

    def rekey(self, new_dek: bytes, own_tables: Mapping[str, SealedColumns]) -> int:
        """Re-seal every sealed value under ``new_dek``: every key-value table, and ``own_tables``.

        One transaction: afterwards the whole file opens under ``new_dek`` only (with a check row,
        :meth:`dek_check_opens`), or, if interrupted or cancelled, still under the old DEK only. Fresh nonces.
        Returns how many values were re-sealed. Raises :class:`TamperedRowError` (nothing changed) when a
        value does not open under the current DEK. Not idempotent: the caller records which DEK is current.
        """
        if len(new_dek) != DEK_BYTES:
            raise ValueError(f"the DEK must be {DEK_BYTES} bytes")
        count = 0
        with self.transaction():
            self._kv(META_TABLE)
            for table in self._kv_table_names():
                for key, blob in self._conn.execute(f'SELECT key, value FROM "{table}"').fetchall():
                    value = self.unseal(table, key, blob)
                    fresh = seal_value(new_dek, table, key, value, os.urandom(NONCE_BYTES))
                    self._conn.execute(f'UPDATE "{table}" SET value = ? WHERE key = ?', (fresh, key))
                    count += 1
            existing = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, (pk_columns, columns) in own_tables.items():
                if table not in existing:
                    continue
                names = [*pk_columns, *(c for c, _ in columns)]
                select = ", ".join(f'"{_check_table(n)}"' for n in names)
                where = " AND ".join(f'"{n}" = ?' for n in pk_columns)
                for row in self._conn.execute(f'SELECT {select} FROM "{_check_table(table)}"').fetchall():
                    pk = tuple(row[: len(pk_columns)])
                    row_pk: Pk = pk if len(pk) > 1 else pk[0]
                    updates: list[bytes | None] = []
                    for (_column, label), blob in zip(columns, row[len(pk_columns) :], strict=True):
                        if blob is None:
                            updates.append(None)
                            continue
                        value = self.open_column(table, row_pk, label, blob)
                        updates.append(
                            seal_value(new_dek, table, _column_pk(row_pk, label), value, os.urandom(NONCE_BYTES))
                        )
                        count += 1
                    assignments = ", ".join(f'"{c}" = ?' for c, _ in columns)
                    self._conn.execute(f'UPDATE "{table}" SET {assignments} WHERE {where}', (*updates, *pk))
            check = seal_value(new_dek, META_TABLE, _DEK_CHECK, b"dek", os.urandom(NONCE_BYTES))
            self._conn.execute(f'INSERT OR REPLACE INTO "{META_TABLE}" (key, value) VALUES (?, ?)', (_DEK_CHECK, check))
        self._dek = bytes(new_dek)
        return count

    # -- rollback guard (crypto.md §13.2) ---------------------------------------------------------

    def advance_generation(self, recorded: int) -> int:
        """Check ``state.db`` against ``recorded`` (the generation the keystore holds, kept apart from this
        file) and move this file one generation on; the caller then records the returned value.

        Because the database is advanced (and committed) before the keystore records it, after any crash
        the database is at least as new as the record. A database *older* than the record is an earlier
        copy put back: :class:`StateRolledBackError`, and nothing changes. A database without a generation
        is older than any record above 0 (removing the row does not turn the check off). Not idempotent
        (each call advances); cancellation leaves a state the next call accepts.
        """
        with self.transaction():
            raw = self.get(META_TABLE, _GENERATION)
            in_db = int.from_bytes(raw, "big") if raw is not None else 0
            if in_db < recorded:
                raise StateRolledBackError(
                    f"{self.path} is older than this device's keystore says ({in_db} < {recorded}): an earlier "
                    "copy of it was put back, and sending on its sessions would reuse ratchet keys. "
                    + StateRolledBackError.RECOVERY
                )
            generation = in_db + 1
            self.put(META_TABLE, _GENERATION, generation.to_bytes(8, "big"))
        return generation

    def accept_generation(self, recorded: int) -> int:
        """The recovery after :class:`StateRolledBackError`: move this file past ``recorded`` whatever it
        holds; the caller records the returned generation. Idempotent in effect."""
        with self.transaction():
            raw = self.get(META_TABLE, _GENERATION)
            generation = max(recorded, int.from_bytes(raw, "big") if raw is not None else 0) + 1
            self.put(META_TABLE, _GENERATION, generation.to_bytes(8, "big"))
        return generation

    # -- keyed hashes and guarded sets (crypto.md §13.3) -----------------------------------------------

    def create_index_key(self) -> bool:
        """Create this file's index key (32 random bytes, sealed in ``local_meta``) unless it exists; True if
        created. Only a migration calls this: afterwards a missing key is tampering (:meth:`blind`). Idempotent.
        The key is a row, not derived from the DEK, so a DEK rotation re-seals it and every keyed hash stays."""
        with self.transaction():
            if self.get(META_TABLE, _INDEX_KEY) is not None:
                return False
            self.put(META_TABLE, _INDEX_KEY, os.urandom(INDEX_KEY_BYTES))
        return True

    def _index(self) -> bytes:
        if self._index_key is None:
            key = self.get(META_TABLE, _INDEX_KEY)
            if key is None or len(key) != INDEX_KEY_BYTES:
                raise TamperedRowError(
                    f"the index key of {self.path} is missing: its row was deleted, and the rows keyed by it "
                    "(device-list marks, history indexes) cannot be found without it; put back a backup of "
                    "state.db, or link this device anew (docs/crypto.md §13.3)"
                )
            self._index_key = key
        return self._index_key

    def blind(self, label: str, *fields: PkField) -> bytes:
        """A keyed hash (blind index) of ``fields``: ``HMAC-SHA256(index key, layout("local-index", label,
        *fields))[:16]``. Equal inputs give equal values, so it can be a row key or a ``UNIQUE`` column, but
        without the DEK a stolen file cannot be searched for a guessed address. Raises :class:`TamperedRowError`
        when the index key is gone (or the file was never migrated, :func:`protocol.client.store.migrate`)."""
        return hmac.new(self._index(), layout("local-index", label, *fields), hashlib.sha256).digest()[:BLIND_BYTES]

    def _member_tag(self, table: str, key: PkField) -> bytes:
        return hmac.new(self._index(), layout("local-set", table, key), hashlib.sha256).digest()

    def _digest_of(self, table: str) -> _SetDigest:
        keys = self.keys(table)
        acc = bytes(hashlib.sha256().digest_size)
        for key in keys:
            acc = _xor(acc, self._member_tag(table, key))
        return _SetDigest(count=len(keys), xor=acc)

    def _set_digest(self, table: str) -> _SetDigest:
        stored = self.get_struct(META_TABLE, _SET_PREFIX + table, _SetDigest)
        if stored is None:
            raise TamperedRowError(
                f"the guard row of {table} in {self.path} is missing: it was deleted, so deleted rows of {table} "
                "could not be noticed. " + StateRolledBackError.RECOVERY
            )
        return stored

    def guard_set(self, table: str) -> None:
        """Start (or restart) guarding the key-value table ``table``: a sealed row in ``local_meta`` holds the
        count of its rows and the XOR of ``HMAC(index key, layout("local-set", table, key))`` over their keys,
        kept up to date by :meth:`put_member` / :meth:`delete_member` and compared by :meth:`check_members`.
        The rows present now are trusted: called by a migration, and by the user's explicit recovery.
        Idempotent."""
        with self.transaction():
            self.put_struct(META_TABLE, _SET_PREFIX + table, self._digest_of(table))

    def put_member(self, table: str, key: PkField, value: bytes) -> None:
        """:meth:`put` in a guarded table, updating its guard row in the same transaction. Raises
        :class:`TamperedRowError` when the guard row is missing."""
        with self.transaction():
            current = self._set_digest(table)
            exists = self._conn.execute(f'SELECT 1 FROM "{self._kv(table)}" WHERE key = ?', (key,)).fetchone()
            self.put(table, key, value)
            if exists is None:
                updated = _SetDigest(count=current.count + 1, xor=_xor(current.xor, self._member_tag(table, key)))
                self.put_struct(META_TABLE, _SET_PREFIX + table, updated)

    def delete_member(self, table: str, key: PkField) -> bool:
        """:meth:`delete` in a guarded table, updating its guard row in the same transaction; True if it existed."""
        with self.transaction():
            current = self._set_digest(table)
            if not self.delete(table, key):
                return False
            updated = _SetDigest(count=current.count - 1, xor=_xor(current.xor, self._member_tag(table, key)))
            self.put_struct(META_TABLE, _SET_PREFIX + table, updated)
        return True

    def check_members(self, table: str) -> None:
        """Raise :class:`TamperedRowError` unless the keys of the guarded ``table`` are exactly those written
        through :meth:`put_member` / :meth:`delete_member`: a row deleted (or put back) behind tetherless's
        back must not silently turn off the check it holds. Reads only; O(rows)."""
        expected = self._set_digest(table)
        actual = self._digest_of(table)
        if actual != expected:
            raise TamperedRowError(
                f"{table} in {self.path} holds {actual.count} rows where tetherless wrote {expected.count}: rows "
                "were deleted or put back outside tetherless, and the checks they hold cannot be trusted. "
                + StateRolledBackError.RECOVERY
            )

    def _kv_table_names(self) -> list[str]:
        names = [r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return [
            name
            for name in names
            if _TABLE_NAME.match(name)
            and [c[1] for c in self._conn.execute(f'PRAGMA table_info("{name}")')] == ["key", "value"]
        ]

    # -- transactions and raw SQL ----------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LocalDB]:
        """All writes inside commit together (durably) or not at all. Nests (savepoints)."""
        if self._depth == 0:
            self._conn.execute("BEGIN IMMEDIATE")
        else:
            self._conn.execute(f"SAVEPOINT sp{self._depth}")
        self._depth += 1
        try:
            yield self
        except BaseException:
            self._depth -= 1
            # Tables created and the index key read inside the rolled-back part may be gone: forget the caches.
            self._kv_tables.clear()
            self._index_key = None
            self.rollbacks += 1
            if self._depth == 0:
                self._conn.execute("ROLLBACK")
            else:
                self._conn.execute(f"ROLLBACK TO sp{self._depth}")
                self._conn.execute(f"RELEASE sp{self._depth}")
            raise
        self._depth -= 1
        if self._depth == 0:
            self._conn.execute("COMMIT")
        else:
            self._conn.execute(f"RELEASE sp{self._depth}")

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    def execute(self, sql: str, parameters: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        """Run one SQL statement on the connection (for modules with their own tables)."""
        return self._conn.execute(sql, parameters)

    # -- sealed key-value tables -------------------------------------------------------------

    def _kv(self, table: str) -> str:
        if table not in self._kv_tables:
            _check_table(table)
            # An untyped key column keeps str, bytes and int keys apart (no affinity conversions).
            self._conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (key PRIMARY KEY NOT NULL, value BLOB NOT NULL)')
            self._kv_tables.add(table)
        return table

    def put(self, table: str, key: PkField, value: bytes) -> None:
        """Insert or replace ``key`` → ``value`` (sealed) in the key-value table ``table``."""
        self._kv(table)
        self._conn.execute(
            f'INSERT OR REPLACE INTO "{table}" (key, value) VALUES (?, ?)', (key, self.seal(table, key, value))
        )

    def get(self, table: str, key: PkField) -> bytes | None:
        """The opened value of ``key`` (None if absent); raises :class:`TamperedRowError`."""
        self._kv(table)
        row = self._conn.execute(f'SELECT value FROM "{table}" WHERE key = ?', (key,)).fetchone()
        return None if row is None else self.unseal(table, key, row[0])

    def delete(self, table: str, key: PkField) -> bool:
        """Delete ``key``; True if it existed."""
        self._kv(table)
        return self._conn.execute(f'DELETE FROM "{table}" WHERE key = ?', (key,)).rowcount > 0

    def keys(self, table: str) -> list[PkField]:
        """Every key of ``table``, in key order."""
        self._kv(table)
        return [row[0] for row in self._conn.execute(f'SELECT key FROM "{table}" ORDER BY key')]

    def items(self, table: str) -> Iterator[tuple[PkField, bytes]]:
        """``(key, opened value)`` for every row, in key order; raises :class:`TamperedRowError`."""
        self._kv(table)
        rows = self._conn.execute(f'SELECT key, value FROM "{table}" ORDER BY key').fetchall()
        for key, blob in rows:
            yield key, self.unseal(table, key, blob)

    def put_struct(self, table: str, key: PkField, value: msgspec.Struct) -> None:
        """:meth:`put` of a msgspec struct encoded as MessagePack."""
        self.put(table, key, msgspec.msgpack.encode(value))

    def get_struct(self, table: str, key: PkField, type_: type[S]) -> S | None:
        """:meth:`get` decoded as ``type_``; raises :class:`LocalDBError` if it does not decode."""
        data = self.get(table, key)
        if data is None:
            return None
        try:
            return msgspec.msgpack.decode(data, type=type_)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise LocalDBError(f"local row {table}/{_pk_text(key)} is not a {type_.__name__}: {exc}") from exc


__all__ = [
    "BLIND_BYTES",
    "DB_FILE",
    "DEK_BYTES",
    "INDEX_KEY_BYTES",
    "LocalDB",
    "LocalDBError",
    "SealedColumns",
    "StateRolledBackError",
    "TamperedRowError",
    "open_value",
    "row_ad",
    "seal_value",
]
