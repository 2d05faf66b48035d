"""Device lists: building, hashing, signing and checking them.

Version 1 of this module knows *genesis* lists (the first version of an
account's list, created with its first device). Later versions (enrolment,
revocation, policies) extend :func:`verify_genesis` with a chain check.
"""

from __future__ import annotations

import hashlib

import nacl.signing

from . import signing
from .errors import ErrorCode, TetherlessError
from .ids import account_id_for, device_id_for
from .messages import DeviceEntry, DeviceList, DeviceListSignature, SignedDeviceList


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
