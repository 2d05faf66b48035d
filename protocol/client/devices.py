"""Device management for format-2/3 accounts: link, approve, list, revoke, recovery key, hardware keys, upgrade.

The SDK side of crypto.md §3-§6 (the CLI is :mod:`tetherless_cli.devices`).
Every function takes a connected :class:`~protocol.client.sdk.RelayClient`;
every chain it relies on is fetched and verified from the genesis (or from
the stored high-water mark) by :meth:`RelayClient.device_chain`, so a relay
that serves a doctored list gets
:class:`~protocol.client.chains.DeviceListRejectedError`, never a signature.

Enrolment with a link code (crypto.md §5.1-5.2)::

    # the new device N
    pending = await start_link(client_n)             # posts the offer; show pending.code to the user
    keys = await finish_link(client_n, pending, keystore=ks)   # waits for the proposal, verifies, joins

    # any current device A
    approved = await approve_link(client_a, code)    # checks offer_mac, proposes the version adding N

Without a current device: :func:`join_with_recovery` (crypto.md §5.4) and
:func:`join_with_authenticator` (§5.3, an assertion provider callable, e.g. a
software authenticator in tests). :func:`revoke_device`,
:func:`set_recovery_key` and :func:`add_credential` change an account's list
from one of its devices (threshold-1 policies: one approval is enough; a
k-of-n policy needs approvals gathered elsewhere).

Format 3 (crypto.md §3.6): every version this module builds is format 3
when this device has a long-term ML-KEM key (``DeviceKeys.kem_seed``); a
format-2 list is thereby upgraded by its next change, and this device's
entry gains its ``kem_key`` when it lacks one. :func:`upgrade_list` makes
that change on its own (``tetherless device upgrade``).

Randomness comes from the client's ``random_bytes`` and time from its clock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import nacl.public
import nacl.signing
import trio
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from .. import device_list, enrolment, handshake, prekeys, recovery, webauthn
from ..errors import ErrorCode, RemoteError, TetherlessError
from ..ids import Address, device_id_for
from ..messages import (
    DeviceEntry,
    DeviceList,
    DeviceListAccepted,
    EnrolmentBundle,
    EnrolmentOffer,
    EnrolmentProposal,
    Policy,
    SignedDeviceList,
    SignedPrekey,
    WebAuthnAssertion,
    WebAuthnCredential,
    WebAuthnRegistration,
    WebAuthnRegistrationOptions,
)
from .chains import save_mark
from .http import TransportError
from .keystore import AlreadyInitialisedError, DeviceKeys, Keystore
from .localdb import DB_FILE
from .sdk import RelayClient

LINK_POLL_SECONDS: Final = 1.0
LINK_TIMEOUT_SECONDS: Final = 600.0  # the relay keeps an offer for 10 minutes
ENROLMENT_PREKEYS_TABLE: Final = "device_enrolment_prekeys"

#: ``(challenge, credentials of the current list) -> assertion``: asks an authenticator to sign ``challenge``.
AssertionProvider = Callable[[bytes, Sequence[WebAuthnCredential]], WebAuthnAssertion]
#: ``(registration options) -> registration``: asks an authenticator to create a credential.
CredentialMaker = Callable[[WebAuthnRegistrationOptions], WebAuthnRegistration]


class EnrolmentPrekeys(msgspec.Struct, frozen=True):
    """The prekeys a linking device offered (crypto.md §5.2 step 1), private halves included.

    Kept sealed in the local database (table ``device_enrolment_prekeys``,
    key ``"bundle"``) so that the session layer can answer the approver's
    first message. ``pq_prekey_seed`` is the 64-byte ML-KEM-768 seed ``d‖z``.
    """

    signed_prekey: SignedPrekey
    signed_prekey_private: bytes
    pq_prekey: SignedPrekey
    pq_prekey_seed: bytes


def fingerprint(sign_key: bytes) -> str:
    """A device's fingerprint as both screens show it: its device id in groups of four."""
    device_id = device_id_for(sign_key)
    return " ".join(device_id[i : i + 4] for i in range(0, len(device_id), 4))


# -- the new device's keys ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _NewDevice:
    signing_key: nacl.signing.SigningKey
    box_private_key: bytes
    kem_seed: bytes

    @property
    def sign_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def box_key(self) -> bytes:
        return bytes(nacl.public.PrivateKey(self.box_private_key).public_key)

    @property
    def device_id(self) -> str:
        return device_id_for(self.sign_key)

    @property
    def kem_key(self) -> bytes:
        return handshake.mlkem_public(self.kem_seed)

    def entry(self, added_at_ms: int) -> DeviceEntry:
        """Its format-3 entry (role ``device``)."""
        return device_list.device_entry(self.sign_key, self.box_key, added_at_ms=added_at_ms, kem_key=self.kem_key)

    def __repr__(self) -> str:
        return f"_NewDevice({self.device_id})"


def _new_device(client: RelayClient) -> _NewDevice:
    return _NewDevice(
        nacl.signing.SigningKey(client.random_bytes(32)),
        client.random_bytes(32),
        client.random_bytes(handshake.MLKEM_SEED_BYTES),
    )


