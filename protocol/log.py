"""The account log's record format, ids and account keys (docs/account-log.md §4, §5, §9).

Pure: no I/O, no clock, no randomness. Nonces, keys and ephemeral keys are
passed in, so the vectors in ``protocol/vectors/log-record.json`` are exact.

Records (§4.2)::

    ciphertext = nonce(24) ‖ XChaCha20-Poly1305(K[epoch], nonce, pad(msgpack(LogPlaintext)), ad)
    ad         = layout("log-record", account_id, record_id, epoch, kind,
                        snapshot_id or b"", covers or 0, parts or 0)

The associated data binds every header field the relay can see, so the relay
cannot move a record to another account, relabel it or swap snapshot parts
without :func:`open_record` failing with ``malformed_body``.

Key records (kind ``key``, §5.1) are not sealed under the account key: they
are a signed :class:`KeyEpochRecord`, padded, with per-device grants
(libsodium sealed boxes of ``K[epoch] ‖ u64(epoch)`` to each device's X25519
box key) and a commitment to the key. :func:`verify_key_record` checks the
signature, the creator, the grants against the device list and the
commitment; :func:`unwrap_grant` opens this device's grant.

Since issue 12 (§4.6, §5.5): v2 key records (:func:`make_key_record_v2`) grant
independent epoch keys, several epochs per grant, through the post-quantum
hybrid wrap of :mod:`protocol.hybrid`; records under v2 epochs are signed by
their writer inside the AEAD (:func:`seal_signed_record`,
:func:`open_signed_record`). The v1 functions stay for reading legacy logs.

Ids (§4.4, §9): :func:`message_record_id` is deterministic from
``(account_id, sender device address, message_uid)``, so two devices of one
account that log the same message write the same record (the relay keeps the
first, L3); :func:`envelope_key` is the per-recipient-device idempotency key
of an envelope, so a restarted client recomputes the same key.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Annotated, Final, Literal

import nacl.bindings
import nacl.exceptions
import nacl.signing
from msgspec import Meta

from . import codec, device_list, hybrid, padding, recovery, signing
from .errors import ErrorCode, TetherlessError
from .messages import DeviceEntry, Message

KEY_BYTES: Final = 32
NONCE_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
TAG_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
RECORD_ID_BYTES: Final = 16
MESSAGE_UID_BYTES: Final = 16
RECORD_DOMAIN: Final = "log-record"
RECORD_ID_DOMAIN: Final = "log-record-id"
ENVELOPE_KEY_DOMAIN: Final = "envelope-key"
KEY_EPOCH_DOMAIN: Final = "log-key-epoch"
KEY_CHAIN_DOMAIN: Final = "log-key-chain"
KEY_COMMIT_DOMAIN: Final = "log-key-commit"
FRAME_CONTENT_TYPE: Final = "application/vnd.tetherless.message+msgpack"
ACCOUNT_KEY_CONTENT_TYPE: Final = "tetherless/account-key"

Kind = Literal["event", "state", "key", "snapshot_part", "snapshot"]


class InvalidRecordError(TetherlessError):
    """A record that must not be trusted: ``malformed_body`` (does not open/decode) or ``bad_signature``."""


# -- plaintexts (inside the ciphertext; never on the wire in the clear) ----------------------


class MessageFrame(Message, frozen=True):
    """The signed body of a v1 envelope sent by the offline-first client (§9, interim).

    v1 ``SealedContent`` has no ``pair_seq``; the client carries it here, inside
    the signed ``body``, with the application's content type and body.
    ``SealedContent.message_id`` is the logical ``message_uid``.
    """

    pair_seq: Annotated[int, Meta(ge=1)]
    content_type: str
    body: bytes


class MessageSent(Message, frozen=True, tag="message-sent", tag_field="type"):
    message_uid: bytes
    sender: str
    recipients: list[str]
    pair_seq: int
    sent_at_ms: int
    content_type: str
    body: bytes
    envelope_ids: list[bytes] = []
    relay_sent_at_ms: int = 0


class MessageReceived(Message, frozen=True, tag="message-received", tag_field="type"):
    message_uid: bytes
    sender: str
    sender_sign_key: bytes
    recipient: str
    pair_seq: int
    sent_at_ms: int
    relay_sent_at_ms: int
    content_type: str
    body: bytes
    late: bool = False


class DeviceState(Message, frozen=True, tag="device-state", tag_field="type"):
    registers: dict[str, bytes] = {}


LogBody = MessageSent | MessageReceived | DeviceState


class LogPlaintext(Message, frozen=True):
    """What an ``event``/``state`` record encrypts (§4.5)."""

    writer_device: str
    writer_seq: int
    created_at_ms: int
    body: LogBody


class KeyGrant(Message, frozen=True):
    device_id: str
    sealed: bytes


class KeyEpochBody(Message, frozen=True):
    account_id: str
    epoch: int
    device_list_version: int
    creator_device: str
    created_at_ms: int
    grants: list[KeyGrant]
    prev_key_wrap: bytes
    key_commitment: bytes


class KeyEpochRecord(Message, frozen=True):
    body: KeyEpochBody
    signature: bytes


# -- ids ------------------------------------------------------------------------------------------


def message_record_id(account_id: str, sender_device_address: str, message_uid: bytes) -> bytes:
    """``SHA-256(layout("log-record-id", account_id, "message", sender, message_uid))[:16]`` (§4.4)."""
    return signing.digest(RECORD_ID_DOMAIN, account_id, "message", sender_device_address, message_uid)[:RECORD_ID_BYTES]


def envelope_key(message_uid: bytes, recipient_device_address: str) -> bytes:
    """``SHA-256(layout("envelope-key", message_uid, recipient))[:16]``: an envelope's idempotency key (§9)."""
    return signing.digest(ENVELOPE_KEY_DOMAIN, message_uid, recipient_device_address)[:16]


# -- records --------------------------------------------------------------------------------------


def record_ad(
    account_id: str,
    record_id: bytes,
    epoch: int,
    kind: str,
    snapshot_id: bytes | None = None,
    covers: int | None = None,
    parts: int | None = None,
    *,
    domain: str = RECORD_DOMAIN,
) -> bytes:
    """The associated data of a record: every header field the relay sees (§4.2; ``domain`` v2: §4.6)."""
    return signing.layout(domain, account_id, record_id, epoch, kind, snapshot_id or b"", covers or 0, parts or 0)


