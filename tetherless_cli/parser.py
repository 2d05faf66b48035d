"""Every ``tetherless`` subcommand's arguments, declared without importing what runs them.

Each leaf parser names its handler as ``"module:function"`` (``handler`` in the namespace); the front door
imports that module only when the command runs, so ``--help`` and ``--version`` stay cheap
(docs/decisions/0010-cli-package.md). This module imports only :mod:`argparse`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, TypeAlias

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _number(text: str, kind: type[int] | type[float], least: float, what: str) -> int | float:
    """An argparse ``type``: a number of ``kind`` that is at least ``least`` — anything else is argparse's one-line
    usage error (exit 2), never a negative limit or timeout that silently shows nothing or never waits."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not value >= least or value != value:  # the second test refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def count(text: str) -> int:
    return int(_number(text, int, 0, "a whole number of 0 or more"))


def entry_id(text: str) -> int:
    return int(_number(text, int, 1, "an outbox ID (a whole number of 1 or more)"))


def approvals(text: str) -> int:
    return int(_number(text, int, 1, "a number of approvals (a whole number of 1 or more)"))


def seconds(text: str) -> float:
    return float(_number(text, float, 1e-3, "a number of seconds above 0"))


def days(text: str) -> float:
    return float(_number(text, float, 0, "a number of days of 0 or more"))


