"""Device lists v2 (new versions, revocation) and WebAuthn registration (docs/crypto.md §3.3, §4, §6).

Posting a version needs no bearer token: the approvals it carries are the
authorization (a recovered account has no device that could log in). The
checks are those of :func:`protocol.device_list.evaluate_version`, run
against the head read from the store; the store then commits the version
only if the head is still the one checked (compare-and-set under the
account's row lock), together with the WebAuthn counter checks and every
device-table and revocation effect, in one transaction. The outcome is the
same as if everything ran in that transaction, without Ed25519 and COSE
verification inside it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass

import trio

from protocol import codec, webauthn
from protocol.device_list import evaluate_version, list_hash
from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import (
    DeviceListAccepted,
    PostDeviceListRequest,
    SignedDeviceList,
    WebAuthnCredential,
    WebAuthnRegistration,
    WebAuthnRegistrationOptions,
)
from relay import metrics
from relay.config import Config
from relay.store import (
    ChallengeOutcome,
    CredentialUse,
    DeviceListUpdate,
    DeviceRecord,
    NewCredential,
    Store,
)

from .abuse import AbuseLimits
from .auth import AuthService, Principal
from .context import ServiceContext
from .inbox import InboxNotifier

log = logging.getLogger("relay.services.devices")

MAX_CLOCK_SKEW_MS = 10 * 60 * 1000  # |created_at_ms - now| (crypto.md §3.3 step 3)
REGISTRATION_TTL_MS = 120_000
# Preference order offered to authenticators: Ed25519 (fully specified), EdDSA, ES256.
REGISTRATION_ALGORITHMS = [-19, -8, -7]


@dataclass(frozen=True, slots=True)
class WebAuthnSettings:
    """``rp_id``: the relying-party id credentials are registered for; ``origins``: if not empty, the only
    clientDataJSON origins accepted (on top of fido2's rp-id check)."""

    rp_id: str
    origins: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: Config, relay_name: str) -> WebAuthnSettings:
        return cls(
            rp_id=config.webauthn_rp_id or default_rp_id(relay_name),
            origins=frozenset(o.strip() for o in config.webauthn_origins.split(",") if o.strip()),
        )


def default_rp_id(relay_name: str) -> str:
    """The relay name's host without port ("relay.example:8443" -> "relay.example", "[::1]:80" -> "::1")."""
    if relay_name.startswith("["):
        return relay_name[1:].partition("]")[0]
    host, sep, port = relay_name.rpartition(":")
    return host if sep and port.isdigit() else relay_name


def _client_origin_and_challenge(client_data_json: bytes) -> tuple[str, bytes]:
    """The origin and challenge of a clientDataJSON; raises ``webauthn_invalid`` when malformed."""
    try:
        data = json.loads(client_data_json)
        origin, challenge = data["origin"], data["challenge"]
        if not isinstance(origin, str) or not isinstance(challenge, str):
            raise TypeError("origin and challenge are strings")
        raw = base64.urlsafe_b64decode(challenge + "=" * (-len(challenge) % 4))
    except (ValueError, TypeError, KeyError, binascii.Error, RecursionError) as exc:
        raise TetherlessError(ErrorCode.WEBAUTHN_INVALID, "clientDataJSON is malformed") from exc
    return origin, raw


