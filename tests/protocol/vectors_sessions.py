"""The sessions section of protocol/vectors/v2.json (handshake, ratchet, sealed sender v2; crypto.md §15).

Inputs are fixed seeds and a *recorded* ML-KEM-768 ciphertext (ML-KEM
encapsulation draws its own randomness, so it was run once and its output is
pinned here); everything after it — decapsulation, PQXDH, the ratchet and the
sealed boxes — is deterministic, so :func:`sessions_section` recomputes the
exact bytes. Plumbing vectors from RFC 5869 A.1 and RFC 8439 §2.8.2 are
computed through the same library calls the protocol uses.
"""

from __future__ import annotations

import hashlib
from typing import Any

import nacl.signing
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from protocol import codec, handshake, session
from protocol.ids import account_id_for, device_id_for
from protocol.session import ResponderKeys, SessionState

RELAY = "relay.example"
NOW_MS = 1_700_000_000_000
SKIPPED_TTL_MS = 2_678_400_000
MLKEM_SEED = bytes(range(64))  # the draft-ietf-lamps-kyber-certificates example seed
BOB_PQ_SEED = hashlib.sha512(b"tetherless vector bob pq").digest()
# Encaps(mlkem_public(BOB_PQ_SEED)), recorded once.
RECORDED_KEM_CIPHERTEXT = bytes.fromhex(
    "08e0e9e04cde003009300836570bf7dfc1a4fc53c874edabefc9bc965308eee4265f7df1d82913593dfef2326e13aba0"
    "8a7ae4fa6d53e577fbd7e13f87e7f9762bb575bebb139b07a9de9f584b9f53e40de833fddbbad7f27773270e07bc292d"
    "0bf161f6469f00e9e09064e123e76b062672d3985fdcc82a7e661466828462f5235dcdbe26dcd1c2a82875c7bb2aebc8"
    "e7e6f3b3c4e301a5194b09a75bcb9f578ef6c00e951593dd15eabef2d9b8384654f902588648dde045686786dfd796b2"
    "b8de68331db85df35a481e353264ad9890a14adf73cf2984c34bc3185da6d12ec6bfbfb6eb838cdee9b3a25d0553f7d7"
    "faed4e33c16cab033febb5655c724c480dfa5205b5e1f17cfc4fce8122b7c71a8d10fd6f3ffa8e472ccc6a94089c2900"
    "30ace4042357db8724c918685ae9c3ec3b15ff35c599d39a7fe7dab71afe5bcce64822477e9ccd350c1bb71a6b930c70"
    "e2dc988cb2aded16ba0aede35a3b8024604a317bcffcd9222a5ee880e32fac2578cfa5b409eacc55dce071e7b0b16b1b"
    "a0551b411b045f19ab2d772eb9f0ea32935858efb5061dc5e4076bd6bdabb2618d0a86f9352169c255e4c48ba37db387"
    "d248b778930d37e241c72d4e04c4ff535c4f909da6204a6a575a6f3471a24b5e1bf4117b29929508268dae91f12adda2"
    "d51829fe121524dd775f6f24b4c28737abd2484b1efc7c7dda18d63a1d7c051ec81a6ba42df93cee091d38dd7e080b2b"
    "7f875b704c920018dba48e1bfb8bfced052e116d65e46a6e1fbd054062e9b06792b81f61475fae79830f60d04fc4cf32"
    "73867473a5831fc9ef04f58f6033f0bab38eb629bd44a60154a9a9ea7d05c7f99c914c35b9adaa593662bf34a1b4977b"
    "8a426029b7bba066369c7ab44a21a6a94eea1e6fae10ffb681e94c1bef4159567c32fdedf01e3befccde1a0d9398f55a"
    "0233525b42af51f30323e84d47535c3c53511802e36eb04f56d0ab796062061d05a63b20d421609d2f99b0c94d8c3999"
    "e7fbe4ae1956c8818c48ee9d8eba295a927bff0473cc838a12b6dd2f5ae1635d191ba07986af54e466b0d745fc623c5d"
    "bd51a4889877af91c9f7316048f340e1877e083e39ba5f762effe3b6b0679ae323c6560b672eb2870ac82b9e46e4870b"
    "e303c3f9a38514fba1b35c5a86203d1feacc58921c4425a088fbed2018a7edab99c116ccde2e142f14c3284808e0d69e"
    "be5422065f5be19a34a5d816b34601d3462eb613a4bbb395f5699271351692ee96bdf5ca25a83c88056e312c33e49e7c"
    "ade0f9df43598c1130662e59011cbb655093dca8624a32cb49accea6fb197556f7f319d82263a66c3cfcf08de9cadd5d"
    "044b8b0759ea6b3bc99f0355361192acda56c69fbfb1ac2a72f199222a78998b05e86150e5c5e08ec4203293ecf3f158"
    "a8f3e094c9218679da066451711e5405a23ceb627a3b0c408f6c44c274f5b29d294f748734ce1cef2b24818ea1e4ad0c"
    "d5c00e3562db73df4dbad37ee9e4bb62fd268af33917acfaeee029b5a9ffd23d"
)


