"""Device lists: building, hashing, approving and checking them.

Three formats share one chain: format 1 (docs/protocol.md §4, "any one
device of the previous version"), format 2 (docs/crypto.md §3: a policy,
WebAuthn credentials, a recovery key and the account-key epoch) and format 3
(docs/crypto.md §3.6: per device also an ML-KEM-768 key, a role and scopes;
only role ``device`` approves). The relay and clients run the same checks:

- :func:`verify_genesis` checks an account's first list (any format);
- :func:`evaluate_version` checks one version against its predecessor
  (crypto.md §3.2) and says what changed;
- :func:`verify_chain` checks a whole chain from the genesis, the WebAuthn
  sign counters along it, and the client's high-water mark (crypto.md §3.5).

Builders for clients: :func:`genesis`, :func:`genesis_v2`, :func:`genesis_v3`,
:func:`next_version`, :func:`approve`, :func:`sign_recovery`,
:func:`self_sign`. Everything here is pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Final

import msgspec
import nacl.signing

from . import signing
from .errors import ErrorCode, TetherlessError
from .handshake import mlkem_check_public
from .ids import account_id_for, device_id_for
from .messages import (
    DEFAULT_POLICY,
    DeviceEntry,
    DeviceList,
    DeviceListChain,
    DeviceListSignature,
    DeviceRole,
    DeviceScope,
    Policy,
    SignedDeviceList,
    WebAuthnAssertion,
    WebAuthnCredential,
)

FORMAT_1 = 1
FORMAT_2 = 2
FORMAT_3 = 3

ROLE_DEVICE: Final = "device"
ROLE_INTEGRATION: Final = "integration"
ROLE_ARCHIVER: Final = "archiver"
# The scopes each role may carry (docs/crypto.md §3.6): a closed table, checked by check_structure.
ROLE_SCOPES: Final[dict[str, frozenset[str]]] = {
    ROLE_DEVICE: frozenset(),
    ROLE_INTEGRATION: frozenset({"receive", "send"}),
    ROLE_ARCHIVER: frozenset(),
}
# Which roles receive account-key grants, i.e. can read the account's history (docs/crypto.md §3.6).
_HISTORY_ROLES: Final = frozenset({ROLE_DEVICE, ROLE_ARCHIVER})


class DeviceListForkError(TetherlessError):
    """A chain does not contain the version and hash the client verified before (crypto.md §3.5).

    Client-side only (never on the wire): show it as an alarm, keep the
    conflicting versions as evidence, and use none of the account's keys.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.INVALID_DEVICE_LIST, detail)


class DeviceListRollbackError(TetherlessError):
    """A chain ends below the version the client verified before (crypto.md §3.5). Client-side only."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.INVALID_DEVICE_LIST, detail)


def receives_account_key_grants(entry: DeviceEntry) -> bool:
    """Whether the account's devices grant ``entry`` the account key (so it reads the history).

    Part of the role's definition (docs/crypto.md §3.6): ``device`` and
    ``archiver`` do, ``integration`` never does (an integration sees only
    the messages addressed to it). Format-1/2 entries are role ``device``.
    Pure.
    """
    return entry.role in _HISTORY_ROLES


def may_approve(entry: DeviceEntry) -> bool:
    """Whether ``entry``'s signature counts as an approval of the next version: role ``device`` only."""
    return entry.role == ROLE_DEVICE


def _bad(why: str) -> TetherlessError:
    return TetherlessError(ErrorCode.INVALID_DEVICE_LIST, why)


# -- layouts and hashes ----------------------------------------------------------------------------


def list_layout(device_list: DeviceList) -> bytes:
    """The bytes every approval of ``device_list`` covers.

    Format 1: docs/protocol.md §4. Format 2: ``list_layout_v2`` of
    docs/crypto.md §3.1 (entries in the list's order, which
    :func:`check_structure` requires to be sorted). Format 3: the format-2
    fields under the domain ``device-list/3`` with each device's ``kem_key``,
    ``role`` and counted ``scopes`` after its ``added_at_ms`` (crypto.md §3.6).
    """
    dl = device_list
    if dl.format == FORMAT_1:
        fields: list[signing.Field] = [dl.account_id, dl.version, dl.prev_hash, dl.created_at_ms, len(dl.devices)]
        for device in dl.devices:
            fields += [device.device_id, device.sign_key, device.box_key, device.name, device.added_at_ms]
        return signing.layout("device-list", *fields)
    policy = dl.policy
    fields = [
        dl.account_id,
        dl.version,
        dl.prev_hash,
        dl.created_at_ms,
        policy.threshold,
        int(policy.require_webauthn),
        int(policy.require_user_verification),
        dl.account_key_epoch,
        dl.recovery_key,
        dl.recovery_backup_key_hash,
        len(dl.devices),
    ]
    for device in dl.devices:
        fields += [device.device_id, device.sign_key, device.box_key, device.added_at_ms]
        if dl.format == FORMAT_3:
            fields += [device.kem_key, device.role, len(device.scopes), *device.scopes]
    fields.append(len(dl.credentials))
    for credential in dl.credentials:
        fields += [credential.credential_id, credential.public_key, credential.rp_id, credential.added_at_ms]
    return signing.layout("device-list/3" if dl.format == FORMAT_3 else "device-list/2", *fields)


