"""``tetherless serve``, ``config show``, ``migrate``, ``backup`` and ``admin openapi``: running and keeping a relay.

Exit codes: :mod:`tetherless_cli.exits` (2 for a relay that refuses to start or a bad setting).
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from pathlib import Path

import trio

from relay import config as config_mod
from relay import logs
from tetherless_cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from tetherless_cli.parser import SERVE_FLAGS


def _flag_values(args: argparse.Namespace) -> dict[str, object]:
    flags: dict[str, object] = {dest: getattr(args, dest) for dest in SERVE_FLAGS}
    flags["peers"] = ",".join(args.peers) if args.peers else None
    flags["web_client"] = args.web_client
    return flags


def _load_config(args: argparse.Namespace) -> config_mod.Config:
    flags = _flag_values(args)
    try:
        config, _ = config_mod.load(flags, file=args.config)
    except config_mod.ConfigError as exc:
        print(f"tetherless: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from relay import app
    from relay.store.base import StartupRefusedError

    config = _load_config(args)
    logs.setup(config.log_format, config.log_level)

    def ready(url: str, relay_name: str) -> None:
        # Always printed, whatever --log-level says (scripts and supervisors wait for it); with --log-format json
        # it is a JSON line like every other one (docs/operations.md).
        line = f"tetherless relay ready at {url} (relay name {relay_name}, data {config.data})"
        if config.log_format == "json":
            line = logs.JsonFormatter().format(logging.LogRecord("tetherless", logging.INFO, "", 0, line, None, None))
        print(line, flush=True)

    try:
        trio.run(lambda: app.run(config, on_ready=ready))
    except BaseException as exc:
        # Start-up refusals: TLS files, data directory, listen address, another relay's database or key, a
        # schema too new. trio may deliver one inside an exception group.
        refused = _only_leaf(exc)
        if isinstance(refused, StartupRefusedError):
            print(f"tetherless: error: {refused}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(refused, OSError):
            print(f"tetherless: error: cannot serve on {config.listen}: {refused.strerror or refused}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return EXIT_OK


def _only_leaf(exc: BaseException) -> BaseException:
    """The single exception inside nested one-member exception groups, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def cmd_config_show(args: argparse.Namespace) -> int:
    flags = _flag_values(args)
    try:
        config, sources = config_mod.load(flags, file=args.config)
    except config_mod.ConfigError as exc:
        print(f"tetherless: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    width = max(len(name) for name in sources)
    for name, source in sources.items():
        value = getattr(config, name)
        if name == "database":
            from relay.store import redact_url

            value = redact_url(value)
        print(f"{name:<{width}}  {value!r:<24}  ({source})")
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from relay.store.sqlite import DB_FILE, migrate

    if args.database:
        return _migrate_postgres(args.database)
    path = Path(args.data) / DB_FILE
    if args.to and not path.exists():
        print(f"tetherless: error: no relay database at {path}", file=sys.stderr)
        return EXIT_FAILURE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        applied = migrate(conn)
    finally:
        conn.close()
    print(f"applied migrations {applied}" if applied else "schema is up to date")
    if args.to:
        return _copy_to_postgres(path, args.to)
    return EXIT_OK


def _migrate_postgres(url: str) -> int:
    from relay.store import StoreUnavailableError, redact_url
    from relay.store.base import StartupRefusedError
    from relay.store.postgres import migrate_url

    try:
        applied = migrate_url(url)
    except StoreUnavailableError as exc:
        print(f"tetherless: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except StartupRefusedError as exc:  # the schema needs newer code
        print(f"tetherless: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{redact_url(url)}: " + (f"applied migrations {applied}" if applied else "schema is up to date"))
    return EXIT_OK


def _copy_to_postgres(path: Path, url: str) -> int:
    from relay.store import StoreUnavailableError, is_postgres_url, redact_url
    from relay.store.postgres import MigrationError, copy_from_sqlite

    if not is_postgres_url(url):
        print("tetherless: error: --to expects a postgresql:// URL", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = copy_from_sqlite(path, url)
    except (MigrationError, StoreUnavailableError) as exc:
        print(f"tetherless: error: {exc} (nothing was copied)", file=sys.stderr)
        return EXIT_FAILURE
    print(f"copied {path} to {redact_url(url)}; verified:")
    print(f"  {'table':<14} {'rows':>10}  checksum (sha-256 sum)")
    for table in report:
        print(f"  {table.table:<14} {table.rows:>10}  {table.checksum}")
    print("copy relay.key from the data directory to every replica's --data directory")
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    from relay.store.sqlite import DB_FILE

    source = Path(args.data) / DB_FILE
    if not source.exists():
        print(f"tetherless: error: no relay database at {source}", file=sys.stderr)
        return EXIT_FAILURE
    target = Path(args.output)
    if target.exists():
        print(f"tetherless: error: {target} exists; refusing to overwrite", file=sys.stderr)
        return EXIT_FAILURE
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)  # SQLite online backup: consistent while the relay serves
    finally:
        dst.close()
        src.close()
    print(f"backed up {source} to {target}")
    return EXIT_OK


def cmd_openapi(args: argparse.Namespace) -> int:
    from relay.api.openapi import openapi_bytes
    from relay.api.routes import all_routes

    sys.stdout.write(openapi_bytes(all_routes()).decode())
    return EXIT_OK
