"""Sealed sender v2 on sessions (protocol/session.py, docs/crypto.md §7.3, §9, §14)."""

from __future__ import annotations

import hashlib
import itertools

import msgspec
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec, handshake, padding, payload, ratchet, session
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import account_id_for, device_id_for
from protocol.messages import PrekeyMessage, RatchetMessage, SealedV2
from protocol.payload import InvalidPayloadError
from protocol.session import ResponderKeys, SessionState

RELAY = "relay.test"
TTL = 86_400_000
_n = itertools.count()


def _rand(label: str = "") -> bytes:
    return hashlib.sha256(b"%s-%d" % (label.encode(), next(_n))).digest()


class Device:
    def __init__(self, name: str) -> None:
        self.signing_key = nacl.signing.SigningKey(hashlib.sha256(b"sign" + name.encode()).digest())
        sign_key = bytes(self.signing_key.verify_key)
        self.address = f"{device_id_for(sign_key)}.{account_id_for(sign_key)}@{RELAY}"
        self.identity_private = hashlib.sha256(b"ik" + name.encode()).digest()
        self.identity_key = handshake.x25519_public(self.identity_private)
        self.spk = hashlib.sha256(b"spk" + name.encode()).digest()
        self.pq_seed = hashlib.sha512(b"pq" + name.encode()).digest()
        self.opk = hashlib.sha256(b"opk" + name.encode()).digest()

    def prekeys(self, *, opk: bool = True) -> handshake.PeerPrekeys:
        return handshake.PeerPrekeys(
            signed_prekey_id=1,
            signed_prekey=handshake.x25519_public(self.spk),
            pq_prekey_id=2,
            pq_last_resort=not opk,
            pq_prekey=handshake.mlkem_public(self.pq_seed),
            one_time_prekey_id=3 if opk else None,
            one_time_prekey=handshake.x25519_public(self.opk) if opk else None,
        )

    def responder_keys(self, message: PrekeyMessage) -> ResponderKeys:
        return ResponderKeys(
            signed_prekey_private=self.spk,
            pq_seed=self.pq_seed,
            one_time_prekey_private=self.opk if message.one_time_prekey_id is not None else None,
        )


ALICE, BOB, MALLORY = Device("alice"), Device("bob"), Device("mallory")


def _start(a: Device = ALICE, b: Device = BOB, *, opk: bool = True) -> SessionState:
    prekeys = b.prekeys(opk=opk)
    ct, ss = handshake.encapsulate(prekeys.pq_prekey)
    return session.start(
        own_address=a.address,
        identity_private_key=a.identity_private,
        peer_address=b.address,
        peer_identity_key=b.identity_key,
        prekeys=prekeys,
        ephemeral_private_key=_rand("ek"),
        ratchet_entropy=_rand("rk"),
        kem_ciphertext=ct,
        kem_shared_secret=ss,
        now_ms=1,
    )


def _seal(state: SessionState, to: Device, body: bytes = b"hello") -> tuple[SessionState, bytes]:
    return session.seal(
        state,
        sender_list_version=1,
        recipient_box_key=to.identity_key,
        sent_at_ms=5,
        message_id=_rand("mid")[:16],
        content_type="text/plain",
        body=body,
        entropy=_rand("e1") + _rand("e2"),
    )


def _open(ciphertext: bytes, me: Device) -> SealedV2:
    sealed = session.parse_inner(session.open_outer(ciphertext, me.identity_private))
    assert sealed is not None
    return sealed


def _accept(ciphertext: bytes, me: Device = BOB, sender: Device = ALICE) -> tuple[SessionState, session.Content]:
    sealed = _open(ciphertext, me)
    return session.accept_prekey(
        own_address=me.address,
        identity_private_key=me.identity_private,
        sealed=sealed,
        sender_identity_key=sender.identity_key,
        keys=me.responder_keys(session.prekey_message(sealed)),
        entropy=_rand("r"),
        now_ms=2,
        skipped_ttl_ms=TTL,
    )


