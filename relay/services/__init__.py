"""Domain logic: accounts, auth, inboxes. No HTTP, no SQL."""

from __future__ import annotations

from dataclasses import dataclass

from relay.blobs.base import BlobStorage
from relay.relay_keys import RelayKeyring
from relay.store import Store

from .abuse import AbuseLimits, RateSettings
from .accounts import AccountService
from .auth import SESSION_CACHE_MS, AuthService, Principal
from .blobs import BlobService, BlobSettings, NoBlobStorage
from .context import ServiceContext, limits_from, wall_clock_ms
from .devices import DeviceService, WebAuthnSettings, default_rp_id
from .enrolment import EnrolmentService
from .federation import (
    FederationService,
    FederationSettings,
    PeerNameNotFoundError,
    PeerResponse,
    PeerTransport,
    PeerUnreachableError,
)
from .inbox import InboxNotifier, InboxService, StreamChunk
from .log import LogChunk, LogNotifier, LogService
from .prekeys import PrekeyService, PrekeySettings


@dataclass(frozen=True, slots=True)
class Services:
    """Every service of one relay process, built by the composition root."""

    ctx: ServiceContext
    accounts: AccountService
    auth: AuthService
    inbox: InboxService
    abuse: AbuseLimits
    federation: FederationService
    log: LogService
    devices: DeviceService
    prekeys: PrekeyService
    enrolments: EnrolmentService
    blobs: BlobService

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
        webauthn: WebAuthnSettings | None = None,
        prekeys: PrekeySettings | None = None,
        session_cache_ms: int = SESSION_CACHE_MS,
        blob_storage: BlobStorage | None = None,
        blobs: BlobSettings | None = None,
    ) -> Services:
        abuse = AbuseLimits(rates or RateSettings())
        accounts = AccountService(store, ctx)
        notifier = InboxNotifier()
        federation_service = FederationService(
            store, ctx, federation or FederationSettings(), keyring, peer_transport, notifier, accounts
        )
        auth = AuthService(store, ctx, cache_ms=session_cache_ms)
        webauthn = webauthn or WebAuthnSettings(rp_id=default_rp_id(ctx.relay_name))
        return cls(
            ctx=ctx,
            accounts=accounts,
            auth=auth,
            inbox=InboxService(store, ctx, notifier, abuse, federation_service),
            abuse=abuse,
            federation=federation_service,
            log=LogService(store, ctx, LogNotifier()),
            devices=DeviceService(store, ctx, notifier, auth, abuse, webauthn),
            prekeys=PrekeyService(store, ctx, prekeys or PrekeySettings(), federation_service),
            enrolments=EnrolmentService(store, ctx, prekeys or PrekeySettings()),
            blobs=BlobService(store, blob_storage or NoBlobStorage(), ctx, blobs or BlobSettings()),
        )


__all__ = [
    "AbuseLimits",
    "AccountService",
    "AuthService",
    "BlobService",
    "BlobSettings",
    "DeviceService",
    "EnrolmentService",
    "FederationService",
    "FederationSettings",
    "InboxNotifier",
    "InboxService",
    "LogChunk",
    "LogNotifier",
    "LogService",
    "PeerNameNotFoundError",
    "PeerResponse",
    "PeerTransport",
    "PeerUnreachableError",
    "PrekeyService",
    "PrekeySettings",
    "Principal",
    "RateSettings",
    "ServiceContext",
    "Services",
    "StreamChunk",
    "WebAuthnSettings",
    "limits_from",
    "wall_clock_ms",
]
