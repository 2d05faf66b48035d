"""The Double Ratchet (protocol/ratchet.py, docs/crypto.md §8): state machine, limits, FS and PCS."""

from __future__ import annotations

import hashlib
import itertools

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protocol import codec, ratchet
from protocol.errors import ErrorCode
from protocol.handshake import x25519_public
from protocol.messages import RatchetMessage
from protocol.payload import InvalidPayloadError
from protocol.ratchet import RatchetState

TTL_MS = 86_400_000
_counter = itertools.count()


def _entropy() -> bytes:
    return hashlib.sha256(b"entropy%d" % next(_counter)).digest()


def _pair(sk: bytes = b"k" * 32) -> tuple[RatchetState, RatchetState]:
    spk = hashlib.sha256(b"spk").digest()
    bob = ratchet.init_bob(shared_key=sk, associated_data=b"ad", session_id=b"s" * 16, ratchet_private_key=spk)
    alice = ratchet.init_alice(
        shared_key=sk,
        associated_data=b"ad",
        session_id=b"s" * 16,
        peer_ratchet_key=x25519_public(spk),
        entropy=_entropy(),
    )
    return alice, bob


def _dec(state: RatchetState, message: RatchetMessage, now_ms: int = 0) -> tuple[RatchetState, bytes]:
    return ratchet.decrypt(state, message, entropy=_entropy(), now_ms=now_ms, skipped_ttl_ms=TTL_MS)


def _key_nonce(state: RatchetState) -> tuple[bytes, bytes]:
    assert state.sending_chain_key is not None
    return ratchet.message_key_material(ratchet.kdf_ck(state.sending_chain_key)[1])


class RatchetMachine(RuleBasedStateMachine):
    """Two parties, a lossy, reordering, duplicating network, and crashes that reload encoded state."""

    @initialize()
    def start(self) -> None:
        self.states = dict(zip("AB", _pair(), strict=True))
        self.in_flight: list[tuple[str, RatchetMessage, bytes]] = []  # (recipient, message, plaintext)
        self.delivered: list[tuple[str, RatchetMessage]] = []
        self.used_key_nonces: set[tuple[bytes, bytes]] = set()
        self.sent_count = 0

    def _send(self, sender: str, body: bytes) -> None:
        state = self.states[sender]
        key_nonce = _key_nonce(state)
        assert key_nonce not in self.used_key_nonces, "a (key, nonce) pair was used twice"
        self.used_key_nonces.add(key_nonce)
        self.states[sender], message = ratchet.encrypt(state, body)
        self.sent_count += 1
        self.in_flight.append(("B" if sender == "A" else "A", message, body))

    @rule(body=st.binary(max_size=64))
    def alice_sends(self, body: bytes) -> None:
        self._send("A", body)

    @precondition(lambda self: self.states["B"].sending_chain_key is not None)
    @rule(body=st.binary(max_size=64))
    def bob_sends(self, body: bytes) -> None:
        self._send("B", body)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.in_flight) - 1))
        recipient, message, body = self.in_flight.pop(index)
        self.states[recipient], plaintext = _dec(self.states[recipient], message)
        assert plaintext == body
        self.delivered.append((recipient, message))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))

    def _must_fail(self, recipient: str, message: RatchetMessage) -> None:
        before = codec.encode(self.states[recipient])
        with pytest.raises(InvalidPayloadError) as err:
            _dec(self.states[recipient], message)
        assert err.value.code is ErrorCode.MALFORMED_BODY
        assert codec.encode(self.states[recipient]) == before

    @precondition(lambda self: self.delivered)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        recipient, message = data.draw(st.sampled_from(self.delivered))
        self._must_fail(recipient, message)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def tamper(self, data: st.DataObject) -> None:
        recipient, message, _ = data.draw(st.sampled_from(self.in_flight))
        flip = data.draw(st.integers(0, len(message.ciphertext) - 1))
        ct = bytearray(message.ciphertext)
        ct[flip] ^= 0x01
        self._must_fail(recipient, msgspec.structs.replace(message, ciphertext=bytes(ct)))
        self._must_fail(recipient, msgspec.structs.replace(message, n=message.n + 1))

    @rule()
    def crash_and_reload(self) -> None:
        self.states = {k: codec.decode(codec.encode(v), RatchetState) for k, v in self.states.items()}

    @invariant()
    def skipped_keys_bounded(self) -> None:
        for state in self.states.values():
            assert len(state.skipped) <= ratchet.MAX_SKIPPED_PER_SESSION
            assert len(state.skipped) <= self.sent_count


