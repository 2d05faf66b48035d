"""The inbox's send and receive plans: pure functions of what the store read, no database."""

from __future__ import annotations

import pytest

from protocol.errors import ErrorCode, TetherlessError
from relay.store.base import NewEnvelope, ReceivedEnvelope, ReceivedOutcome, StoredEnvelope
from relay.store.inbox_rules import EarlierSend, Recipient, key_hash, key_hashes, plan_received, plan_send

ALICE = Recipient("acct-a", revoked=False, queued=0, last_seq=7)
NOW = 1_000


def env(
    key: bytes, device: str = "dev-a", account: str = "acct-a", *, digest: bytes = b"", relay: str = ""
) -> NewEnvelope:
    return NewEnvelope(device, account, key, b"id-" + key, 2_000, b"ct", relay, digest=digest or b"d-" + key)


def received(origin_id: bytes, device: str = "dev-a", account: str = "acct-a") -> ReceivedEnvelope:
    return ReceivedEnvelope(origin_id, device, account, b"local-" + origin_id, 2_000, b"ct")


def refused(code: ErrorCode, *args: object) -> None:
    with pytest.raises(TetherlessError) as info:
        plan_send(*args)  # type: ignore[arg-type]
    assert info.value.code is code


def test_fresh_envelopes_take_consecutive_cursors_in_request_order() -> None:
    plan = plan_send([env(b"k1"), env(b"k2")], {"dev-a": ALICE}, {}, NOW, 10)
    assert [(seq, e.idempotency_key) for seq, e in plan.local] == [(8, b"k1"), (9, b"k2")]
    assert plan.results == [
        StoredEnvelope(b"id-k1", NOW, False, "dev-a"),
        StoredEnvelope(b"id-k2", NOW, False, "dev-a"),
    ]
    assert [e.idempotency_key for e in plan.keys] == [b"k1", b"k2"]
    inbox = plan.inboxes["dev-a"]
    assert (inbox.queued, inbox.last_seq, inbox.added) == (2, 9, 2)


def test_a_key_sent_before_answers_the_original_result_and_stores_nothing() -> None:
    earlier = {b"k1": EarlierSend(b"first-id", b"d-k1", 500)}
    plan = plan_send([env(b"k1")], {"dev-a": ALICE}, earlier, NOW, 10)
    assert plan.results == [StoredEnvelope(b"first-id", 500, True, "dev-a")]
    assert (plan.local, plan.keys, plan.outbox) == ([], [], [])


def test_a_key_repeated_in_one_batch_is_a_duplicate_of_the_first() -> None:
    plan = plan_send([env(b"k1"), env(b"k1")], {"dev-a": ALICE}, {}, NOW, 10)
    assert [r.duplicate for r in plan.results] == [False, True]
    assert len(plan.local) == len(plan.keys) == 1


@pytest.mark.parametrize("earlier", [{b"k1": EarlierSend(b"first-id", b"d-k1", 500)}, {}])
def test_a_key_reused_for_another_envelope_is_a_conflict(earlier: dict[bytes, EarlierSend]) -> None:
    batch = [env(b"k1", digest=b"other")] if earlier else [env(b"k1", digest=b"one"), env(b"k1", digest=b"two")]
    refused(ErrorCode.IDEMPOTENCY_CONFLICT, batch, {"dev-a": ALICE}, earlier, NOW, 10)


def test_unknown_revoked_and_foreign_recipients_refuse_the_batch() -> None:
    refused(ErrorCode.UNKNOWN_RECIPIENT, [env(b"k1"), env(b"k2", "ghost")], {"dev-a": ALICE}, {}, NOW, 10)
    refused(ErrorCode.UNKNOWN_RECIPIENT, [env(b"k1", account="acct-b")], {"dev-a": ALICE}, {}, NOW, 10)
    revoked = Recipient("acct-a", revoked=True, queued=0)
    refused(ErrorCode.RECIPIENT_REVOKED, [env(b"k1")], {"dev-a": revoked}, {}, NOW, 10)


def test_the_quota_counts_the_batch_itself() -> None:
    nearly = Recipient("acct-a", revoked=False, queued=8)
    assert len(plan_send([env(b"k1"), env(b"k2")], {"dev-a": nearly}, {}, NOW, 10).local) == 2
    refused(ErrorCode.INBOX_FULL, [env(b"k1"), env(b"k2"), env(b"k3")], {"dev-a": nearly}, {}, NOW, 10)


def test_envelopes_for_other_relays_go_to_the_outbox_and_claim_their_keys() -> None:
    plan = plan_send([env(b"k1", "far", "acct-far", relay="relay.example")], {}, {}, NOW, 10)
    assert [e.idempotency_key for e in plan.outbox] == [b"k1"]
    assert [e.idempotency_key for e in plan.keys] == [b"k1"]
    assert (plan.local, plan.inboxes) == ([], {})


def test_received_envelopes_each_get_their_own_outcome() -> None:
    recipients = {
        "dev-a": Recipient("acct-a", revoked=False, queued=1, last_seq=3),
        "dev-r": Recipient("acct-a", revoked=True, queued=0),
    }
    batch = [
        received(b"o1"),
        received(b"seen"),
        received(b"o1"),  # the same origin id again in one delivery
        received(b"o2", "ghost"),
        received(b"o3", "dev-a", "acct-b"),
        received(b"o4", "dev-r"),
        received(b"o5"),
        received(b"o6"),  # the quota of 3 counts this delivery
    ]
    plan = plan_received(batch, recipients, {b"seen"}, 3)
    assert [outcome for outcome, _ in plan.results] == [
        ReceivedOutcome.STORED,
        ReceivedOutcome.DUPLICATE,
        ReceivedOutcome.DUPLICATE,
        ReceivedOutcome.UNKNOWN_RECIPIENT,
        ReceivedOutcome.UNKNOWN_RECIPIENT,
        ReceivedOutcome.RECIPIENT_REVOKED,
        ReceivedOutcome.STORED,
        ReceivedOutcome.INBOX_FULL,
    ]
    assert [(seq, e.origin_envelope_id) for seq, e in plan.stored] == [(4, b"o1"), (5, b"o5")]
    assert (plan.inboxes["dev-a"].queued, plan.inboxes["dev-a"].last_seq) == (3, 5)
    assert set(plan.inboxes) == {"dev-a"}


def test_the_batch_key_hashes_are_the_key_hash_of_each_key() -> None:
    """``key_hashes`` (the send path) must agree with ``key_hash`` (migrations, PostgreSQL's SQL, earlier rows)."""
    keys = [b"k" * 8, b"\x00" * 8, bytes(range(64))]
    assert key_hashes("sender-device", keys) == {key: key_hash("sender-device", key) for key in keys}
    assert key_hashes("another", keys[:1]) != key_hashes("sender-device", keys[:1])
