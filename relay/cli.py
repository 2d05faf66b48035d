"""``tetherless``: the one front door, for the server and the client.

Server commands: ``serve``, ``config show``, ``migrate``, ``backup``,
``admin openapi``. Client commands (``device init``, ``whoami``, ``send``,
``sync``) come from :mod:`protocol.client.commands`.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from protocol.client.commands import register_commands
from relay import config as config_mod
from relay import logs
from relay.federation_admin import register_federation_admin

SERVE_FLAGS = {
    "data": ("--data", "directory for the database and relay key (default ./data)"),
    "listen": ("--listen", "HOST:PORT to listen on (default 127.0.0.1:8080; port 0 picks one)"),
    "metrics_listen": ("--metrics-listen", "HOST:PORT of a separate plain-HTTP listener serving only /metrics"),
    "name": (
        "--name",
        "relay name used in addresses (default: HOST:PORT of --listen; required with --database)",
    ),
    "tls_cert": ("--tls-cert", "PEM certificate chain: serve HTTPS (ALPN h2, http/1.1)"),
    "tls_key": ("--tls-key", "PEM private key for --tls-cert"),
    "log_format": ("--log-format", "text or json"),
    "log_level": ("--log-level", "debug, info, warning or error"),
    "federation": ("--federation", "open, allowlist or off (default open)"),
    "database": ("--database", "postgresql://USER:PASSWORD@HOST/DB: serve from PostgreSQL (default: SQLite in --data)"),
    "web_dist": ("--web-dist", "directory of the built browser client served at / (default: web/dist of the checkout)"),
}


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file (also TETHERLESS_CONFIG)")
    for dest, (flag, help_text) in SERVE_FLAGS.items():
        parser.add_argument(flag, dest=dest, default=None, help=help_text)
    parser.add_argument(
        "--peer",
        dest="peers",
        action="append",
        metavar="NAME=URL",
        help="static federation resolver entry, e.g. relay-b.example=https://10.0.0.7:8443 (repeatable)",
    )
    parser.add_argument(
        "--no-web-client",
        dest="web_client",
        action="store_const",
        const=False,
        default=None,
        help="do not serve the browser client at / (also web_client = false)",
    )


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
        raise SystemExit(2) from None
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from relay import app
    from relay.store.base import StartupRefusedError

    config = _load_config(args)
    logs.setup(config.log_format, config.log_level)

    def ready(url: str, relay_name: str) -> None:
        print(f"tetherless relay ready at {url} (relay name {relay_name}, data {config.data})", flush=True)

    try:
        trio.run(lambda: app.run(config, on_ready=ready))
    except BaseException as exc:
        # Start-up refusals: TLS files, data directory, listen address, another relay's database or key, a
        # schema too new. trio may deliver one inside an exception group.
        refused = _only_leaf(exc)
        if isinstance(refused, StartupRefusedError):
            print(f"tetherless: error: {refused}", file=sys.stderr)
            return 2
        if isinstance(refused, OSError):
            print(f"tetherless: error: cannot serve on {config.listen}: {refused.strerror or refused}", file=sys.stderr)
            return 2
        raise
    return 0


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
        return 1
    width = max(len(name) for name in sources)
    for name, source in sources.items():
        value = getattr(config, name)
        if name == "database":
            from relay.store import redact_url

            value = redact_url(value)
        print(f"{name:<{width}}  {value!r:<24}  ({source})")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from relay.store.sqlite import DB_FILE, migrate

    if args.database:
        return _migrate_postgres(args.database)
    path = Path(args.data) / DB_FILE
    if args.to and not path.exists():
        print(f"tetherless: error: no relay database at {path}", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        applied = migrate(conn)
    finally:
        conn.close()
    print(f"applied migrations {applied}" if applied else "schema is up to date")
    if args.to:
        return _copy_to_postgres(path, args.to)
    return 0


def _migrate_postgres(url: str) -> int:
    from relay.store import StoreUnavailableError, redact_url
    from relay.store.base import StartupRefusedError
    from relay.store.postgres import migrate_url

    try:
        applied = migrate_url(url)
    except StoreUnavailableError as exc:
        print(f"tetherless: error: {exc}", file=sys.stderr)
        return 1
    except StartupRefusedError as exc:  # the schema needs newer code
        print(f"tetherless: error: {exc}", file=sys.stderr)
        return 2
    print(f"{redact_url(url)}: " + (f"applied migrations {applied}" if applied else "schema is up to date"))
    return 0


def _copy_to_postgres(path: Path, url: str) -> int:
    from relay.store import StoreUnavailableError, is_postgres_url, redact_url
    from relay.store.postgres import MigrationError, copy_from_sqlite

    if not is_postgres_url(url):
        print("tetherless: error: --to expects a postgresql:// URL", file=sys.stderr)
        return 2
    try:
        report = copy_from_sqlite(path, url)
    except (MigrationError, StoreUnavailableError) as exc:
        print(f"tetherless: error: {exc} (nothing was copied)", file=sys.stderr)
        return 1
    print(f"copied {path} to {redact_url(url)}; verified:")
    print(f"  {'table':<14} {'rows':>10}  checksum (sha-256 sum)")
    for table in report:
        print(f"  {table.table:<14} {table.rows:>10}  {table.checksum}")
    print("copy relay.key from the data directory to every replica's --data directory")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from relay.store.sqlite import DB_FILE

    source = Path(args.data) / DB_FILE
    if not source.exists():
        print(f"tetherless: error: no relay database at {source}", file=sys.stderr)
        return 1
    target = Path(args.output)
    if target.exists():
        print(f"tetherless: error: {target} exists; refusing to overwrite", file=sys.stderr)
        return 1
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)  # SQLite online backup: consistent while the relay serves
    finally:
        dst.close()
        src.close()
    print(f"backed up {source} to {target}")
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    from relay.api.openapi import openapi_bytes
    from relay.api.routes import all_routes

    sys.stdout.write(openapi_bytes(all_routes()).decode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tetherless", description="Tetherless relay and client")
    parser.add_argument("--home", default=None, help="client state directory (default $TETHERLESS_HOME)")
    parser.add_argument(
        "--passphrase-file",
        default=None,
        metavar="FILE",
        help="read the client keystore passphrase from FILE's first line (else $TETHERLESS_PASSPHRASE or a prompt)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run a relay")
    _add_server_options(serve)
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print effective settings and where each came from")
    _add_server_options(show)
    show.set_defaults(func=cmd_config_show)

    migrate = sub.add_parser("migrate", help="apply database migrations without serving")
    migrate.add_argument("--data", default="./data", help="relay data directory")
    target = migrate.add_mutually_exclusive_group()
    target.add_argument(
        "--to", default=None, help="copy the SQLite relay in --data into this empty PostgreSQL database (URL)"
    )
    target.add_argument("--database", default=None, help="apply migrations to this PostgreSQL database (URL) instead")
    migrate.set_defaults(func=cmd_migrate)

    backup = sub.add_parser("backup", help="consistent copy of a relay database (safe while serving)")
    backup.add_argument("--data", default="./data", help="relay data directory")
    backup.add_argument("output", help="file to write (must not exist)")
    backup.set_defaults(func=cmd_backup)

    admin = sub.add_parser("admin", help="operator tools")
    admin_sub = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    openapi = admin_sub.add_parser("openapi", help="print the OpenAPI document")
    openapi.set_defaults(func=cmd_openapi)
    register_federation_admin(admin_sub)

    register_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Any = args.func
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
