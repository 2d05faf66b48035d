"""The relay's SQL, one module per topic, written once for both engines over :class:`relay.store.engine.Engine`.

Each module is plain functions over a DB-API connection and an engine; they
import no driver. :class:`relay.store.sql.store.SQLStore` turns them into the
:class:`relay.store.base.Store` methods; the backends (``sqlite.py``,
``postgres.py``) only supply connections, transactions and wake-ups.
Decisions live in the pure ``*_rules`` modules beside this package.

How a function runs: a write inside the backend's transaction (SQLite: the
group-commit writer's, in its own SAVEPOINT; PostgreSQL: one transaction per
call, retried on deadlock), so an exception undoes everything it wrote; a
read on a reader connection, in one snapshot where it reads several tables.
"""
