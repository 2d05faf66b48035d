"""Federation routes: the signed server-to-server API and the client's window onto remote device lists.

Thin handlers like the rest of the API; the rules live in
``relay.services.federation``. ``signed`` routes are authenticated by the
origin relay's HTTP message signature before their body is decoded (the
application calls ``FederationService.authenticate``); their principal is
the origin relay's name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.errors import ErrorCode as E
from protocol.messages import DeliverRequest, DeliverResponse, DeviceListChain

from .routing import Call, Route

if TYPE_CHECKING:
    from .routes import Endpoints

SIGNATURE_ERRORS = (
    E.BODY_TOO_LARGE,
    E.SIGNATURE_MISSING,
    E.BAD_SIGNATURE,
    E.SIGNATURE_EXPIRED,
    E.WRONG_DESTINATION,
    E.DIGEST_MISMATCH,
    E.PEER_FORBIDDEN,
    E.UNKNOWN_RELAY_KEY,
    E.PEER_UNAVAILABLE,
    E.RATE_LIMITED,
    E.SIGNATURE_REPLAYED,
)


def federation_routes(ep: Endpoints) -> list[Route]:
    """The federation part of the route table."""

    async def deliver(call: Call) -> DeliverResponse:
        """POST /federation/v1/deliver — store envelopes another relay delivers (signed by it)."""
        return await ep.services.federation.receive(call.principal, call.body)

    async def peer_device_list(call: Call) -> DeviceListChain:
        """GET /federation/v1/accounts/{account_id}/devices — a local account's chain, for a peer (signed)."""
        return await ep.services.federation.local_device_list(call.path_params["account_id"])

    async def remote_device_list(call: Call) -> DeviceListChain:
        """GET /v1/relays/{relay}/accounts/{account_id}/devices — any account's chain, via its home relay."""
        params = call.path_params
        return await ep.services.federation.device_list(params["relay"], params["account_id"])

    return [
        Route(
            "POST",
            "/federation/v1/deliver",
            deliver,
            "Deliver envelopes from another relay (RFC 9421-signed; idempotent per origin and envelope id)",
            body=DeliverRequest,
            response=DeliverResponse,
            signed=True,
            errors=(*SIGNATURE_ERRORS, E.MALFORMED_BODY, E.INVALID_FIELD, E.BATCH_TOO_LARGE),
            tag="federation",
        ),
        Route(
            "GET",
            "/federation/v1/accounts/{account_id}/devices",
            peer_device_list,
            "A local account's device list chain, for another relay (RFC 9421-signed)",
            response=DeviceListChain,
            signed=True,
            errors=(*SIGNATURE_ERRORS, E.UNKNOWN_ACCOUNT),
            tag="federation",
        ),
        Route(
            "GET",
            "/v1/relays/{relay}/accounts/{account_id}/devices",
            remote_device_list,
            "An account's device list chain from its home relay (fetched by this relay, verified by the client)",
            response=DeviceListChain,
            auth=True,
            errors=(
                E.MISSING_TOKEN,
                E.INVALID_TOKEN,
                E.TOKEN_EXPIRED,
                E.TOKEN_REVOKED,
                E.RATE_LIMITED,
                E.UNKNOWN_ACCOUNT,
                E.REMOTE_RECIPIENT,
                E.PEER_FORBIDDEN,
                E.PEER_UNAVAILABLE,
            ),
            tag="federation",
        ),
    ]