def _enrolment_prekeys(client: RelayClient, device: _NewDevice, now_ms: int) -> EnrolmentPrekeys:
    x25519_private = client.random_bytes(32)
    x25519_public = bytes(nacl.public.PrivateKey(x25519_private).public_key)
    seed = client.random_bytes(64)
    mlkem_public = MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()
    sign = device.signing_key
    return EnrolmentPrekeys(
        signed_prekey=prekeys.sign_prekey(sign, device.device_id, prekeys.X25519_SIGNED, 1, x25519_public, now_ms),
        signed_prekey_private=x25519_private,
        pq_prekey=prekeys.sign_prekey(sign, device.device_id, prekeys.MLKEM_LAST_RESORT, 1, mlkem_public, now_ms),
        pq_prekey_seed=seed,
    )


# -- small helpers -------------------------------------------------------------------------


async def post_version(client: RelayClient, signed: SignedDeviceList) -> DeviceListAccepted:
    """``POST /v1/accounts/{account_id}/devices`` (no token: the approvals authorize it).

    Checks that the relay accepted exactly this version, then raises the
    account's high-water mark. Raises relay errors (``device_list_conflict``
    when another change won the race: rebuild on the new head).
    """
    dl = signed.device_list
    accepted = await client.api.post_device_list(signed)
    digest = device_list.list_hash(dl)
    if accepted.version != dl.version or accepted.list_hash != digest:
        raise TetherlessError(ErrorCode.INVALID_FIELD, "the relay accepted another device-list version than ours")
    relay = Address.parse(client.keys.address).relay if client.keys else (await client.well_known()).relay
    save_mark(client.local_db, dl.account_id, relay, (dl.version, digest))
    client.forget_device_list(dl.account_id)
    return accepted


def _own(client: RelayClient) -> DeviceKeys:
    if client.keys is None:
        raise RuntimeError("this client has no device keys")
    return client.keys


async def _own_head(client: RelayClient) -> device_list.VerifiedChain:
    """Our account's verified chain; its head must be format 2 or 3 (changing a format-1 list would upgrade
    it, which waits until every device has v2 prekeys, crypto.md §14)."""
    keys = _own(client)
    verified = await client.device_chain(keys.account_id)
    _require_format_2(verified.head)
    return verified


def _require_format_2(head: DeviceList) -> None:
    if head.format < device_list.FORMAT_2:
        raise TetherlessError(
            ErrorCode.INVALID_DEVICE_LIST, "this account's device list is format 1: device management needs format 2"
        )


def _own_next_version(keys: DeviceKeys, head: DeviceList, **changes: Any) -> DeviceList:
    """:func:`device_list.next_version` as this device builds it: format 3 when this device has a
    long-term ML-KEM key (upgrading a format-2 list), its own ``kem_key`` set when its entry lacks one."""
    if not keys.kem_seed:
        return device_list.next_version(head, **changes)
    own = next((d for d in head.devices if d.device_id == keys.device_id), None)
    set_kem = {keys.device_id: keys.kem_public_key} if own is not None and not own.kem_key else {}
    return device_list.next_version(head, format=device_list.FORMAT_3, set_kem_keys=set_kem, **changes)


def key_assertion(
    verified: device_list.VerifiedChain, dl: DeviceList, get_assertion: AssertionProvider
) -> WebAuthnAssertion:
    """A hardware key's assertion over ``dl`` (the version after ``verified``'s head), checked here before any
    relay sees it: by a credential of the head, verifying over ``list_hash(dl)`` for that credential's rp id
    (UV when the policy requires it), its sign counter above the highest this chain carries (crypto.md §6).

    Raises ``policy_not_met`` (the head has no hardware key), ``webauthn_invalid`` (another credential, rp
    id or signature), ``webauthn_replayed`` (a counter that did not advance: a replay or a cloned key), and
    what ``get_assertion`` raises. Uses the key once.
    """
    head = verified.head
    if not head.credentials:
        raise TetherlessError(ErrorCode.POLICY_NOT_MET, "the account has no hardware key in its device list")
    assertion = get_assertion(device_list.list_hash(dl), list(head.credentials))
    credential = next((c for c in head.credentials if c.credential_id == assertion.credential_id), None)
    if credential is None:
        raise TetherlessError(ErrorCode.WEBAUTHN_INVALID, "the key answered with a credential the list does not hold")
    try:
        result = webauthn.verify_assertion(
            credential,
            assertion,
            challenge=device_list.list_hash(dl),
            require_user_verification=head.policy.require_user_verification,
        )
        device_list.check_counter(
            credential.credential_id, verified.counters.get(credential.credential_id), result.sign_count
        )
    except TetherlessError as exc:  # said as the client's own refusal: nothing was sent
        raise TetherlessError(exc.code, f"refused the security key's approval, not sent: {exc.detail}") from exc
    return assertion


def _own_approvals(
    keys: DeviceKeys,
    verified: device_list.VerifiedChain,
    dl: DeviceList,
    get_assertion: AssertionProvider | None,
) -> SignedDeviceList:
    """``dl`` signed by this device when its role may approve (crypto.md §3.6), plus a hardware key's
    assertion when ``get_assertion`` is given (:func:`key_assertion`). Raises ``policy_not_met`` when that
    leaves no approval at all, and what :func:`key_assertion` raises."""
    own = next((d for d in verified.head.devices if d.device_id == keys.device_id), None)
    signs = own is not None and device_list.may_approve(own)
    signatures = [device_list.approve(dl, keys.signing_key)] if signs else []
    assertions = [key_assertion(verified, dl, get_assertion)] if get_assertion is not None else []
    if not signatures and not assertions:
        raise TetherlessError(
            ErrorCode.POLICY_NOT_MET, "this device may not approve list changes: approve with a hardware key"
        )
    return device_list.signed_list(dl, signatures, webauthn_assertions=assertions)