class DeviceService:
    def __init__(
        self,
        store: Store,
        ctx: ServiceContext,
        notifier: InboxNotifier,
        auth: AuthService,
        abuse: AbuseLimits,
        webauthn_settings: WebAuthnSettings,
    ) -> None:
        self._store = store
        self._ctx = ctx
        self._notifier = notifier
        self._auth = auth
        self._abuse = abuse
        self._webauthn = webauthn_settings

    @property
    def webauthn_settings(self) -> WebAuthnSettings:
        return self._webauthn

    # -- device-list versions ------------------------------------------------------------

    async def post_version(self, account_id: str, request: PostDeviceListRequest) -> DeviceListAccepted:
        """Accept the next version of ``account_id``'s device list (crypto.md §3.3, §4).

        Raises ``rate_limited`` (per account), ``unknown_account``,
        ``device_list_conflict`` (version is not head + 1, or ``prev_hash`` is
        not the head's hash), ``invalid_device_list`` (structure, another
        account's list, ``created_at_ms`` more than 10 minutes from now, a
        device id already known on this relay), ``bad_signature``,
        ``policy_not_met``, ``webauthn_invalid`` (also: an added credential
        not registered for this account, an origin outside
        ``webauthn_origins``) and ``webauthn_replayed``. Nothing is stored on
        any error. After the commit every device of the account gets a
        ``DeviceListChanged`` stream item; revoked devices' streams end.
        """
        try:
            accepted = await self._post_version(account_id, request)
        except TetherlessError as exc:
            metrics.device_list_versions_total.labels(exc.code.value).inc()
            raise
        metrics.device_list_versions_total.labels("accepted").inc()
        return accepted

    async def _post_version(self, account_id: str, request: PostDeviceListRequest) -> DeviceListAccepted:
        signed = request.signed
        dl = signed.device_list
        if dl.account_id != account_id:
            raise TetherlessError(ErrorCode.INVALID_DEVICE_LIST, "the list belongs to another account than the path")
        self._abuse.device_list_change(account_id)
        head = await self._store.get_device_list_head(account_id)
        if head is None:
            raise TetherlessError(ErrorCode.UNKNOWN_ACCOUNT, "no such account on this relay")
        prev = codec.decode(head.signed, SignedDeviceList).device_list
        if dl.version != head.version + 1 or dl.prev_hash != list_hash(prev):
            raise TetherlessError(
                ErrorCode.DEVICE_LIST_CONFLICT,
                f"the head is version {head.version}: post version {head.version + 1} with its hash as prev_hash",
            )
        change = evaluate_version(prev, signed, removed_ids=head.removed_ids)
        now = self._ctx.clock_ms()
        if abs(dl.created_at_ms - now) > MAX_CLOCK_SKEW_MS:
            raise TetherlessError(ErrorCode.INVALID_DEVICE_LIST, "created_at_ms is more than 10 minutes from now")
        if self._webauthn.origins:
            for assertion in signed.webauthn_assertions:
                origin, _ = _client_origin_and_challenge(assertion.client_data_json)
                if origin not in self._webauthn.origins:
                    raise TetherlessError(ErrorCode.WEBAUTHN_INVALID, "assertion origin is not accepted here")
        credentials = {c.credential_id: c for c in (*prev.credentials, *dl.credentials)}
        update = DeviceListUpdate(
            account_id=account_id,
            version=dl.version,
            signed=codec.encode(signed),
            added=[
                DeviceRecord(
                    device_id=d.device_id,
                    account_id=account_id,
                    sign_key=d.sign_key,
                    box_key=d.box_key,
                    created_at_ms=now,
                )
                for d in change.added
            ],
            removed=[d.device_id for d in change.removed],
            assertions=[
                CredentialUse(cid, credentials[cid].public_key, credentials[cid].rp_id, count)
                for cid, count in sorted(change.assertion_counters.items())
            ],
            added_credentials=[NewCredential(c.credential_id, c.public_key, c.rp_id) for c in change.added_credentials],
            removed_credentials=[c.credential_id for c in change.removed_credentials],
        )
        # Shielded: a request cancelled while its commit is under way must still drop the revoked devices'
        # cached sessions once it commits (other replicas hear of it by notice, decision 0013; this one does not).
        with trio.CancelScope(shield=True):
            committed = await self._store.append_device_list(update, now)
            if committed.revoked:
                self._auth.forget_devices(committed.revoked)
        if committed.revoked:
            metrics.devices_revoked_total.inc(len(committed.revoked))
            log.info("device-list version %d revoked %d device(s)", dl.version, len(committed.revoked))
        for device_id in committed.devices:
            self._notifier.notify(device_id)
        return DeviceListAccepted(account_id=account_id, version=dl.version, list_hash=change.list_hash)

    # -- WebAuthn registration ----------------------------------------------------------------

    async def register_begin(self, principal: Principal) -> WebAuthnRegistrationOptions:
        """Creation options with a fresh challenge: single use, 120 s, bound to the caller's account and device."""
        challenge = self._ctx.random_bytes(32)
        expires = self._ctx.clock_ms() + REGISTRATION_TTL_MS
        await self._store.put_webauthn_registration(challenge, principal.account_id, principal.device_id, expires)
        existing = await self._store.get_webauthn_credentials(principal.account_id)
        return WebAuthnRegistrationOptions(
            challenge=challenge,
            rp_id=self._webauthn.rp_id,
            rp_name=self._ctx.relay_name,
            user_id=principal.account_id.encode("ascii"),
            user_name=f"{principal.account_id}@{self._ctx.relay_name}",
            algorithms=list(REGISTRATION_ALGORITHMS),
            attestation="none",
            user_verification="preferred",
            timeout_ms=REGISTRATION_TTL_MS,
            expires_at_ms=expires,
            exclude_credentials=[c.credential_id for c in existing if c.status == "active"],
        )

    async def register_complete(self, principal: Principal, registration: WebAuthnRegistration) -> WebAuthnCredential:
        """Verify an authenticator's ``create`` response and store the credential as pending for the account.

        The challenge (read from clientDataJSON) is burned whatever the
        outcome. Raises ``webauthn_invalid`` (malformed, wrong type, origin,
        rp id, flags, attestation; or the credential is already in the
        list), ``challenge_unknown`` (not begun by this device),
        ``challenge_used``, ``challenge_expired``. The returned credential is
        what the device puts in its next version, with an assertion over it.
        """
        try:
            credential = await self._register_complete(principal, registration)
        except TetherlessError as exc:
            metrics.webauthn_registrations_total.labels(exc.code.value).inc()
            raise
        metrics.webauthn_registrations_total.labels("registered").inc()
        return credential

    async def _register_complete(self, principal: Principal, registration: WebAuthnRegistration) -> WebAuthnCredential:
        origin, challenge = _client_origin_and_challenge(registration.client_data_json)
        now = self._ctx.clock_ms()
        outcome = await self._store.consume_webauthn_registration(
            challenge, principal.account_id, principal.device_id, now
        )
        if outcome is ChallengeOutcome.UNKNOWN:
            raise TetherlessError(ErrorCode.CHALLENGE_UNKNOWN, "this relay did not begin that registration for you")
        if outcome is ChallengeOutcome.USED:
            raise TetherlessError(ErrorCode.CHALLENGE_USED, "registration challenge already used; begin again")
        if outcome is ChallengeOutcome.EXPIRED:
            raise TetherlessError(ErrorCode.CHALLENGE_EXPIRED, "registration challenge expired; begin again")
        if self._webauthn.origins and origin not in self._webauthn.origins:
            raise TetherlessError(ErrorCode.WEBAUTHN_INVALID, "origin is not accepted here")
        registered = webauthn.verify_registration(
            registration, challenge=challenge, rp_id=self._webauthn.rp_id, added_at_ms=now
        )
        credential = registered.credential
        await self._store.put_webauthn_credential(
            principal.account_id,
            principal.device_id,
            NewCredential(credential.credential_id, credential.public_key, credential.rp_id),
            registered.sign_count,
            now,
        )
        return credential