def seal_record(
    key: bytes,
    plaintext: LogPlaintext,
    *,
    account_id: str,
    record_id: bytes,
    epoch: int,
    kind: str = "event",
    nonce: bytes,
    snapshot_id: bytes | None = None,
    covers: int | None = None,
    parts: int | None = None,
) -> bytes:
    """Encrypt ``plaintext`` under the account key of ``epoch``. ``nonce``: 24 fresh random bytes."""
    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES or len(record_id) != RECORD_ID_BYTES:
        raise ValueError("key 32, nonce 24 and record id 16 bytes")
    ad = record_ad(account_id, record_id, epoch, kind, snapshot_id, covers, parts)
    padded = padding.pad(codec.encode(plaintext))
    return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(padded, ad, nonce, key)


def open_record(
    key: bytes,
    ciphertext: bytes,
    *,
    account_id: str,
    record_id: bytes,
    epoch: int,
    kind: str = "event",
    snapshot_id: bytes | None = None,
    covers: int | None = None,
    parts: int | None = None,
) -> LogPlaintext:
    """Inverse of :func:`seal_record`; raises :class:`InvalidRecordError` (``malformed_body``)."""
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "log record is truncated")
    ad = record_ad(account_id, record_id, epoch, kind, snapshot_id, covers, parts)
    try:
        padded = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext[NONCE_BYTES:], ad, ciphertext[:NONCE_BYTES], key
        )
    except nacl.exceptions.CryptoError:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "log record does not decrypt") from None
    try:
        return codec.decode(padding.unpad(padded), LogPlaintext)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"log record plaintext: {exc.detail}") from exc


# -- account keys (§5.1) --------------------------------------------------------------------------


def key_commitment(account_id: str, epoch: int, key: bytes) -> bytes:
    return signing.digest(KEY_COMMIT_DOMAIN, account_id, epoch, key)


def _chain_ad(account_id: str, epoch: int) -> bytes:
    return signing.layout(KEY_CHAIN_DOMAIN, account_id, epoch)


def wrap_previous_key(key: bytes, previous_key: bytes, *, account_id: str, epoch: int, nonce: bytes) -> bytes:
    """``nonce ‖ XChaCha20-Poly1305(K[epoch], nonce, K[epoch-1], layout("log-key-chain", account, epoch))``."""
    return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        previous_key, _chain_ad(account_id, epoch), nonce, key
    )


def unwrap_previous_key(key: bytes, wrap: bytes, *, account_id: str, epoch: int) -> bytes:
    """``K[epoch-1]`` from a key record's ``prev_key_wrap``; raises :class:`InvalidRecordError`."""
    try:
        return bytes(
            nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                wrap[NONCE_BYTES:], _chain_ad(account_id, epoch), wrap[:NONCE_BYTES], key
            )
        )
    except (nacl.exceptions.CryptoError, ValueError):
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "previous epoch key does not unwrap") from None


def _grant_plaintext(key: bytes, epoch: int) -> bytes:
    return key + epoch.to_bytes(8, "big")


def seal_grant(key: bytes, epoch: int, box_key: bytes, ephemeral_private_key: bytes) -> bytes:
    """libsodium ``crypto_box_seal`` of ``K ‖ u64(epoch)`` to ``box_key``, with the ephemeral key passed in."""
    if len(ephemeral_private_key) != 32 or len(box_key) != 32:
        raise ValueError("X25519 keys are 32 bytes")
    epk = nacl.bindings.crypto_scalarmult_base(ephemeral_private_key)
    nonce = nacl.bindings.crypto_generichash_blake2b_salt_personal(epk + box_key, digest_size=24)
    boxed = nacl.bindings.crypto_box(_grant_plaintext(key, epoch), nonce, box_key, ephemeral_private_key)
    return bytes(epk) + bytes(boxed)


def key_epoch_layout(body: KeyEpochBody) -> bytes:
    fields: list[signing.Field] = [
        body.account_id,
        body.epoch,
        body.device_list_version,
        body.creator_device,
        body.created_at_ms,
        len(body.grants),
    ]
    for grant in body.grants:
        fields += [grant.device_id, grant.sealed]
    fields += [body.prev_key_wrap, body.key_commitment]
    return signing.layout(KEY_EPOCH_DOMAIN, *fields)


def make_key_record(
    signing_key: nacl.signing.SigningKey,
    *,
    account_id: str,
    creator_device: str,
    epoch: int,
    key: bytes,
    device_list_version: int,
    devices: list[DeviceEntry],
    created_at_ms: int,
    ephemeral_keys: list[bytes],
    previous_key: bytes | None = None,
    wrap_nonce: bytes = b"",
) -> bytes:
    """The ``ciphertext`` of a key record granting ``key`` (epoch ``epoch``) to ``devices``.

    ``ephemeral_keys``: one fresh 32-byte X25519 private key per device.
    ``previous_key`` (with ``wrap_nonce``) for a new epoch > 1; None for epoch 1
    and for grant-only records.
    """
    if len(ephemeral_keys) != len(devices):
        raise ValueError("one ephemeral key per device")
    grants = [
        KeyGrant(device_id=d.device_id, sealed=seal_grant(key, epoch, d.box_key, esk))
        for d, esk in zip(devices, ephemeral_keys, strict=True)
    ]
    wrap = b""
    if previous_key is not None:
        wrap = wrap_previous_key(key, previous_key, account_id=account_id, epoch=epoch, nonce=wrap_nonce)
    body = KeyEpochBody(
        account_id=account_id,
        epoch=epoch,
        device_list_version=device_list_version,
        creator_device=creator_device,
        created_at_ms=created_at_ms,
        grants=grants,
        prev_key_wrap=wrap,
        key_commitment=key_commitment(account_id, epoch, key),
    )
    signature = signing.sign(signing_key, key_epoch_layout(body))
    return padding.pad(codec.encode(KeyEpochRecord(body=body, signature=signature)))


def decode_key_record(ciphertext: bytes) -> KeyEpochRecord:
    try:
        return codec.decode(padding.unpad(ciphertext), KeyEpochRecord)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"key record: {exc.detail}") from exc