def list_hash(device_list: DeviceList) -> bytes:
    """SHA-256 of the list's layout (either format): ``prev_hash`` of the next version, WebAuthn challenge."""
    return hashlib.sha256(list_layout(device_list)).digest()


# -- structure -------------------------------------------------------------------------------------


def check_structure(device_list: DeviceList) -> None:
    """Check one list on its own (no predecessor). Raises ``invalid_device_list``.

    Both formats: device ids derived from their keys, unique ids and box
    keys, ``prev_hash`` empty exactly for version 1. Format 1: the format-2
    fields keep their defaults. Format 2 (crypto.md §3.1): names empty,
    devices sorted by id and credentials by credential id (so one list has
    one layout), unique credentials with allowed COSE keys, recovery key and
    backup-key hash of 0 or 32 bytes, ``threshold ≤ |devices| + |credentials|``,
    and ``require_webauthn`` only with at least one credential. Formats 1
    and 2: every device has role ``device``, no scopes and no ``kem_key``
    (their layouts do not cover them). Format 3 (crypto.md §3.6): ``kem_key``
    empty or a valid 1184-byte ML-KEM-768 key, unique; a known role with
    sorted, unique scopes from its set (``integration`` at least one); the
    threshold counts only role-``device`` entries and credentials.
    """
    dl = device_list
    if (dl.version == 1) != (not dl.prev_hash):
        raise _bad("prev_hash is empty exactly for version 1")
    if dl.prev_hash and len(dl.prev_hash) != 32:
        raise _bad("prev_hash is 32 bytes")
    ids = [d.device_id for d in dl.devices]
    for device in dl.devices:
        if device.device_id != device_id_for(device.sign_key):
            raise _bad(f"device_id {device.device_id} does not match its sign_key")
    if len(set(ids)) != len(ids):
        raise _bad("a device appears twice")
    if len({d.box_key for d in dl.devices}) != len(ids):
        raise _bad("two devices share a box_key")
    if dl.format == FORMAT_3:
        _check_roles_and_kem_keys(dl.devices)
    elif any(d.kem_key or d.role != ROLE_DEVICE or d.scopes for d in dl.devices):
        raise _bad(f"kem_key, role and scopes need format 3 (this list is format {dl.format})")
    if dl.format == FORMAT_1:
        if (
            dl.policy != DEFAULT_POLICY
            or dl.credentials
            or dl.recovery_key
            or dl.recovery_backup_key_hash
            or dl.account_key_epoch
        ):
            raise _bad("a format-1 list has no policy, credentials, recovery key or epoch")
        return
    if any(d.name for d in dl.devices):
        raise _bad("device names must be empty from format 2 on (they live in the account log)")
    if ids != sorted(ids):
        raise _bad("devices must be sorted by device_id")
    credential_ids = [c.credential_id for c in dl.credentials]
    if credential_ids != sorted(credential_ids) or len(set(credential_ids)) != len(credential_ids):
        raise _bad("credentials must be sorted by credential_id and unique")
    for credential in dl.credentials:
        from . import webauthn  # here: most lists hold no credential, and the CLI's start-up pays for every import

        try:
            webauthn.parse_public_key(credential.public_key)
        except TetherlessError as exc:
            raise _bad(f"credential public key: {exc.detail}") from exc
    if len(dl.recovery_key) not in (0, 32) or len(dl.recovery_backup_key_hash) not in (0, 32):
        raise _bad("recovery_key and recovery_backup_key_hash are empty or 32 bytes")
    if dl.policy.threshold > sum(map(may_approve, dl.devices)) + len(dl.credentials):
        raise _bad("threshold is above the number of devices (role device) and credentials")
    if dl.policy.require_webauthn and not dl.credentials:
        raise _bad("require_webauthn needs at least one credential")


