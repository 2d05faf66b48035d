"""A second derivation of the PQXDH and ratchet vectors, from docs/crypto.md alone (§0, §7.3, §8.2, §9, §10).

protocol/vectors/v2.json is produced by the code it checks (tests/protocol/vectors_sessions.py), so a
regenerated file agrees with any bug. Here every value is recomputed with the primitives themselves
(hmac/hashlib HKDF, ``cryptography`` X25519/ML-KEM/ChaCha20-Poly1305, PyNaCl's SealedBox, generic
MessagePack) and a layout written again from protocol.md §3 — nothing from protocol/handshake.py,
ratchet.py, session.py or signing.py — and compared both with the file and with what the code computes
now. Dropping the ML-KEM secret (or a DH output) from ``SK`` fails here even after the vectors are
regenerated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import msgspec
import nacl.public
import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from protocol import handshake, session
from protocol.session import ResponderKeys
from tests.protocol.vectors_sessions import RECORDED_KEM_CIPHERTEXT
from tests.protocol.vectors_sessions import _entropy as vector_entropy  # the generator's input labels

V2 = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "v2.json"
PQXDH_INFO = "Tetherless_X25519_SHA-256_ML-KEM-768"


# -- the primitives, written again ----------------------------------------------------------------


def layout(domain: str, *fields: int | bytes | str) -> bytes:
    """protocol.md §3: prefix, domain, NUL, then ``i`` u64 / ``b`` u32-length bytes / ``s`` u32-length UTF-8."""
    out = b"tetherless/v1/" + domain.encode() + b"\x00"
    for value in fields:
        if isinstance(value, int):
            out += b"i" + struct.pack(">Q", value)
        elif isinstance(value, bytes):
            out += b"b" + struct.pack(">I", len(value)) + value
        else:
            raw = value.encode()
            out += b"s" + struct.pack(">I", len(raw)) + raw
    return out


def digest(domain: str, *fields: int | bytes | str) -> bytes:
    return hashlib.sha256(layout(domain, *fields)).digest()


def hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 with HMAC-SHA-256, extract then expand."""
    prk = hmac.digest(salt, ikm, "sha256")
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        okm += block
    return okm[:length]


def x25519_pub(private: bytes) -> bytes:
    return x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def dh(private: bytes, public: bytes) -> bytes:
    return x25519.X25519PrivateKey.from_private_bytes(private).exchange(
        x25519.X25519PublicKey.from_public_bytes(public)
    )