def _check_creator_and_signature(
    body_account: str,
    body_epoch: int,
    creator_device: str,
    *,
    account_id: str,
    epoch: int,
    holders: dict[str, DeviceEntry],
    layout: bytes,
    signature: bytes,
    not_holder: str,
) -> None:
    """The checks every key record starts with (v1 and v2/v3): its account and epoch, a creator among
    ``holders`` (detail ``key record creator {not_holder}``), and the creator's signature over ``layout``."""
    if body_account != account_id or body_epoch != epoch:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "key record for another account or epoch")
    creator = holders.get(creator_device)
    if creator is None:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, f"key record creator {not_holder}")
    try:
        signing.verify(creator.sign_key, layout, signature)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "key record signature does not verify") from exc


def _check_grantees(granted: list[str], holders: dict[str, DeviceEntry], *, exact: bool) -> None:
    """Every grant names a distinct device of ``holders``; with ``exact`` (a full or rotation record), all."""
    if len(set(granted)) != len(granted) or not set(granted) <= set(holders):
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "key record grants a device outside the list")
    if exact and set(granted) != set(holders):
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "key record does not grant exactly the list's devices")


def verify_key_record(
    record: KeyEpochRecord, *, account_id: str, epoch: int, devices: list[DeviceEntry], grant_only: bool = False
) -> None:
    """Check a key record against the verified device list of its ``device_list_version`` (§5.1).

    The creator must be in ``devices`` and have signed it; the record must be
    for ``account_id`` and ``epoch``; every grant must name a device of the
    list, at most once, and a full (non-grant-only) record must grant exactly
    the list's devices. Raises :class:`InvalidRecordError` (``bad_signature``).
    """
    body = record.body
    by_id = {d.device_id: d for d in devices}
    _check_creator_and_signature(
        body.account_id, body.epoch, body.creator_device, account_id=account_id, epoch=epoch, holders=by_id,
        layout=key_epoch_layout(body), signature=record.signature, not_holder="is not in the device list",
    )  # fmt: skip
    _check_grantees([g.device_id for g in body.grants], by_id, exact=not grant_only)


def unwrap_grant(record: KeyEpochRecord, *, device_id: str, box_private_key: bytes) -> bytes | None:
    """This device's ``K[epoch]`` from a verified key record, checked against the commitment; None if not granted."""
    body = record.body
    for grant in body.grants:
        if grant.device_id != device_id:
            continue
        public_key = nacl.bindings.crypto_scalarmult_base(box_private_key)
        try:
            plain = nacl.bindings.crypto_box_seal_open(grant.sealed, public_key, box_private_key)
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "key grant does not open") from exc
        key, epoch = plain[:KEY_BYTES], int.from_bytes(plain[KEY_BYTES:], "big")
        if len(plain) != KEY_BYTES + 8 or epoch != body.epoch:
            raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "key grant names another epoch")
        if key_commitment(body.account_id, body.epoch, key) != body.key_commitment:
            raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "key grant does not match the key commitment")
        return bytes(key)
    return None


# -- key records v2 and signed records (§5.1 v2, §4.6; crypto.md §12.1) -----------------------------------

KEY_EPOCH_V2_DOMAIN: Final = "log-key-epoch/2"
KEY_GRANT_V2_DOMAIN: Final = "log-key-grant/2"
RECORD_V2_DOMAIN: Final = "log-record/2"
RECORD_SIGNATURE_DOMAIN: Final = "log-record-sig/2"
KEY_RECORD_V2: Final = 2
KEY_EPOCH_V3_DOMAIN: Final = "log-key-epoch/3"
KEY_RECORD_V3: Final = 3


class EpochKey(Message, frozen=True):
    epoch: Annotated[int, Meta(ge=1)]
    key: Annotated[bytes, Meta(min_length=32, max_length=32)]


class GrantPayload(Message, frozen=True):
    """What one hybrid grant wraps: the keys of one or more epochs (all of them for a new device)."""

    keys: list[EpochKey]


class HybridGrant(Message, frozen=True):
    """One device's grant: a hybrid wrap (crypto.md §12.1) of a :class:`GrantPayload`, or ``b""`` when the
    device has no ML-KEM key in its list entry (format 2): it gets the keys through a v2 session instead."""

    device_id: str
    wrapped: bytes


class EpochCommitment(Message, frozen=True):
    epoch: Annotated[int, Meta(ge=1)]
    commitment: Annotated[bytes, Meta(min_length=32, max_length=32)]


class KeyEpochBodyV2(Message, frozen=True):
    """A v2 key record (§5.1 v2). ``rotation``: it creates ``epoch`` with a fresh, independent key and grants
    exactly the list's grant-receiving devices; otherwise it hands the keys in ``commitments`` to new devices."""

    account_id: str
    epoch: Annotated[int, Meta(ge=1)]
    device_list_version: Annotated[int, Meta(ge=1)]
    creator_device: str
    created_at_ms: int
    rotation: bool
    grants: list[HybridGrant]
    commitments: list[EpochCommitment]


class WriterMark(Message, frozen=True):
    """A removed writer's close-out mark (§5.1 v3): the highest ``writer_seq`` of its records before the rotation."""

    device_id: str
    last_seq: Annotated[int, Meta(ge=0)]


class KeyEpochRecordV2(Message, frozen=True, omit_defaults=True):
    """A v2 key record, or a v3 one (§5.1 v3): a v2 body plus ``closed``, the rotation's close-out marks of the
    writers it removes, signed under the v3 domain. A v2 record encodes exactly as before (``closed`` omitted)."""

    v: Literal[2, 3]
    body: KeyEpochBodyV2
    signature: bytes
    closed: list[WriterMark] = []


class SignedRecordPayload(Message, frozen=True):
    """What a v2 record's AEAD encrypts: the writer, its signature and the inner plaintext's bytes (§4.6)."""

    writer_device: str
    signature: bytes
    payload: bytes


AnyKeyRecord = KeyEpochRecord | KeyEpochRecordV2


def key_epoch_v2_layout(body: KeyEpochBodyV2, closed: list[WriterMark] | None = None) -> bytes:
    """What a key record's creator signs: the v2 layout, or with ``closed`` (not None) the v3 layout, which
    appends the close-out marks under its own domain (so a v3 signature never verifies as v2 and back)."""
    fields: list[signing.Field] = [
        body.account_id,
        body.epoch,
        body.device_list_version,
        body.creator_device,
        body.created_at_ms,
        int(body.rotation),
        len(body.grants),
    ]
    for grant in body.grants:
        fields += [grant.device_id, grant.wrapped]
    fields.append(len(body.commitments))
    for c in body.commitments:
        fields += [c.epoch, c.commitment]
    if closed is None:
        return signing.layout(KEY_EPOCH_V2_DOMAIN, *fields)
    fields.append(len(closed))
    for mark in closed:
        fields += [mark.device_id, mark.last_seq]
    return signing.layout(KEY_EPOCH_V3_DOMAIN, *fields)


