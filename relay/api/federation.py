"""Federation: the signed server-to-server API and the client's window onto remote device lists.

``signed`` routes are authenticated by the origin relay's HTTP message
signature before their body is decoded (the application calls
``FederationService.authenticate``); their principal is the origin relay's
name. Rules live in ``relay.services.federation`` (docs/federation.md).
"""

from __future__ import annotations

from protocol.errors import ErrorCode as E
from protocol.messages import DeliverRequest, DeliverResponse, DeviceListChain

from .context import Api
from .routing import Call, RouteTable

ROUTES = RouteTable("federation")


@ROUTES.route(
    "POST",
    "/federation/v1/deliver",
    body=DeliverRequest,
    response=DeliverResponse,
    signed=True,
    errors=(E.BATCH_TOO_LARGE,),
)
async def deliver(api: Api, call: Call) -> DeliverResponse:
    """POST /federation/v1/deliver — Deliver envelopes from another relay (RFC 9421-signed; idempotent per origin and envelope id)"""  # noqa: E501
    return await api.services.federation.receive(call.principal, call.body)


@ROUTES.route(
    "GET",
    "/federation/v1/accounts/{account_id}/devices",
    response=DeviceListChain,
    signed=True,
    errors=(E.UNKNOWN_ACCOUNT,),
)
async def peer_device_list(api: Api, call: Call) -> DeviceListChain:
    """GET /federation/v1/accounts/{account_id}/devices — A local account's device list chain, for another relay (RFC 9421-signed)"""  # noqa: E501
    return await api.services.federation.local_device_list(call.path_params["account_id"])


@ROUTES.route(
    "GET",
    "/v1/relays/{relay}/accounts/{account_id}/devices",
    response=DeviceListChain,
    auth=True,
    errors=(
        E.INVALID_FIELD,
        E.UNKNOWN_ACCOUNT,
        E.REMOTE_RECIPIENT,
        E.PEER_FORBIDDEN,
        E.PEER_ADDRESS_REFUSED,
        E.PEER_UNAVAILABLE,
        E.UNKNOWN_RELAY,
    ),
)
async def remote_device_list(api: Api, call: Call) -> DeviceListChain:
    """GET /v1/relays/{relay}/accounts/{account_id}/devices — An account's device list chain from its home relay (fetched by this relay, verified by the client)"""  # noqa: E501
    params = call.path_params
    return await api.services.federation.device_list(params["relay"], params["account_id"])