def _check_roles_and_kem_keys(devices: Sequence[DeviceEntry]) -> None:
    kem_keys = [d.kem_key for d in devices if d.kem_key]
    if len(set(kem_keys)) != len(kem_keys):
        raise _bad("two devices share a kem_key")
    for device in devices:
        if device.kem_key:
            try:
                mlkem_check_public(device.kem_key)
            except TetherlessError as exc:
                raise _bad(f"device {device.device_id}: kem_key: {exc.detail}") from exc
        allowed = ROLE_SCOPES.get(device.role)
        if allowed is None:  # pragma: no cover - the message type admits only known roles
            raise _bad(f"device {device.device_id}: unknown role {device.role!r}")
        scopes = list(device.scopes)
        if scopes != sorted(set(scopes)) or not set(scopes) <= allowed:
            raise _bad(
                f"device {device.device_id}: role {device.role} takes sorted, unique scopes from {sorted(allowed)}"
            )
        if device.role == ROLE_INTEGRATION and not scopes:
            raise _bad(f"device {device.device_id}: an integration needs at least one scope")


def _policy(dl: DeviceList) -> Policy:
    """The policy in force for approving the version after ``dl`` (format 1: threshold 1)."""
    return DEFAULT_POLICY if dl.format == FORMAT_1 else dl.policy


def _epoch(dl: DeviceList) -> int:
    return 0 if dl.format == FORMAT_1 else dl.account_key_epoch


# -- genesis ---------------------------------------------------------------------------------------


def device_entry(
    sign_key: bytes,
    box_key: bytes,
    *,
    name: str = "",
    added_at_ms: int,
    kem_key: bytes = b"",
    role: DeviceRole = "device",
    scopes: Iterable[DeviceScope] = (),
) -> DeviceEntry:
    """A device's entry (``kem_key``, ``role`` and ``scopes`` are format 3; scopes are sorted here)."""
    return DeviceEntry(
        device_id=device_id_for(sign_key),
        sign_key=sign_key,
        box_key=box_key,
        name=name,
        added_at_ms=added_at_ms,
        kem_key=kem_key,
        role=role,
        scopes=sorted(set(scopes)),
    )


def genesis(signing_key: nacl.signing.SigningKey, box_key: bytes, *, name: str, now_ms: int) -> SignedDeviceList:
    """A new account's first device list (format 1), signed by its only device."""
    sign_key = bytes(signing_key.verify_key)
    entry = device_entry(sign_key, box_key, name=name, added_at_ms=now_ms)
    device_list = DeviceList(
        account_id=account_id_for(sign_key), version=1, prev_hash=b"", created_at_ms=now_ms, devices=[entry]
    )
    signature = signing.sign(signing_key, list_layout(device_list))
    return SignedDeviceList(
        device_list=device_list, signatures=[DeviceListSignature(device_id=entry.device_id, signature=signature)]
    )


def genesis_v2(
    signing_key: nacl.signing.SigningKey,
    box_key: bytes,
    *,
    now_ms: int,
    policy: Policy | None = None,
    recovery_key: nacl.signing.SigningKey | None = None,
    recovery_backup_key_hash: bytes = b"",
) -> SignedDeviceList:
    """A new account's first device list in format 2 (crypto.md §3.2, last paragraph).

    One device with its self-signature; optionally a policy (its threshold
    can only be 1 with one device) and a recovery key, which self-signs.
    """
    return _genesis(
        signing_key,
        box_key,
        b"",
        now_ms=now_ms,
        policy=policy,
        recovery_key=recovery_key,
        recovery_backup_key_hash=recovery_backup_key_hash,
    )


def genesis_v3(
    signing_key: nacl.signing.SigningKey,
    box_key: bytes,
    kem_key: bytes,
    *,
    now_ms: int,
    policy: Policy | None = None,
    recovery_key: nacl.signing.SigningKey | None = None,
    recovery_backup_key_hash: bytes = b"",
) -> SignedDeviceList:
    """A new account's first device list in format 3 (crypto.md §3.6): as :func:`genesis_v2`, and the
    device, role ``device``, publishes its ML-KEM-768 encapsulation key ``kem_key`` (``ValueError`` if empty)."""
    if not kem_key:
        raise ValueError("a format-3 genesis device has a kem_key")
    return _genesis(
        signing_key,
        box_key,
        kem_key,
        now_ms=now_ms,
        policy=policy,
        recovery_key=recovery_key,
        recovery_backup_key_hash=recovery_backup_key_hash,
    )


