"""Enrolment by link code (docs/crypto.md §7.2): thin handlers, rules in relay.services.enrolment."""

from __future__ import annotations

from protocol.errors import ErrorCode as E
from protocol.messages import EnrolmentOffer, EnrolmentOfferAccepted, EnrolmentProposal, EnrolmentProposalAccepted

from .context import Api
from .http import Response
from .routing import Call, RouteTable

ROUTES = RouteTable("enrolment")


@ROUTES.route(
    "POST",
    "/v1/enrolments",
    body=EnrolmentOffer,
    response=EnrolmentOfferAccepted,
    status=201,
    ip_limited=True,
    errors=(E.PREKEY_INVALID, E.ENROLMENT_USED),
)
async def offer(api: Api, call: Call) -> EnrolmentOfferAccepted:
    """POST /v1/enrolments — Offer a new device for enrolment under its link code's lookup id (no token)"""
    return await api.services.enrolments.offer(call.body)


@ROUTES.route(
    "GET",
    "/v1/enrolments/{lookup_id}",
    response=EnrolmentOffer,
    auth=True,
    errors=(E.ENROLMENT_UNKNOWN, E.ENROLMENT_EXPIRED, E.ENROLMENT_USED),
)
async def get_offer(api: Api, call: Call) -> EnrolmentOffer:
    """GET /v1/enrolments/{lookup_id} — The enrolment offer under a lookup id, for an approving device"""
    return await api.services.enrolments.get_offer(call.principal, call.path_params["lookup_id"])


@ROUTES.route(
    "POST",
    "/v1/enrolments/{lookup_id}/proposal",
    body=EnrolmentProposal,
    response=EnrolmentProposalAccepted,
    status=201,
    auth=True,
    errors=(E.ENROLMENT_UNKNOWN, E.ENROLMENT_EXPIRED, E.FORBIDDEN, E.ENROLMENT_USED),
)
async def propose(api: Api, call: Call) -> EnrolmentProposalAccepted:
    """POST /v1/enrolments/{lookup_id}/proposal — Answer an enrolment offer with a device-list version that adds the device"""  # noqa: E501
    return await api.services.enrolments.propose(call.principal, call.path_params["lookup_id"], call.body)


@ROUTES.route(
    "GET",
    "/v1/enrolments/{lookup_id}/proposal",
    response=EnrolmentProposal,
    no_content="No proposal yet",
    ip_limited=True,
    errors=(E.ENROLMENT_UNKNOWN, E.ENROLMENT_EXPIRED),
)
async def get_proposal(api: Api, call: Call) -> EnrolmentProposal | Response:
    """GET /v1/enrolments/{lookup_id}/proposal — The proposal for an enrolment offer (204 while there is none; the lookup id is the capability)"""  # noqa: E501
    proposal = await api.services.enrolments.get_proposal(call.path_params["lookup_id"])
    return proposal if proposal is not None else Response(204, [("cache-control", "no-store")])