def _decrypt(state: SessionState, ciphertext: bytes, me: Device) -> tuple[SessionState, session.Content]:
    return session.decrypt(state, _open(ciphertext, me), entropy=_rand("r"), now_ms=3, skipped_ttl_ms=TTL)


def refused(code: ErrorCode, detail: str, call: object, *args: object, **kwargs: object) -> None:
    """``InvalidPayloadError`` with exactly this code and detail: the check that refused is the one named."""
    assert callable(call)
    with pytest.raises(InvalidPayloadError) as err:
        call(*args, **kwargs)
    assert (err.value.code, err.value.detail) == (code, detail)


@pytest.mark.parametrize("opk", [True, False])
def test_conversation_prekey_then_ratchet_messages(opk: bool) -> None:
    alice = _start(opk=opk)
    alice, c1 = _seal(alice, BOB, b"one")
    alice, c2 = _seal(alice, BOB, b"two")
    assert _open(c1, BOB).kind == session.KIND_PREKEY
    assert _open(c2, BOB).kind == session.KIND_PREKEY
    bob, content = _accept(c1)
    assert content.body == b"one"
    assert content.recipient == BOB.address
    assert bob.session_id == alice.session_id
    assert bob.transcript_hash == alice.transcript_hash
    bob, content = _decrypt(bob, c2, BOB)  # A's repeated prekey message on the existing session
    assert content.body == b"two"
    bob, c3 = _seal(bob, ALICE, b"three")
    assert _open(c3, ALICE).kind == session.KIND_MESSAGE
    alice, content = _decrypt(alice, c3, ALICE)
    assert content.body == b"three"
    assert alice.pending_prekey is None
    alice, c4 = _seal(alice, BOB, b"four")
    assert _open(c4, BOB).kind == session.KIND_MESSAGE
    bob, content = _decrypt(bob, c4, BOB)
    assert content.body == b"four"
    # State survives an encode/decode round trip.
    assert codec.decode(codec.encode(bob), SessionState) == bob


def test_sizes_are_48_plus_a_bucket() -> None:
    alice = _start()
    alice, first = _seal(alice, BOB, b"x" * 200)
    assert len(first) == payload.SEAL_OVERHEAD_BYTES + 2048  # a session's first messages: 2 KiB (§10)
    bob, _ = _accept(first)
    bob, reply = _seal(bob, ALICE, b"x" * 200)
    assert len(reply) == payload.SEAL_OVERHEAD_BYTES + 512


def test_v1_payloads_still_open_through_the_dispatch() -> None:
    v1 = payload.seal(
        signing_key=ALICE.signing_key,
        sender=ALICE.address,
        recipient=BOB.address,
        recipient_box_key=BOB.identity_key,
        sent_at_ms=1,
        message_id=b"m" * 16,
        content_type="text/plain",
        body=b"old",
        ephemeral_private_key=_rand(),
    )
    inner = session.open_outer(v1, BOB.identity_private)
    assert session.parse_inner(inner) is None
    assert payload.open_plaintext(inner, own_address=BOB.address).body == b"old"


@pytest.mark.parametrize("first", [0x00, 0x01, 0x03, 0x7F, 0x90, 0xC0])
def test_reserved_version_bytes_are_malformed(first: int) -> None:
    refused(
        ErrorCode.MALFORMED_BODY,
        f"unknown payload version 0x{first:02x}",
        session.parse_inner,
        bytes([first]) + b"\x80",
    )
    refused(ErrorCode.MALFORMED_BODY, "empty plaintext", session.parse_inner, b"")
    refused(
        ErrorCode.MALFORMED_BODY,
        f"sealed v2: {_decode_error(b'garbage', SealedV2)}",
        session.parse_inner,
        b"\x02garbage",
    )


