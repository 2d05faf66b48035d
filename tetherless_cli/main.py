"""``tetherless``: the front door. Parses, imports the one command that runs, and turns its failure into one line.

Only :mod:`argparse` and this package's declarations are imported before a command is chosen, so ``--help``
and ``--version`` import no cryptography, trio, database driver, relay or SDK module
(docs/decisions/0010-cli-package.md; tests/cli/test_startup.py checks it). A handler is a function
``(args) -> int``; an ``async`` one runs under trio. Every failure prints exactly one line to stderr
(``tetherless: error: <code>: <detail>`` for relay errors) and no traceback (``TETHERLESS_DEBUG=1`` shows
one); the exit codes are :mod:`tetherless_cli.exits`.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from tetherless_cli.exits import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_REVOKED, EXIT_USAGE, PROG, UsageError
from tetherless_cli.parser import build_parser

Handler = Callable[[Any], Any]

# inspect.CO_COROUTINE: `inspect` itself costs more to import than a whole `--version` (tests check the value).
CO_COROUTINE = 0x80


def is_async(handler: Handler) -> bool:
    """True for an ``async def`` handler (run under trio)."""
    return bool(getattr(getattr(handler, "__code__", None), "co_flags", 0) & CO_COROUTINE)


def version() -> str:
    """This installation's version, from the package metadata (``0+unknown`` when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as metadata_version

    try:
        return metadata_version("tetherless")
    except PackageNotFoundError:
        return "0+unknown"


def error(message: str) -> None:
    """The one stderr line of a failed command."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def resolve_handler(name: str) -> Handler:
    """Import ``"module:function"`` (only now: the point of naming handlers by string)."""
    module_name, _, function = name.partition(":")
    handler: Handler = getattr(importlib.import_module(module_name), function)
    return handler


def without_collecting(load: Callable[[str], Handler], name: str) -> Handler:
    """``load(name)`` with the cyclic garbage collector off, and what it created frozen (``gc.freeze``).

    Importing a command's modules creates ~36k tracked objects that live as long as the process (modules, classes,
    functions): the collector would run ~80 times while they are made, scanning them again each time and freeing
    nothing (≈ 15 % of the CPU of importing what ``send`` needs; docs/performance.md "CLI start-up, third round").
    Frozen, later collections skip them. The collector is on again afterwards if it was before, for the command
    itself. Raises what ``load`` raises (the collector is restored all the same).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return load(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``tetherless`` command; returns its exit code (argparse exits 2 itself on a usage error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)  # only the command argv names
    args = parser.parse_args(argv)
    if args.version:
        print(f"{PROG} {version()}")
        return 0
    if getattr(args, "handler", None) is None:
        parser.error("a COMMAND is required")
    try:
        handler = without_collecting(resolve_handler, args.handler)
        if is_async(handler):
            return _run_async(handler, args)
        return int(handler(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        return report(exc, relay_url=getattr(args, "relay_url", None))


def _run_async(handler: Handler, args: Any) -> int:
    import trio

    from protocol.client.keystore import INSECURE_KDF_ENV, insecure_kdf

    # On every client command, so nobody keeps real keys under test-only Argon2id costs without being told. Only
    # on a terminal: scripts and tests that opted in read stderr as "one line per error" (the home carries a mark).
    if insecure_kdf() and sys.stderr.isatty():
        print(
            f"{PROG}: warning: {INSECURE_KDF_ENV}=1: keystores use test-only Argon2id costs "
            "(a passphrase is as cheap to guess as a plain hash); never use this for real keys",
            file=sys.stderr,
            flush=True,
        )
    return int(trio.run(handler, args))


#: SDK errors that are a sentence for the user as they are: (module, class, exit code), most specific first. Looked
#: up in ``sys.modules`` only: the command that raised one imported its module, and ``--help`` must import none.
LOCAL_ERRORS: Final[tuple[tuple[str, str, int], ...]] = (
    ("protocol.client.contacts", "InvalidContactError", EXIT_USAGE),  # a bad name or address
    ("protocol.client.contacts", "ContactError", EXIT_FAILURE),  # a taken name, an unknown one
    ("protocol.client.outbox", "OutboxError", EXIT_FAILURE),  # no such entry, or sent already
    ("protocol.client.fido2", "SecurityKeyError", EXIT_FAILURE),  # no key, no touch, not the account's key
    ("protocol.client.blobs", "MediaError", EXIT_FAILURE),  # a file to send or fetch: unreadable, corrupt …
)


def _loaded_class(module: str, name: str) -> type[BaseException] | None:
    """``module.name`` if that module is imported already (else nothing raised it), without importing it."""
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def report(exc: Exception, *, relay_url: str | None = None) -> int:
    """Print ``exc`` as one stderr line and return its exit code (the one place that does this)."""
    if isinstance(exc, UsageError):
        error(str(exc))
        return EXIT_USAGE
    if isinstance(exc, BrokenPipeError):
        # stdout went away (e.g. `| head`): nothing more to print, and Python must not complain while flushing
        # it at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    for module, name, code in LOCAL_ERRORS:
        cls = _loaded_class(module, name)
        if cls is not None and isinstance(exc, cls):
            error(str(exc))
            return code
    # Imported here, not above: the command that raised them has imported them already, and --help must not.
    from protocol.client.chains import DeviceRevokedError
    from protocol.client.http import ConnectError, TLSTrustError, TransportError
    from protocol.client.keystore import KeystoreError, PassphraseRequiredError, WrongPassphraseError
    from protocol.client.localdb import LocalDBError
    from protocol.errors import ErrorCode, RemoteError, TetherlessError, UnknownRemoteError

    if isinstance(exc, DeviceRevokedError):
        error(f"{exc.code.value}: {exc.detail}")
        return EXIT_REVOKED
    if isinstance(exc, RemoteError):
        if exc.code is ErrorCode.DEVICE_REVOKED:
            error(f"{exc.code.value}: this device was revoked from its account and stops here ({exc.detail})")
            return EXIT_REVOKED
        error(f"{exc.code.value}: {exc.detail}" if exc.detail else exc.code.value)
    elif isinstance(exc, UnknownRemoteError):
        error(f"the relay answered HTTP {exc.http_status} without a problem document")
    elif isinstance(exc, TetherlessError):
        error(f"{exc.code.value}: {exc.detail}" if exc.detail else exc.code.value)
    elif isinstance(exc, TLSTrustError):
        error(f"{exc}: pass --ca-file PEM with the CA certificate that signed it")
        return EXIT_USAGE
    elif isinstance(exc, TransportError) and not exc.retryable:
        # Only a change of settings helps (http:// against a TLS port, or https:// against a plain one): usage.
        error(str(exc))
        return EXIT_USAGE
    elif isinstance(exc, ConnectError):
        where = f" at {relay_url}" if relay_url else ""
        error(f"cannot reach the relay{where}: {exc}")
    elif isinstance(exc, TransportError):
        error(f"connection to the relay failed: {exc}")
    elif isinstance(exc, WrongPassphraseError | PassphraseRequiredError):
        error(str(exc))
        return EXIT_USAGE
    elif isinstance(exc, KeystoreError | LocalDBError):
        error(str(exc))
    else:
        if os.environ.get("TETHERLESS_DEBUG"):
            import traceback

            traceback.print_exception(exc)
        error(f"internal: {exc.__class__.__name__}: {exc}")
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