def _save_new_home(
    client: RelayClient,
    keystore: Keystore,
    device: _NewDevice,
    *,
    account_id: str,
    relay: str,
    name: str,
    bundle: EnrolmentPrekeys | None,
    list_format: int,
) -> DeviceKeys:
    keys = DeviceKeys(
        signing_seed=bytes(device.signing_key),
        box_private_key=device.box_private_key,
        relay_url=client.relay_url,
        account_id=account_id,
        device_id=device.device_id,
        address=str(Address(account=account_id, relay=relay, device=device.device_id)),
        device_name=name,
        ca_file=client.ca_file,
        list_format=list_format,
        kem_seed=device.kem_seed,
    )
    keystore.create(keys)
    db = keystore.local_db()
    if bundle is not None:
        db.put_struct(ENROLMENT_PREKEYS_TABLE, "bundle", bundle)
    client.keys = keys  # and its cipher
    client.local_db = db
    return keys


def _discard_new_home(keystore: Keystore) -> None:
    """Remove the files a failed join created (the home was empty before)."""
    keystore.close()
    for name in (keystore.keystore_path.name, DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm"):
        with contextlib.suppress(FileNotFoundError):
            (keystore.home / name).unlink()


async def _join(
    client: RelayClient,
    keystore: Keystore,
    device: _NewDevice,
    signed: SignedDeviceList,
    *,
    relay: str,
    name: str,
    bundle: EnrolmentPrekeys | None = None,
) -> DeviceKeys:
    """Store the new device's home, then post its version; undo the home if the relay refuses."""
    keys = _save_new_home(
        client,
        keystore,
        device,
        account_id=signed.device_list.account_id,
        relay=relay,
        name=name,
        bundle=bundle,
        list_format=signed.device_list.format,
    )
    try:
        await post_version(client, signed)
    except (RemoteError, TetherlessError):
        _discard_new_home(keystore)
        client.keys = None
        client.local_db = None
        raise
    # Publish this device's prekeys now (a link-code join keeps the ones it offered), so others can
    # start sessions with it while it is offline (crypto.md §7.2, §14). Best effort: sync retries.
    with contextlib.suppress(RemoteError, TetherlessError, TransportError):
        await client.enable_sessions()
    return keys


def _check_home_free(keystore: Keystore | None) -> None:
    if keystore is not None and keystore.exists():
        raise AlreadyInitialisedError(f"a device already exists in {keystore.home}")


# -- enrolment with a link code: the new device -------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingLink:
    """A posted enrolment offer. Show :attr:`code` (or :attr:`qr`) to the user; keep the rest private."""

    code: str
    qr: str
    relay: str
    lookup_id: bytes
    device_id: str
    fingerprint: str
    expires_at_ms: int
    _secret: bytes = field(repr=False)
    _device: _NewDevice = field(repr=False)
    _bundle: EnrolmentPrekeys = field(repr=False)


async def start_link(client: RelayClient) -> PendingLink:
    """Create this device's keys and prekeys and post an :class:`EnrolmentOffer` (crypto.md §5.2 step 1).

    ``client`` is connected to the account's home relay and has no keys yet.
    Raises relay errors (``rate_limited``, ``prekey_invalid`` …).
    """
    relay = (await client.well_known()).relay
    device = _new_device(client)
    now = client.now_ms()
    bundle = _enrolment_prekeys(client, device, now)
    secret = enrolment.new_link_secret(client.random_bytes(enrolment.LINK_SECRET_BYTES))
    offer = enrolment.make_offer(
        secret,
        relay,
        device.signing_key,
        device.box_key,
        EnrolmentBundle(signed_prekey=bundle.signed_prekey, pq_prekey=bundle.pq_prekey),
        now,
        kem_key=device.kem_key,
    )
    accepted = await client.api.enrolment_offer(offer)
    return PendingLink(
        code=enrolment.link_code_text(secret),
        qr=enrolment.link_qr(relay, secret),
        relay=relay,
        lookup_id=offer.lookup_id,
        device_id=device.device_id,
        fingerprint=fingerprint(device.sign_key),
        expires_at_ms=accepted.expires_at_ms,
        _secret=secret,
        _device=device,
        _bundle=bundle,
    )


async def wait_for_proposal(
    client: RelayClient,
    pending: PendingLink,
    *,
    poll_seconds: float = LINK_POLL_SECONDS,
    timeout_seconds: float = LINK_TIMEOUT_SECONDS,
) -> EnrolmentProposal:
    """Poll ``GET /v1/enrolments/{lookup_id}/proposal`` until a proposal arrives.

    Raises ``enrolment_expired`` (locally too, once the offer's time is up)
    and relay errors; transport errors are retried.
    """
    lookup = enrolment.lookup_id_text(pending.lookup_id)
    with trio.move_on_after(timeout_seconds):
        while True:
            delay = poll_seconds
            try:
                proposal = await client.api.enrolment_proposal(lookup)
            except TransportError:
                proposal = None
            except RemoteError as exc:
                if exc.code is not ErrorCode.RATE_LIMITED:
                    raise
                proposal, delay = None, max(poll_seconds, float(exc.retry_after_seconds or 1))
            if proposal is not None:
                return proposal
            if client.now_ms() > pending.expires_at_ms:
                break
            await trio.sleep(delay)
    raise TetherlessError(ErrorCode.ENROLMENT_EXPIRED, "no device approved the link code in time; start again")


async def verify_proposal(
    client: RelayClient, pending: PendingLink, proposal: EnrolmentProposal
) -> tuple[SignedDeviceList, device_list.VerifiedChain]:
    """Check a proposal as crypto.md §5.2 step 4 demands and return it self-signed.

    The account's chain from its genesis up to L-1; that L adds exactly this
    device and changes nothing else; the approvals (§3.2, with this device's
    self-signature); the ``approval_tag`` (made by a holder of the link code).
    Raises ``bad_signature`` for a wrong tag, ``invalid_device_list`` for a
    version that changes more, ``device_list_conflict`` for a stale one, and
    :class:`~protocol.client.chains.DeviceListRejectedError` for the chain.
    """
    signed = proposal.signed
    dl = signed.device_list
    try:
        enrolment.verify_approval_tag(
            pending._secret, pending.relay, dl.account_id, dl.version, device_list.list_hash(dl), proposal.approval_tag
        )
    except enrolment.LinkCodeMismatchError as exc:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, f"proposal rejected: {exc}") from exc
    verified = await client.device_chain(dl.account_id)
    head = verified.head
    if dl.version != head.version + 1 or dl.prev_hash != device_list.list_hash(head):
        raise TetherlessError(
            ErrorCode.DEVICE_LIST_CONFLICT, "the account's device list changed since the approval; approve again"
        )
    device = pending._device
    mine = [d for d in dl.devices if d.device_id == device.device_id]
    if not mine or mine[0] != _offered_entry(device, dl, mine[0].added_at_ms):
        raise TetherlessError(ErrorCode.INVALID_DEVICE_LIST, "proposal rejected: it does not add this device's keys")
    # The approver may upgrade a format-2 list to format 3 and publish its own kem_key in the same version
    # (crypto.md §3.6); evaluate_version below demands its signature for that.
    before = {d.device_id: d for d in head.devices}
    set_kem = {
        d.device_id: d.kem_key
        for d in dl.devices
        if d.device_id in before and d.kem_key and not before[d.device_id].kem_key
    }
    expected = device_list.next_version(
        head, add_devices=[mine[0]], set_kem_keys=set_kem, format=dl.format, now_ms=dl.created_at_ms
    )
    if expected != dl:
        raise TetherlessError(
            ErrorCode.INVALID_DEVICE_LIST, "proposal rejected: it changes more than adding this device"
        )
    self_signed = device_list.signed_list(
        dl,
        [*signed.signatures, device_list.approve(dl, device.signing_key)],
        recovery_signatures=signed.recovery_signatures,
        webauthn_assertions=signed.webauthn_assertions,
    )
    try:
        device_list.evaluate_version(head, self_signed, removed_ids=verified.removed_ids)
    except TetherlessError as exc:
        raise TetherlessError(exc.code, f"proposal rejected: {exc.detail}") from exc
    return self_signed, verified