TestRatchetMachine = RatchetMachine.TestCase
TestRatchetMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# -- single cases ---------------------------------------------------------------------------------


def test_out_of_order_and_skipped_messages_open() -> None:
    alice, bob = _pair()
    messages = []
    for i in range(5):
        alice, m = ratchet.encrypt(alice, b"m%d" % i)
        messages.append(m)
    bob, p = _dec(bob, messages[3])
    assert p == b"m3"
    assert len(bob.skipped) == 3
    bob, p = _dec(bob, messages[0])
    assert p == b"m0"
    assert len(bob.skipped) == 2
    bob, p = _dec(bob, messages[4])
    assert p == b"m4"
    # previous_chain_length: messages of an earlier chain still open after a DH step.
    bob, reply = ratchet.encrypt(bob, b"r")
    alice, _ = _dec(alice, reply)
    alice, late = ratchet.encrypt(alice, b"new chain")
    bob, p = _dec(bob, late)
    assert p == b"new chain"
    bob, p = _dec(bob, messages[2])
    assert p == b"m2"


def _chain(alice: RatchetState, count: int) -> tuple[RatchetState, list[RatchetMessage]]:
    sent: list[RatchetMessage] = []
    for i in range(count):
        alice, m = ratchet.encrypt(alice, b"m%d" % i)
        sent.append(m)
    return alice, sent


TOO_FAR = "message is too far ahead in its chain"
USED = "message key already used or unknown"


def test_too_far_ahead_is_rejected_and_changes_nothing() -> None:
    alice, bob = _pair()
    alice, sent = _chain(alice, ratchet.MAX_SKIP + 2)
    # A genuine message MAX_SKIP + 1 keys ahead: it would decrypt, only the bound refuses it.
    before = codec.encode(bob)
    with pytest.raises(InvalidPayloadError) as err:
        _dec(bob, sent[-1])
    assert (err.value.code, err.value.detail) == (ErrorCode.MALFORMED_BODY, TOO_FAR)
    assert codec.encode(bob) == before
    # Exactly MAX_SKIP ahead is fine (n = 0 was never delivered).
    bob, p = _dec(bob, sent[-2])
    assert p == b"m%d" % ratchet.MAX_SKIP
    assert len(bob.skipped) == ratchet.MAX_SKIP


def test_previous_chain_too_long_is_rejected_at_the_dh_step() -> None:
    """The bound also applies to the keys left on the old chain (``previous_chain_length``)."""
    alice, bob = _pair()
    alice, sent = _chain(alice, ratchet.MAX_SKIP + 2)
    bob, _ = _dec(bob, sent[0])
    bob, reply = ratchet.encrypt(bob, b"r")
    alice, _ = _dec(alice, reply)
    alice, new_chain = ratchet.encrypt(alice, b"new chain")
    assert new_chain.previous_chain_length == ratchet.MAX_SKIP + 2
    # Bob has received 1 of them: MAX_SKIP + 1 keys to skip on the old chain.
    with pytest.raises(InvalidPayloadError) as err:
        _dec(bob, new_chain)
    assert err.value.detail == TOO_FAR
    # With one more received, exactly MAX_SKIP are left: the step goes through.
    bob, _ = _dec(bob, sent[1])
    bob, p = _dec(bob, new_chain)
    assert p == b"new chain"
    assert len(bob.skipped) == ratchet.MAX_SKIP
    # The old chain's keys expire like any skipped key, and still open their messages.
    assert {k.expires_at_ms for k in bob.skipped} == {TTL_MS}
    bob, p = _dec(bob, sent[2])
    assert p == b"m2"