def _signed_layout(record: KeyEpochRecordV2) -> bytes:
    return key_epoch_v2_layout(record.body, record.closed if record.v == KEY_RECORD_V3 else None)


def grant_context(account_id: str, epoch: int, device_list_version: int, creator_device: str, device_id: str) -> bytes:
    """The hybrid wrap's context for one grant: the relay cannot move a wrap to another record, epoch or device."""
    return signing.layout(KEY_GRANT_V2_DOMAIN, account_id, epoch, device_list_version, creator_device, device_id)


def make_key_record_v2(
    signing_key: nacl.signing.SigningKey,
    *,
    account_id: str,
    creator_device: str,
    epoch: int,
    keys: dict[int, bytes],
    rotation: bool,
    device_list_version: int,
    devices: list[DeviceEntry],
    created_at_ms: int,
    wrap_randomness: list[tuple[bytes, bytes, bytes]],
    closed: dict[str, int] | None = None,
) -> bytes:
    """The ``ciphertext`` of a v2 key record granting every key in ``keys`` (which holds ``epoch``) to ``devices``.

    ``closed``: device id → last ``writer_seq`` of each writer this rotation removes (§5.1 v3); when given and
    not empty the record is a v3 record committing to those marks (sorted by device id), else a v2 record.

    ``wrap_randomness``: per device *with* a ``kem_key``, in order, ``(ephemeral X25519 private key, ML-KEM
    ciphertext, ML-KEM shared secret)`` from a fresh encapsulation to that key. A device without one (format 2)
    gets an empty grant: the caller sends it the keys through its v2 session, never as a classical sealed box.
    Pure and deterministic. Raises ``ValueError`` on inconsistent inputs.
    """
    if epoch not in keys or any(len(k) != KEY_BYTES for k in keys.values()) or any(e > epoch for e in keys):
        raise ValueError("keys must hold the record's epoch and no later one, 32 bytes each")
    payload = codec.encode(GrantPayload(keys=[EpochKey(epoch=e, key=keys[e]) for e in sorted(keys)]))
    randomness = iter(wrap_randomness)
    grants: list[HybridGrant] = []
    for device in devices:
        wrapped = b""
        if device.kem_key:
            esk, kem_ct, kem_ss = next(randomness)
            context = grant_context(account_id, epoch, device_list_version, creator_device, device.device_id)
            recipient = hybrid.HybridRecipient(x25519_public=device.box_key, kem_public=device.kem_key)
            wrapped = hybrid.seal(
                recipient,
                payload,
                context=context,
                ephemeral_private_key=esk,
                kem_ciphertext=kem_ct,
                kem_shared_secret=kem_ss,
            )
        grants.append(HybridGrant(device_id=device.device_id, wrapped=wrapped))
    if next(randomness, None) is not None:
        raise ValueError("one wrap randomness per device with a kem_key")
    body = KeyEpochBodyV2(
        account_id=account_id,
        epoch=epoch,
        device_list_version=device_list_version,
        creator_device=creator_device,
        created_at_ms=created_at_ms,
        rotation=rotation,
        grants=grants,
        commitments=[EpochCommitment(epoch=e, commitment=key_commitment(account_id, e, keys[e])) for e in sorted(keys)],
    )
    if closed and not rotation:
        raise ValueError("only a rotation closes writers")
    if closed:
        marks = [WriterMark(device_id=d, last_seq=closed[d]) for d in sorted(closed)]
        signature = signing.sign(signing_key, key_epoch_v2_layout(body, marks))
        record = KeyEpochRecordV2(v=KEY_RECORD_V3, body=body, signature=signature, closed=marks)
    else:
        record = KeyEpochRecordV2(
            v=KEY_RECORD_V2, body=body, signature=signing.sign(signing_key, key_epoch_v2_layout(body))
        )
    return padding.pad(codec.encode(record))


def decode_any_key_record(ciphertext: bytes) -> AnyKeyRecord:
    """A v2 key record, else a v1 one; raises :class:`InvalidRecordError` (``malformed_body``)."""
    try:
        plain = padding.unpad(ciphertext)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"key record: {exc.detail}") from exc
    with contextlib.suppress(TetherlessError):
        return codec.decode(plain, KeyEpochRecordV2)
    try:
        return codec.decode(plain, KeyEpochRecord)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"key record: {exc.detail}") from exc


def verify_key_record_v2(record: KeyEpochRecordV2, *, account_id: str, epoch: int, devices: list[DeviceEntry]) -> None:
    """Check a v2 key record against the verified devices of its ``device_list_version`` (§5.1 v2).

    The creator must be a grant-receiving device of the list and have signed it;
    every grant names a distinct grant-receiving device of the list; a device
    with a ``kem_key`` gets a hybrid wrap, one without gets none; a rotation
    grants exactly the list's grant-receiving devices (a removed device gets
    nothing), a grant-only record a subset; the commitments name ``epoch`` and
    only earlier epochs, once each. A v3 record (signed over its ``closed`` marks)
    is a rotation that closes only writers it does not grant, once each; a v2 one
    closes none. Raises :class:`InvalidRecordError` (``bad_signature``).
    """
    body = record.body
    receiving = {d.device_id: d for d in devices if device_list.receives_account_key_grants(d)}
    _check_creator_and_signature(
        body.account_id, body.epoch, body.creator_device, account_id=account_id, epoch=epoch, holders=receiving,
        layout=_signed_layout(record), signature=record.signature, not_holder="is not a key-holding device of the list",
    )  # fmt: skip
    closed = [m.device_id for m in record.closed]
    if record.closed and (record.v != KEY_RECORD_V3 or not body.rotation):
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "only a v3 rotation closes writers")
    if len(set(closed)) != len(closed) or set(closed) & {g.device_id for g in body.grants}:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "key record closes a writer twice or one it grants")
    _check_grantees([g.device_id for g in body.grants], receiving, exact=body.rotation)
    if any(bool(g.wrapped) != bool(receiving[g.device_id].kem_key) for g in body.grants):
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "key record grant does not match the device's keys")
    epochs = [c.epoch for c in body.commitments]
    if epoch not in epochs or len(set(epochs)) != len(epochs) or max(epochs) != epoch:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "key record commitments do not match its epoch")