def _offered_entry(device: _NewDevice, dl: DeviceList, added_at_ms: int) -> DeviceEntry:
    """The entry the new device offered: role ``device``, its keys, its kem_key in format 3."""
    entry = device.entry(added_at_ms)
    return entry if dl.format == device_list.FORMAT_3 else msgspec.structs.replace(entry, kem_key=b"")


async def finish_link(
    client: RelayClient,
    pending: PendingLink,
    *,
    keystore: Keystore,
    name: str = "",
    poll_seconds: float = LINK_POLL_SECONDS,
    timeout_seconds: float = LINK_TIMEOUT_SECONDS,
) -> DeviceKeys:
    """Wait for the approval, verify it, self-sign, post the version and store this device's home.

    Raises what :func:`wait_for_proposal`, :func:`verify_proposal` and
    :func:`post_version` raise (``device_list_conflict``: approve again).
    """
    _check_home_free(keystore)
    proposal = await wait_for_proposal(client, pending, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)
    signed, _ = await verify_proposal(client, pending, proposal)
    return await _join(
        client, keystore, pending._device, signed, relay=pending.relay, name=name, bundle=pending._bundle
    )


# -- enrolment with a link code: the approving device -------------------------------------------


@dataclass(frozen=True, slots=True)
class ApprovedLink:
    """What :func:`approve_link` proposed: the new device and the version that adds it."""

    device_id: str
    address: str
    fingerprint: str
    version: int


async def fetch_offer(client: RelayClient, code: str) -> tuple[bytes, EnrolmentOffer]:
    """The offer behind a link code, checked against the code: ``(link secret, offer)``.

    Raises ``ValueError`` for a malformed code; ``enrolment_unknown`` ("code
    does not match") when no offer is stored under the code's lookup id;
    ``bad_signature`` ("code does not match") when the offer's MAC does not;
    ``prekey_invalid``; relay errors (``enrolment_expired``, ``enrolment_used`` …).
    """
    secret = enrolment.parse_link_code(code)
    keys = _own(client)
    relay = Address.parse(keys.address).relay
    lookup = enrolment.lookup_id(secret, relay)
    try:
        offer = await client.api.enrolment_get_offer(enrolment.lookup_id_text(lookup))
    except RemoteError as exc:
        if exc.code is ErrorCode.ENROLMENT_UNKNOWN:
            raise TetherlessError(
                ErrorCode.ENROLMENT_UNKNOWN,
                "code does not match: no device is waiting to join with it on this relay (mistyped, or expired)",
            ) from exc
        raise
    try:
        enrolment.verify_offer_mac(secret, offer)
    except enrolment.LinkCodeMismatchError as exc:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, f"code does not match: {exc}") from exc
    if offer.relay != relay:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "code does not match: the offer names another relay")
    enrolment.verify_offer_prekeys(offer)
    return secret, offer