def test_first_reply_with_a_previous_chain_length_skips_nothing() -> None:
    """Before Alice has a receiving chain there are no keys to skip, whatever ``previous_chain_length`` says."""
    alice, bob = _pair()
    alice, m = ratchet.encrypt(alice, b"x")
    bob, _ = _dec(bob, m)
    bob, reply = ratchet.encrypt(msgspec.structs.replace(bob, previous_sent=5), b"r")
    assert reply.previous_chain_length == 5
    alice, p = _dec(alice, reply)
    assert p == b"r"
    assert alice.skipped == []


def test_skipped_keys_per_session_are_capped_oldest_first() -> None:
    alice, bob = _pair()
    sent: list[RatchetMessage] = []
    for _round in range(3):  # three chains of 1,000 skipped keys each
        for _ in range(ratchet.MAX_SKIP + 1):
            alice, m = ratchet.encrypt(alice, b"x")
            sent.append(m)
        bob, _ = _dec(bob, sent[-1])
        bob, reply = ratchet.encrypt(bob, b"r")
        alice, _ = _dec(alice, reply)
    assert len(bob.skipped) == ratchet.MAX_SKIPPED_PER_SESSION
    with pytest.raises(InvalidPayloadError):
        _dec(bob, sent[0])  # evicted
    bob, p = _dec(bob, sent[-2])
    assert p == b"x"


def test_skipped_keys_expire() -> None:
    alice, bob = _pair()
    alice, m0 = ratchet.encrypt(alice, b"0")
    alice, m1 = ratchet.encrypt(alice, b"1")
    bob, _ = ratchet.decrypt(bob, m1, entropy=_entropy(), now_ms=1_000, skipped_ttl_ms=10)
    with pytest.raises(InvalidPayloadError):
        ratchet.decrypt(bob, m0, entropy=_entropy(), now_ms=1_010, skipped_ttl_ms=10)
    _, p = ratchet.decrypt(bob, m0, entropy=_entropy(), now_ms=1_009, skipped_ttl_ms=10)
    assert p == b"0"


def test_bob_cannot_send_first() -> None:
    _, bob = _pair()
    with pytest.raises(ValueError, match=r"^this session cannot send before it has received a message$"):
        ratchet.encrypt(bob, b"x")


def test_a_sending_chain_ends_at_2_to_the_32_minus_1() -> None:
    alice, _ = _pair()
    last = msgspec.structs.replace(alice, sent=ratchet.MAX_CHAIN_LENGTH - 1)
    _, m = ratchet.encrypt(last, b"x")
    assert m.n == ratchet.MAX_CHAIN_LENGTH - 1
    with pytest.raises(ValueError, match=r"^sending chain exhausted: start a new session$"):
        ratchet.encrypt(msgspec.structs.replace(alice, sent=ratchet.MAX_CHAIN_LENGTH), b"x")


def test_low_order_ratchet_key_is_malformed_and_changes_nothing() -> None:
    alice, bob = _pair()
    alice, m = ratchet.encrypt(alice, b"x")
    bad = RatchetMessage(ratchet_key=bytes(32), previous_chain_length=0, n=0, ciphertext=m.ciphertext)
    with pytest.raises(InvalidPayloadError) as err:
        _dec(bob, bad)
    assert (err.value.code, err.value.detail) == (ErrorCode.MALFORMED_BODY, "bad ratchet key")
    _, p = _dec(bob, m)
    assert p == b"x"