def _h(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def _entropy(label: str, n: int = 32) -> bytes:
    return hashlib.sha512(f"tetherless vector entropy {label}".encode()).digest()[:n]


class _Device:
    def __init__(self, name: str) -> None:
        key = nacl.signing.SigningKey(_h(f"vector sign {name}"))
        sign_key = bytes(key.verify_key)
        self.address = f"{device_id_for(sign_key)}.{account_id_for(sign_key)}@{RELAY}"
        self.device_id = device_id_for(sign_key)
        self.identity_private = _h(f"vector identity {name}")
        self.identity_key = handshake.x25519_public(self.identity_private)
        self.spk = _h(f"vector spk {name}")
        self.opk = _h(f"vector opk {name}")

    def inputs(self) -> dict[str, str]:
        return {
            "address": self.address,
            "identity_private": self.identity_private.hex(),
            "signed_prekey_private": self.spk.hex(),
            "one_time_prekey_private": self.opk.hex(),
        }


def plumbing() -> dict[str, Any]:
    """RFC 5869 A.1 (HKDF-SHA-256) and RFC 8439 §2.8.2 (ChaCha20-Poly1305) through our calls."""
    ikm, salt, info = b"\x0b" * 22, bytes(range(13)), bytes(range(0xF0, 0xFA))
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
        b"sunscreen would be it."
    )
    sealed = ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)
    return {
        "hkdf_rfc5869_a1": {
            "ikm": ikm.hex(),
            "salt": salt.hex(),
            "info": info.hex(),
            "length": 42,
            "okm": handshake.hkdf(salt, ikm, info, 42).hex(),
        },
        "aead_rfc8439_2_8_2": {
            "key": key.hex(),
            "nonce": nonce.hex(),
            "aad": aad.hex(),
            "plaintext": plaintext.hex(),
            "ciphertext": sealed[:-16].hex(),
            "tag": sealed[-16:].hex(),
        },
    }


def mlkem() -> dict[str, Any]:
    ek = handshake.mlkem_public(MLKEM_SEED)
    bob_ek = handshake.mlkem_public(BOB_PQ_SEED)
    return {
        "keygen": {"seed": MLKEM_SEED.hex(), "ek_sha256": hashlib.sha256(ek).hexdigest(), "ek_prefix": ek[:32].hex()},
        "decapsulation": {
            "seed": BOB_PQ_SEED.hex(),
            "ek_sha256": hashlib.sha256(bob_ek).hexdigest(),
            "ciphertext": RECORDED_KEM_CIPHERTEXT.hex(),
            "shared_secret": handshake.mlkem_decapsulate(BOB_PQ_SEED, RECORDED_KEM_CIPHERTEXT).hex(),
        },
    }


ALICE, BOB = _Device("alice"), _Device("bob")


def _prekeys() -> handshake.PeerPrekeys:
    return handshake.PeerPrekeys(
        signed_prekey_id=1,
        signed_prekey=handshake.x25519_public(BOB.spk),
        pq_prekey_id=1,
        pq_last_resort=False,
        pq_prekey=handshake.mlkem_public(BOB_PQ_SEED),
        one_time_prekey_id=42,
        one_time_prekey=handshake.x25519_public(BOB.opk),
    )


def pqxdh() -> dict[str, Any]:
    ss = handshake.mlkem_decapsulate(BOB_PQ_SEED, RECORDED_KEM_CIPHERTEXT)
    result = handshake.initiate(
        own_device_id=ALICE.device_id,
        identity_private_key=ALICE.identity_private,
        peer_device_id=BOB.device_id,
        peer_identity_key=BOB.identity_key,
        prekeys=_prekeys(),
        ephemeral_private_key=_entropy("ek"),
        kem_ciphertext=RECORDED_KEM_CIPHERTEXT,
        kem_shared_secret=ss,
    )
    return {
        "initiator": ALICE.inputs(),
        "responder": {**BOB.inputs(), "pq_seed": BOB_PQ_SEED.hex()},
        "signed_prekey_id": 1,
        "pq_prekey_id": 1,
        "pq_last_resort": False,
        "one_time_prekey_id": 42,
        "ephemeral_private": _entropy("ek").hex(),
        "kem_ciphertext_sha256": hashlib.sha256(RECORDED_KEM_CIPHERTEXT).hexdigest(),
        "kem_shared_secret": ss.hex(),
        "transcript_hash": result.transcript_hash.hex(),
        "shared_key": result.shared_key.hex(),
        "associated_data": result.associated_data.hex(),
        "session_id": result.session_id.hex(),
    }