def unwrap_grant_v2(
    record: KeyEpochRecordV2, *, device_id: str, box_private_key: bytes, kem_seed: bytes
) -> dict[int, bytes] | None:
    """This device's epoch keys from a verified v2 key record, each checked against the record's commitment.

    None when the record grants nothing to this device, or grants it through a session (empty wrap) or the
    device has no ML-KEM key. Raises :class:`InvalidRecordError` when the wrap does not open (a tampered or
    swapped ML-KEM or X25519 share) or a key does not match its commitment.
    """
    body = record.body
    grant = next((g for g in body.grants if g.device_id == device_id), None)
    if grant is None or not grant.wrapped or not kem_seed:
        return None
    context = grant_context(body.account_id, body.epoch, body.device_list_version, body.creator_device, device_id)
    try:
        plain = hybrid.open_wrap(box_private_key, kem_seed, grant.wrapped, context=context)
        payload = codec.decode(plain, GrantPayload)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "key grant does not open") from exc
    commitments = {c.epoch: c.commitment for c in body.commitments}
    keys: dict[int, bytes] = {}
    for item in payload.keys:
        if commitments.get(item.epoch) != key_commitment(body.account_id, item.epoch, item.key):
            raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "key grant does not match the key commitment")
        keys[item.epoch] = item.key
    if set(keys) != set(commitments):
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "key grant does not carry every committed epoch")
    return keys


def record_v2_ad(account_id: str, record_id: bytes, epoch: int, kind: str) -> bytes:
    """The associated data of a signed (v2) record; its own domain, so a v1 ciphertext never opens as v2."""
    return record_ad(account_id, record_id, epoch, kind, domain=RECORD_V2_DOMAIN)


def record_signature_layout(ad: bytes, writer_device: str, payload: bytes) -> bytes:
    """What a writer signs: every header field the relay sees (through the v2 AD), itself and the payload digest."""
    return signing.layout(RECORD_SIGNATURE_DOMAIN, ad, writer_device, sha256(payload))


def seal_signed_record(
    key: bytes,
    plaintext: LogPlaintext,
    signing_key: nacl.signing.SigningKey,
    *,
    account_id: str,
    record_id: bytes,
    epoch: int,
    kind: str = "event",
    nonce: bytes,
) -> bytes:
    """A v2 record: ``plaintext`` signed by its writer (``plaintext.writer_device``), then sealed under ``K[epoch]``.

    ``nonce``: 24 fresh random bytes. Pure; raises ``ValueError`` for wrong lengths.
    """
    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES or len(record_id) != RECORD_ID_BYTES:
        raise ValueError("key 32, nonce 24 and record id 16 bytes")
    ad = record_v2_ad(account_id, record_id, epoch, kind)
    return _seal_signed(key, codec.encode(plaintext), plaintext.writer_device, signing_key, ad, nonce)


def _seal_signed(
    key: bytes, payload: bytes, writer_device: str, signing_key: nacl.signing.SigningKey, ad: bytes, nonce: bytes
) -> bytes:
    """§4.6: ``payload`` signed by ``writer_device`` over the v2 ``ad``, then sealed under ``key``."""
    signature = signing.sign(signing_key, record_signature_layout(ad, writer_device, payload))
    signed = SignedRecordPayload(writer_device=writer_device, signature=signature, payload=payload)
    return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        padding.pad(codec.encode(signed)), ad, nonce, key
    )


def _open_signed(key: bytes, ciphertext: bytes, writers: dict[str, bytes], ad: bytes, what: str) -> tuple[str, bytes]:
    """Inverse of :func:`_seal_signed`: (the writer, the payload it signed). Raises :class:`InvalidRecordError`:
    ``malformed_body`` when it does not open, ``bad_signature`` when the writer is not in ``writers`` or the
    signature does not verify."""
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"{what} is truncated")
    try:
        padded = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext[NONCE_BYTES:], ad, ciphertext[:NONCE_BYTES], key
        )
        signed = codec.decode(padding.unpad(padded), SignedRecordPayload)
    except nacl.exceptions.CryptoError:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"{what} does not decrypt") from None
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"{what}: {exc.detail}") from exc
    sign_key = writers.get(signed.writer_device)
    if sign_key is None:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, f"{what} writer does not hold this epoch")
    try:
        signing.verify(sign_key, record_signature_layout(ad, signed.writer_device, signed.payload), signed.signature)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, f"{what} signature does not verify") from exc
    return signed.writer_device, signed.payload


def open_signed_record(
    key: bytes,
    ciphertext: bytes,
    *,
    writers: dict[str, bytes],
    account_id: str,
    record_id: bytes,
    epoch: int,
    kind: str = "event",
) -> LogPlaintext:
    """Inverse of :func:`seal_signed_record`. ``writers``: device id → Ed25519 key of every device allowed to
    write under ``epoch`` (the devices its key records granted, as the verified list names them).

    Raises :class:`InvalidRecordError`: ``malformed_body`` when it does not open or decode, ``bad_signature``
    when the writer is not allowed, the signature does not verify or the inner writer differs.
    """
    ad = record_v2_ad(account_id, record_id, epoch, kind)
    writer, payload = _open_signed(key, ciphertext, writers, ad, "log record")
    try:
        plaintext = codec.decode(payload, LogPlaintext)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"log record plaintext: {exc.detail}") from exc
    if plaintext.writer_device != writer:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "log record names another writer than its signer")
    return plaintext


def frame_message(pair_seq: int, content_type: str, body: bytes) -> bytes:
    return codec.encode(MessageFrame(pair_seq=pair_seq, content_type=content_type, body=body))


def unframe_message(body: bytes) -> MessageFrame:
    try:
        return codec.decode(body, MessageFrame)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"message frame: {exc.detail}") from exc


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- snapshots (§6.1; added by helper "log-snapshots", client side in protocol/client/snapshots.py) --------

SNAPSHOT_ID_DOMAIN: Final = "log-snapshot-id"
SNAPSHOT_PART_ID_DOMAIN: Final = "log-snapshot-part-id"
SNAPSHOT_MANIFEST_ID_DOMAIN: Final = "log-snapshot-manifest-id"
#: Plaintext bytes of one part: with its msgpack frame it pads to exactly the 1 MiB bucket, so a full part's
#: ciphertext is ``max_log_record_bytes`` (1 MiB + 40).
SNAPSHOT_PART_BYTES: Final = 1024 * 1024 - 256


