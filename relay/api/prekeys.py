"""Prekey and enrolment routes (docs/crypto.md §5.2, §7.2): thin handlers, rules in relay.services.prekeys
and relay.services.enrolment."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.errors import ErrorCode as E
from protocol.errors import TetherlessError
from protocol.messages import (
    ClaimPrekeysRequest,
    ClaimPrekeysResponse,
    EnrolmentOffer,
    EnrolmentOfferAccepted,
    EnrolmentProposal,
    EnrolmentProposalAccepted,
    FederatedClaimRequest,
    PrekeyCounts,
    PrekeyUpload,
)

from .federation import SIGNATURE_ERRORS
from .http import Response
from .routing import Call, Route

if TYPE_CHECKING:
    from .routes import Endpoints

_AUTH_ERRORS = (E.MISSING_TOKEN, E.INVALID_TOKEN, E.TOKEN_EXPIRED, E.TOKEN_REVOKED, E.DEVICE_REVOKED, E.RATE_LIMITED)
_BODY_ERRORS = (E.MALFORMED_BODY, E.INVALID_FIELD, E.UNSUPPORTED_MEDIA_TYPE, E.BODY_TOO_LARGE)


def prekey_routes(ep: Endpoints) -> list[Route]:
    """The prekey and enrolment part of the route table."""

    async def upload(call: Call) -> PrekeyCounts:
        """PUT /v1/prekeys — verify and store the caller's prekeys; answer what it now holds."""
        if call.body is None:
            raise TetherlessError(E.MALFORMED_BODY, "this endpoint needs a body")
        return await ep.services.prekeys.upload(call.principal, call.body)

    async def counts(call: Call) -> PrekeyCounts:
        """GET /v1/prekeys — the caller's one-time keys left and current signed/last-resort key ids."""
        return await ep.services.prekeys.counts(call.principal)

    async def claim(call: Call) -> ClaimPrekeysResponse:
        """POST /v1/prekeys/claim — one prekey bundle per named device (one-time keys served once)."""
        return await ep.services.prekeys.claim(call.principal, call.body)

    async def peer_claim(call: Call) -> ClaimPrekeysResponse:
        """POST /federation/v1/prekeys/claim — bundles of local devices for a user of another relay (signed)."""
        return await ep.services.prekeys.claim_for_peer(call.principal, call.body)

    async def offer(call: Call) -> EnrolmentOfferAccepted:
        """POST /v1/enrolments — a new device's enrolment offer, stored under its lookup id."""
        return await ep.services.enrolments.offer(call.body)

    async def get_offer(call: Call) -> EnrolmentOffer:
        """GET /v1/enrolments/{lookup_id} — the offer, for an approving device."""
        return await ep.services.enrolments.get_offer(call.principal, call.path_params["lookup_id"])

    async def propose(call: Call) -> EnrolmentProposalAccepted:
        """POST /v1/enrolments/{lookup_id}/proposal — a device-list version adding the offering device."""
        return await ep.services.enrolments.propose(call.principal, call.path_params["lookup_id"], call.body)

    async def get_proposal(call: Call) -> EnrolmentProposal | Response:
        """GET /v1/enrolments/{lookup_id}/proposal — the proposal (204 while there is none)."""
        proposal = await ep.services.enrolments.get_proposal(call.path_params["lookup_id"])
        return proposal if proposal is not None else Response(204, [("cache-control", "no-store")])

    enrolment_errors = (E.ENROLMENT_UNKNOWN, E.ENROLMENT_EXPIRED)
    return [
        Route(
            "PUT",
            "/v1/prekeys",
            upload,
            "Upload the device's prekeys (signed prekey, PQ last-resort key, one-time keys)",
            body=PrekeyUpload,
            response=PrekeyCounts,
            auth=True,
            errors=(*_AUTH_ERRORS, *_BODY_ERRORS, E.PREKEY_INVALID, E.UNKNOWN_DEVICE),
            tag="prekeys",
        ),
        Route(
            "GET",
            "/v1/prekeys",
            counts,
            "The device's prekey counts and current key ids",
            response=PrekeyCounts,
            auth=True,
            errors=_AUTH_ERRORS,
            tag="prekeys",
        ),
        Route(
            "POST",
            "/v1/prekeys/claim",
            claim,
            "Claim prekey bundles of devices (one-time keys are served once)",
            body=ClaimPrekeysRequest,
            response=ClaimPrekeysResponse,
            auth=True,
            errors=(*_AUTH_ERRORS, *_BODY_ERRORS),
            tag="prekeys",
        ),
        Route(
            "POST",
            "/federation/v1/prekeys/claim",
            peer_claim,
            "Claim prekey bundles of this relay's devices for a user of another relay (RFC 9421-signed)",
            body=FederatedClaimRequest,
            response=ClaimPrekeysResponse,
            signed=True,
            errors=(*SIGNATURE_ERRORS, E.MALFORMED_BODY, E.INVALID_FIELD),
            tag="federation",
        ),
        Route(
            "POST",
            "/v1/enrolments",
            offer,
            "Offer a new device for enrolment under its link code's lookup id (no token)",
            body=EnrolmentOffer,
            response=EnrolmentOfferAccepted,
            status=201,
            ip_limited=True,
            errors=(*_BODY_ERRORS, E.RATE_LIMITED, E.PREKEY_INVALID, E.ENROLMENT_USED),
            tag="enrolment",
        ),
        Route(
            "GET",
            "/v1/enrolments/{lookup_id}",
            get_offer,
            "The enrolment offer under a lookup id, for an approving device",
            response=EnrolmentOffer,
            auth=True,
            errors=(*_AUTH_ERRORS, *enrolment_errors, E.ENROLMENT_USED),
            tag="enrolment",
        ),
        Route(
            "POST",
            "/v1/enrolments/{lookup_id}/proposal",
            propose,
            "Answer an enrolment offer with a device-list version that adds the device",
            body=EnrolmentProposal,
            response=EnrolmentProposalAccepted,
            status=201,
            auth=True,
            errors=(*_AUTH_ERRORS, *_BODY_ERRORS, *enrolment_errors, E.FORBIDDEN, E.ENROLMENT_USED),
            tag="enrolment",
        ),
        Route(
            "GET",
            "/v1/enrolments/{lookup_id}/proposal",
            get_proposal,
            "The proposal for an enrolment offer (204 while there is none; the lookup id is the capability)",
            response=EnrolmentProposal,
            no_content="No proposal yet",
            ip_limited=True,
            errors=(E.RATE_LIMITED, *enrolment_errors),
            tag="enrolment",
        ),
    ]
