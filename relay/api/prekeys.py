"""Prekeys (docs/crypto.md §5.2): thin handlers, rules in relay.services.prekeys."""

from __future__ import annotations

from protocol.errors import ErrorCode as E
from protocol.errors import TetherlessError
from protocol.messages import (
    ClaimPrekeysRequest,
    ClaimPrekeysResponse,
    FederatedClaimRequest,
    PrekeyCounts,
    PrekeyUpload,
)

from .context import Api
from .routing import Call, RouteTable

ROUTES = RouteTable("prekeys")


@ROUTES.route(
    "PUT",
    "/v1/prekeys",
    body=PrekeyUpload,
    response=PrekeyCounts,
    auth=True,
    errors=(E.MALFORMED_BODY, E.PREKEY_INVALID, E.UNKNOWN_DEVICE),
)
async def upload(api: Api, call: Call) -> PrekeyCounts:
    """PUT /v1/prekeys — Upload the device's prekeys (signed prekey, PQ last-resort key, one-time keys)"""
    if call.body is None:  # PUT bodies are optional to the application; this one is not
        raise TetherlessError(E.MALFORMED_BODY, "this endpoint needs a body")
    return await api.services.prekeys.upload(call.principal, call.body)


@ROUTES.route("GET", "/v1/prekeys", response=PrekeyCounts, auth=True)
async def counts(api: Api, call: Call) -> PrekeyCounts:
    """GET /v1/prekeys — The device's prekey counts and current key ids"""
    return await api.services.prekeys.counts(call.principal)


@ROUTES.route("POST", "/v1/prekeys/claim", body=ClaimPrekeysRequest, response=ClaimPrekeysResponse, auth=True)
async def claim(api: Api, call: Call) -> ClaimPrekeysResponse:
    """POST /v1/prekeys/claim — Claim prekey bundles of devices (one-time keys are served once)"""
    return await api.services.prekeys.claim(call.principal, call.body)


@ROUTES.route(
    "POST",
    "/federation/v1/prekeys/claim",
    body=FederatedClaimRequest,
    response=ClaimPrekeysResponse,
    signed=True,
    tag="federation",
)
async def peer_claim(api: Api, call: Call) -> ClaimPrekeysResponse:
    """POST /federation/v1/prekeys/claim — Claim prekey bundles of this relay's devices for a user of another relay (RFC 9421-signed)"""  # noqa: E501
    return await api.services.prekeys.claim_for_peer(call.principal, call.body)