@pytest.mark.parametrize("first", [0x80, 0x8F, 0xDE, 0xDF])
def test_every_msgpack_map_header_is_a_v1_payload(first: int) -> None:
    """fixmap 0x80-0x8f, map16 0xde, map32 0xdf: the bounds of the v1 dispatch (§14)."""
    assert session.parse_inner(bytes([first]) + b"\x00" * 4) is None


def test_content_for_another_recipient_is_bad_signature() -> None:
    # A session correctly keyed with Bob whose Content names Mallory (a sender that re-used one session for
    # another device, or a bug): the handshake and the ratchet both succeed, so only the recipient check
    # inside the ciphertext can refuse it — on a new session and on an existing one.
    alice = _start()
    misaddressed = msgspec.structs.replace(alice, peer_address=MALLORY.address)
    _, ct = _seal(misaddressed, BOB)
    refused(ErrorCode.BAD_SIGNATURE, "message was encrypted for another recipient", _accept, ct)
    alice, c1 = _seal(alice, BOB)
    bob, _ = _accept(c1)
    _, c2 = _seal(msgspec.structs.replace(alice, peer_address=MALLORY.address), BOB)
    before = codec.encode(bob)
    refused(ErrorCode.BAD_SIGNATURE, "message was encrypted for another recipient", _decrypt, bob, c2, BOB)
    assert codec.encode(bob) == before


def test_session_with_another_device_does_not_open() -> None:
    # Alice's session with Mallory, but the sealed box goes to Bob: it never opens as Bob's session.
    state = _start(ALICE, MALLORY)
    state, ct = session.seal(
        state,
        sender_list_version=1,
        recipient_box_key=BOB.identity_key,
        sent_at_ms=1,
        message_id=b"m" * 16,
        content_type="t",
        body=b"x",
        entropy=_rand() + _rand(),
    )
    sealed = _open(ct, BOB)
    with pytest.raises(InvalidPayloadError):
        session.accept_prekey(
            own_address=BOB.address,
            identity_private_key=BOB.identity_private,
            sealed=sealed,
            sender_identity_key=ALICE.identity_key,
            keys=BOB.responder_keys(session.prekey_message(sealed)),
            entropy=_rand(),
            now_ms=1,
            skipped_ttl_ms=TTL,
        )


def test_wrong_sender_identity_key_fails() -> None:
    alice = _start()
    alice, c1 = _seal(alice, BOB)
    sealed = _open(c1, BOB)
    refused(
        ErrorCode.BAD_SIGNATURE,
        "session id does not match the handshake",  # the recomputed session id differs
        session.accept_prekey,
        own_address=BOB.address,
        identity_private_key=BOB.identity_private,
        sealed=sealed,
        sender_identity_key=MALLORY.identity_key,  # the sender claims Alice; the key is not hers
        keys=BOB.responder_keys(session.prekey_message(sealed)),
        entropy=_rand(),
        now_ms=1,
        skipped_ttl_ms=TTL,
    )


@pytest.mark.parametrize(
    ("keys", "detail"),
    [
        (
            ResponderKeys(signed_prekey_private=BOB.spk, pq_seed=BOB.pq_seed),
            "one-time prekey does not match the message",
        ),
        (
            ResponderKeys(signed_prekey_private=BOB.spk[:31], pq_seed=BOB.pq_seed, one_time_prekey_private=BOB.opk),
            "handshake: X25519 keys are 32 bytes",
        ),
    ],
)
def test_unusable_responder_keys_are_malformed(keys: ResponderKeys, detail: str) -> None:
    _, c1 = _seal(_start(), BOB)
    refused(
        ErrorCode.MALFORMED_BODY,
        detail,
        session.accept_prekey,
        own_address=BOB.address,
        identity_private_key=BOB.identity_private,
        sealed=_open(c1, BOB),
        sender_identity_key=ALICE.identity_key,
        keys=keys,
        entropy=_rand(),
        now_ms=1,
        skipped_ttl_ms=TTL,
    )