class SnapshotMessage(Message, frozen=True):
    """One message of the history a snapshot carries, with its original log position and record id."""

    position: int
    record_id: bytes
    message_uid: bytes
    sender: str
    direction: Literal["sent", "received"]
    recipients: list[str]
    pair_seq: int
    sent_at_ms: int
    relay_sent_at_ms: int
    content_type: str
    body: bytes
    late: bool = False


class SnapshotGap(Message, frozen=True):
    """Log positions ``(after, upto]`` removed by retention that no snapshot covered (§6.3)."""

    after: int
    upto: int


class SnapshotKeyRecord(Message, frozen=True):
    """A copy of a ``key`` record at a position ``<= covers`` (signed, verified by readers like the original):
    a device that starts from the snapshot needs the epoch-creating records it does not page."""

    position: int
    record_id: bytes
    epoch: int
    device_list_version: int
    committed_at_ms: int
    ciphertext: bytes


class SnapshotState(Message, frozen=True):
    """The materialised history after applying every record ``<= covers`` (§6.1), split over the parts."""

    covers: int
    messages: list[SnapshotMessage]
    gaps: list[SnapshotGap] = []
    key_records: list[SnapshotKeyRecord] = []


class SnapshotPart(Message, frozen=True):
    """The plaintext of one ``snapshot_part`` record: chunk ``index`` of ``total`` of the encoded state.

    ``covers`` and ``total`` are inside the AEAD, so a relay cannot make a reader accept a snapshot for another
    position or a truncated one even without the manifest."""

    index: int
    total: int
    covers: int
    data: bytes


class SnapshotManifest(Message, frozen=True):
    """The plaintext of a ``snapshot`` manifest: SHA-256 of every part's ``data``, in order (§4.5)."""

    writer_device: str
    created_at_ms: int
    covers: int
    part_hashes: list[bytes]


def snapshot_id(account_id: str, writer_device: str, covers: int) -> bytes:
    """Deterministic per (writer, covers): a retried write after a crash reuses every record id (L3)."""
    return signing.digest(SNAPSHOT_ID_DOMAIN, account_id, writer_device, covers)[:RECORD_ID_BYTES]


def snapshot_part_id(snapshot: bytes, index: int) -> bytes:
    return signing.digest(SNAPSHOT_PART_ID_DOMAIN, snapshot, index)[:RECORD_ID_BYTES]


def snapshot_manifest_id(snapshot: bytes) -> bytes:
    return signing.digest(SNAPSHOT_MANIFEST_ID_DOMAIN, snapshot)[:RECORD_ID_BYTES]


def split_snapshot(state: SnapshotState, part_bytes: int = SNAPSHOT_PART_BYTES) -> list[bytes]:
    """The encoded state cut into chunks of at most ``part_bytes`` (deterministic for a given state)."""
    if not 1 <= part_bytes <= SNAPSHOT_PART_BYTES:
        raise ValueError(f"part_bytes must be between 1 and {SNAPSHOT_PART_BYTES}")
    data = codec.encode(state)
    return [data[i : i + part_bytes] for i in range(0, len(data), part_bytes)] or [b""]


def join_snapshot(parts: list[SnapshotPart], covers: int) -> SnapshotState:
    """Reassemble parts (any order); raises :class:`InvalidRecordError` unless they are exactly parts
    ``0 … total-1`` of one snapshot at ``covers``."""
    ordered = sorted(parts, key=lambda p: p.index)
    total = len(ordered)
    if [p.index for p in ordered] != list(range(total)) or any(p.total != total for p in ordered):
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "snapshot parts are missing or repeated")
    if any(p.covers != covers for p in ordered):
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "snapshot parts are for another position")
    try:
        state = codec.decode(b"".join(p.data for p in ordered), SnapshotState)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"snapshot state: {exc.detail}") from exc
    if state.covers != covers:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "snapshot state is for another position")
    return state


def _seal_plain(key: bytes, payload: bytes, ad: bytes, nonce: bytes) -> bytes:
    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError("key 32 and nonce 24 bytes")
    return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(padding.pad(payload), ad, nonce, key)


def _open_plain(key: bytes, ciphertext: bytes, ad: bytes, what: str) -> bytes:
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"{what} is truncated")
    try:
        padded = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext[NONCE_BYTES:], ad, ciphertext[:NONCE_BYTES], key
        )
        return padding.unpad(padded)
    except (nacl.exceptions.CryptoError, TetherlessError):
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"{what} does not decrypt") from None


def seal_snapshot_part(
    key: bytes, part: SnapshotPart, *, account_id: str, snapshot: bytes, epoch: int, nonce: bytes
) -> bytes:
    """A ``snapshot_part`` ciphertext: the §4.2 layout with ``pad(msgpack(SnapshotPart))`` as plaintext."""
    ad = record_ad(account_id, snapshot_part_id(snapshot, part.index), epoch, "snapshot_part", snapshot)
    return _seal_plain(key, codec.encode(part), ad, nonce)


def open_snapshot_part(
    key: bytes, ciphertext: bytes, *, account_id: str, record_id: bytes, snapshot: bytes, epoch: int
) -> SnapshotPart:
    """Inverse of :func:`seal_snapshot_part`; also checks that ``record_id`` is the part's own id."""
    ad = record_ad(account_id, record_id, epoch, "snapshot_part", snapshot)
    plain = _open_plain(key, ciphertext, ad, "snapshot part")
    try:
        part = codec.decode(plain, SnapshotPart)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"snapshot part: {exc.detail}") from exc
    if snapshot_part_id(snapshot, part.index) != record_id:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "snapshot part is stored under another record id")
    return part


def _manifest_ad(account_id: str, snapshot: bytes, epoch: int, covers: int, parts: int, *, signed: bool) -> bytes:
    domain = RECORD_V2_DOMAIN if signed else RECORD_DOMAIN
    return record_ad(
        account_id, snapshot_manifest_id(snapshot), epoch, "snapshot", snapshot, covers, parts, domain=domain
    )


