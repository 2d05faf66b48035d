"""Device lists (docs/crypto.md §3.3): read an account's chain, append its next version."""

from __future__ import annotations

from protocol.errors import ErrorCode as E
from protocol.messages import DeviceListAccepted, DeviceListChain, PostDeviceListRequest

from .context import Api
from .routing import Call, RouteTable

ROUTES = RouteTable("accounts")


@ROUTES.route("GET", "/v1/accounts/{account_id}/devices", response=DeviceListChain, errors=(E.UNKNOWN_ACCOUNT,))
async def device_list(api: Api, call: Call) -> DeviceListChain:
    """GET /v1/accounts/{account_id}/devices — An account's device list chain, genesis first"""
    return await api.services.accounts.device_list_chain(call.path_params["account_id"])


@ROUTES.route(
    "POST",
    "/v1/accounts/{account_id}/devices",
    body=PostDeviceListRequest,
    response=DeviceListAccepted,
    status=201,
    ip_limited=True,
    errors=(
        E.RATE_LIMITED,  # per-account budget of device-list changes
        E.UNKNOWN_ACCOUNT,
        E.DEVICE_LIST_CONFLICT,
        E.INVALID_DEVICE_LIST,
        E.BAD_SIGNATURE,
        E.POLICY_NOT_MET,
        E.WEBAUTHN_INVALID,
        E.WEBAUTHN_REPLAYED,
    ),
)
async def post_device_list(api: Api, call: Call) -> DeviceListAccepted:
    """POST /v1/accounts/{account_id}/devices — Append the next version of an account's device list (no token: its approvals are the authorization)"""  # noqa: E501
    return await api.services.devices.post_version(call.path_params["account_id"], call.body)
