"""WebAuthn credential registration (docs/crypto.md §6): thin handlers, rules in relay.services.devices."""

from __future__ import annotations

from protocol.errors import ErrorCode as E
from protocol.messages import WebAuthnCredential, WebAuthnRegistration, WebAuthnRegistrationOptions

from .context import Api
from .routing import Call, RouteTable

ROUTES = RouteTable("accounts")


@ROUTES.route("POST", "/v1/webauthn/register/begin", response=WebAuthnRegistrationOptions, auth=True)
async def register_begin(api: Api, call: Call) -> WebAuthnRegistrationOptions:
    """POST /v1/webauthn/register/begin — Begin registering a WebAuthn credential (single-use challenge, 120 s)"""
    return await api.services.devices.register_begin(call.principal)


@ROUTES.route(
    "POST",
    "/v1/webauthn/register/complete",
    body=WebAuthnRegistration,
    response=WebAuthnCredential,
    auth=True,
    errors=(E.WEBAUTHN_INVALID, E.CHALLENGE_UNKNOWN, E.CHALLENGE_USED, E.CHALLENGE_EXPIRED),
)
async def register_complete(api: Api, call: Call) -> WebAuthnCredential:
    """POST /v1/webauthn/register/complete — Complete a WebAuthn registration: the credential is stored as pending for the account"""  # noqa: E501
    return await api.services.devices.register_complete(call.principal, call.body)
