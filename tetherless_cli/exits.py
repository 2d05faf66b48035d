"""THE exit-code table of ``tetherless`` (every command; docs/decisions/0010-cli-package.md).

Imported by the front door before any command runs, so it imports nothing.
"""

from __future__ import annotations

from typing import Final

PROG: Final = "tetherless"

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # anything else; one ``tetherless: error: …`` line on stderr
# Bad arguments or configuration: no passphrase source or a wrong passphrase, a relay that refuses to start, a
# relay URL or trusted CA that does not match the relay's TLS (untrusted certificate, http:// vs https://).
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3  # the home relay stayed unreachable (``sync``, ``log …``)
EXIT_REVOKED: Final = 4  # this device was removed from its account's device list (docs/account-log.md §13)
EXIT_INTERRUPTED: Final = 130  # Ctrl-C (128 + SIGINT)


class UsageError(Exception):
    """A bad argument the parser could not catch: one line, exit status 2."""


__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REVOKED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "PROG",
    "UsageError",
]
