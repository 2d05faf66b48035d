"""The PQXDH handshake (protocol/handshake.py, docs/crypto.md §7.3)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mlkem

from protocol import handshake, signing
from protocol.errors import ErrorCode, TetherlessError
from protocol.handshake import PeerPrekeys

# The ML-KEM-768 example key of draft-ietf-lamps-kyber-certificates (seed 00 01 … 3f), as a
# SubjectPublicKeyInfo; copied from dotnet/runtime MLKemTestData.IetfMlKem768Spki.
IETF_MLKEM768_SPKI = (
    "MIIEsjALBglghkgBZQMEBAIDggShACmKoQ1CPI3aBp0CvFnmzfA6CWuLPaTKubgMpKFJB2cszvHsT68jSgvFt+nUc/KzEzs7"
    "JqHRdctnp4BZGWmcAvdlMbmcX4kYBwS7TKRTXFuJcmecZgoHxeUUuHAJyGLrj1FXaV77P8QKne9rgcHMAqJJrk8JStDZvTSF"
    "wcHGgIBSCnyMYyAyzuc4FU5cUXbAfaVgJHdqQw/nbqz2ZaP3uDIQIhW8gvEJOcg1VwQzao+sHYHkuwSFql18dNa1m75cXpcq"
    "DYusQRtVtdVVfNaAoaj3G064a8SMmgUJcxpUvZ1ykLJ5Y+Q3Lcmxmc/crAsBrNKKYjlREuTENkjWIsSMgjTQFEDozDdskn8j"
    "pa/JrAR0xmInTkJFJchVLs47P+JlFt6QG8fVFb3olVjmJslcgLkzQvgBAATznmxslIccXjRMqzlmyDX5qWpZr9McQChrOLHB"
    "p4RwurlHUYk0RTzoZzapGfH1ptUQqG9UVPw5gMtcdlvSvV97NrFBDWY1yM60fE3aDXaijqyTnHHDAkgEhmxxYmZYRCFjwsIh"
    "F+UKzvzmN4qYVlIwKk7wws4Mxxa3eW4ray43d9+hrD2iWaMbWptTD4y2OKgaYqwwGEmrr5WnMBvaMAaJCb/bfmfbzLs4pVUa"
    "JbGjoPaFdIrVdT2IgPABbGJ0hhZjhMVXH+I2WQA2TQODEeLYdds2ZoaTK17GAkMKNp6Hpu9cM4eGZXglvUwFes65I+sJNeaQ"
    "XmO0ztf4CFenc91ksVDSZhLqmsEgUtsgF78YQ8y0sygbaQ3HKK36hcACgbjjwJKHM1+Fa0/CiS9povV5Ia2gGRTECYhmLVd2"
    "lmKnhjUbm2ZJPat5WU2YbeIQDWW6D/TqWLgVONJKRDWiWPrCVASqf0H2WLE4UGXhWNy2ARVzJyD0BFmqrBXkBpU6kKxSmX0c"
    "zQcAYO/GXbnmUzVEZ/rVbscTyG51QMQjrPJmn1L6b0rGiI2HHvPoR8ApqKr7uS4XskqgebH0GbphdbRCr7EZCdSla3CgM1so"
    "c5IYqnyTSOLDwvPrPRWkHmQXwN2Uv+shQZsxGnuxOhgLvoMyGKmmsXRHzIXyJYWVh6cwdwSay8/UTQ8CVDjhXRU4Jw1Ybhv4"
    "MZKpRZz2PA6XL4UpdnmDHs8SFQmFHLg0D28Qew+hoO/Rs2qBibwIXE9ct4TlU/QbkY+AOXzhlW94W+43fKmqi+aZitowwmt8"
    "PYxrVSVMyWIDsgxCruCsTh67QI5JqeP4edCrB4XrcCVCXRMFoimcAV4SDRY7DhlJTOVyU9AkbRgnRcuBl6t0OLPBu3lyvsWj"
    "BuujVnhVwBRpn+9lrlTHcKDYXBhADPZCrtxmB3e6SxOFAr1aeBL2IfhKSClrmN1DIrbxWCi4qPDgCoukSlPDqLFDVxsHQKvV"
    "Z9rxzenHnCBLbV4lnRdmoxu7y05qBc9FAhdrMBwcL0Ekd1AVe87IXoCbMKTWDXdHzdD1uZqoyCaYdRd5OqqAgKCxJKhVjfcr"
    "vje3X07btr6CFtbGM/srIoDiURPYaV5DSBw+6zl+sZJQUim2eiAeqJPD4ssy2ovDQvpN6gV4"
)


def _h(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


A_DEV = "a" * 32
B_DEV = "b" * 32
IK_A, IK_B, SPK, OPK, EK = _h("ik-a"), _h("ik-b"), _h("spk"), _h("opk"), _h("ek")
PQ_SEED = _h("pq") + _h("pq2")


def _prekeys(*, opk: bool = True, last_resort: bool = False) -> PeerPrekeys:
    return PeerPrekeys(
        signed_prekey_id=7,
        signed_prekey=handshake.x25519_public(SPK),
        pq_prekey_id=9,
        pq_last_resort=last_resort,
        pq_prekey=handshake.mlkem_public(PQ_SEED),
        one_time_prekey_id=11 if opk else None,
        one_time_prekey=handshake.x25519_public(OPK) if opk else None,
    )


def _both(
    *, opk: bool = True, last_resort: bool = False
) -> tuple[handshake.HandshakeResult, handshake.HandshakeResult]:
    prekeys = _prekeys(opk=opk, last_resort=last_resort)
    ct, ss = handshake.encapsulate(prekeys.pq_prekey)
    alice = handshake.initiate(
        own_device_id=A_DEV,
        identity_private_key=IK_A,
        peer_device_id=B_DEV,
        peer_identity_key=handshake.x25519_public(IK_B),
        prekeys=prekeys,
        ephemeral_private_key=EK,
        kem_ciphertext=ct,
        kem_shared_secret=ss,
    )
    bob = handshake.respond(
        own_device_id=B_DEV,
        identity_private_key=IK_B,
        peer_device_id=A_DEV,
        peer_identity_key=handshake.x25519_public(IK_A),
        signed_prekey_id=7,
        signed_prekey_private=SPK,
        pq_prekey_id=9,
        pq_last_resort=last_resort,
        pq_seed=PQ_SEED,
        one_time_prekey_id=11 if opk else None,
        one_time_prekey_private=OPK if opk else None,
        ephemeral_key=alice.ephemeral_key,
        kem_ciphertext=ct,
    )
    return alice, bob


def test_cryptography_mlkem768_keygen_matches_the_published_ietf_example() -> None:
    published = base64.b64decode(IETF_MLKEM768_SPKI)
    key = mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes(range(64))).public_key()
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert spki == published
    assert published.endswith(handshake.mlkem_public(bytes(range(64))))


def test_mlkem_decapsulation_is_deterministic_and_matches_encapsulation() -> None:
    ek = handshake.mlkem_public(PQ_SEED)
    ct, ss = handshake.encapsulate(ek)
    assert len(ct) == handshake.MLKEM_CIPHERTEXT_BYTES
    assert len(ss) == 32
    assert handshake.mlkem_decapsulate(PQ_SEED, ct) == ss == handshake.mlkem_decapsulate(PQ_SEED, ct)
    other = bytes(ct[:-1]) + bytes([ct[-1] ^ 1])
    assert handshake.mlkem_decapsulate(PQ_SEED, other) != ss  # implicit rejection, no exception


@pytest.mark.parametrize(("opk", "last_resort"), [(True, False), (False, False), (True, True), (False, True)])
def test_both_sides_derive_the_same_keys(opk: bool, last_resort: bool) -> None:
    alice, bob = _both(opk=opk, last_resort=last_resort)
    assert alice == bob
    assert len(alice.shared_key) == 32
    assert len(alice.session_id) == 16
    assert alice.session_id == signing.digest("session-id", alice.transcript_hash)[:16]
    assert alice.associated_data == signing.layout(
        "session-ad", A_DEV, handshake.x25519_public(IK_A), B_DEV, handshake.x25519_public(IK_B), alice.transcript_hash
    )


def test_every_session_is_fresh() -> None:
    # Fresh (CT, SS) per session: even the same keys give a new transcript and key.
    assert _both()[0].shared_key != _both()[0].shared_key


def test_wrong_kem_ciphertext_gives_a_different_key_on_the_responder() -> None:
    prekeys = _prekeys()
    ct, ss = handshake.encapsulate(prekeys.pq_prekey)
    args = dict(
        own_device_id=A_DEV,
        identity_private_key=IK_A,
        peer_device_id=B_DEV,
        peer_identity_key=handshake.x25519_public(IK_B),
        prekeys=prekeys,
        ephemeral_private_key=EK,
    )
    alice = handshake.initiate(**args, kem_ciphertext=ct, kem_shared_secret=ss)  # type: ignore[arg-type]
    tampered = bytes([ct[0] ^ 1]) + ct[1:]
    bob = handshake.respond(
        own_device_id=B_DEV,
        identity_private_key=IK_B,
        peer_device_id=A_DEV,
        peer_identity_key=handshake.x25519_public(IK_A),
        signed_prekey_id=7,
        signed_prekey_private=SPK,
        pq_prekey_id=9,
        pq_last_resort=False,
        pq_seed=PQ_SEED,
        one_time_prekey_id=11,
        one_time_prekey_private=OPK,
        ephemeral_key=alice.ephemeral_key,
        kem_ciphertext=tampered,
    )
    assert bob.shared_key != alice.shared_key
    assert bob.session_id != alice.session_id


LOW_ORDER = "X25519 output is all zero (low-order key)"


@pytest.mark.parametrize(
    "low_order",
    [
        bytes(32),
        (1).to_bytes(32, "little"),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ],
)
def test_low_order_keys_are_refused(low_order: bytes) -> None:
    with pytest.raises(TetherlessError) as err:
        handshake.dh(IK_A, low_order)
    assert (err.value.code, err.value.detail) == (ErrorCode.PREKEY_INVALID, LOW_ORDER)
    prekeys = PeerPrekeys(
        signed_prekey_id=1,
        signed_prekey=low_order,
        pq_prekey_id=1,
        pq_last_resort=True,
        pq_prekey=handshake.mlkem_public(PQ_SEED),
    )
    with pytest.raises(TetherlessError) as err:
        handshake.initiate(
            own_device_id=A_DEV,
            identity_private_key=IK_A,
            peer_device_id=B_DEV,
            peer_identity_key=handshake.x25519_public(IK_B),
            prekeys=prekeys,
            ephemeral_private_key=EK,
            kem_ciphertext=bytes(1088),
            kem_shared_secret=bytes(32),
        )
    assert (err.value.code, err.value.detail) == (ErrorCode.PREKEY_INVALID, LOW_ORDER)


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"signed_prekey": b"x" * 31}, "a signed prekey is 32 bytes"),
        ({"one_time_prekey": b"x" * 33}, "a one-time prekey is 32 bytes"),
        ({"one_time_prekey_id": None}, "a one-time prekey needs its id and vice versa"),
        ({"pq_prekey": b"x" * 1183}, "an ML-KEM-768 public key is 1184 bytes"),
    ],
)
def test_bad_prekey_shapes_are_prekey_invalid(change: dict[str, object], detail: str) -> None:
    base = _prekeys()
    fields = {f: getattr(base, f) for f in base.__slots__}
    fields.update(change)
    with pytest.raises(TetherlessError) as err:
        handshake.initiate(
            own_device_id=A_DEV,
            identity_private_key=IK_A,
            peer_device_id=B_DEV,
            peer_identity_key=handshake.x25519_public(IK_B),
            prekeys=PeerPrekeys(**fields),
            ephemeral_private_key=EK,
            kem_ciphertext=bytes(1088),
            kem_shared_secret=bytes(32),
        )
    assert (err.value.code, err.value.detail) == (ErrorCode.PREKEY_INVALID, detail)


def test_short_kem_ciphertext_and_bad_public_key_are_prekey_invalid() -> None:
    with pytest.raises(TetherlessError) as err:
        handshake.mlkem_decapsulate(PQ_SEED, bytes(1087))
    assert (err.value.code, err.value.detail) == (ErrorCode.PREKEY_INVALID, "an ML-KEM-768 ciphertext is 1088 bytes")
    with pytest.raises(TetherlessError) as err:
        handshake.mlkem_check_public(b"\xff" * 1184)  # coefficients >= q: FIPS 203 modulus check
    assert (err.value.code, err.value.detail) == (ErrorCode.PREKEY_INVALID, "ML-KEM-768 public key is not valid")


def test_a_kem_shared_secret_is_32_bytes() -> None:
    with pytest.raises(ValueError, match=r"^an ML-KEM-768 shared secret is 32 bytes$"):
        handshake.initiate(
            own_device_id=A_DEV,
            identity_private_key=IK_A,
            peer_device_id=B_DEV,
            peer_identity_key=handshake.x25519_public(IK_B),
            prekeys=_prekeys(),
            ephemeral_private_key=EK,
            kem_ciphertext=bytes(1088),
            kem_shared_secret=bytes(31),
        )


@pytest.mark.parametrize(("key_id", "private"), [(11, None), (None, OPK)])
def test_responder_one_time_prekey_needs_its_id_and_vice_versa(key_id: int | None, private: bytes | None) -> None:
    with pytest.raises(TetherlessError) as err:
        handshake.respond(
            own_device_id=B_DEV,
            identity_private_key=IK_B,
            peer_device_id=A_DEV,
            peer_identity_key=handshake.x25519_public(IK_A),
            signed_prekey_id=7,
            signed_prekey_private=SPK,
            pq_prekey_id=9,
            pq_last_resort=False,
            pq_seed=PQ_SEED,
            one_time_prekey_id=key_id,
            one_time_prekey_private=private,
            ephemeral_key=handshake.x25519_public(EK),
            kem_ciphertext=bytes(1088),
        )
    assert (err.value.code, err.value.detail) == (
        ErrorCode.PREKEY_INVALID,
        "a one-time prekey needs its id and vice versa",
    )


def test_wrong_lengths_name_what_is_wrong() -> None:
    with pytest.raises(TetherlessError) as err:
        handshake.initiate(
            own_device_id=A_DEV,
            identity_private_key=IK_A,
            peer_device_id=B_DEV,
            peer_identity_key=handshake.x25519_public(IK_B),
            prekeys=_prekeys(),
            ephemeral_private_key=EK,
            kem_ciphertext=bytes(1087),
            kem_shared_secret=bytes(32),
        )
    assert (err.value.code, err.value.detail) == (ErrorCode.PREKEY_INVALID, "an ML-KEM-768 ciphertext is 1088 bytes")
    with pytest.raises(TetherlessError) as err:
        handshake.mlkem_check_public(bytes(1183))
    assert (err.value.code, err.value.detail) == (ErrorCode.PREKEY_INVALID, "an ML-KEM-768 public key is 1184 bytes")
    for short_seed in (handshake.mlkem_public, lambda seed: handshake.mlkem_decapsulate(seed, bytes(1088))):
        with pytest.raises(ValueError, match=r"^an ML-KEM-768 seed is 64 bytes$"):
            short_seed(PQ_SEED[:63])


def test_x25519_private_key_is_32_bytes() -> None:
    with pytest.raises(ValueError, match=r"^an X25519 private key is 32 bytes$"):
        handshake.x25519_public(IK_A[:31])