async def approve_link(
    client: RelayClient,
    code: str,
    *,
    confirm: Callable[[EnrolmentOffer, str], bool] | None = None,
    get_assertion: AssertionProvider | None = None,
) -> ApprovedLink:
    """Approve the device showing ``code``: propose the version of our list that adds it (crypto.md §5.2 steps 2-3).

    ``confirm(offer, fingerprint)`` may refuse (then ``PermissionError``).
    ``get_assertion``: a hardware key of the list approves too (after the
    confirmation; :func:`key_assertion`), which a policy requiring one needs
    and which lets a device whose role may not approve propose alone.
    Raises what :func:`fetch_offer` and :func:`key_assertion` raise,
    :class:`DeviceRevokedError`, :class:`DeviceListRejectedError` and relay errors.
    """
    keys = _own(client)
    secret, offer = await fetch_offer(client, code)
    shown = fingerprint(offer.sign_key)
    if confirm is not None and not confirm(offer, shown):
        raise PermissionError("not approved")
    verified = await _own_head(client)
    now = client.now_ms()
    added_at = max(now, verified.head.created_at_ms)
    format_3 = bool(keys.kem_seed) or verified.head.format == device_list.FORMAT_3
    if format_3 and not offer.kem_key:
        raise TetherlessError(
            ErrorCode.INVALID_FIELD,
            "the new device offers no ML-KEM key (an older client): update it, this account's list is format 3",
        )
    entry = device_list.device_entry(
        offer.sign_key, offer.box_key, added_at_ms=added_at, kem_key=offer.kem_key if format_3 else b""
    )
    dl = _own_next_version(keys, verified.head, add_devices=[entry], now_ms=now)
    signed = _own_approvals(keys, verified, dl, get_assertion)
    relay = Address.parse(keys.address).relay
    tag = enrolment.approval_tag(secret, relay, dl.account_id, dl.version, device_list.list_hash(dl))
    await client.api.enrolment_propose(
        enrolment.lookup_id_text(offer.lookup_id), EnrolmentProposal(signed=signed, approval_tag=tag)
    )
    return ApprovedLink(
        device_id=entry.device_id,
        address=str(Address(account=dl.account_id, relay=relay, device=entry.device_id)),
        fingerprint=shown,
        version=dl.version,
    )


async def wait_for_join(
    client: RelayClient,
    approved: ApprovedLink,
    *,
    poll_seconds: float = LINK_POLL_SECONDS,
    timeout_seconds: float = LINK_TIMEOUT_SECONDS,
) -> bool:
    """Wait until the device :func:`approve_link` proposed is in our verified device list (it self-signed and
    posted the version, crypto.md §5.2 step 4). True once it is; False after ``timeout_seconds``.

    The approver grants the new device the account's history only after that version is committed: a key
    record names the list version its grants are judged against (account-log.md §5.5). Idempotent (reads
    only); transport errors are retried until the timeout; cancellation leaves nothing behind. Raises relay
    errors and :class:`~protocol.client.chains.DeviceListRejectedError` for a chain that does not verify.
    """
    keys = _own(client)
    with trio.move_on_after(timeout_seconds):
        while True:
            try:
                verified = await client.device_chain(keys.account_id)
            except TransportError:
                pass
            else:
                if any(d.device_id == approved.device_id for d in verified.devices):
                    return True
                if verified.head.version >= approved.version:
                    return False  # another version took its place: it never joins with this proposal
            await trio.sleep(poll_seconds)
    return False


# -- joining without a current device -------------------------------------------------------------


async def _account_head(client: RelayClient, account_address: str) -> tuple[Address, device_list.VerifiedChain]:
    address = Address.parse(account_address)
    if address.device:
        address = Address(account=address.account, relay=address.relay)
    well_known = await client.well_known()
    if address.relay != well_known.relay.lower():
        raise TetherlessError(
            ErrorCode.INVALID_FIELD, f"connect to the account's home relay {address.relay} (this is {well_known.relay})"
        )
    verified = await client.device_chain(address.account)
    _require_format_2(verified.head)
    return address, verified


async def join_with_recovery(
    client: RelayClient,
    account_address: str,
    recovery_text: str,
    *,
    keystore: Keystore,
    name: str = "",
    revoke: Sequence[str] = (),
) -> DeviceKeys:
    """Join ``account_address`` approved by its recovery key (crypto.md §5.4), optionally revoking lost devices.

    Raises ``ValueError`` for a malformed recovery key, ``policy_not_met``
    when it is not the account's recovery key, and the errors of the chain
    and of ``POST /v1/accounts/{id}/devices``.
    """
    _check_home_free(keystore)
    secret = recovery.parse_recovery_secret(recovery_text)
    address, verified = await _account_head(client, account_address)
    head = verified.head
    rk = recovery.recovery_keys(secret, address.account)
    if not head.recovery_key or head.recovery_key != rk.public_key:
        raise TetherlessError(ErrorCode.POLICY_NOT_MET, "this is not the account's current recovery key")
    device = _new_device(client)
    now = client.now_ms()
    dl = device_list.next_version(
        head,
        add_devices=[device.entry(max(now, head.created_at_ms))],
        remove_device_ids=revoke,
        format=device_list.FORMAT_3,
        now_ms=now,
    )
    signed = device_list.signed_list(
        dl,
        [device_list.approve(dl, device.signing_key)],
        recovery_signatures=[device_list.sign_recovery(dl, rk.signing_key)],
    )
    return await _join(client, keystore, device, signed, relay=address.relay, name=name)


