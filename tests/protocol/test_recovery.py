"""The printed recovery key (protocol.recovery, docs/crypto.md §3.4)."""

from __future__ import annotations

import base64
import hashlib
import string

import nacl.signing
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol import device_list, handshake, hybrid, recovery, signing
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


def test_backup_key_is_the_hybrid_recipient_of_the_backup_seed_and_its_hash_binds_both_halves() -> None:
    keys = recovery.recovery_keys(SECRET, ACCOUNT)
    recipient = recovery.backup_recipient(keys)
    # Independent recomputation: X25519 base-point multiplication and FIPS 203 key generation from the seed.
    x25519_public = X25519PrivateKey.from_private_bytes(keys.x25519_private).public_key().public_bytes_raw()
    kem_public = mlkem.MLKEM768PrivateKey.from_seed_bytes(keys.mlkem_seed).public_key().public_bytes_raw()
    assert (recipient.x25519_public, recipient.kem_public) == (x25519_public, kem_public)
    expected = hashlib.sha256(signing.layout("recovery-backup-key", x25519_public, kem_public)).digest()
    assert recovery.backup_key_hash(recipient) == expected
    # A wrap to the backup key opens with the private halves derived from the printed secret alone.
    kem_ct, kem_ss = handshake.encapsulate(kem_public)
    wrapped = hybrid.seal(
        recipient,
        b"epoch keys",
        context=b"ctx",
        ephemeral_private_key=bytes(range(32)),
        kem_ciphertext=kem_ct,
        kem_shared_secret=kem_ss,
    )
    again = recovery.recovery_keys(recovery.parse_recovery_secret(recovery.new_recovery_secret(SECRET)), ACCOUNT)
    assert hybrid.open_wrap(again.x25519_private, again.mlkem_seed, wrapped, context=b"ctx") == b"epoch keys"
    # Another secret or account gives another key; swapping either half changes the hash.
    other = recovery.backup_recipient(recovery.recovery_keys(bytes(20), ACCOUNT))
    assert recovery.backup_key_hash(other) != expected
    swapped = hybrid.HybridRecipient(x25519_public=x25519_public, kem_public=other.kem_public)
    assert recovery.backup_key_hash(swapped) != expected
    with pytest.raises(hybrid.HybridWrapError):
        hybrid.open_wrap(
            keys.x25519_private, recovery.recovery_keys(bytes(20), ACCOUNT).mlkem_seed, wrapped, context=b"ctx"
        )


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