def seal_snapshot_manifest(
    key: bytes,
    manifest: SnapshotManifest,
    *,
    account_id: str,
    snapshot: bytes,
    epoch: int,
    nonce: bytes,
    signing_key: nacl.signing.SigningKey | None = None,
) -> bytes:
    """A ``snapshot`` manifest ciphertext; ``covers`` and the part count are bound into the AD (§4.2).

    With ``signing_key`` (every manifest under a v2 epoch, §6.1 "signed snapshots") it is signed by
    ``manifest.writer_device`` like an event record (§4.6: the v2 AD, ``SignedRecordPayload``); its part hashes
    then authenticate every part. Pure; raises ``ValueError`` for wrong lengths.
    """
    parts = len(manifest.part_hashes)
    ad = _manifest_ad(account_id, snapshot, epoch, manifest.covers, parts, signed=signing_key is not None)
    if signing_key is None:
        return _seal_plain(key, codec.encode(manifest), ad, nonce)
    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError("key 32 and nonce 24 bytes")
    return _seal_signed(key, codec.encode(manifest), manifest.writer_device, signing_key, ad, nonce)


def open_snapshot_manifest(
    key: bytes,
    ciphertext: bytes,
    *,
    account_id: str,
    snapshot: bytes,
    epoch: int,
    covers: int,
    parts: int,
    writers: dict[str, bytes] | None = None,
) -> SnapshotManifest:
    """Inverse of :func:`seal_snapshot_manifest`. ``writers`` (device id → Ed25519 key of the epoch's writers)
    given: only a signed manifest opens (an unsigned one does not open under the v2 AD), signed by one of them
    and naming its signer. None: the legacy unsigned layout (legacy epochs). Raises :class:`InvalidRecordError`
    (``malformed_body``, ``bad_signature``)."""
    ad = _manifest_ad(account_id, snapshot, epoch, covers, parts, signed=writers is not None)
    if writers is None:
        plain = _open_plain(key, ciphertext, ad, "snapshot manifest")
    else:
        signer, plain = _open_signed(key, ciphertext, writers, ad, "snapshot manifest")
    try:
        manifest = codec.decode(plain, SnapshotManifest)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, f"snapshot manifest: {exc.detail}") from exc
    if manifest.covers != covers or len(manifest.part_hashes) != parts:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "snapshot manifest disagrees with its header")
    if writers is not None and manifest.writer_device != signer:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "snapshot manifest names another writer than its signer")
    return manifest


# -- recovery backup records (§5.7; crypto.md §3.4, §12.2) ------------------------------------------------

RECOVERY_BACKUP_DOMAIN: Final = "log-recovery-backup"
RECOVERY_BACKUP_WRAP_DOMAIN: Final = "log-recovery-backup-wrap"
RECOVERY_BACKUP_ID_DOMAIN: Final = "log-recovery-backup-id"


class RecoveryBackupBody(Message, frozen=True):
    """A recovery backup (§5.7): epoch keys wrapped to the recovery backup key, whose public halves it names
    (their hash must be the ``recovery_backup_key_hash`` of the list version it names)."""

    account_id: str
    epoch: Annotated[int, Meta(ge=1)]
    device_list_version: Annotated[int, Meta(ge=1)]
    writer_device: str
    created_at_ms: int
    x25519_public: Annotated[bytes, Meta(min_length=32, max_length=32)]
    kem_public: Annotated[bytes, Meta(min_length=1184, max_length=1184)]
    wrapped: bytes
    commitments: list[EpochCommitment]

    @property
    def recipient(self) -> hybrid.HybridRecipient:
        return hybrid.HybridRecipient(x25519_public=self.x25519_public, kem_public=self.kem_public)


class RecoveryBackupRecord(Message, frozen=True):
    """A ``key``-kind log record that is a recovery backup, not a key record (its fields differ from both)."""

    backup: RecoveryBackupBody
    signature: bytes


def recovery_backup_layout(body: RecoveryBackupBody) -> bytes:
    fields: list[signing.Field] = [
        body.account_id,
        body.epoch,
        body.device_list_version,
        body.writer_device,
        body.created_at_ms,
        body.x25519_public,
        body.kem_public,
        body.wrapped,
        len(body.commitments),
    ]
    for c in body.commitments:
        fields += [c.epoch, c.commitment]
    return signing.layout(RECOVERY_BACKUP_DOMAIN, *fields)


def recovery_backup_context(
    account_id: str, epoch: int, device_list_version: int, writer_device: str, backup_key_hash: bytes
) -> bytes:
    """The hybrid wrap's context: a backup cannot be moved to another account, epoch, list version, writer or
    recovery key."""
    return signing.layout(
        RECOVERY_BACKUP_WRAP_DOMAIN, account_id, epoch, device_list_version, writer_device, backup_key_hash
    )


def recovery_backup_id(account_id: str, epoch: int, backup_key_hash: bytes) -> bytes:
    """The record id of the backup of ``epoch`` to one recovery key: two devices writing it race harmlessly
    (the relay keeps the first, L3) and a retried append is idempotent."""
    return signing.digest(RECOVERY_BACKUP_ID_DOMAIN, account_id, epoch, backup_key_hash)[:RECORD_ID_BYTES]


def make_recovery_backup(
    signing_key: nacl.signing.SigningKey,
    *,
    account_id: str,
    writer_device: str,
    epoch: int,
    keys: dict[int, bytes],
    device_list_version: int,
    recipient: hybrid.HybridRecipient,
    created_at_ms: int,
    ephemeral_private_key: bytes,
    kem_ciphertext: bytes,
    kem_shared_secret: bytes,
) -> bytes:
    """The ``ciphertext`` of a recovery backup record wrapping every key in ``keys`` (which holds ``epoch`` and
    no later one) to ``recipient``. ``(kem_ciphertext, kem_shared_secret)``: a fresh encapsulation to
    ``recipient.kem_public``; ``ephemeral_private_key``: 32 fresh random bytes.

    Pure and deterministic. Raises ``ValueError`` on inconsistent inputs.
    """
    if epoch not in keys or any(len(k) != KEY_BYTES for k in keys.values()) or any(e > epoch for e in keys):
        raise ValueError("keys must hold the record's epoch and no later one, 32 bytes each")
    key_hash = recovery.backup_key_hash(recipient)
    wrapped = hybrid.seal(
        recipient,
        codec.encode(GrantPayload(keys=[EpochKey(epoch=e, key=keys[e]) for e in sorted(keys)])),
        context=recovery_backup_context(account_id, epoch, device_list_version, writer_device, key_hash),
        ephemeral_private_key=ephemeral_private_key,
        kem_ciphertext=kem_ciphertext,
        kem_shared_secret=kem_shared_secret,
    )
    body = RecoveryBackupBody(
        account_id=account_id,
        epoch=epoch,
        device_list_version=device_list_version,
        writer_device=writer_device,
        created_at_ms=created_at_ms,
        x25519_public=recipient.x25519_public,
        kem_public=recipient.kem_public,
        wrapped=wrapped,
        commitments=[EpochCommitment(epoch=e, commitment=key_commitment(account_id, e, keys[e])) for e in sorted(keys)],
    )
    signature = signing.sign(signing_key, recovery_backup_layout(body))
    return padding.pad(codec.encode(RecoveryBackupRecord(backup=body, signature=signature)))


