"""Domain logic: accounts, auth, inboxes. No HTTP, no SQL."""

from __future__ import annotations

from dataclasses import dataclass

from relay.store import Store

from .abuse import AbuseLimits, RateSettings
from .accounts import AccountService
from .auth import AuthService, Principal
from .context import ServiceContext, limits_from, wall_clock_ms
from .inbox import InboxNotifier, InboxService, StreamChunk


@dataclass(frozen=True, slots=True)
class Services:
    """Every service of one relay process, built by the composition root."""

    ctx: ServiceContext
    accounts: AccountService
    auth: AuthService
    inbox: InboxService
    abuse: AbuseLimits

    @classmethod
    def build(cls, store: Store, ctx: ServiceContext, rates: RateSettings | None = None) -> Services:
        abuse = AbuseLimits(rates or RateSettings())
        return cls(
            ctx=ctx,
            accounts=AccountService(store, ctx),
            auth=AuthService(store, ctx),
            inbox=InboxService(store, ctx, InboxNotifier(), abuse),
            abuse=abuse,
        )


__all__ = [
    "AbuseLimits",
    "AccountService",
    "AuthService",
    "InboxNotifier",
    "InboxService",
    "Principal",
    "RateSettings",
    "ServiceContext",
    "Services",
    "StreamChunk",
    "limits_from",
    "wall_clock_ms",
]
