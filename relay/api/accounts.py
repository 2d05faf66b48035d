"""Accounts and authentication: create an account, challenge, session, revoke (docs/protocol.md)."""

from __future__ import annotations

from protocol.errors import ErrorCode as E
from protocol.messages import (
    AccountCreated,
    Challenge,
    ChallengeRequest,
    CreateAccountRequest,
    RevokeSessionsRequest,
    Session,
    SessionRequest,
    SessionsRevoked,
)

from .context import Api
from .routing import Call, RouteTable

ROUTES = RouteTable("accounts")


@ROUTES.route(
    "POST",
    "/v1/accounts",
    body=CreateAccountRequest,
    response=AccountCreated,
    status=201,
    ip_limited=True,
    errors=(E.INVALID_DEVICE_LIST, E.BAD_SIGNATURE, E.ACCOUNT_EXISTS),
)
async def create_account(api: Api, call: Call) -> AccountCreated:
    """POST /v1/accounts — Create an account with its genesis device list"""
    return await api.services.accounts.create_account(call.body)


@ROUTES.route(
    "POST",
    "/v1/auth/challenge",
    body=ChallengeRequest,
    response=Challenge,
    ip_limited=True,
    errors=(E.UNKNOWN_DEVICE, E.DEVICE_REVOKED),
    tag="auth",
)
async def challenge(api: Api, call: Call) -> Challenge:
    """POST /v1/auth/challenge — Get a single-use challenge for a device"""
    return await api.services.auth.issue_challenge(call.body)


@ROUTES.route(
    "POST",
    "/v1/auth/session",
    body=SessionRequest,
    response=Session,
    ip_limited=True,
    errors=(
        E.UNKNOWN_DEVICE,
        E.DEVICE_REVOKED,
        E.CHALLENGE_UNKNOWN,
        E.CHALLENGE_USED,
        E.CHALLENGE_EXPIRED,
        E.BAD_SIGNATURE,
    ),
    tag="auth",
)
async def session(api: Api, call: Call) -> Session:
    """POST /v1/auth/session — Exchange a signed challenge for a bearer token"""
    return await api.services.auth.open_session(call.body)


@ROUTES.route("DELETE", "/v1/auth/session", body=RevokeSessionsRequest, response=SessionsRevoked, auth=True, tag="auth")
async def revoke_session(api: Api, call: Call) -> SessionsRevoked:
    """DELETE /v1/auth/session — Revoke this session token, or all of the device's"""
    body: RevokeSessionsRequest = call.body or RevokeSessionsRequest()
    count = await api.services.auth.revoke(call.principal, all_sessions=body.all_sessions)
    return SessionsRevoked(revoked=count)
