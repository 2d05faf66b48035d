"""Start-up checks: which relay a store belongs to, and which code may run on its schema (migrations/0007).

Replicas share one database, so the database is where they agree on one
identity: the relay name and the fingerprints (key ids) of the relay keys —
never the keys, so a database backup holds no secret. The first start
records them; every later start compares (:func:`plan_identity`, a pure
decision over what was read) and refuses with a one-line reason.

A key change is accepted only as a rotation: the mounted rotation file
(``relay-keys.json``) retires the recorded key, which is what
``tetherless admin relay-key rotate`` writes. The check guards against
configuration mistakes (replicas given different Secrets or names); it is not
an access control: whoever can start a replica with the database's
credentials can write any row.

Rolling upgrades (docs/decisions/0008-rolling-upgrades.md): a migration is
expand-only unless its file says ``-- contract: N`` (code knowing fewer than
N migrations can no longer run); :func:`raise_floor` records that in
``schema_compat`` and :func:`check_schema` refuses older code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..base import StartupRefusedError
from ..engine import Engine

ROTATION_HINT = "mount the same Secret (relay.key and relay-keys.json) on every replica"
_CONTRACT = re.compile(r"^--\s*contract:\s*(\d+)\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class RecordedIdentity:
    relay_name: str | None  # None: no name bound (SQLite started without an explicit name)
    current_key_id: str | None  # None: nothing recorded yet
    retired_key_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class IdentityPlan:
    bind_name: str | None = None  # record this name
    current_key_id: str | None = None  # record this key id as current (first start or rotation)
    retire: tuple[str, ...] = ()  # record these key ids as retired
    notes: tuple[str, ...] = field(default=())


def plan_identity(
    recorded: RecordedIdentity, relay_name: str | None, effective_name: str, key_id: str, retired: Sequence[str]
) -> IdentityPlan:
    """What to record, given what is recorded and how this process was started. Raises StartupRefusedError.

    ``relay_name`` is the explicitly configured name (None: none, then
    ``effective_name``, the listen address, is served but not bound).
    """
    if recorded.relay_name is not None and recorded.relay_name != effective_name:
        how = "" if relay_name is not None else " (no --name given)"
        raise StartupRefusedError(
            f"this database belongs to relay {recorded.relay_name}; started as {effective_name}{how}"
        )
    bind = relay_name if recorded.relay_name is None and relay_name is not None else None
    notes: list[str] = [f"relay name {bind} bound to this database"] if bind else []
    known = recorded.retired_key_ids | ({recorded.current_key_id} if recorded.current_key_id else set())
    retire = tuple(k for k in dict.fromkeys(retired) if k not in known and k != key_id)
    if recorded.current_key_id is None:
        notes.append(f"relay key {key_id} recorded for this database")
        return IdentityPlan(bind, key_id, retire, tuple(notes))
    if key_id == recorded.current_key_id:
        return IdentityPlan(bind, None, retire, tuple(notes))
    if key_id in recorded.retired_key_ids:
        raise StartupRefusedError(
            f"relay key {key_id} was retired for this database (the current one is {recorded.current_key_id});"
            f" {ROTATION_HINT}"
        )
    if recorded.current_key_id not in retired:
        raise StartupRefusedError(
            f"relay key {key_id} is not the one recorded for this database ({recorded.current_key_id});"
            f" {ROTATION_HINT}, or rotate with `tetherless admin relay-key rotate`"
        )
    notes.append(f"relay key rotated: {recorded.current_key_id} retired, {key_id} current")
    return IdentityPlan(bind, key_id, (*retire, recorded.current_key_id), tuple(notes))


def read_identity(conn: Any, e: Engine) -> RecordedIdentity:
    row = conn.execute("SELECT relay_name FROM relay_identity WHERE id = 1").fetchone()
    keys = conn.execute(f"SELECT key_id, status FROM relay_key_ids{e.lock_rows}").fetchall()
    current = next((k for k, status in keys if status == "current"), None)
    return RecordedIdentity(row[0] if row else None, current, frozenset(k for k, status in keys if status == "retired"))


def bind_identity(
    conn: Any,
    e: Engine,
    *,
    relay_name: str | None,
    effective_name: str,
    key_id: str,
    retired_key_ids: Sequence[str],
    now_ms: int,
) -> list[str]:
    """See ``Store.bind_identity``. Replicas starting together: the primary keys let one first start win
    (the other's insert conflicts, its transaction is retried and then compares against the winner)."""
    plan = plan_identity(read_identity(conn, e), relay_name, effective_name, key_id, retired_key_ids)
    if plan.bind_name is not None:
        e.insert_new(
            conn,
            "relay_identity",
            (("id", "integer"), ("relay_name", "text"), ("bound_at_ms", "bigint")),
            [(1, plan.bind_name, now_ms)],
            race="another replica bound the relay name",
        )
    if plan.current_key_id is not None:
        conn.execute(e.q("UPDATE relay_key_ids SET status = 'retired' WHERE status = 'current'"))
        e.insert_new(
            conn,
            "relay_key_ids",
            (("key_id", "text"), ("status", "text"), ("recorded_at_ms", "bigint")),
            [(plan.current_key_id, "current", now_ms)],
            race="another replica recorded the relay key",
        )
    if plan.retire:
        e.execute_in(
            conn, "UPDATE relay_key_ids SET status = 'retired' WHERE {one_of}", (), "key_id", plan.retire, "text"
        )
        e.insert_many(
            conn,
            "relay_key_ids",
            (("key_id", "text"), ("status", "text"), ("recorded_at_ms", "bigint")),
            [(k, "retired", now_ms) for k in plan.retire],
            on_conflict="ON CONFLICT DO NOTHING",
        )
    return list(plan.notes)


# -- schema compatibility between code versions ------------------------------------------------


def contract_floor(sql: str) -> int | None:
    """The ``-- contract: N`` line of a migration: code knowing fewer than N migrations cannot run after it."""
    found = [int(n) for n in _CONTRACT.findall(sql)]
    return max(found) if found else None


def raise_floor(conn: Any, e: Engine, sql: str) -> None:
    """Inside the migration's own transaction: record its contract floor (nothing for expand migrations)."""
    floor = contract_floor(sql)
    if floor is not None:
        conn.execute(
            e.q(f"UPDATE schema_compat SET min_code_schema = {e.greatest}(min_code_schema, ?) WHERE id = 1"), (floor,)
        )


def code_floor(conn: Any) -> int:
    """The recorded floor: code knowing fewer migrations than this cannot run on the database. Reads only."""
    row = conn.execute("SELECT min_code_schema FROM schema_compat WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def check_schema(conn: Any, e: Engine, *, known: int) -> str | None:
    """Whether code that knows migrations up to ``known`` may run on this database.

    Returns None (the schema is not newer than the code), or a line to log
    when newer migrations are all expand-only (this code keeps running).
    Raises :class:`StartupRefusedError` when a contract migration needs newer
    code. Reads only.
    """
    applied = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
    if applied <= known:
        return None
    floor = code_floor(conn)
    if known < floor:
        raise StartupRefusedError(
            f"the database schema is at migration {applied} and needs code that knows migration {floor} or newer;"
            f" this relay knows up to {known}: upgrade it (docs/decisions/0008-rolling-upgrades.md)"
        )
    return (
        f"the database schema is at migration {applied}, newer than this relay's {known}; the newer migrations"
        " are expand-only, so this relay keeps running (finish the upgrade)"
    )
