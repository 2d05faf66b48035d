"""Domain logic: accounts, auth, inboxes. No HTTP, no SQL."""

from __future__ import annotations

from dataclasses import dataclass

from relay.relay_keys import RelayKeyring
from relay.store import Store

from .abuse import AbuseLimits, RateSettings
from .accounts import AccountService
from .auth import AuthService, Principal
from .context import ServiceContext, limits_from, wall_clock_ms
from .federation import FederationService, FederationSettings, PeerResponse, PeerTransport, PeerUnreachableError
from .inbox import InboxNotifier, InboxService, StreamChunk


@dataclass(frozen=True, slots=True)
class Services:
    """Every service of one relay process, built by the composition root."""

    ctx: ServiceContext
    accounts: AccountService
    auth: AuthService
    inbox: InboxService
    abuse: AbuseLimits
    federation: FederationService

    @classmethod
    def build(
        cls,
        store: Store,
        ctx: ServiceContext,
        rates: RateSettings | None = None,
        *,
        federation: FederationSettings | None = None,
        keyring: RelayKeyring | None = None,
        peer_transport: PeerTransport | None = None,
    ) -> Services:
        abuse = AbuseLimits(rates or RateSettings())
        accounts = AccountService(store, ctx)
        notifier = InboxNotifier()
        federation_service = FederationService(
            store, ctx, federation or FederationSettings(), keyring, peer_transport, notifier, accounts
        )
        return cls(
            ctx=ctx,
            accounts=accounts,
            auth=AuthService(store, ctx),
            inbox=InboxService(store, ctx, notifier, abuse, federation_service),
            abuse=abuse,
            federation=federation_service,
        )


__all__ = [
    "AbuseLimits",
    "AccountService",
    "AuthService",
    "FederationService",
    "FederationSettings",
    "InboxNotifier",
    "InboxService",
    "PeerResponse",
    "PeerTransport",
    "PeerUnreachableError",
    "Principal",
    "RateSettings",
    "ServiceContext",
    "Services",
    "StreamChunk",
    "limits_from",
    "wall_clock_ms",
]