async def join_with_authenticator(
    client: RelayClient,
    account_address: str,
    get_assertion: AssertionProvider,
    *,
    keystore: Keystore,
    name: str = "",
    revoke: Sequence[str] = (),
) -> DeviceKeys:
    """Join ``account_address`` approved by a hardware key registered in its list (crypto.md §5.3), optionally
    revoking lost devices in the same version.

    The user typed the self-certifying account address, so the chain verified
    from its genesis is the right account. ``get_assertion(list_hash(L),
    credentials)`` returns the authenticator's assertion over the new version,
    checked here first (:func:`key_assertion`). Raises what that raises, the
    errors of the chain and of ``POST /v1/accounts/{id}/devices``
    (``webauthn_invalid``, ``webauthn_replayed``, ``policy_not_met``).
    """
    _check_home_free(keystore)
    address, verified = await _account_head(client, account_address)
    head = verified.head
    if not head.credentials:
        raise TetherlessError(ErrorCode.POLICY_NOT_MET, "the account has no hardware key in its device list")
    device = _new_device(client)
    now = client.now_ms()
    dl = device_list.next_version(
        head,
        add_devices=[device.entry(max(now, head.created_at_ms))],
        remove_device_ids=[resolve_device_id(target, head) for target in revoke],
        format=device_list.FORMAT_3,
        now_ms=now,
    )
    assertion = key_assertion(verified, dl, get_assertion)
    signed = device_list.signed_list(dl, [device_list.approve(dl, device.signing_key)], webauthn_assertions=[assertion])
    return await _join(client, keystore, device, signed, relay=address.relay, name=name)


# -- changes made by a current device ---------------------------------------------------------------


def resolve_device_id(target: str, head: DeviceList) -> str:
    """A device id from an id or a full device address; raises ``unknown_device`` when it is not in the list."""
    device_id = target.strip()
    if "@" in device_id:
        address = Address.parse(device_id)
        if not address.device or address.account != head.account_id:
            raise TetherlessError(ErrorCode.INVALID_FIELD, "not a device address of this account")
        device_id = address.device
    if all(d.device_id != device_id for d in head.devices):
        raise TetherlessError(ErrorCode.UNKNOWN_DEVICE, f"no device {device_id} in the account's device list")
    return device_id


async def revoke_device(
    client: RelayClient, target: str, *, get_assertion: AssertionProvider | None = None
) -> DeviceListAccepted:
    """Remove a device (id or device address; may be this device) from the account's list (crypto.md §4).

    ``get_assertion``: a hardware key of the list co-signs (:func:`key_assertion`).
    Raises ``unknown_device``, ``invalid_device_list`` (the last device
    cannot go), what :func:`key_assertion` raises, the chain errors and those of ``POST …/devices``.
    """
    keys = _own(client)
    verified = await _own_head(client)
    device_id = resolve_device_id(target, verified.head)
    if len(verified.head.devices) == 1 and not verified.head.credentials:
        raise TetherlessError(ErrorCode.INVALID_DEVICE_LIST, "the account's only device cannot be revoked")
    dl = _fit_threshold(_own_next_version(keys, verified.head, remove_device_ids=[device_id], now_ms=client.now_ms()))
    return await post_version(client, _own_approvals(keys, verified, dl, get_assertion))


def _fit_threshold(dl: DeviceList) -> DeviceList:
    """A removal may leave fewer approvers than the threshold (crypto.md §3.6: the list must keep enough):
    lower it to what is left."""
    approvers = sum(map(device_list.may_approve, dl.devices)) + len(dl.credentials)
    if dl.policy.threshold <= approvers:
        return dl
    return msgspec.structs.replace(dl, policy=msgspec.structs.replace(dl.policy, threshold=max(approvers, 1)))


def resolve_credential_id(target: str, head: DeviceList) -> bytes:
    """The id of the list's hardware key whose hex id is or starts with ``target`` (at least 8 hex digits).

    Raises ``unknown_device`` when none matches, ``invalid_field`` for a malformed or ambiguous prefix.
    """
    prefix = target.strip().lower()
    if len(prefix) < 8 or any(ch not in "0123456789abcdef" for ch in prefix):
        raise TetherlessError(ErrorCode.INVALID_FIELD, f"not a hardware key id: {target!r} (8 or more hex digits)")
    found = [c.credential_id for c in head.credentials if c.credential_id.hex().startswith(prefix)]
    if not found:
        raise TetherlessError(ErrorCode.UNKNOWN_DEVICE, f"no hardware key {prefix} in the account's device list")
    if len(found) > 1:
        raise TetherlessError(ErrorCode.INVALID_FIELD, f"{prefix} names {len(found)} hardware keys: give more digits")
    return found[0]


