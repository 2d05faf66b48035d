"""The sync engine in parts that own their state (docs/decisions/0011-sync-engine-parts.md).

``engine.py`` is the coordinator (:class:`~protocol.client.engine.engine.SyncEngine`); ``snapshots.py``, ``log.py``,
``inbox.py``, ``outbox.py``, ``epochs.py``, ``pending.py`` and ``lists.py`` are its parts, each built from the parts
below it (import-linter keeps the order); ``base.py`` holds what they share. The public names are re-exported by
:mod:`protocol.client.sync`.
"""
