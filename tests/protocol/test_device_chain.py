"""Device-list chain checks (protocol.device_list.verify_chain), as clients run them."""

from __future__ import annotations

import hashlib

import msgspec
import nacl.signing
import pytest

from protocol import device_list, signing
from protocol.device_list import verify_chain
from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import DeviceListChain, DeviceListSignature, SignedDeviceList


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"k%d" % n).digest())


FIRST, SECOND, STRANGER = key(1), key(2), key(3)
GENESIS = device_list.genesis(FIRST, b"\x01" * 32, name="one", now_ms=1)
ACCOUNT = GENESIS.device_list.account_id


def next_version(signer: nacl.signing.SigningKey, **changes: object) -> SignedDeviceList:
    second = device_list.device_entry(bytes(SECOND.verify_key), b"\x02" * 32, name="two", added_at_ms=2)
    dl = msgspec.structs.replace(
        GENESIS.device_list,
        version=2,
        prev_hash=device_list.list_hash(GENESIS.device_list),
        created_at_ms=2,
        devices=[*GENESIS.device_list.devices, second],
    )
    dl = msgspec.structs.replace(dl, **changes)
    signature = signing.sign(signer, device_list.list_layout(dl))
    signer_id = device_list.device_entry(bytes(signer.verify_key), b"\x00" * 32, name="", added_at_ms=0).device_id
    return SignedDeviceList(device_list=dl, signatures=[DeviceListSignature(device_id=signer_id, signature=signature)])


def test_genesis_only() -> None:
    (device,) = verify_chain(DeviceListChain(account_id=ACCOUNT, versions=[GENESIS]), ACCOUNT).devices
    assert device.sign_key == bytes(FIRST.verify_key)


def test_second_version_signed_by_a_previous_device() -> None:
    chain = DeviceListChain(account_id=ACCOUNT, versions=[GENESIS, next_version(FIRST)])
    devices = verify_chain(chain, ACCOUNT).devices
    assert [d.name for d in devices] == ["one", "two"]


@pytest.mark.parametrize(
    ("versions", "code"),
    [
        ([], ErrorCode.INVALID_DEVICE_LIST),
        ([GENESIS, next_version(SECOND)], ErrorCode.BAD_SIGNATURE),  # signer not in the previous version
        ([GENESIS, next_version(STRANGER)], ErrorCode.BAD_SIGNATURE),
        ([GENESIS, next_version(FIRST, version=3)], ErrorCode.INVALID_DEVICE_LIST),
        ([GENESIS, next_version(FIRST, prev_hash=b"x" * 32)], ErrorCode.INVALID_DEVICE_LIST),
    ],
)
def test_bad_chains(versions: list[SignedDeviceList], code: ErrorCode) -> None:
    with pytest.raises(TetherlessError) as info:
        verify_chain(DeviceListChain(account_id=ACCOUNT, versions=versions), ACCOUNT)
    assert info.value.code is code


def test_chain_for_another_account() -> None:
    other = device_list.genesis(STRANGER, b"\x03" * 32, name="x", now_ms=1)
    with pytest.raises(TetherlessError) as info:
        verify_chain(DeviceListChain(account_id=ACCOUNT, versions=[other]), ACCOUNT)
    assert info.value.code is ErrorCode.INVALID_DEVICE_LIST
