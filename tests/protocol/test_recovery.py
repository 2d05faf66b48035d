"""The printed recovery key (protocol.recovery, docs/crypto.md §3.4)."""

from __future__ import annotations

import base64
import hashlib
import string

import nacl.signing
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol import device_list, recovery, signing
from protocol.messages import DeviceListChain

SECRET = hashlib.sha256(b"recovery").digest()[:20]
ACCOUNT = "b" * 32
ALPHABET = string.ascii_lowercase + "234567"


def test_text_format() -> None:
    text = recovery.new_recovery_secret(SECRET)
    assert text.startswith("tlr-")
    groups = text[4:].split("-")
    assert [len(g) for g in groups] == [4] * 9
    assert set("".join(groups)) <= set(ALPHABET)
    raw = base64.b32decode("".join(groups).upper() + "====")
    assert raw[:20] == SECRET
    assert raw[20:] == signing.digest("recovery-check", SECRET)[:2]


@pytest.mark.parametrize(
    "spelling",
    [
        lambda t: t,
        lambda t: t.upper(),
        lambda t: t[4:],
        lambda t: t.replace("-", " "),
        lambda t: t.replace("-", ""),
        lambda t: f"  {t}\n",
    ],
)
def test_round_trip_in_any_spelling(spelling: object) -> None:
    assert callable(spelling)
    assert recovery.parse_recovery_secret(spelling(recovery.new_recovery_secret(SECRET))) == SECRET


def test_every_single_character_typo_is_caught() -> None:
    compact = recovery.new_recovery_secret(SECRET)[4:].replace("-", "")
    for i, original in enumerate(compact):
        for replacement in ALPHABET:
            if replacement == original:
                continue
            typo = compact[:i] + replacement + compact[i + 1 :]
            with pytest.raises(ValueError, match="typo"):
                recovery.parse_recovery_secret(typo)


def test_swapped_neighbours_are_caught() -> None:
    compact = recovery.new_recovery_secret(SECRET)[4:].replace("-", "")
    for i in range(len(compact) - 1):
        if compact[i] == compact[i + 1]:
            continue
        swapped = compact[:i] + compact[i + 1] + compact[i] + compact[i + 2 :]
        with pytest.raises(ValueError, match="typo"):
            recovery.parse_recovery_secret(swapped)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "36 characters"),
        ("tlr-abcd", "36 characters"),
        ("a" * 37, "36 characters"),
        ("1" * 36, "a-z"),
        ("tl-" + "a" * 36, "36 characters"),
    ],
)
def test_malformed_texts(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        recovery.parse_recovery_secret(text)


def test_wrong_entropy_length() -> None:
    with pytest.raises(ValueError, match="20"):
        recovery.new_recovery_secret(b"\x00" * 19)
    with pytest.raises(ValueError, match="20"):
        recovery.recovery_keys(b"\x00" * 21, ACCOUNT)


def test_derivations_follow_the_spec() -> None:
    keys = recovery.recovery_keys(SECRET, ACCOUNT)

    def hkdf(domain: str, length: int) -> bytes:
        info = signing.layout(domain, ACCOUNT)
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"\x00" * 32, info=info).derive(SECRET)

    assert bytes(keys.signing_key) == hkdf("recovery-sign", 32)
    assert keys.public_key == bytes(keys.signing_key.verify_key)
    assert keys.backup_seed == hkdf("recovery-backup", 96)
    assert (keys.mlkem_seed, keys.x25519_private) == (keys.backup_seed[:64], keys.backup_seed[64:])


def test_keys_differ_per_account_and_per_secret() -> None:
    a = recovery.recovery_keys(SECRET, ACCOUNT)
    assert recovery.recovery_keys(SECRET, "c" * 32).public_key != a.public_key
    assert recovery.recovery_keys(bytes(20), ACCOUNT).public_key != a.public_key
    assert recovery.recovery_keys(SECRET, ACCOUNT).public_key == a.public_key


def test_a_printed_key_recovers_an_account() -> None:
    first = nacl.signing.SigningKey(b"\x31" * 32)
    account = device_list.genesis_v2(first, b"\x01" * 32, now_ms=1).device_list.account_id
    text = recovery.new_recovery_secret(SECRET)
    keys = recovery.recovery_keys(SECRET, account)
    genesis = device_list.genesis_v2(first, b"\x01" * 32, now_ms=1, recovery_key=keys.signing_key)
    # later, on a new device, with only the printed text
    new_device = nacl.signing.SigningKey(b"\x32" * 32)
    restored = recovery.recovery_keys(recovery.parse_recovery_secret(text.upper()), account)
    entry = device_list.device_entry(bytes(new_device.verify_key), b"\x02" * 32, added_at_ms=2)
    dl = device_list.next_version(
        genesis.device_list, add_devices=[entry], remove_device_ids=[genesis.device_list.devices[0].device_id], now_ms=2
    )
    signed = device_list.signed_list(
        dl,
        [device_list.approve(dl, new_device)],
        recovery_signatures=[device_list.sign_recovery(dl, restored.signing_key)],
    )
    result = device_list.verify_chain(DeviceListChain(account_id=account, versions=[genesis, signed]), account)
    assert [d.sign_key for d in result.devices] == [bytes(new_device.verify_key)]