def _seal(state: SessionState, to: _Device, index: int, text: str) -> tuple[SessionState, bytes]:
    return session.seal(
        state,
        sender_list_version=1,
        recipient_box_key=to.identity_key,
        sent_at_ms=NOW_MS + index,
        message_id=_entropy(f"message id {index}", 16),
        content_type="text/plain; charset=utf-8",
        body=text.encode(),
        entropy=_entropy(f"seal {index}", 64),
    )


def conversation() -> dict[str, Any]:
    """A→B x3 (prekey messages), B opens 1, 3, then 2 (out of order); B→A x2, A opens only the second (skipped)."""
    state_a = session.start(
        own_address=ALICE.address,
        identity_private_key=ALICE.identity_private,
        peer_address=BOB.address,
        peer_identity_key=BOB.identity_key,
        prekeys=_prekeys(),
        ephemeral_private_key=_entropy("ek"),
        ratchet_entropy=_entropy("alice ratchet 0"),
        kem_ciphertext=RECORDED_KEM_CIPHERTEXT,
        kem_shared_secret=handshake.mlkem_decapsulate(BOB_PQ_SEED, RECORDED_KEM_CIPHERTEXT),
        now_ms=NOW_MS,
    )
    envelopes: list[dict[str, Any]] = []
    sent: list[bytes] = []
    for i, text in enumerate(["a1", "a2", "a3"]):
        state_a, ct = _seal(state_a, BOB, i, text)
        sent.append(ct)
    opened: list[dict[str, Any]] = []

    def open_b(state: SessionState | None, index: int) -> SessionState:
        inner = session.parse_inner(session.open_outer(sent[index], BOB.identity_private))
        assert inner is not None
        entropy = _entropy(f"bob open {index}")
        if state is None:
            state, content = session.accept_prekey(
                own_address=BOB.address,
                identity_private_key=BOB.identity_private,
                sealed=inner,
                sender_identity_key=ALICE.identity_key,
                keys=ResponderKeys(signed_prekey_private=BOB.spk, pq_seed=BOB_PQ_SEED, one_time_prekey_private=BOB.opk),
                entropy=entropy,
                now_ms=NOW_MS,
                skipped_ttl_ms=SKIPPED_TTL_MS,
            )
        else:
            state, content = session.decrypt(
                state, inner, entropy=entropy, now_ms=NOW_MS, skipped_ttl_ms=SKIPPED_TTL_MS
            )
        opened.append({"by": "bob", "envelope": index, "body": content.body.decode(), "kind": inner.kind})
        return state

    state_b = open_b(None, 0)
    state_b = open_b(state_b, 2)
    state_b = open_b(state_b, 1)
    for i, text in enumerate(["b1", "b2"], start=3):
        state_b, ct = _seal(state_b, ALICE, i, text)
        sent.append(ct)
    inner = session.parse_inner(session.open_outer(sent[4], ALICE.identity_private))
    assert inner is not None
    state_a, content = session.decrypt(
        state_a, inner, entropy=_entropy("alice open 4"), now_ms=NOW_MS, skipped_ttl_ms=SKIPPED_TTL_MS
    )
    opened.append({"by": "alice", "envelope": 4, "body": content.body.decode(), "kind": inner.kind})
    for index, ct in enumerate(sent):
        envelopes.append({"index": index, "ciphertext": ct.hex()})
    return {
        "envelopes": envelopes,
        "opened": opened,
        "alice_state_sha256": hashlib.sha256(codec.encode(state_a)).hexdigest(),
        "bob_state_sha256": hashlib.sha256(codec.encode(state_b)).hexdigest(),
        "alice_skipped": [[k.ratchet_key.hex(), k.n] for k in state_a.ratchet.skipped],
    }


def sessions_section() -> dict[str, Any]:
    return {"plumbing": plumbing(), "mlkem768": mlkem(), "pqxdh": pqxdh(), "conversation": conversation()}
