"""Device-list and WebAuthn routes (docs/crypto.md §3.3, §6): thin handlers, rules in relay.services.devices."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.errors import ErrorCode as E
from protocol.messages import (
    DeviceListAccepted,
    PostDeviceListRequest,
    WebAuthnCredential,
    WebAuthnRegistration,
    WebAuthnRegistrationOptions,
)

from .routing import Call, Route

if TYPE_CHECKING:
    from .routes import Endpoints

_AUTH_ERRORS = (E.MISSING_TOKEN, E.INVALID_TOKEN, E.TOKEN_EXPIRED, E.TOKEN_REVOKED, E.DEVICE_REVOKED, E.RATE_LIMITED)
_BODY_ERRORS = (E.MALFORMED_BODY, E.INVALID_FIELD, E.UNSUPPORTED_MEDIA_TYPE, E.BODY_TOO_LARGE)


def device_routes(ep: Endpoints) -> list[Route]:
    """The device-list and WebAuthn part of the route table."""

    async def post_device_list(call: Call) -> DeviceListAccepted:
        """POST /v1/accounts/{account_id}/devices — append the next device-list version (approvals authorize it)."""
        return await ep.services.devices.post_version(call.path_params["account_id"], call.body)

    async def register_begin(call: Call) -> WebAuthnRegistrationOptions:
        """POST /v1/webauthn/register/begin — creation options for a new WebAuthn credential of the account."""
        return await ep.services.devices.register_begin(call.principal)

    async def register_complete(call: Call) -> WebAuthnCredential:
        """POST /v1/webauthn/register/complete — verify the attestation; the credential becomes pending."""
        return await ep.services.devices.register_complete(call.principal, call.body)

    return [
        Route(
            "POST",
            "/v1/accounts/{account_id}/devices",
            post_device_list,
            "Append the next version of an account's device list (no token: its approvals are the authorization)",
            body=PostDeviceListRequest,
            response=DeviceListAccepted,
            status=201,
            ip_limited=True,
            errors=(
                *_BODY_ERRORS,
                E.RATE_LIMITED,
                E.UNKNOWN_ACCOUNT,
                E.DEVICE_LIST_CONFLICT,
                E.INVALID_DEVICE_LIST,
                E.BAD_SIGNATURE,
                E.POLICY_NOT_MET,
                E.WEBAUTHN_INVALID,
                E.WEBAUTHN_REPLAYED,
            ),
            tag="accounts",
        ),
        Route(
            "POST",
            "/v1/webauthn/register/begin",
            register_begin,
            "Begin registering a WebAuthn credential (single-use challenge, 120 s)",
            response=WebAuthnRegistrationOptions,
            auth=True,
            errors=_AUTH_ERRORS,
            tag="accounts",
        ),
        Route(
            "POST",
            "/v1/webauthn/register/complete",
            register_complete,
            "Complete a WebAuthn registration: the credential is stored as pending for the account",
            body=WebAuthnRegistration,
            response=WebAuthnCredential,
            auth=True,
            errors=(
                *_AUTH_ERRORS,
                *_BODY_ERRORS,
                E.WEBAUTHN_INVALID,
                E.CHALLENGE_UNKNOWN,
                E.CHALLENGE_USED,
                E.CHALLENGE_EXPIRED,
            ),
            tag="accounts",
        ),
    ]