def _genesis(
    signing_key: nacl.signing.SigningKey,
    box_key: bytes,
    kem_key: bytes,
    *,
    now_ms: int,
    policy: Policy | None,
    recovery_key: nacl.signing.SigningKey | None,
    recovery_backup_key_hash: bytes,
) -> SignedDeviceList:
    sign_key = bytes(signing_key.verify_key)
    dl = DeviceList(
        account_id=account_id_for(sign_key),
        version=1,
        prev_hash=b"",
        created_at_ms=now_ms,
        devices=[device_entry(sign_key, box_key, added_at_ms=now_ms, kem_key=kem_key)],
        format=FORMAT_3 if kem_key else FORMAT_2,
        policy=policy if policy is not None else DEFAULT_POLICY,
        recovery_key=bytes(recovery_key.verify_key) if recovery_key is not None else b"",
        recovery_backup_key_hash=recovery_backup_key_hash,
    )
    signed = SignedDeviceList(device_list=dl, signatures=[approve(dl, signing_key)])
    if recovery_key is not None:
        signed = msgspec.structs.replace(signed, recovery_signatures=[sign_recovery(dl, recovery_key)])
    return signed


def verify_genesis(signed: SignedDeviceList) -> DeviceEntry:
    """Check a genesis list (any format) and return its device.

    Raises ``invalid_device_list`` when the list is not a well-formed genesis
    (version 1, no ``prev_hash``, one device whose id matches its key, account
    id derived from that key, one signature by that device; in format 2 also
    :func:`check_structure`, no credentials, no assertions, and a recovery
    signature exactly when a recovery key is set) and ``bad_signature`` when
    a signature does not verify; in format 3 the device has role ``device``
    and a ``kem_key``. Pure; idempotent.
    """
    dl = signed.device_list
    if dl.version != 1 or dl.prev_hash:
        raise _bad("a genesis list has version 1 and no prev_hash")
    if len(dl.devices) != 1:
        raise _bad("a genesis list has exactly one device")
    device = dl.devices[0]
    if device.device_id != device_id_for(device.sign_key):
        raise _bad("device_id does not match sign_key")
    if dl.account_id != account_id_for(device.sign_key):
        raise _bad("account_id is not derived from the genesis device's key")
    if len(signed.signatures) != 1 or signed.signatures[0].device_id != device.device_id:
        raise _bad("a genesis list is signed by its device, once")
    check_structure(dl)
    if dl.format == FORMAT_3 and (not may_approve(device) or not device.kem_key):
        raise _bad("a format-3 genesis device has role device and a kem_key")
    if dl.credentials or signed.webauthn_assertions:
        raise _bad("a genesis list has no WebAuthn credentials")
    if len(signed.recovery_signatures) != (1 if dl.recovery_key else 0):
        raise _bad("a genesis list carries one recovery signature exactly when it sets a recovery key")
    layout = list_layout(dl)
    signing.verify(device.sign_key, layout, signed.signatures[0].signature)
    if dl.recovery_key:
        signing.verify(dl.recovery_key, layout, signed.recovery_signatures[0])
    return device


# -- one version -----------------------------------------------------------------------------------


class VersionChange(msgspec.Struct, frozen=True):
    """What an accepted version changes, as :func:`evaluate_version` found it.

    ``assertion_counters`` maps the credential id of every verified assertion
    (approvals and proofs of possession) to its new sign count: the relay
    compares them with its stored counters (``webauthn_replayed``), clients
    along the chain (:func:`verify_chain`).
    """

    added: list[DeviceEntry]
    removed: list[DeviceEntry]
    added_credentials: list[WebAuthnCredential]
    removed_credentials: list[WebAuthnCredential]
    assertion_counters: dict[bytes, int]
    list_hash: bytes = b""
    approving_devices: list[str] = msgspec.field(default_factory=list)
    approving_credentials: list[bytes] = msgspec.field(default_factory=list)
    recovery_approved: bool = False
    policy_changed: bool = False
    recovery_key_changed: bool = False