def test_forged_sender_address_on_a_session_is_rejected() -> None:
    alice = _start()
    alice, c1 = _seal(alice, BOB)
    bob, _ = _accept(c1)
    alice, c2 = _seal(alice, BOB)
    sealed = _open(c2, BOB)
    for forged in (
        msgspec.structs.replace(sealed, sender=MALLORY.address),
        msgspec.structs.replace(sealed, session_id=bytes(16)),
    ):
        refused(
            ErrorCode.BAD_SIGNATURE,
            "message is not for this session",
            session.decrypt,
            bob,
            forged,
            entropy=_rand(),
            now_ms=1,
            skipped_ttl_ms=TTL,
        )
    # The session still works for the real message.
    _, content = session.decrypt(bob, sealed, entropy=_rand(), now_ms=1, skipped_ttl_ms=TTL)
    assert content.body == b"hello"


def test_tampered_bodies_are_malformed_and_do_not_touch_state() -> None:
    alice = _start()
    alice, c1 = _seal(alice, BOB)
    bob, _ = _accept(c1)
    bob, reply = _seal(bob, ALICE)
    sealed = _open(reply, ALICE)
    message = codec.decode(sealed.body, RatchetMessage)
    bad = msgspec.structs.replace(
        sealed,
        body=codec.encode(
            msgspec.structs.replace(message, ciphertext=message.ciphertext[:-1] + bytes([message.ciphertext[-1] ^ 1]))
        ),
    )
    before = codec.encode(alice)
    with pytest.raises(InvalidPayloadError) as err:
        session.decrypt(alice, bad, entropy=_rand(), now_ms=1, skipped_ttl_ms=TTL)
    assert err.value.code is ErrorCode.MALFORMED_BODY
    assert codec.encode(alice) == before
    with pytest.raises(InvalidPayloadError):
        session.decrypt(
            alice, msgspec.structs.replace(sealed, body=b"\x01"), entropy=_rand(), now_ms=1, skipped_ttl_ms=TTL
        )


def test_sealed_v2_hides_everything_but_the_bucket() -> None:
    alice = _start()
    alice, c1 = _seal(alice, BOB, b"the plaintext")
    assert b"the plaintext" not in c1
    assert ALICE.address.encode() not in c1
    assert padding.is_bucket(len(c1) - payload.SEAL_OVERHEAD_BYTES)


@settings(max_examples=300, deadline=None)
@given(inner=st.binary(max_size=300))
def test_parse_inner_raises_only_documented_errors(inner: bytes) -> None:
    code = None
    try:
        session.parse_inner(inner)
    except InvalidPayloadError as exc:
        code = exc.code
    assert code in (None, ErrorCode.MALFORMED_BODY)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=2000), kind=st.sampled_from([1, 2]))
def test_garbage_bodies_raise_only_documented_errors(body: bytes, kind: int) -> None:
    alice = _start()
    alice, c1 = _seal(alice, BOB)
    bob, _ = _accept(c1)
    sealed = msgspec.structs.replace(_open(c1, BOB), body=body, kind=kind)
    before = codec.encode(bob)
    with pytest.raises(InvalidPayloadError) as err:
        session.decrypt(bob, sealed, entropy=_rand(), now_ms=1, skipped_ttl_ms=TTL)
    assert err.value.code in (ErrorCode.MALFORMED_BODY, ErrorCode.BAD_SIGNATURE)
    assert codec.encode(bob) == before


def _decode_error(raw: bytes, kind: type) -> str:
    """The detail the codec gives for ``raw`` as ``kind`` (what the session layer must pass on)."""
    with pytest.raises(TetherlessError) as err:
        codec.decode(raw, kind)
    assert err.value.detail
    return err.value.detail