SERVE_FLAGS: Final = {
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

HOME_HELP: Final = "client state directory (default $TETHERLESS_HOME)"
PASSPHRASE_FILE_HELP: Final = (
    "read the client keystore passphrase from FILE's first line (else $TETHERLESS_PASSPHRASE or a prompt)"
)
CA_FILE_HELP: Final = (
    "PEM file of the CA certificate(s) to trust for an https:// relay (device init/link keep it in the home; "
    "given to another command, it replaces the kept one for that command)"
)


def _add_global_options(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument("--home", default=default, help=HOME_HELP)
    parser.add_argument("--passphrase-file", default=default, metavar="FILE", help=PASSPHRASE_FILE_HELP)
    parser.add_argument("--ca-file", default=default, metavar="PEM", help=CA_FILE_HELP)


# The client's global options again on every client command, so `tetherless send --home H …` works. SUPPRESS:
# absent after the command, they keep the value given before it (or None).
_CLIENT_GLOBALS = argparse.ArgumentParser(add_help=False)
_add_global_options(_CLIENT_GLOBALS, default=argparse.SUPPRESS)


def _client(sub: Subparsers, name: str, handler: str, **kwargs: str) -> argparse.ArgumentParser:
    """A client command's parser: the global options, and its handler named, not imported."""
    parser = sub.add_parser(name, parents=[_CLIENT_GLOBALS], **kwargs)  # type: ignore[arg-type]
    parser.set_defaults(handler=handler)
    return parser


def _server(sub: Subparsers, name: str, handler: str, **kwargs: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, **kwargs)  # type: ignore[arg-type]
    parser.set_defaults(handler=handler)
    return parser


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


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``tetherless`` parser. Imports nothing beyond :mod:`argparse`; idempotent.

    Without ``argv``, every command. With the command line it will parse, only the command it names (see
    :func:`command_named`; none for ``--version``) when it names one plainly, else every command: the line parses
    and fails exactly as with the whole parser, and declaring one command instead of ~40 parsers saves most of
    the parser's cost (argparse looks up translations for every parser and argument), which every run pays.
    """
    parser = argparse.ArgumentParser(prog="tetherless", description="Tetherless relay and client")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    _add_global_options(parser, default=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = command_named(argv) if argv is not None else None
    for name, declare in COMMANDS.items():
        if named is None or name == named:
            declare(sub)
    return parser


# The top-level options, and those of them that take a value (_add_global_options declares them).
_TOP_OPTIONS: Final = ("--help", "--version", "--home", "--passphrase-file", "--ca-file")
_TOP_VALUE_OPTIONS: Final = ("--home", "--passphrase-file", "--ca-file")


def command_named(argv: Sequence[str]) -> str | None:
    """The top-level command ``argv`` runs, found the way argparse finds it: past ``--version`` and the global
    options that take a value (``--home H``, ``--home=H``, or an unambiguous prefix such as ``--ho H``); ``""``
    when there is none (``--version`` alone). None for anything else (``-h``, ``--help``, ``--``, an ambiguous or
    unknown option, an unknown command): the caller then declares every command, so argparse answers such a line
    exactly as it always did."""
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in COMMANDS:
            return token
        option, equals, _ = token.partition("=")
        matches = [name for name in _TOP_OPTIONS if name.startswith(option)] if option.startswith("--") else []
        full = option if option in _TOP_OPTIONS else (matches[0] if len(matches) == 1 else None)
        if full == "--version" and not equals:
            index += 1
        elif full in _TOP_VALUE_OPTIONS:
            index += 1 if equals else 2
        else:
            return None
    return ""


# -- server: serve, config show, migrate, backup, admin ------------------------------------------------------


def _add_serve(sub: Subparsers) -> None:
    serve = _server(sub, "serve", "tetherless_cli.serve:cmd_serve", help="run a relay")
    _add_server_options(serve)


def _add_config(sub: Subparsers) -> None:
    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = _server(
        config_sub,
        "show",
        "tetherless_cli.serve:cmd_config_show",
        help="print effective settings and where each came from",
    )
    _add_server_options(show)


def _add_migrate(sub: Subparsers) -> None:
    migrate = _server(
        sub, "migrate", "tetherless_cli.serve:cmd_migrate", help="apply database migrations without serving"
    )
    migrate.add_argument("--data", default="./data", help="relay data directory")
    target = migrate.add_mutually_exclusive_group()
    target.add_argument(
        "--to", default=None, help="copy the SQLite relay in --data into this empty PostgreSQL database (URL)"
    )
    target.add_argument("--database", default=None, help="apply migrations to this PostgreSQL database (URL) instead")


def _add_backup(sub: Subparsers) -> None:
    backup = _server(
        sub,
        "backup",
        "tetherless_cli.serve:cmd_backup",
        help="consistent copy of a relay database (safe while serving)",
    )
    backup.add_argument("--data", default="./data", help="relay data directory")
    backup.add_argument("output", help="file to write (must not exist)")


def _add_admin(sub: Subparsers) -> None:
    admin = sub.add_parser("admin", help="operator tools")
    admin_sub = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    _server(admin_sub, "openapi", "tetherless_cli.serve:cmd_openapi", help="print the OpenAPI document")

    fed = _server(
        admin_sub,
        "federation",
        "tetherless_cli.admin:cmd_federation",
        help="show federation peers, or retry delivery now",
    )
    fed.add_argument("action", nargs="?", choices=["show", "retry"], default="show")
    fed.add_argument("peer", nargs="?", help="with retry: only this peer (default: all)")
    fed.add_argument("--data", default="./data", help="relay data directory")
    fed.add_argument("--database", default="", help="postgresql://… instead of SQLite in --data")

    key = admin_sub.add_parser("relay-key", help="manage the relay's federation signing key")
    key_sub = key.add_subparsers(dest="relay_key_command", metavar="ACTION", required=True)
    rot = _server(
        key_sub,
        "rotate",
        "tetherless_cli.admin:cmd_relay_key_rotate",
        help="new signing key; the old one stays valid for an overlap period",
    )
    rot.add_argument("--data", default="./data", help="relay data directory")
    rot.add_argument("--overlap-days", type=days, default=7.0, help="days the old key stays valid (default 7)")


# -- device …, whoami ---------------------------------------------------------------------------------------


def _add_approval_options(parser: argparse.ArgumentParser, *, yes_help: str = "") -> None:
    """``--yes`` and ``--fido2``: the options of every command that signs a device-list change."""
    parser.add_argument(
        "--yes", action="store_true", help=yes_help or "do not ask for confirmation (required off a terminal)"
    )
    parser.add_argument("--fido2", action="store_true", help="a FIDO2 security key of the account approves too")


def _add_policy_command(commands: Subparsers) -> None:
    policy = _client(
        commands,
        "policy",
        "tetherless_cli.devices:cmd_device_policy",
        help="show or set who must approve changes to the device list (no options: show it)",
    )
    policy.add_argument(
        "--require-fido2",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a FIDO2 security key of the account must approve every change",
    )
    policy.add_argument(
        "--user-verification",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a security key's approval counts only with user verification (PIN or biometrics)",
    )
    policy.add_argument(
        "--threshold", type=approvals, default=None, metavar="N", help="approvals every change needs (devices, keys)"
    )
    _add_approval_options(policy, yes_help="loosen without asking (required off a terminal to loosen)")
    policy.add_argument("--json", action="store_true", help="show: one JSON object")


def _add_fido2_commands(commands: Subparsers) -> None:
    fido2 = commands.add_parser("fido2", help="FIDO2 security keys that approve this account's device changes")
    keys = fido2.add_subparsers(dest="fido2_command", metavar="COMMAND", required=True)
    add = _client(
        keys, "add", "tetherless_cli.devices:cmd_device_fido2_add", help="register a security key as an approver"
    )
    add.add_argument("--name", default=None, help="a name for the key, kept on this device")
    listing = _client(keys, "list", "tetherless_cli.devices:cmd_device_fido2_list", help="the account's security keys")
    listing.add_argument("--json", action="store_true", help="one JSON object")
    remove = _client(
        keys, "remove", "tetherless_cli.devices:cmd_device_fido2_remove", help="remove a security key from the account"
    )
    remove.add_argument("key", metavar="ID", help="the key's id as `device fido2 list` shows it (8+ hex digits)")
    _add_approval_options(remove)


def _add_device(sub: Subparsers) -> None:
    device = sub.add_parser("device", help="manage this device")
    commands = device.add_subparsers(dest="device_command", metavar="COMMAND", required=True)

    init = _client(
        commands,
        "init",
        "tetherless_cli.devices:cmd_device_init",
        help="create an account and its first device on a relay",
    )
    init.add_argument("--relay", required=True, metavar="URL", help="relay base URL, e.g. http://127.0.0.1:8080")
    init.add_argument("--name", default=None, help="device name shown to your other devices (default: host name)")
    init.add_argument(
        "--recovery-key-file",
        default=None,
        metavar="FILE",
        help="write the new recovery key to FILE (0600) instead of showing it on the terminal",
    )
    init.add_argument("--no-recovery-key", action="store_true", help="create the account without a recovery key")
    init.add_argument("--list-format", type=int, choices=(1, 2, 3), default=3, help=argparse.SUPPRESS)

    link = _client(
        commands,
        "link",
        "tetherless_cli.devices:cmd_device_link",
        help="join an existing account (link code, its recovery key, or a hardware key in its list)",
    )
    link.add_argument("--relay", required=True, metavar="URL", help="the account's home relay base URL")
    link.add_argument("--name", default=None, help="this device's name, kept locally (default: host name)")
    link.add_argument("--timeout", type=seconds, default=None, metavar="S", help="wait at most S")
    link.add_argument(
        "--account", default=None, metavar="ADDRESS", help="account@relay to join (with --recovery-key or --fido2)"
    )
    link.add_argument("--recovery-key", action="store_true", help="approve with the account's recovery key")
    link.add_argument("--fido2", action="store_true", help="approve with a FIDO2 security key of the account")
    link.add_argument("--recovery-key-file", default=None, metavar="FILE", help="read the recovery key from FILE")
    link.add_argument(
        "--revoke",
        action="append",
        default=[],
        metavar="ID",
        help="with --recovery-key or --fido2: also revoke this lost device",
    )

    approve = _client(
        commands,
        "approve",
        "tetherless_cli.devices:cmd_device_approve",
        help="add the device showing CODE to this account",
    )
    approve.add_argument("code", metavar="CODE", help="the link code shown by the new device (tl-xxxx-…)")
    _add_approval_options(approve)
    approve.add_argument(
        "--timeout",
        type=seconds,
        default=300.0,  # the new device polls every second; the relay keeps an offer 10 minutes
        help="seconds to wait for the new device to join and for its history grant (default %(default)g)",
    )

    listing = _client(
        commands, "list", "tetherless_cli.devices:cmd_device_list", help="the account's verified device list"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object")

    revoke = _client(
        commands,
        "revoke",
        "tetherless_cli.devices:cmd_device_revoke",
        help="remove a device from the account (may be this one)",
    )
    revoke.add_argument("device", metavar="ID", help="a device id or full device address")
    _add_approval_options(revoke)

    _add_fido2_commands(commands)
    _add_policy_command(commands)

    recovery_key = _client(
        commands,
        "recovery-key",
        "tetherless_cli.devices:cmd_device_recovery_key",
        help="create a new recovery key and show it once",
    )
    recovery_key.add_argument("--recovery-key-file", default=None, metavar="FILE", help="write it to FILE (0600)")

    _client(
        commands,
        "upgrade",
        "tetherless_cli.devices:cmd_device_upgrade",
        help="upgrade the account's device list to format 3 and publish this device's ML-KEM key",
    )

    protect = _client(
        commands,
        "protect",
        "tetherless_cli.devices:cmd_device_protect",
        help="encrypt the keys of a home made by an older client",
    )
    protect.add_argument(
        "--keyring", action="store_true", help="keep the key in the OS keyring, no passphrase (needs a secure keyring)"
    )


def _add_whoami(sub: Subparsers) -> None:
    whoami = _client(sub, "whoami", "tetherless_cli.whoami:cmd_whoami", help="print this device's address")
    whoami.add_argument("--account", action="store_true", help="print the account's address (reaches every device)")


# -- send, sync, history, outbox ----------------------------------------------------------------------------


def _add_send(sub: Subparsers) -> None:
    send = _client(sub, "send", "tetherless_cli.messages:cmd_send", help="send a message (from --text or stdin)")
    send.add_argument("address", metavar="ADDRESS", help="device.account@relay, or account@relay for every device")
    body = send.add_mutually_exclusive_group()
    body.add_argument("--text", default=None, help="the message; without it, stdin is read")
    body.add_argument(
        "--file",
        default=None,
        metavar="PATH",
        help="send the file at PATH, end-to-end encrypted (resumes an interrupted upload of the same file)",
    )
    send.add_argument("--name", default=None, help="with --file: the file name the recipient sees (default PATH's)")
    send.add_argument("--content-type", default=None, metavar="TYPE", help="with --file: its media type (guessed)")


def _add_blob(sub: Subparsers) -> None:
    blob = sub.add_parser("blob", help="files received in messages (end-to-end encrypted media)")
    commands = blob.add_subparsers(dest="blob_command", metavar="COMMAND")
    get = _client(
        commands,
        "get",
        "tetherless_cli.blobs:cmd_blob_get",
        help="download, verify and decrypt the file of a message (resumes; opens offline once cached)",
    )
    get.add_argument("ref", metavar="REF", help="the file message's id, as `sync --json` shows it in file.ref")
    get.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="PATH",
        help="file to write, or a directory for the file's own name (default: the current directory)",
    )
    get.add_argument("--force", action="store_true", help="replace PATH when it exists")


def _add_sync(sub: Subparsers) -> None:
    sync = _client(sub, "sync", "tetherless_cli.messages:cmd_sync", help="print and acknowledge pending messages")
    sync.add_argument("--follow", action="store_true", help="keep streaming new messages until interrupted")
    sync.add_argument("--json", action="store_true", help="one JSON object per line")
    sync.add_argument("--timeout", type=seconds, default=None, metavar="S", help="give up (exit 3) when unreachable")
    sync.add_argument("--status", action="store_true", help="status lines on stderr at each state change")
    sync.add_argument(
        "--recover-rollback",
        action="store_true",
        help="after a 'restored from an older copy' error: start every session afresh, then sync",
    )


def _add_history(sub: Subparsers) -> None:
    history = _client(
        sub, "history", "tetherless_cli.messages:cmd_history", help="show the local message history (no network)"
    )
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    history.add_argument("--since", default=None, metavar="WHEN", help="ISO date/time, duration (2h, 7d) or @position")
    history.add_argument("--with", dest="peer", default=None, metavar="ADDRESS", help="only messages with ADDRESS")
    history.add_argument("--limit", type=count, default=None, metavar="N")


def _add_outbox(sub: Subparsers) -> None:
    outbox = _client(
        sub, "outbox", "tetherless_cli.messages:cmd_outbox", help="show messages waiting to be sent or logged"
    )
    outbox.add_argument("--json", action="store_true", help="one JSON object per line")
    actions = outbox.add_subparsers(dest="outbox_command", metavar="ACTION")
    retry = _client(
        actions, "retry", "tetherless_cli.messages:cmd_outbox_retry", help="send a failed or waiting message again"
    )
    retry.add_argument("local_id", type=entry_id, metavar="ID", help="the ID column of `tetherless outbox`")
    cancel = _client(
        actions, "cancel", "tetherless_cli.messages:cmd_outbox_cancel", help="remove a message not yet sent"
    )
    cancel.add_argument("local_id", type=entry_id, metavar="ID", help="the ID column of `tetherless outbox`")


# -- log snapshot, log retention (account-log.md §6) ---------------------------------------------------------


def _add_log(sub: Subparsers) -> None:
    log_parser = sub.add_parser("log", help="the account log: snapshots and retention")
    commands = log_parser.add_subparsers(dest="log_command", required=True, metavar="COMMAND")
    snapshot = _client(
        commands,
        "snapshot",
        "tetherless_cli.account_log:cmd_log_snapshot",
        help="sync, then write a snapshot of the history at the log cursor",
    )
    snapshot.add_argument("--json", action="store_true", help="print the result as one JSON object")
    snapshot.add_argument("--part-bytes", type=int, default=None, help=argparse.SUPPRESS)  # tests: smaller parts
    retention = _client(
        commands,
        "retention",
        "tetherless_cli.account_log:cmd_log_retention",
        help="print or set the account log's retention",
    )
    retention.add_argument("value", nargs="?", default=None, metavar="forever|DAYS", help="set it (omit: print)")
    retention.add_argument("--json", action="store_true", help="print the result as one JSON object")


# -- contact …, doctor -----------------------------------------------------------------------------------------


def _add_contact(sub: Subparsers) -> None:
    contact = sub.add_parser("contact", help="short names for addresses (this device only)")
    commands = contact.add_subparsers(dest="contact_command", metavar="COMMAND", required=True)
    add = _client(
        commands, "add", "tetherless_cli.contacts:cmd_contact_add", help="save NAME for ADDRESS (send NAME then works)"
    )
    add.add_argument("name", metavar="NAME", help="no '@' or ':'; compared without regard to case")
    add.add_argument("address", metavar="ADDRESS", help="device.account@relay, or account@relay")
    add.add_argument("--replace", action="store_true", help="change the address of an existing NAME")
    listing = _client(commands, "list", "tetherless_cli.contacts:cmd_contact_list", help="every contact")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    remove = _client(commands, "remove", "tetherless_cli.contacts:cmd_contact_remove", help="forget a contact")
    remove.add_argument("name", metavar="NAME")


def _add_doctor(sub: Subparsers) -> None:
    doctor = _client(
        sub,
        "doctor",
        "tetherless_cli.doctor:cmd_doctor",
        help="check this device, its relay and its state; say what to do",
    )
    doctor.add_argument("--json", action="store_true", help="one JSON object")
    # --ca-file: the client's global option (parser.CA_FILE_HELP): the CA file to try instead of the home's.
    doctor.add_argument(
        "--timeout", type=seconds, default=10.0, metavar="S", help="seconds per network check (default 10)"
    )


#: Every top-level command, in the order ``--help`` lists them, and the function that declares it with its
#: subcommands.
COMMANDS: Final[dict[str, Callable[[Subparsers], None]]] = {
    "serve": _add_serve,
    "config": _add_config,
    "migrate": _add_migrate,
    "backup": _add_backup,
    "admin": _add_admin,
    "device": _add_device,
    "whoami": _add_whoami,
    "send": _add_send,
    "sync": _add_sync,
    "history": _add_history,
    "outbox": _add_outbox,
    "blob": _add_blob,
    "log": _add_log,
    "contact": _add_contact,
    "doctor": _add_doctor,
}

__all__ = ["COMMANDS", "SERVE_FLAGS", "build_parser", "command_named"]
