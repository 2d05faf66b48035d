"""``tetherless whoami [--account]``: this device's address, or its account's (no network, no passphrase).

It reads the home's public identity (:mod:`protocol.client.identity`, standard library only) and unlocks the
keystore only when that copy is missing or cannot be trusted (a home made before it existed; a format-1 home).
"""

from __future__ import annotations

import argparse

from protocol.client.identity import read_identity
from tetherless_cli.exits import EXIT_OK
from tetherless_cli.home_path import resolve_home


def cmd_whoami(args: argparse.Namespace) -> int:
    """Print the address. Raises the keystore's errors (no home, wrong passphrase) only on the fallback path."""
    identity = read_identity(resolve_home(args.home))
    if identity is None:
        from tetherless_cli.home import load  # the slow path: cryptography, and perhaps the passphrase

        _, keys = load(args)
        address, account = keys.address, keys.account_address
    else:
        address, account = identity.address, identity.account_address
    print(account if args.account else address, flush=True)
    return EXIT_OK


__all__ = ["cmd_whoami"]