def decode_recovery_backup(ciphertext: bytes) -> RecoveryBackupRecord | None:
    """The recovery backup in a ``key`` record, or None when it is not one (a key record, or garbage: the key
    record decoder reports that). Never raises."""
    try:
        return codec.decode(padding.unpad(ciphertext), RecoveryBackupRecord)
    except TetherlessError:
        return None


def verify_recovery_backup(
    record: RecoveryBackupRecord,
    *,
    account_id: str,
    epoch: int,
    devices: list[DeviceEntry],
    backup_key_hash: bytes,
    epoch_list_version: int,
) -> None:
    """Check a recovery backup against the verified list of its ``device_list_version`` (§5.7).

    ``devices`` and ``backup_key_hash``: that list version's devices and ``recovery_backup_key_hash``;
    ``epoch_list_version``: the list version named by the verified key record that created ``epoch``. The
    writer must be a role-``device`` entry of the list and have signed it; the named recovery key must be
    the one the list commits to; the list version may not predate the epoch's (a device removed before the
    epoch was created cannot write for it); the commitments name ``epoch`` (the highest) and earlier epochs
    once each. Raises :class:`InvalidRecordError` (``bad_signature``).
    """
    body = record.backup
    if body.account_id != account_id or body.epoch != epoch:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "recovery backup for another account or epoch")
    writer = next((d for d in devices if d.device_id == body.writer_device), None)
    if writer is None or writer.role != device_list.ROLE_DEVICE:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "recovery backup writer is not a device of the list")
    try:
        signing.verify(writer.sign_key, recovery_backup_layout(body), record.signature)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "recovery backup signature does not verify") from exc
    if not backup_key_hash or recovery.backup_key_hash(body.recipient) != backup_key_hash:
        raise InvalidRecordError(
            ErrorCode.BAD_SIGNATURE, "recovery backup names a key the device list does not commit to"
        )
    if body.device_list_version < epoch_list_version:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "recovery backup names an older device list than its epoch")
    epochs = [c.epoch for c in body.commitments]
    if epoch not in epochs or len(set(epochs)) != len(epochs) or max(epochs) != epoch:
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "recovery backup commitments do not match its epoch")


def open_recovery_backup(record: RecoveryBackupRecord, keys: recovery.RecoveryKeys) -> dict[int, bytes]:
    """The epoch keys of a verified recovery backup, opened with the keys derived from the recovery secret and
    each checked against the record's commitment.

    Raises :class:`InvalidRecordError`: ``bad_signature`` when the backup is for another recovery key or a key
    does not match its commitment, ``malformed_body`` when the wrap does not open (a zeroed or swapped
    ML-KEM or X25519 share, a moved context).
    """
    body = record.backup
    key_hash = recovery.backup_key_hash(body.recipient)
    if key_hash != recovery.backup_key_hash(recovery.backup_recipient(keys)):
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "recovery backup is for another recovery key")
    context = recovery_backup_context(
        body.account_id, body.epoch, body.device_list_version, body.writer_device, key_hash
    )
    try:
        plain = hybrid.open_wrap(keys.x25519_private, keys.mlkem_seed, body.wrapped, context=context)
        payload = codec.decode(plain, GrantPayload)
    except TetherlessError as exc:
        raise InvalidRecordError(ErrorCode.MALFORMED_BODY, "recovery backup does not open") from exc
    commitments = {c.epoch: c.commitment for c in body.commitments}
    opened = {item.epoch: item.key for item in payload.keys}
    if set(opened) != set(commitments) or any(
        commitments[e] != key_commitment(body.account_id, e, k) for e, k in opened.items()
    ):
        raise InvalidRecordError(ErrorCode.BAD_SIGNATURE, "recovery backup keys do not match their commitments")
    return opened


__all__ = [
    "ACCOUNT_KEY_CONTENT_TYPE",
    "FRAME_CONTENT_TYPE",
    "AnyKeyRecord",
    "DeviceState",
    "EpochCommitment",
    "EpochKey",
    "GrantPayload",
    "HybridGrant",
    "InvalidRecordError",
    "KeyEpochBody",
    "KeyEpochBodyV2",
    "KeyEpochRecord",
    "KeyEpochRecordV2",
    "KeyGrant",
    "LogBody",
    "LogPlaintext",
    "MessageFrame",
    "MessageReceived",
    "MessageSent",
    "RecoveryBackupBody",
    "RecoveryBackupRecord",
    "SignedRecordPayload",
    "SnapshotGap",
    "SnapshotKeyRecord",
    "SnapshotManifest",
    "SnapshotMessage",
    "SnapshotPart",
    "SnapshotState",
    "WriterMark",
    "decode_any_key_record",
    "decode_key_record",
    "decode_recovery_backup",
    "envelope_key",
    "frame_message",
    "grant_context",
    "join_snapshot",
    "key_commitment",
    "key_epoch_v2_layout",
    "make_key_record",
    "make_key_record_v2",
    "make_recovery_backup",
    "message_record_id",
    "open_record",
    "open_recovery_backup",
    "open_signed_record",
    "open_snapshot_manifest",
    "open_snapshot_part",
    "record_ad",
    "record_signature_layout",
    "record_v2_ad",
    "recovery_backup_context",
    "recovery_backup_id",
    "recovery_backup_layout",
    "seal_grant",
    "seal_record",
    "seal_signed_record",
    "seal_snapshot_manifest",
    "seal_snapshot_part",
    "snapshot_id",
    "snapshot_manifest_id",
    "snapshot_part_id",
    "split_snapshot",
    "unframe_message",
    "unwrap_grant",
    "unwrap_grant_v2",
    "unwrap_previous_key",
    "verify_key_record",
    "verify_key_record_v2",
    "verify_recovery_backup",
    "wrap_previous_key",
]
