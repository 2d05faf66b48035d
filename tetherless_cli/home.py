"""Opening this device's home from the command line: where it is, where its passphrase comes from."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from protocol.client.keystore import PASSPHRASE_ENV, AlreadyInitialisedError, DeviceKeys, Keystore, WrongPassphraseError
from tetherless_cli.exits import UsageError
from tetherless_cli.home_path import resolve_home


def _prompts(args: argparse.Namespace) -> bool:
    """Whether the passphrase comes from a prompt (no file, no environment variable, stdin a terminal)."""
    return not getattr(args, "passphrase_file", None) and PASSPHRASE_ENV not in os.environ and sys.stdin.isatty()


def passphrase_source(args: argparse.Namespace, *, confirm: bool = False) -> Callable[[], str]:
    """Where the keystore's passphrase comes from, asked only when needed.

    ``--passphrase-file FILE`` (its first line), else ``$TETHERLESS_PASSPHRASE``,
    else a prompt naming the home when stdin is a terminal (twice with ``confirm``), else a
    :class:`UsageError` (exit 2) saying how to provide one.
    """
    home = resolve_home(getattr(args, "home", None))

    def source() -> str:
        path = getattr(args, "passphrase_file", None)
        if path:
            try:
                text = Path(path).expanduser().read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot read --passphrase-file {path}: {exc}") from exc
            lines = text.splitlines()
            return lines[0] if lines else ""
        env = os.environ.get(PASSPHRASE_ENV)
        if env is not None:
            return env
        if _prompts(args):
            import getpass  # here: it imports termios, which only a prompt needs

            first = getpass.getpass(f"{'New passphrase' if confirm else 'Passphrase'} for {home}: ")
            if confirm and getpass.getpass("Repeat the passphrase: ") != first:
                raise UsageError("the passphrases do not match")
            return first
        raise UsageError(
            f"a passphrase is needed: use --passphrase-file FILE or set {PASSPHRASE_ENV} (stdin is not a terminal)"
        )

    return source


def require_yes_off_terminal(args: argparse.Namespace, command: str) -> None:
    """A command that changes the account asks at a terminal; off one it runs only with ``--yes``: raises
    :class:`UsageError` (exit 2) saying so, before anything is read or sent."""
    if not args.yes and not sys.stdin.isatty():
        raise UsageError(f"`{command}` needs --yes when stdin is not a terminal (nothing was changed)")


def ask(question: str, *, yes: bool) -> bool:
    """``yes`` (``--yes`` was given), else the answer to ``question [y/N]`` asked on the terminal (prompt on
    stderr, so stdout stays the command's output): True only for y or yes; the end of input is no."""
    if yes:
        return True
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def open_keystore(args: argparse.Namespace, *, confirm: bool = False) -> Keystore:
    """The home's :class:`Keystore` with the CLI's passphrase source (nothing is read yet)."""
    return Keystore(resolve_home(getattr(args, "home", None)), passphrase=passphrase_source(args, confirm=confirm))


def load(args: argparse.Namespace) -> tuple[Keystore, DeviceKeys]:
    """Unlock the home's keys (asks for the passphrase, once more at a terminal when it is wrong); raises the
    keystore's errors. ``--ca-file`` replaces the CA file the home keeps, for this command only."""
    keystore = open_keystore(args)
    try:
        keys = keystore.load()
    except WrongPassphraseError:
        if not _prompts(args):
            raise  # a file or the environment gave it: asking again would get the same answer
        print("wrong passphrase; try again", file=sys.stderr, flush=True)
        keystore = open_keystore(args)
        keys = keystore.load()
    return keystore, with_ca_file(args, keys)


def with_ca_file(args: argparse.Namespace, keys: DeviceKeys) -> DeviceKeys:
    """``keys`` trusting ``--ca-file`` when it was given (the relay's certificate changed CA since ``device init``);
    not stored: the home keeps the file it was made with."""
    ca_file = getattr(args, "ca_file", None)
    return msgspec.structs.replace(keys, ca_file=ca_file) if ca_file else keys


def new_home(args: argparse.Namespace) -> Keystore:
    """A keystore for a device about to be made: the home must be free; the passphrase is asked now (twice at a
    terminal), before anything exists on a relay."""
    home = resolve_home(getattr(args, "home", None))
    if Keystore(home).exists():
        raise AlreadyInitialisedError(f"a device already exists in {home}")
    return Keystore(home, passphrase=passphrase_source(args, confirm=True)())


__all__ = ["ask", "load", "new_home", "open_keystore", "passphrase_source", "require_yes_off_terminal", "with_ca_file"]