def kdf_rk(root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    out = hkdf(root_key, dh_out, layout("dr-root"), 64)
    return out[:32], out[32:]


def chain_message_key(chain_key: bytes, n: int) -> tuple[bytes, bytes]:
    """(chain key after message ``n``, message key of ``n``) from the chain key before message 0."""
    for _ in range(n):
        chain_key = hmac.digest(chain_key, b"\x02", "sha256")
    return hmac.digest(chain_key, b"\x02", "sha256"), hmac.digest(chain_key, b"\x01", "sha256")


def open_envelope(ciphertext: bytes, box_private: bytes) -> list[Any]:
    """SealedBox, ISO 7816-4 unpadding, ``0x02`` and a generic MessagePack array (crypto.md §9, §10)."""
    padded = nacl.public.SealedBox(nacl.public.PrivateKey(box_private)).decrypt(ciphertext)
    stripped = padded.rstrip(b"\x00")
    assert stripped[-1] == 0x80
    inner = stripped[:-1]
    assert inner[0] == 0x02
    sealed: list[Any] = msgspec.msgpack.decode(inner[1:])
    return sealed


def open_ratchet(message: list[Any], chain_key: bytes, ad: bytes, session_id: bytes) -> list[Any]:
    """Decrypt a ``RatchetMessage`` array [ratchet_key, pn, n, ciphertext] with the receiving chain key."""
    ratchet_key, pn, n, ciphertext = message
    _, mk = chain_message_key(chain_key, n)
    okm = hkdf(bytes(32), mk, layout("dr-message"), 44)
    aad = layout("dr-message", ad, session_id, ratchet_key, pn, n)
    content: list[Any] = msgspec.msgpack.decode(ChaCha20Poly1305(okm[:32]).decrypt(okm[32:], ciphertext, aad))
    return content


# -- the recomputation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(V2.read_text(encoding="utf-8"))["sessions"]
    return data


class Handshake(msgspec.Struct, frozen=True, kw_only=True):
    ik_a: bytes
    ik_b: bytes
    spk_b: bytes
    opk_b: bytes
    ek_a: bytes
    pq_seed: bytes
    ss: bytes
    th: bytes
    sk: bytes
    ad: bytes
    session_id: bytes


def _device_id(address: str) -> str:
    return address.split(".", 1)[0]


def recompute_pqxdh(v: dict[str, Any], *, drop_kem_secret: bool = False, with_opk: bool = True) -> Handshake:
    """§7.3 step 3 from the vector's private inputs and the recorded ``CT`` (``with_opk``: use ``OPK_B``)."""
    a, b = v["initiator"], v["responder"]
    ik_a_priv, ik_b_priv = bytes.fromhex(a["identity_private"]), bytes.fromhex(b["identity_private"])
    spk_b_priv, opk_b_priv = bytes.fromhex(b["signed_prekey_private"]), bytes.fromhex(b["one_time_prekey_private"])
    ek_priv, pq_seed = bytes.fromhex(v["ephemeral_private"]), bytes.fromhex(b["pq_seed"])
    ik_a, ik_b, spk_b, opk_b, ek_a = map(x25519_pub, (ik_a_priv, ik_b_priv, spk_b_priv, opk_b_priv, ek_priv))
    ct = RECORDED_KEM_CIPHERTEXT
    assert hashlib.sha256(ct).hexdigest() == v["kem_ciphertext_sha256"]
    kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(pq_seed)
    ss = kem.decapsulate(ct)
    pqpk_b = kem.public_key().public_bytes_raw()
    dhs = [dh(ik_a_priv, spk_b), dh(ek_priv, ik_b), dh(ek_priv, spk_b)] + ([dh(ek_priv, opk_b)] if with_opk else [])
    # The responder's side of every DH gives the same bytes (X25519 is symmetric).
    assert dhs[:3] == [dh(spk_b_priv, ik_a), dh(ik_b_priv, ek_a), dh(spk_b_priv, ek_a)]
    pq_kind = 2 if v["pq_last_resort"] else 1
    th = digest(
        "pqxdh-transcript",
        _device_id(a["address"]),
        ik_a,
        _device_id(b["address"]),
        ik_b,
        v["signed_prekey_id"],
        spk_b,
        v["pq_prekey_id"],
        pq_kind,
        hashlib.sha256(pqpk_b).digest(),
        v["one_time_prekey_id"] if with_opk else 0,
        opk_b if with_opk else b"",
        ek_a,
        ct,
    )
    ikm = b"\xff" * 32 + b"".join(dhs) + (b"" if drop_kem_secret else ss)
    sk = hkdf(bytes(32), ikm, layout("pqxdh", PQXDH_INFO, th), 32)
    ad = layout("session-ad", _device_id(a["address"]), ik_a, _device_id(b["address"]), ik_b, th)
    return Handshake(
        ik_a=ik_a,
        ik_b=ik_b,
        spk_b=spk_b,
        opk_b=opk_b,
        ek_a=ek_a,
        pq_seed=pq_seed,
        ss=ss,
        th=th,
        sk=sk,
        ad=ad,
        session_id=digest("session-id", th)[:16],
    )


def test_hkdf_rewrite_matches_rfc5869_a1() -> None:
    okm = hkdf(bytes(range(13)), b"\x0b" * 22, bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"


def test_pqxdh_vector_recomputed_from_the_spec(vectors: dict[str, Any]) -> None:
    v = vectors["pqxdh"]
    hs = recompute_pqxdh(v)
    assert hs.ss.hex() == v["kem_shared_secret"]
    assert hs.th.hex() == v["transcript_hash"]
    assert hs.sk.hex() == v["shared_key"]
    assert hs.ad.hex() == v["associated_data"]
    assert hs.session_id.hex() == v["session_id"]


@pytest.mark.parametrize(("with_opk", "last_resort"), [(True, False), (False, True), (False, False), (True, True)])
def test_pqxdh_code_agrees_with_the_spec_on_both_sides(
    vectors: dict[str, Any], with_opk: bool, last_resort: bool
) -> None:
    """Against the code as it is now, not the file: a regenerated vector cannot hide a changed KDF.

    The vector has a one-time prekey and a one-time PQ key; the other shapes (no ``OPK_B``: ``opk_id`` 0 and an
    empty field; a last-resort PQ key: ``pq_kind`` 2) are checked against the same second derivation.
    """
    v = {**vectors["pqxdh"], "pq_last_resort": last_resort}
    hs = recompute_pqxdh(v, with_opk=with_opk)
    a, b = v["initiator"], v["responder"]
    prekeys = handshake.PeerPrekeys(
        signed_prekey_id=v["signed_prekey_id"],
        signed_prekey=hs.spk_b,
        pq_prekey_id=v["pq_prekey_id"],
        pq_last_resort=v["pq_last_resort"],
        pq_prekey=mlkem.MLKEM768PrivateKey.from_seed_bytes(hs.pq_seed).public_key().public_bytes_raw(),
        one_time_prekey_id=v["one_time_prekey_id"] if with_opk else None,
        one_time_prekey=hs.opk_b if with_opk else None,
    )
    initiated = handshake.initiate(
        own_device_id=_device_id(a["address"]),
        identity_private_key=bytes.fromhex(a["identity_private"]),
        peer_device_id=_device_id(b["address"]),
        peer_identity_key=hs.ik_b,
        prekeys=prekeys,
        ephemeral_private_key=bytes.fromhex(v["ephemeral_private"]),
        kem_ciphertext=RECORDED_KEM_CIPHERTEXT,
        kem_shared_secret=hs.ss,
    )
    responded = handshake.respond(
        own_device_id=_device_id(b["address"]),
        identity_private_key=bytes.fromhex(b["identity_private"]),
        peer_device_id=_device_id(a["address"]),
        peer_identity_key=hs.ik_a,
        signed_prekey_id=v["signed_prekey_id"],
        signed_prekey_private=bytes.fromhex(b["signed_prekey_private"]),
        pq_prekey_id=v["pq_prekey_id"],
        pq_last_resort=v["pq_last_resort"],
        pq_seed=hs.pq_seed,
        one_time_prekey_id=v["one_time_prekey_id"] if with_opk else None,
        one_time_prekey_private=bytes.fromhex(b["one_time_prekey_private"]) if with_opk else None,
        ephemeral_key=hs.ek_a,
        kem_ciphertext=RECORDED_KEM_CIPHERTEXT,
    )
    for result in (initiated, responded):
        assert (result.transcript_hash, result.shared_key, result.associated_data, result.session_id) == (
            hs.th,
            hs.sk,
            hs.ad,
            hs.session_id,
        )
        assert result.ephemeral_key == hs.ek_a
    # The recomputation is sensitive to the post-quantum part (the property the hybrid exists for).
    assert recompute_pqxdh(v, drop_kem_secret=True, with_opk=with_opk).sk != initiated.shared_key


def test_ratchet_vector_recomputed_from_the_spec(vectors: dict[str, Any]) -> None:
    """§8.2 KDF_RK / KDF_CK / message keys / AAD: open the conversation's envelopes with keys derived here."""
    hs = recompute_pqxdh(vectors["pqxdh"])
    responder = vectors["pqxdh"]["responder"]
    bob_box, alice_box = (
        bytes.fromhex(responder["identity_private"]),
        bytes.fromhex(vectors["pqxdh"]["initiator"]["identity_private"]),
    )
    spk_b_priv = bytes.fromhex(responder["signed_prekey_private"])
    envelopes = [bytes.fromhex(e["ciphertext"]) for e in vectors["conversation"]["envelopes"]]
    opened = {o["envelope"]: o["body"] for o in vectors["conversation"]["opened"]}

    # A -> B: three PrekeyMessages on A's first sending chain, KDF_RK(SK, DH(A's ratchet key, SPK_B)).
    first_ratchet_key: bytes | None = None
    receiving_chain: bytes | None = None
    for index, text in enumerate(["a1", "a2", "a3"]):
        sender, _, kind, session_id, body = open_envelope(envelopes[index], bob_box)
        assert (kind, session_id) == (1, hs.session_id)
        assert sender == vectors["pqxdh"]["initiator"]["address"]
        spk_id, pq_id, last_resort, ek, kem_ct, message, opk_id = msgspec.msgpack.decode(body)
        assert (spk_id, pq_id, last_resort, ek, kem_ct, opk_id) == (1, 1, False, hs.ek_a, RECORDED_KEM_CIPHERTEXT, 42)
        ratchet_key, pn, n, _ = message
        assert (pn, n) == (0, index)
        if first_ratchet_key is None:
            first_ratchet_key = ratchet_key
            root_1, receiving_chain = kdf_rk(hs.sk, dh(spk_b_priv, ratchet_key))
        assert ratchet_key == first_ratchet_key
        assert receiving_chain is not None
        recipient, _, _, content_type, plaintext = open_ratchet(message, receiving_chain, hs.ad, hs.session_id)
        assert (recipient, content_type, plaintext) == (
            responder["address"],
            "text/plain; charset=utf-8",
            text.encode(),
        )
        if index in opened:
            assert opened[index] == text
    assert first_ratchet_key == x25519_pub(vector_entropy("alice ratchet 0"))
    assert receiving_chain is not None

    # B -> A after B's DH step: B's new ratchet key is the entropy B's first decryption was given.
    bob_ratchet_private = vector_entropy("bob open 0")
    root_2, bob_sending_chain = kdf_rk(root_1, dh(bob_ratchet_private, first_ratchet_key))
    for index, text in ((3, "b1"), (4, "b2")):
        _, _, kind, session_id, body = open_envelope(envelopes[index], alice_box)
        assert (kind, session_id) == (2, hs.session_id)
        message = msgspec.msgpack.decode(body)
        assert message[0] == x25519_pub(bob_ratchet_private)
        assert (message[1], message[2]) == (0, index - 3)  # PN: B had no sending chain before; n
        assert open_ratchet(message, bob_sending_chain, hs.ad, hs.session_id)[4] == text.encode()
    assert opened[4] == "b2"

    # And the code's state after the same first message holds exactly these keys.
    inner = session.parse_inner(session.open_outer(envelopes[0], bob_box))
    assert inner is not None
    bob, content = session.accept_prekey(
        own_address=responder["address"],
        identity_private_key=bob_box,
        sealed=inner,
        sender_identity_key=hs.ik_a,
        keys=ResponderKeys(
            signed_prekey_private=spk_b_priv,
            pq_seed=hs.pq_seed,
            one_time_prekey_private=bytes.fromhex(responder["one_time_prekey_private"]),
        ),
        entropy=bob_ratchet_private,
        now_ms=0,
        skipped_ttl_ms=1,
    )
    assert content.body == b"a1"
    assert bob.ratchet.root_key == root_2
    assert bob.ratchet.sending_chain_key == bob_sending_chain
    assert bob.ratchet.receiving_chain_key == chain_message_key(receiving_chain, 0)[0]
    assert (bob.ratchet.associated_data, bob.ratchet.session_id) == (hs.ad, hs.session_id)