async def remove_credential(
    client: RelayClient, target: str, *, get_assertion: AssertionProvider | None = None
) -> DeviceListAccepted:
    """Remove a hardware key (hex id or a unique prefix, :func:`resolve_credential_id`) from the account's list.

    Approved by this device, and by a hardware key when ``get_assertion`` is given (a policy that requires
    one). The account-key epoch advances, as for a revoked device (crypto.md §3.2 step 5). Raises what
    :func:`resolve_credential_id` and :func:`key_assertion` raise, ``invalid_device_list`` (the policy
    requires a hardware key and this is the last one), the chain errors and those of ``POST …/devices``.
    """
    keys = _own(client)
    verified = await _own_head(client)
    credential_id = resolve_credential_id(target, verified.head)
    if verified.head.policy.require_webauthn and len(verified.head.credentials) == 1:
        raise TetherlessError(
            ErrorCode.INVALID_DEVICE_LIST, "the policy requires a hardware key: the last one cannot be removed"
        )
    dl = _fit_threshold(
        _own_next_version(keys, verified.head, remove_credential_ids=[credential_id], now_ms=client.now_ms())
    )
    return await post_version(client, _own_approvals(keys, verified, dl, get_assertion))


def backup_hash(rk: recovery.RecoveryKeys) -> bytes:
    """The list's commitment to the recovery backup key of ``rk`` (crypto.md §3.4)."""
    return recovery.backup_key_hash(recovery.backup_recipient(rk))


async def set_recovery_key(client: RelayClient) -> str:
    """Create a new recovery key, put it and its backup key's hash in the list (signed by itself and this
    device), return its text. The caller then writes the backup (account-log.md §5.7): records written after
    this version wrap only to the new key, so the old one opens nothing new.

    The text is shown once: no device keeps it (crypto.md §3.4).
    """
    keys = _own(client)
    verified = await _own_head(client)
    text = recovery.new_recovery_secret(client.random_bytes(recovery.SECRET_BYTES))
    rk = recovery.recovery_keys(recovery.parse_recovery_secret(text), keys.account_id)
    dl = _own_next_version(
        keys,
        verified.head,
        recovery_key=rk.public_key,
        recovery_backup_key_hash=backup_hash(rk),
        now_ms=client.now_ms(),
    )
    signed = device_list.signed_list(
        dl,
        [device_list.approve(dl, keys.signing_key)],
        recovery_signatures=[device_list.sign_recovery(dl, rk.signing_key)],
    )
    await post_version(client, signed)
    return text


async def add_credential(
    client: RelayClient, make_credential: CredentialMaker, get_assertion: AssertionProvider
) -> WebAuthnCredential:
    """Register a WebAuthn credential (``POST /v1/webauthn/register/*``) and add it to the account's list.

    The new version carries this device's approval and the credential's
    proof of possession (an assertion over its ``list_hash``, crypto.md §3.2
    step 4). The credential the relay answers must be the one this client reads
    from the key's own registration (id, COSE key, rp id): a relay that swaps in
    a key of its own would otherwise become an approver of the account.
    Raises ``webauthn_invalid``, challenge errors and those of ``POST …/devices``.
    """
    keys = _own(client)
    options = await client.api.webauthn_register_begin()
    registration = make_credential(options)
    credential = await client.api.webauthn_register_complete(registration)
    created = webauthn.verify_registration(
        registration, challenge=options.challenge, rp_id=options.rp_id, added_at_ms=credential.added_at_ms
    ).credential
    if created != credential:
        raise TetherlessError(
            ErrorCode.WEBAUTHN_INVALID, "the relay answered with another credential than the security key created"
        )
    verified = await _own_head(client)
    dl = _own_next_version(keys, verified.head, add_credentials=[credential], now_ms=client.now_ms())
    assertion = get_assertion(device_list.list_hash(dl), [credential])
    signed = device_list.signed_list(dl, [device_list.approve(dl, keys.signing_key)], webauthn_assertions=[assertion])
    await post_version(client, signed)
    return credential


async def upgrade_list(client: RelayClient) -> DeviceListAccepted | None:
    """Upgrade the account's list to format 3 and/or publish this device's ``kem_key`` (crypto.md §3.6).

    One version, approved and self-signed by this device, that changes only
    the format and this device's ``kem_key``. Returns None when there is
    nothing to do (format 3 with this device's key in it): idempotent.
    Needs ``client.keys.kem_seed`` (``Keystore.ensure_kem_key``; else
    ``ValueError``). Raises the chain errors and those of ``POST …/devices``
    (``policy_not_met`` when the account's threshold needs more approvals,
    ``device_list_conflict`` when another change won the race: run it again).
    """
    keys = _own(client)
    if not keys.kem_seed:
        raise ValueError("this device has no long-term ML-KEM key yet")
    verified = await _own_head(client)
    own = next(d for d in verified.head.devices if d.device_id == keys.device_id)
    if verified.head.format == device_list.FORMAT_3 and own.kem_key:
        return None
    dl = _own_next_version(keys, verified.head, now_ms=client.now_ms())
    return await post_version(client, device_list.signed_list(dl, [device_list.approve(dl, keys.signing_key)]))


# -- the approval policy (crypto.md §3.2; ``tetherless device policy``) ------------------------------------


def approvers(head: DeviceList) -> tuple[int, int]:
    """(devices that may approve (role ``device``), hardware keys) of ``head``: who can sign the next version."""
    return sum(map(device_list.may_approve, head.devices)), len(head.credentials)


def gatherable_approvals(head: DeviceList) -> int:
    """How many approvals one change made through this module carries: this device's, and one hardware key's
    when the list has one. A k-of-n policy beyond that needs co-approvals of other devices, which nothing here
    gathers yet (only the recovery key, weighing the whole threshold, could still change the list)."""
    return 1 + (1 if head.credentials else 0)