def test_used_or_unknown_message_keys_are_named() -> None:
    alice, bob = _pair()
    alice, m = ratchet.encrypt(alice, b"x")
    bob, _ = _dec(bob, m)
    with pytest.raises(InvalidPayloadError) as err:
        _dec(bob, m)  # the key of n = 0 was used and deleted
    assert (err.value.code, err.value.detail) == (ErrorCode.MALFORMED_BODY, USED)
    # A message on Bob's initial ratchet key (SPK_B), which Alice has no receiving chain for.
    assert alice.receiving_chain_key is None
    on_spk = RatchetMessage(ratchet_key=alice.receiving_key or b"", previous_chain_length=0, n=0, ciphertext=b"x" * 17)
    with pytest.raises(InvalidPayloadError) as err:
        _dec(alice, on_spk)
    assert (err.value.code, err.value.detail) == (ErrorCode.MALFORMED_BODY, USED)


def test_decrypt_needs_32_bytes_of_entropy() -> None:
    alice, bob = _pair()
    _, m = ratchet.encrypt(alice, b"x")
    with pytest.raises(ValueError, match=r"^a ratchet key needs 32 bytes of entropy$"):
        ratchet.decrypt(bob, m, entropy=bytes(31), now_ms=0, skipped_ttl_ms=TTL_MS)


def test_associated_data_binds_the_session() -> None:
    alice, bob = _pair()
    alice, m = ratchet.encrypt(alice, b"x")
    other = msgspec.structs.replace(bob, associated_data=b"other")
    with pytest.raises(InvalidPayloadError) as err:
        _dec(other, m)
    assert (err.value.code, err.value.detail) == (ErrorCode.MALFORMED_BODY, "ratchet message does not decrypt")


def test_forward_secrecy_state_copied_later_cannot_open_earlier_ciphertexts() -> None:
    alice, bob = _pair()
    captured = []
    for i in range(3):
        alice, m = ratchet.encrypt(alice, b"secret %d" % i)
        captured.append(m)
        bob, _ = _dec(bob, m)
    # The ratchet moves on (a round trip), then the attacker copies Bob's state.
    bob, r = ratchet.encrypt(bob, b"reply")
    alice, _ = _dec(alice, r)
    alice, m = ratchet.encrypt(alice, b"later")
    bob, _ = _dec(bob, m)
    stolen = codec.decode(codec.encode(bob), RatchetState)
    for m in captured:
        with pytest.raises(InvalidPayloadError):
            _dec(stolen, m)
    # Also right after receiving, before any DH step: used keys are gone.
    alice2, bob2 = _pair(b"q" * 32)
    alice2, m = ratchet.encrypt(alice2, b"one")
    bob2, _ = _dec(bob2, m)
    with pytest.raises(InvalidPayloadError):
        _dec(codec.decode(codec.encode(bob2), RatchetState), m)


def test_post_compromise_security_after_the_peers_next_dh_step() -> None:
    alice, bob = _pair()
    alice, m = ratchet.encrypt(alice, b"hello")
    bob, _ = _dec(bob, m)
    stolen = codec.decode(codec.encode(alice), RatchetState)  # compromise of Alice at T
    bob, b1 = ratchet.encrypt(bob, b"b1")
    stolen, p = _dec(stolen, b1)  # a passive attacker still reads this one
    assert p == b"b1"
    alice, _ = _dec(alice, b1)
    alice, a2 = ratchet.encrypt(alice, b"a2 (fresh ratchet key)")
    bob, _ = _dec(bob, a2)
    bob, b3 = ratchet.encrypt(bob, b"b3 after Bob's next DH step")
    with pytest.raises(InvalidPayloadError):
        _dec(stolen, b3)
    alice, p = _dec(alice, b3)
    assert p == b"b3 after Bob's next DH step"


def test_init_alice_needs_32_bytes_of_entropy() -> None:
    with pytest.raises(ValueError, match=r"^a ratchet key needs 32 bytes of entropy$"):
        ratchet.init_alice(
            shared_key=b"k" * 32,
            associated_data=b"ad",
            session_id=b"s" * 16,
            peer_ratchet_key=x25519_public(hashlib.sha256(b"spk").digest()),
            entropy=bytes(31),
        )