def _signature_ok(key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        signing.verify(key, message, signature)
    except TetherlessError:
        return False
    return True


def _check_continuation(prev: DeviceList, dl: DeviceList, removed_ids: Collection[str]) -> None:
    if dl.account_id != prev.account_id:
        raise _bad("the version belongs to another account")
    if dl.version != prev.version + 1:
        raise _bad(f"version {dl.version} does not follow version {prev.version}")
    if dl.prev_hash != list_hash(prev):
        raise _bad("prev_hash does not match the previous version")
    if dl.format < prev.format:
        raise _bad(f"the format cannot go back from {prev.format} to {dl.format}")
    check_structure(dl)
    if dl.format == FORMAT_1:
        return  # format 1 keeps protocol v1's rules (docs/protocol.md §4)
    if dl.created_at_ms < prev.created_at_ms:
        raise _bad("created_at_ms is before the previous version's")
    before = {d.device_id: d for d in prev.devices}
    for device in dl.devices:
        if device.device_id in removed_ids and device.device_id not in before:
            raise _bad(f"device {device.device_id} was removed earlier and cannot come back")
        kept = before.get(device.device_id)
        if kept is None:
            if dl.format == FORMAT_3 and not device.kem_key:
                raise _bad(f"added device {device.device_id} has no kem_key (format 3)")
            continue
        # A kem_key may only go from empty (carried over from format 1/2) to set, by a version the device signs.
        kem_ok = device.kem_key == kept.kem_key or not kept.kem_key
        if not kem_ok or _fixed(kept) != _fixed(device):
            raise _bad(f"device {device.device_id} changed its entry")
    old_credentials = {c.credential_id: c for c in prev.credentials}
    for credential in dl.credentials:
        kept_credential = old_credentials.get(credential.credential_id)
        if kept_credential is not None and kept_credential != credential:
            raise _bad("a credential changed its entry")


def _fixed(entry: DeviceEntry) -> tuple[bytes, int, str, list[str]]:
    """The parts of an entry that no later version may change (a new role means a new device)."""
    return entry.box_key, entry.added_at_ms, entry.role, list(entry.scopes)


def evaluate_version(
    prev: DeviceList,
    signed: SignedDeviceList,
    *,
    removed_ids: Collection[str] = (),
) -> VersionChange:
    """Check version L (``signed``) against its predecessor P (crypto.md §3.2) and say what it changes.

    ``removed_ids`` are the device ids removed anywhere earlier in the chain
    (none may come back; :func:`verify_chain` passes them, the relay keeps
    them). Format 1 L keeps protocol v1's rule: at least one valid signature
    by a device of P, else ``bad_signature``.

    Format 2 L, every approval must be genuine (a dropped approval fails the
    threshold, a foreign or wrong one fails the version):

    - ``invalid_device_list``: structure (continuation, sorted unique entries,
      names, threshold, removed ids coming back, changed entries, epoch rule),
      or one approver signing twice;
    - ``bad_signature``: a device signature by neither a device of P nor a
      device added in L, or one that does not verify; a recovery signature by
      neither P's nor L's recovery key;
    - ``webauthn_invalid``: an assertion by a credential of neither P nor
      L's added credentials, or one that does not verify over
      ``list_hash(L)`` (UV required when P requires it);
    - ``policy_not_met``: the weights of P's approvers (1 per device, 1 per
      credential, ``P.threshold`` for P's recovery key) below
      ``P.threshold``; no assertion by a credential of P while P requires
      WebAuthn; or a missing proof of possession (an added device, an added
      credential or a new recovery key that has not signed L; in format 3
      also a device that sets its ``kem_key`` in L);
    - ``policy_not_met`` also for any signature by a device of P whose role
      is not ``device`` (crypto.md §3.6: integrations and archivers never
      approve; they exist only from format 3, so their entry never lacks a
      ``kem_key`` it would have to prove).

    Counters are returned in :attr:`VersionChange.assertion_counters`, not
    judged. Pure.
    """
    dl = signed.device_list
    _check_continuation(prev, dl, removed_ids)
    layout = list_layout(dl)
    digest = hashlib.sha256(layout).digest()
    before = {d.device_id: d for d in prev.devices}
    after = {d.device_id: d for d in dl.devices}
    added = [d for d in dl.devices if d.device_id not in before]
    removed = [d for d in prev.devices if d.device_id not in after]
    old_credentials = {c.credential_id: c for c in prev.credentials}
    new_credentials = {c.credential_id: c for c in dl.credentials}
    added_credentials = [c for c in dl.credentials if c.credential_id not in old_credentials]
    removed_credentials = [c for c in prev.credentials if c.credential_id not in new_credentials]

    if dl.format == FORMAT_1:
        approvers = [
            s.device_id
            for s in signed.signatures
            if s.device_id in before and _signature_ok(before[s.device_id].sign_key, layout, s.signature)
        ]
        if not approvers:
            raise TetherlessError(ErrorCode.BAD_SIGNATURE, "no valid signature by a device of the previous version")
        return VersionChange(
            added=added,
            removed=removed,
            added_credentials=[],
            removed_credentials=[],
            assertion_counters={},
            list_hash=digest,
            approving_devices=sorted(set(approvers)),
        )

    prev_epoch = _epoch(prev)
    if removed or removed_credentials:
        if dl.account_key_epoch != prev_epoch + 1:
            raise _bad("a version that removes a device or credential sets account_key_epoch to the previous + 1")
    elif dl.account_key_epoch < prev_epoch:
        raise _bad("account_key_epoch cannot go down")

    policy = _policy(prev)
    # Devices that must sign L as proof of possession: added ones, and (format 3) kept ones setting a kem_key.
    must_sign = [d for d in dl.devices if d.device_id not in before or d.kem_key != before[d.device_id].kem_key]
    # Device signatures: approvals by devices of P, self-signatures of added devices.
    may_sign = {**before, **{d.device_id: d for d in added}}
    signers: set[str] = set()
    for s in signed.signatures:
        if s.device_id in signers:
            raise _bad(f"device {s.device_id} signed twice")
        signers.add(s.device_id)
        entry = may_sign.get(s.device_id)
        if entry is None:
            raise TetherlessError(ErrorCode.BAD_SIGNATURE, f"signature by {s.device_id}, not a device of P or L")
        signing.verify(entry.sign_key, layout, s.signature)
        # An integration or archiver of P never signs: its entry is complete from the version that added it
        # (format 3 only), so it has no proof of possession to give, and its approval must not count.
        if s.device_id in before and not may_approve(entry):
            raise TetherlessError(
                ErrorCode.POLICY_NOT_MET, f"device {s.device_id} has role {entry.role}: it cannot approve a version"
            )
    approving_devices = sorted(signers & before.keys())

    # Recovery signatures: by P's recovery key (an approval) and/or L's new one (proof of possession).
    recovery_keys = {k for k in (prev.recovery_key, dl.recovery_key) if k}
    recovery_signed: set[bytes] = set()
    for signature in signed.recovery_signatures:
        matching = [k for k in recovery_keys if _signature_ok(k, layout, signature)]
        if not matching:
            raise TetherlessError(ErrorCode.BAD_SIGNATURE, "recovery signature by neither P's nor L's recovery key")
        if matching[0] in recovery_signed:
            raise _bad("the recovery key signed twice")
        recovery_signed.add(matching[0])
    recovery_approved = bool(prev.recovery_key) and prev.recovery_key in recovery_signed

    # Assertions: approvals by credentials of P, proofs of possession of added credentials.
    counters: dict[bytes, int] = {}
    approving_credentials: list[bytes] = []
    for assertion in signed.webauthn_assertions:
        from . import webauthn  # here: see check_structure

        credential = old_credentials.get(assertion.credential_id) or new_credentials.get(assertion.credential_id)
        if credential is None:
            raise TetherlessError(ErrorCode.WEBAUTHN_INVALID, "assertion by an unknown credential")
        if assertion.credential_id in counters:
            raise _bad("a credential asserted twice")
        result = webauthn.verify_assertion(
            credential,
            assertion,
            challenge=digest,
            require_user_verification=policy.require_user_verification,
        )
        counters[assertion.credential_id] = result.sign_count
        if assertion.credential_id in old_credentials:
            approving_credentials.append(assertion.credential_id)

    weight = len(approving_devices) + len(approving_credentials) + (policy.threshold if recovery_approved else 0)
    if weight < policy.threshold:
        raise TetherlessError(
            ErrorCode.POLICY_NOT_MET,
            f"approvals weigh {weight}, the previous version's threshold is {policy.threshold}",
        )
    if policy.require_webauthn and not approving_credentials:
        raise TetherlessError(ErrorCode.POLICY_NOT_MET, "the previous version requires a WebAuthn co-signature")
    for device in must_sign:
        if device.device_id not in signers:
            what = "added device" if device.device_id not in before else "device setting its kem_key"
            raise TetherlessError(ErrorCode.POLICY_NOT_MET, f"{what} {device.device_id} has not signed L")
    for credential in added_credentials:
        if credential.credential_id not in counters:
            raise TetherlessError(ErrorCode.POLICY_NOT_MET, "an added credential has not asserted L")
    recovery_key_changed = dl.recovery_key != prev.recovery_key
    if dl.recovery_key and recovery_key_changed and dl.recovery_key not in recovery_signed:
        raise TetherlessError(ErrorCode.POLICY_NOT_MET, "the new recovery key has not signed L")
    # The backup key (docs/account-log.md §5.7) is derived from the recovery secret: only its holder can name a
    # new one. A device alone could otherwise send every later backup to a key of its own choosing; clearing it
    # (no more backups) needs no secret.
    backup_changed = dl.recovery_backup_key_hash != prev.recovery_backup_key_hash
    if backup_changed and dl.recovery_backup_key_hash and not (dl.recovery_key and dl.recovery_key in recovery_signed):
        raise TetherlessError(
            ErrorCode.POLICY_NOT_MET, "the recovery backup key changed without a signature by L's recovery key"
        )
    return VersionChange(
        added=added,
        removed=removed,
        added_credentials=added_credentials,
        removed_credentials=removed_credentials,
        assertion_counters=counters,
        list_hash=digest,
        approving_devices=approving_devices,
        approving_credentials=sorted(approving_credentials),
        recovery_approved=recovery_approved,
        policy_changed=_policy(dl) != policy,
        recovery_key_changed=recovery_key_changed,
    )


# -- the whole chain -------------------------------------------------------------------------------


class VerifiedChain(msgspec.Struct, frozen=True):
    """A verified chain: the head's devices, the head, and the new high-water mark ``(version, list_hash)``."""

    devices: list[DeviceEntry]
    head: DeviceList
    mark: tuple[int, bytes]
    removed_ids: frozenset[str] = frozenset()
    counters: dict[bytes, int] = msgspec.field(default_factory=dict)


def check_counter(credential_id: bytes, stored: int | None, new: int) -> None:
    """Sign counters must strictly increase per credential unless both are 0 (crypto.md §6).

    ``stored`` is ``None`` when no counter is known yet. Raises ``webauthn_replayed``.
    """
    if stored is None or (stored == 0 and new == 0) or new > stored:
        return
    raise TetherlessError(
        ErrorCode.WEBAUTHN_REPLAYED,
        f"sign counter {new} is not above {stored} for credential {credential_id.hex()[:16]}",
    )


def verify_chain(chain: DeviceListChain, account_id: str, *, mark: tuple[int, bytes] | None = None) -> VerifiedChain:
    """Check an account's device-list chain and return its head and devices.

    Version 1 must be a valid genesis (:func:`verify_genesis`) for
    ``account_id``; every later version must pass :func:`evaluate_version`
    against its predecessor (removed device ids never return), and WebAuthn
    sign counters must strictly increase along the chain per credential
    unless both are 0 (``webauthn_replayed``). Raises
    ``invalid_device_list``, ``bad_signature``, ``policy_not_met``,
    ``webauthn_invalid``, ``webauthn_replayed``.

    ``mark`` is the client's high-water mark ``(version, list_hash)`` from an
    earlier verification: the chain must contain exactly that pair
    (:class:`DeviceListForkError` otherwise) and must not end below it
    (:class:`DeviceListRollbackError`). Both are client-side alarms.
    """
    if chain.account_id != account_id or not chain.versions:
        raise _bad("the relay returned a chain for another account, or an empty one")
    first = chain.versions[0]
    verify_genesis(first)
    if first.device_list.account_id != account_id:
        raise _bad("the genesis list belongs to another account")
    previous = first.device_list
    hashes = {1: list_hash(previous)}
    removed_ids: set[str] = set()
    counters: dict[bytes, int] = {}
    for signed in chain.versions[1:]:
        change = evaluate_version(previous, signed, removed_ids=removed_ids)
        for credential_id, count in change.assertion_counters.items():
            check_counter(credential_id, counters.get(credential_id), count)
            counters[credential_id] = count
        for credential in change.removed_credentials:
            counters.pop(credential.credential_id, None)
        removed_ids.update(d.device_id for d in change.removed)
        previous = signed.device_list
        hashes[previous.version] = change.list_hash
    head = previous
    if mark is not None:
        version, expected = mark
        if head.version < version:
            raise DeviceListRollbackError(
                f"the chain ends at version {head.version}, below the verified version {version}"
            )
        if hashes.get(version) != expected:
            raise DeviceListForkError(f"version {version} differs from the one verified before: a fork")
    return VerifiedChain(
        devices=list(head.devices),
        head=head,
        mark=(head.version, hashes[head.version]),
        removed_ids=frozenset(removed_ids),
        counters=counters,
    )


# -- builders for clients --------------------------------------------------------------------------


def next_version(
    prev: DeviceList,
    *,
    add_devices: Iterable[DeviceEntry] = (),
    remove_device_ids: Iterable[str] = (),
    add_credentials: Iterable[WebAuthnCredential] = (),
    remove_credential_ids: Iterable[bytes] = (),
    policy: Policy | None = None,
    recovery_key: bytes | None = None,
    recovery_backup_key_hash: bytes | None = None,
    account_key_epoch: int | None = None,
    set_kem_keys: Mapping[str, bytes] | None = None,
    format: int | None = None,
    now_ms: int,
) -> DeviceList:
    """Build the version after ``prev`` (unsigned; approve with :func:`approve` and friends).

    ``format`` defaults to P's, at least 2; ``FORMAT_3`` after a format-1/2
    P is the upgrade of crypto.md §3.6 (kept entries keep an empty
    ``kem_key`` until their device sets it). ``set_kem_keys`` maps device
    ids of P to the ``kem_key`` they publish in this version (each such
    device must sign it).

    Entries are sorted, names dropped (format 2), the epoch bumped when a
    device or credential is removed (unless given), ``created_at_ms`` is
    ``max(now_ms, prev.created_at_ms)``. ``policy``/``recovery_key``/
    ``recovery_backup_key_hash`` of ``None`` keep P's (``b""`` clears the
    recovery key). Raises ``ValueError`` for removing an unknown id; the
    result is *not* checked (a client may build anything; the checks run on
    approval by :func:`evaluate_version`).
    """
    remove = set(remove_device_ids)
    remove_credentials = set(remove_credential_ids)
    known = {d.device_id for d in prev.devices}
    if not remove <= known:
        raise ValueError(f"no such device in the list: {sorted(remove - known)}")
    if not remove_credentials <= {c.credential_id for c in prev.credentials}:
        raise ValueError("no such credential in the list")
    kept = [msgspec.structs.replace(d, name="") for d in prev.devices if d.device_id not in remove]
    credentials = sorted(
        [*(c for c in prev.credentials if c.credential_id not in remove_credentials), *add_credentials],
        key=lambda c: c.credential_id,
    )
    kem_keys = dict(set_kem_keys or {})
    if not kem_keys.keys() <= known - remove:
        raise ValueError(f"no such device in the list: {sorted(kem_keys.keys() - (known - remove))}")
    kept = [msgspec.structs.replace(d, kem_key=kem_keys.get(d.device_id, d.kem_key)) for d in kept]
    devices = sorted([*kept, *(msgspec.structs.replace(d, name="") for d in add_devices)], key=lambda d: d.device_id)
    prev_epoch = _epoch(prev)
    if account_key_epoch is None:
        account_key_epoch = prev_epoch + 1 if remove or remove_credentials else prev_epoch
    return DeviceList(
        account_id=prev.account_id,
        version=prev.version + 1,
        prev_hash=list_hash(prev),
        created_at_ms=max(now_ms, prev.created_at_ms),
        devices=devices,
        format=format if format is not None else max(prev.format, FORMAT_2),
        policy=policy if policy is not None else _policy(prev),
        credentials=credentials,
        recovery_key=recovery_key if recovery_key is not None else prev.recovery_key,
        recovery_backup_key_hash=(
            recovery_backup_key_hash if recovery_backup_key_hash is not None else prev.recovery_backup_key_hash
        ),
        account_key_epoch=account_key_epoch,
    )


def approve(device_list: DeviceList, signing_key: nacl.signing.SigningKey) -> DeviceListSignature:
    """A device's signature over ``device_list``: an approval (device of P) or a self-signature (added device)."""
    device_id = device_id_for(bytes(signing_key.verify_key))
    return DeviceListSignature(device_id=device_id, signature=signing.sign(signing_key, list_layout(device_list)))


def sign_recovery(device_list: DeviceList, recovery_signing_key: nacl.signing.SigningKey) -> bytes:
    """The recovery key's signature over ``device_list`` (for ``SignedDeviceList.recovery_signatures``)."""
    return signing.sign(recovery_signing_key, list_layout(device_list))


def signed_list(
    device_list: DeviceList,
    signatures: Sequence[DeviceListSignature] = (),
    *,
    recovery_signatures: Sequence[bytes] = (),
    webauthn_assertions: Sequence[WebAuthnAssertion] = (),
) -> SignedDeviceList:
    """Assemble a :class:`SignedDeviceList` (device signatures sorted by device id)."""
    return SignedDeviceList(
        device_list=device_list,
        signatures=sorted(signatures, key=lambda s: s.device_id),
        recovery_signatures=list(recovery_signatures),
        webauthn_assertions=list(webauthn_assertions),
    )