def plan_policy(
    head: DeviceList,
    *,
    threshold: int | None = None,
    require_webauthn: bool | None = None,
    require_user_verification: bool | None = None,
) -> Policy:
    """``head``'s policy with the given settings changed (None keeps one), refused when it makes no sense.

    Raises ``invalid_device_list`` for a format-1 list (it has no policy) and ``invalid_field`` for: a
    hardware key required, or user verification asked of one, while the list has no key; a threshold above
    the list's approvers (devices of role ``device`` and hardware keys: the protocol's own rule, crypto.md
    §3.6) or above :func:`gatherable_approvals` (every later change would need approvals nothing here can
    gather). Pure.
    """
    _require_format_2(head)
    current = head.policy
    policy = Policy(
        threshold=current.threshold if threshold is None else threshold,
        require_webauthn=current.require_webauthn if require_webauthn is None else require_webauthn,
        require_user_verification=(
            current.require_user_verification if require_user_verification is None else require_user_verification
        ),
    )
    devices_n, keys_n = approvers(head)
    if not keys_n and (policy.require_webauthn or policy.require_user_verification):
        raise TetherlessError(
            ErrorCode.INVALID_FIELD,
            "the account has no hardware key to require or to verify its user with: add one first "
            "(`tetherless device fido2 add`)",
        )
    if policy.threshold > devices_n + keys_n:
        raise TetherlessError(
            ErrorCode.INVALID_FIELD,
            f"threshold {policy.threshold} is above the account's {devices_n + keys_n} approvers "
            f"({devices_n} device(s), {keys_n} hardware key(s))",
        )
    most = gatherable_approvals(head)
    if policy.threshold > most:
        raise TetherlessError(
            ErrorCode.INVALID_FIELD,
            f"threshold {policy.threshold} would need {policy.threshold} approvals on every change; one change "
            f"made here carries at most {most} ("
            + ("this device and a hardware key)" if head.credentials else "this device; a hardware key adds one)"),
        )
    return policy


def policy_loosens(before: Policy, after: Policy) -> bool:
    """Whether ``after`` lets fewer or weaker approvals change the list than ``before`` does."""
    return (
        after.threshold < before.threshold
        or (before.require_webauthn and not after.require_webauthn)
        or (before.require_user_verification and not after.require_user_verification)
    )


def check_own_approvals(head: DeviceList, device_id: str, *, with_key: bool) -> None:
    """Whether this device's approval (when its role may approve) and, ``with_key``, one hardware key's meet
    ``head``'s policy: what the next version needs, whatever it changes (crypto.md §3.2: a policy change too
    is approved under the policy it replaces). Raises ``policy_not_met`` saying what is missing. Pure."""
    policy = head.policy
    own = next((d for d in head.devices if d.device_id == device_id), None)
    weight = (1 if own is not None and device_list.may_approve(own) else 0) + (1 if with_key else 0)
    if policy.require_webauthn and not with_key:
        raise TetherlessError(ErrorCode.POLICY_NOT_MET, "the current policy needs a hardware key's approval (--fido2)")
    if weight < policy.threshold:
        raise TetherlessError(
            ErrorCode.POLICY_NOT_MET,
            f"the current policy needs {policy.threshold} approvals; this device"
            + (" and the hardware key give" if with_key else " gives")
            + f" {weight}",
        )


async def set_policy(
    client: RelayClient, policy: Policy, *, get_assertion: AssertionProvider | None = None
) -> DeviceListAccepted | None:
    """Post the version that sets the account's approval policy to ``policy`` (``tetherless device policy``).

    Approved as the *current* policy demands (crypto.md §3.2: loosening needs the consent of what it
    loosens): by this device, and by the hardware key of ``get_assertion`` (checked by :func:`key_assertion`).
    Returns None when the policy is ``policy`` already (nothing is posted: idempotent). Raises what
    :func:`plan_policy` raises for a ``policy`` that makes no sense for the list, ``policy_not_met``
    (:func:`check_own_approvals`, before the key is asked), what :func:`key_assertion` raises, the chain
    errors and those of ``POST …/devices`` (``device_list_conflict`` when another change won the race: run it
    again). Cancellation before the post sends nothing; after it, the version may stand (read the chain).
    """
    keys = _own(client)
    verified = await _own_head(client)
    head = verified.head
    planned = plan_policy(
        head,
        threshold=policy.threshold,
        require_webauthn=policy.require_webauthn,
        require_user_verification=policy.require_user_verification,
    )
    if planned == head.policy:
        return None
    check_own_approvals(head, keys.device_id, with_key=get_assertion is not None)
    dl = _own_next_version(keys, head, policy=planned, now_ms=client.now_ms())
    return await post_version(client, _own_approvals(keys, verified, dl, get_assertion))


__all__ = [
    "ApprovedLink",
    "AssertionProvider",
    "CredentialMaker",
    "EnrolmentPrekeys",
    "PendingLink",
    "add_credential",
    "approve_link",
    "approvers",
    "backup_hash",
    "check_own_approvals",
    "fetch_offer",
    "fingerprint",
    "finish_link",
    "gatherable_approvals",
    "join_with_authenticator",
    "join_with_recovery",
    "key_assertion",
    "plan_policy",
    "policy_loosens",
    "post_version",
    "remove_credential",
    "resolve_credential_id",
    "resolve_device_id",
    "revoke_device",
    "set_policy",
    "set_recovery_key",
    "start_link",
    "upgrade_list",
    "verify_proposal",
    "wait_for_proposal",
]
