"""FIDO2 security keys through python-fido2's CTAP2 client (docs/crypto.md §5.3, §6; docs/cli.md "Hardware keys").

A :class:`SecurityKey` turns one CTAP device into the two callables :mod:`protocol.client.devices` takes:
:meth:`SecurityKey.make_credential` (a :data:`~protocol.client.devices.CredentialMaker`, for
``add_credential``) and :meth:`SecurityKey.get_assertion` (an
:data:`~protocol.client.devices.AssertionProvider`, for approvals, revocations and joins). This module acts as
the browser would: it states the origin (``https://`` and the relay's host and port) in the client data and
refuses an rp id that origin may not use — a relay that asks the key to register for another site's rp id is
refused before the key is touched.

Where devices come from is the caller's choice: :func:`find_devices` lists USB HID keys
(``CtapHidDevice.list_devices()``) or calls a factory named ``"module:function"`` (tests plug a software
CTAP2 key in that way; the CLI reads the name from ``TETHERLESS_FIDO2_DEVICES``).

No printing: the user-presence prompt is a callback. Every fido2 failure (no touch before the timeout, a key
that does not hold the credential, a key registered already) becomes :class:`SecurityKeyError` with a
sentence a person understands. The calls block the calling thread until the key answers (the user touches
it, or the request's timeout passes).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from fido2.ctap import CtapError
from fido2.rpid import verify_rp_id
from fido2.webauthn import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialCreationOptions,
    PublicKeyCredentialDescriptor,
    PublicKeyCredentialParameters,
    PublicKeyCredentialRequestOptions,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialType,
    PublicKeyCredentialUserEntity,
    UserVerificationRequirement,
)

from ..messages import WebAuthnAssertion, WebAuthnCredential, WebAuthnRegistration, WebAuthnRegistrationOptions

if TYPE_CHECKING:
    from fido2.ctap import CtapDevice

# python-fido2's client stack (fido2.client: CTAP2, PIN protocols, extensions) costs about 60 ms of CPU to
# import; it is imported in the calls that talk to a key, so the other device commands do not pay for it.

ASSERTION_TIMEOUT_MS: Final = 60_000  # how long the key blinks for a touch before the approval gives up
_PUBLIC_KEY: Final = PublicKeyCredentialType.PUBLIC_KEY


class SecurityKeyError(Exception):
    """A security key could not do what was asked; ``str()`` is one sentence for the user."""


class NoSecurityKeyError(SecurityKeyError):
    """No FIDO2 security key is plugged in (or the factory found none)."""

    def __init__(self) -> None:
        super().__init__("no FIDO2 security key found")


def find_devices(factory: str | None = None) -> list[CtapDevice]:
    """The plugged-in CTAP devices: USB HID keys, or what ``factory`` (``"module:function"``) returns.

    Raises :class:`NoSecurityKeyError` when there is none, ``ValueError`` for a malformed factory name and
    ``ImportError``/``AttributeError`` when it names nothing. Reads the USB bus (or calls the factory) on
    every call; idempotent.
    """
    if factory:
        module_name, _, function = factory.partition(":")
        if not module_name or not function:
            raise ValueError(f"a FIDO2 device factory is module:function, not {factory!r}")
        found = list(getattr(importlib.import_module(module_name), function)())
    else:
        from fido2.hid import CtapHidDevice  # the HID backend loads the OS's USB bindings: only when used

        found = list(CtapHidDevice.list_devices())
    if not found:
        raise NoSecurityKeyError()
    return found


def relay_origin(relay_url: str) -> str:
    """The origin this client states in client data for ``relay_url``: ``https://`` with its host and port.

    The scheme is https whatever the relay's transport is: WebAuthn only runs in secure contexts, and the
    relay's check (``verify_rp_id``, crypto.md §6) wants an https origin for its rp id.
    """
    parts = urlsplit(relay_url)
    if not parts.hostname:
        raise ValueError(f"not a relay URL: {relay_url!r}")
    return f"https://{parts.netloc.rpartition('@')[2]}"


def check_rp_id(rp_id: str, origin: str) -> None:
    """The browser's rule: ``rp_id`` is the origin's host or a registrable suffix of it.

    Raises :class:`SecurityKeyError` naming both otherwise (a relay asking for another site's rp id).
    """
    if not verify_rp_id(rp_id, origin):
        raise SecurityKeyError(f"rp id {rp_id!r} is not valid for the relay {origin}: refusing to use the key for it")


def _user_verification(value: str) -> UserVerificationRequirement:
    try:
        return UserVerificationRequirement(value)
    except ValueError:
        return UserVerificationRequirement.PREFERRED


class SecurityKey:
    """One CTAP device used for the relay at ``relay_url``; ``prompt()`` is called when it waits for a touch,
    ``pin()`` when a key with a PIN set needs it (None: cancel)."""

    def __init__(
        self,
        device: CtapDevice,
        relay_url: str,
        prompt: Callable[[], None] = lambda: None,
        pin: Callable[[], str | None] = lambda: None,
    ) -> None:
        from fido2.client import ClientError, DefaultClientDataCollector, Fido2Client, UserInteraction

        class _Prompt(UserInteraction):
            def prompt_up(self) -> None:
                prompt()

            def request_pin(self, permissions: object, rp_id: str | None) -> str | None:
                return pin()  # a key with a PIN set asks for it (user verification "preferred"); None cancels

        self.origin = relay_origin(relay_url)
        try:
            self._client = Fido2Client(device, DefaultClientDataCollector(self.origin), _Prompt())
        except (CtapError, ClientError, OSError) as exc:
            raise SecurityKeyError(f"the security key does not answer: {_reason(exc)}") from exc

    def make_credential(self, options: WebAuthnRegistrationOptions) -> WebAuthnRegistration:
        """Create a credential on the key for the relay's registration ``options`` (``POST
        /v1/webauthn/register/begin``). Raises :class:`SecurityKeyError` (an rp id not valid for the relay,
        the key registered already, no touch in time). Not idempotent: each call makes a new credential."""
        from fido2.client import ClientError

        check_rp_id(options.rp_id, self.origin)
        request = PublicKeyCredentialCreationOptions(
            rp=PublicKeyCredentialRpEntity(name=options.rp_name or options.rp_id, id=options.rp_id),
            user=PublicKeyCredentialUserEntity(name=options.user_name, id=options.user_id, display_name=""),
            challenge=options.challenge,
            pub_key_cred_params=[PublicKeyCredentialParameters(type=_PUBLIC_KEY, alg=a) for a in options.algorithms],
            timeout=options.timeout_ms or None,
            exclude_credentials=[
                PublicKeyCredentialDescriptor(type=_PUBLIC_KEY, id=c) for c in options.exclude_credentials
            ]
            or None,
            authenticator_selection=AuthenticatorSelectionCriteria(
                user_verification=_user_verification(options.user_verification)
            ),
        )
        try:
            response = self._client.make_credential(request)
        except (ClientError, CtapError, OSError) as exc:
            if isinstance(exc, ClientError) and exc.code is ClientError.ERR.DEVICE_INELIGIBLE:
                raise SecurityKeyError("this security key is registered for the account already") from exc
            raise SecurityKeyError(f"the security key did not create a credential: {_reason(exc)}") from exc
        return WebAuthnRegistration(
            credential_id=bytes(response.raw_id),
            client_data_json=bytes(response.response.client_data),
            attestation_object=bytes(response.response.attestation_object),
        )

    def get_assertion(self, challenge: bytes, credentials: Sequence[WebAuthnCredential]) -> WebAuthnAssertion:
        """An assertion over ``challenge`` (a device list's ``list_hash``) by whichever of ``credentials`` is on
        this key. Only credentials whose rp id the relay's origin may use are offered (the client data names
        that origin). Raises :class:`SecurityKeyError` (none of them usable here or on this key, no touch in
        time). Each call uses the key once: its sign counter advances."""
        from fido2.client import ClientError

        usable = [c for c in credentials if verify_rp_id(c.rp_id, self.origin)]
        if not usable:
            rp_ids = ", ".join(sorted({c.rp_id for c in credentials})) or "none"
            raise SecurityKeyError(f"the account's hardware keys are registered for rp id {rp_ids}, not {self.origin}")
        rp_id = usable[0].rp_id
        request = PublicKeyCredentialRequestOptions(
            challenge=challenge,
            timeout=ASSERTION_TIMEOUT_MS,
            rp_id=rp_id,
            allow_credentials=[
                PublicKeyCredentialDescriptor(type=_PUBLIC_KEY, id=c.credential_id) for c in usable if c.rp_id == rp_id
            ],
            user_verification=UserVerificationRequirement.PREFERRED,
        )
        try:
            response = self._client.get_assertion(request).get_response(0)
        except (ClientError, CtapError, OSError) as exc:
            if _no_credential(exc):
                raise SecurityKeyError("this security key holds none of the account's hardware keys") from exc
            raise SecurityKeyError(f"the security key did not sign: {_reason(exc)}") from exc
        return WebAuthnAssertion(
            credential_id=bytes(response.raw_id),
            authenticator_data=bytes(response.response.authenticator_data),
            client_data_json=bytes(response.response.client_data),
            signature=bytes(response.response.signature),
        )


def _no_credential(exc: Exception) -> bool:
    from fido2.client import ClientError

    cause = exc.cause if isinstance(exc, ClientError) else exc
    return isinstance(cause, CtapError) and cause.code == CtapError.ERR.NO_CREDENTIALS


def _reason(exc: Exception) -> str:
    from fido2.client import ClientError

    if isinstance(exc, ClientError):
        if exc.code is ClientError.ERR.TIMEOUT:
            return "it was not touched in time"
        if exc.cause is not None:
            return str(exc.cause)
        return exc.code.name.lower().replace("_", " ")
    return str(exc) or exc.__class__.__name__


__all__ = [
    "ASSERTION_TIMEOUT_MS",
    "NoSecurityKeyError",
    "SecurityKey",
    "SecurityKeyError",
    "check_rp_id",
    "find_devices",
    "relay_origin",
]