def test_undecodable_layers_name_the_layer_and_the_codec_error() -> None:
    alice = _start()
    alice, c1 = _seal(alice, BOB)
    bob, _ = _accept(c1)
    sealed = _open(c1, BOB)
    garbage = b"\x93\x01"
    refused(
        ErrorCode.MALFORMED_BODY,
        f"prekey message: {_decode_error(garbage, PrekeyMessage)}",
        session.prekey_message,
        msgspec.structs.replace(sealed, body=garbage),
    )
    refused(
        ErrorCode.MALFORMED_BODY,
        f"ratchet message: {_decode_error(garbage, RatchetMessage)}",
        session.decrypt,
        bob,
        msgspec.structs.replace(sealed, kind=session.KIND_MESSAGE, body=garbage),
        entropy=_rand(),
        now_ms=1,
        skipped_ttl_ms=TTL,
    )
    # A ratchet message that decrypts to something that is not a Content (a broken or hostile sender).
    bob_ratchet, message = ratchet.encrypt(bob.ratchet, garbage)
    del bob_ratchet
    not_content = SealedV2(
        sender=BOB.address,
        sender_list_version=1,
        kind=session.KIND_MESSAGE,
        session_id=bob.session_id,
        body=codec.encode(message),
    )
    refused(
        ErrorCode.MALFORMED_BODY,
        f"content: {_decode_error(garbage, session.Content)}",
        session.decrypt,
        alice,
        not_content,
        entropy=_rand(),
        now_ms=1,
        skipped_ttl_ms=TTL,
    )


def test_a_ratchet_message_is_not_a_prekey_message() -> None:
    alice = _start()
    alice, c1 = _seal(alice, BOB)
    bob, _ = _accept(c1)
    _, reply = _seal(bob, ALICE)
    refused(ErrorCode.MALFORMED_BODY, "not a prekey message", session.prekey_message, _open(reply, ALICE))


@pytest.mark.parametrize("which", ["own", "peer"])
def test_sessions_are_between_device_addresses(which: str) -> None:
    account_address = BOB.address.split(".", 1)[1]  # the account's address, no device
    own, peer = (account_address, BOB.address) if which == "own" else (ALICE.address, account_address)
    prekeys = BOB.prekeys()
    ct, ss = handshake.encapsulate(prekeys.pq_prekey)
    with pytest.raises(ValueError, match=r"^sessions are between device addresses$"):
        session.start(
            own_address=own,
            identity_private_key=ALICE.identity_private,
            peer_address=peer,
            peer_identity_key=BOB.identity_key,
            prekeys=prekeys,
            ephemeral_private_key=_rand(),
            ratchet_entropy=_rand(),
            kem_ciphertext=ct,
            kem_shared_secret=ss,
            now_ms=1,
        )
    # The responder side refuses the same: a sealed sender or an own address without a device.
    _, c1 = _seal(_start(), BOB)
    sealed = _open(c1, BOB)
    if which == "peer":
        sealed = msgspec.structs.replace(sealed, sender=ALICE.address.split(".", 1)[1])
    refused(
        ErrorCode.MALFORMED_BODY,
        "sessions are between device addresses",
        session.accept_prekey,
        own_address=account_address if which == "own" else BOB.address,
        identity_private_key=BOB.identity_private,
        sealed=sealed,
        sender_identity_key=ALICE.identity_key,
        keys=BOB.responder_keys(session.prekey_message(sealed)),
        entropy=_rand(),
        now_ms=1,
        skipped_ttl_ms=TTL,
    )


def test_sealing_needs_64_bytes_of_entropy() -> None:
    with pytest.raises(ValueError, match=r"^sealing needs 64 bytes of entropy$"):
        session.seal(
            _start(),
            sender_list_version=1,
            recipient_box_key=BOB.identity_key,
            sent_at_ms=1,
            message_id=b"m" * 16,
            content_type="t",
            body=b"x",
            entropy=_rand(),
        )
