"""The command line's side of FIDO2 security keys: which key, the touch prompt, the PIN prompt.

The commands that use a key (``device fido2 add|list|remove``, ``device approve|revoke --fido2``,
``device link --account ADDRESS --fido2``) live in :mod:`tetherless_cli.devices`; the key itself is
:class:`protocol.client.fido2.SecurityKey` over python-fido2's CTAP2 client.

``TETHERLESS_FIDO2_DEVICES=module:function`` replaces the USB HID scan with a factory returning CTAP
devices (the e2e tests plug ``tests.support.soft_ctap:devices`` in; docs/security.md says why that is no
new exposure: whoever sets the environment of the process can already run any code in it).
A :class:`~protocol.client.fido2.SecurityKeyError` is a sentence for the user: the front door prints it as the
command's one line, exit 1 (:data:`tetherless_cli.main.LOCAL_ERRORS`).
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import TYPE_CHECKING

from protocol.client.devices import AssertionProvider
from tetherless_cli.exits import UsageError

if TYPE_CHECKING:
    from protocol.client.fido2 import SecurityKey

# protocol.client.fido2 (python-fido2's CTAP stack) is imported by the calls below, not here: the device
# commands that use no key (list, init, link by code …) do not pay for it (docs/performance.md, CLI start-up).

DEVICES_ENV = "TETHERLESS_FIDO2_DEVICES"
TOUCH_PROMPT = "Touch your security key"


def _prompt() -> None:
    print(TOUCH_PROMPT, file=sys.stderr, flush=True)


def _pin() -> str | None:
    """A key with a PIN set asks for it; only at a terminal (off one the operation is cancelled)."""
    if not sys.stdin.isatty():
        return None
    return getpass.getpass("Security key PIN: ") or None


def security_key(relay_url: str) -> SecurityKey:
    """The first plugged-in security key, speaking for the relay at ``relay_url``.

    Raises :class:`~protocol.client.fido2.NoSecurityKeyError` ("no FIDO2 security key found") and
    :class:`UsageError` for a malformed ``$TETHERLESS_FIDO2_DEVICES``. Asks the key nothing yet.
    """
    from protocol.client.fido2 import SecurityKey, find_devices

    try:
        found = find_devices(os.environ.get(DEVICES_ENV) or None)
    except (ValueError, ImportError, AttributeError) as exc:
        raise UsageError(f"${DEVICES_ENV}: {exc}") from exc
    return SecurityKey(found[0], relay_url, _prompt, _pin)


def assertion_provider(relay_url: str, wanted: bool) -> AssertionProvider | None:
    """``--fido2``: the key's :meth:`~protocol.client.fido2.SecurityKey.get_assertion`, looked for now so that
    a missing key fails before anything is sent; None without the flag."""
    return security_key(relay_url).get_assertion if wanted else None


__all__ = ["DEVICES_ENV", "TOUCH_PROMPT", "assertion_provider", "security_key"]
