"""Device lists: building, hashing, signing and checking them.

:func:`verify_genesis` checks an account's first list; :func:`verify_chain`
checks a whole chain under the default "any one current device" policy, as
clients do before trusting any device key (docs/crypto.md §3 describes the
policies to come).
"""

from __future__ import annotations

import hashlib

import nacl.signing

from . import signing
from .errors import ErrorCode, TetherlessError
from .ids import account_id_for, device_id_for
from .messages import DeviceEntry, DeviceList, DeviceListChain, DeviceListSignature, SignedDeviceList


def list_layout(device_list: DeviceList) -> bytes:
    """The bytes every signature over ``device_list`` covers (docs/protocol.md §4)."""
    fields: list[signing.Field] = [
        device_list.account_id,
        device_list.version,
        device_list.prev_hash,
        device_list.created_at_ms,
        len(device_list.devices),
    ]
    for device in device_list.devices:
        fields += [device.device_id, device.sign_key, device.box_key, device.name, device.added_at_ms]
    return signing.layout("device-list", *fields)


def list_hash(device_list: DeviceList) -> bytes:
    """SHA-256 of the list's layout: what the next version puts in ``prev_hash``."""
    return hashlib.sha256(list_layout(device_list)).digest()


def device_entry(sign_key: bytes, box_key: bytes, *, name: str, added_at_ms: int) -> DeviceEntry:
    return DeviceEntry(
        device_id=device_id_for(sign_key), sign_key=sign_key, box_key=box_key, name=name, added_at_ms=added_at_ms
    )


def genesis(signing_key: nacl.signing.SigningKey, box_key: bytes, *, name: str, now_ms: int) -> SignedDeviceList:
    """A new account's first device list, signed by its only device."""
    sign_key = bytes(signing_key.verify_key)
    entry = device_entry(sign_key, box_key, name=name, added_at_ms=now_ms)
    device_list = DeviceList(
        account_id=account_id_for(sign_key), version=1, prev_hash=b"", created_at_ms=now_ms, devices=[entry]
    )
    signature = signing.sign(signing_key, list_layout(device_list))
    return SignedDeviceList(
        device_list=device_list, signatures=[DeviceListSignature(device_id=entry.device_id, signature=signature)]
    )


def verify_genesis(signed: SignedDeviceList) -> DeviceEntry:
    """Check a genesis list and return its device.

    Raises ``invalid_device_list`` when the list is not a well-formed genesis
    (version 1, no ``prev_hash``, one device whose id matches its key, account
    id derived from that key, one signature by that device) and
    ``bad_signature`` when the signature does not verify. Pure; idempotent.
    """
    dl = signed.device_list

    def bad(why: str) -> TetherlessError:
        return TetherlessError(ErrorCode.INVALID_DEVICE_LIST, why)

    if dl.version != 1 or dl.prev_hash:
        raise bad("a genesis list has version 1 and no prev_hash")
    if len(dl.devices) != 1:
        raise bad("a genesis list has exactly one device")
    device = dl.devices[0]
    if device.device_id != device_id_for(device.sign_key):
        raise bad("device_id does not match sign_key")
    if dl.account_id != account_id_for(device.sign_key):
        raise bad("account_id is not derived from the genesis device's key")
    if len(signed.signatures) != 1 or signed.signatures[0].device_id != device.device_id:
        raise bad("a genesis list is signed by its device, once")
    signing.verify(device.sign_key, list_layout(dl), signed.signatures[0].signature)
    return device


def verify_chain(chain: DeviceListChain, account_id: str) -> list[DeviceEntry]:
    """Check an account's device-list chain and return the devices of its latest version.

    Version 1 must be a valid genesis (:func:`verify_genesis`)
    for ``account_id``; each later version must continue it (next version
    number, same account, ``prev_hash`` of the previous list) and carry a
    valid signature by a device of the previous version (the default "any one
    device" policy). Raises ``invalid_device_list`` or ``bad_signature``.
    """

    def bad(why: str) -> TetherlessError:
        return TetherlessError(ErrorCode.INVALID_DEVICE_LIST, why)

    if chain.account_id != account_id or not chain.versions:
        raise bad("the relay returned a chain for another account, or an empty one")
    first = chain.versions[0]
    verify_genesis(first)
    if first.device_list.account_id != account_id:
        raise bad("the genesis list belongs to another account")
    previous = first.device_list
    for signed in chain.versions[1:]:
        current = signed.device_list
        if current.account_id != account_id or current.version != previous.version + 1:
            raise bad("device-list versions do not follow each other")
        if current.prev_hash != list_hash(previous):
            raise bad("device-list prev_hash does not match the previous version")
        signers = {d.device_id: d.sign_key for d in previous.devices}
        layout = list_layout(current)
        if not any(
            s.device_id in signers and _signature_ok(signers[s.device_id], layout, s.signature)
            for s in signed.signatures
        ):
            raise TetherlessError(ErrorCode.BAD_SIGNATURE, "no valid signature by a device of the previous version")
        for device in current.devices:
            if device.device_id != device_id_for(device.sign_key):
                raise bad("device_id does not match sign_key")
        previous = current
    return list(previous.devices)


def _signature_ok(key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        signing.verify(key, message, signature)
    except TetherlessError:
        return False
    return True
