"""Every kind of bad input gets its documented 4xx problem code from a real relay process; never a 5xx."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from protocol import codec
from protocol.messages import Challenge, InboxPage, SendResponse
from tests.e2e.http11 import Http11, Peer, login, register
from tests.relay_process import RelayProcess

LIMIT = 65536
SMALL_LIMITS = {
    "TETHERLESS_MAX_BODY_BYTES": str(LIMIT),
    "TETHERLESS_MAX_ENVELOPE_BYTES": str(LIMIT),
    "TETHERLESS_MAX_BATCH_ENVELOPES": "10",
    "TETHERLESS_MAX_INBOX_ENVELOPES": "5",
}


@pytest.fixture(scope="module")
def relay_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process = RelayProcess(tmp_path_factory.mktemp("bad-input") / "data", env=SMALL_LIMITS)
    process.start()
    try:
        yield process.url
    finally:
        assert process.stop() == 0


@pytest.fixture(scope="module")
def http(relay_url: str) -> Http11:
    return Http11(relay_url)


@pytest.fixture(scope="module")
def alice(http: Http11) -> Peer:
    dev = register(http, "alice")
    login(http, dev)
    return dev


@pytest.fixture(scope="module")
def bob(http: Http11) -> Peer:
    dev = register(http, "bob")
    login(http, dev)
    return dev


def send_body(to: Peer, ciphertext: bytes = b"x" * 32, key: bytes | None = None) -> dict[str, object]:
    return {
        "envelopes": [{"recipient": to.address, "idempotency_key": key or os.urandom(16), "ciphertext": ciphertext}]
    }


# -- request bodies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (codec.MSGPACK, b"\xc1"),  # 0xc1 is never used in MessagePack
        (codec.MSGPACK, b"\x81\xa9envelopes"),  # truncated map: the value is missing
        (codec.JSON, b"{not json"),
        (codec.JSON, b'{"envelopes": [}'),
    ],
)
def test_malformed_bodies(http: Http11, alice: Peer, content_type: str, body: bytes) -> None:
    answer = http.request(
        "POST", "/v1/messages", body, {"content-type": content_type, "authorization": f"Bearer {alice.token}"}
    )
    assert (answer.status, answer.code) == (400, "malformed_body")


def test_trailing_bytes_after_valid_body(http: Http11, alice: Peer, bob: Peer) -> None:
    body = codec.encode(send_body(bob)) + b"\x00"
    answer = http.request(
        "POST", "/v1/messages", body, {"content-type": codec.MSGPACK, "authorization": f"Bearer {alice.token}"}
    )
    assert (answer.status, answer.code) == (400, "malformed_body")


@pytest.mark.parametrize(
    "body",
    [
        {"envelopes": "not a list"},
        {"envelopes": []},
        {"envelopes": [{"recipient": 5, "idempotency_key": "AAAAAAAAAAA=", "ciphertext": "eA=="}]},
        {"envelopes": [{"recipient": "a@b", "idempotency_key": "AA==", "ciphertext": "eA=="}]},  # key too short
        {"envelopes": [{"recipient": "a@b", "idempotency_key": "AAAAAAAAAAA=", "ciphertext": "not base64!"}]},
        {},
    ],
)
def test_wrong_field_types(http: Http11, alice: Peer, body: object) -> None:
    answer = http.request(
        "POST",
        "/v1/messages",
        msgspec.json.encode(body),
        {"content-type": codec.JSON, "authorization": f"Bearer {alice.token}"},
    )
    assert (answer.status, answer.code) == (422, "invalid_field")


def test_bad_addresses(http: Http11, alice: Peer, bob: Peer) -> None:
    bad = send_body(bob)
    bad["envelopes"][0]["recipient"] = "not-an-address"  # type: ignore[index]
    assert http.msgpack("POST", "/v1/messages", bad, alice.token).code == "invalid_field"
    remote = send_body(bob)
    remote["envelopes"][0]["recipient"] = f"{bob.device_id}.{bob.parsed.account}@elsewhere.example"  # type: ignore[index]
    answer = http.msgpack("POST", "/v1/messages", remote, alice.token)
    # federation is open by default: queued for elsewhere.example (off/deny: tests/e2e/test_federation.py)
    assert answer.status == 201, answer.body
    ghost = send_body(bob)
    ghost["envelopes"][0]["recipient"] = f"{'q' * 32}.{bob.parsed.account}@{bob.parsed.relay}"  # type: ignore[index]
    answer = http.msgpack("POST", "/v1/messages", ghost, alice.token)
    assert (answer.status, answer.code) == (404, "unknown_recipient")


def test_unsupported_media_type_and_accept(http: Http11, alice: Peer) -> None:
    answer = http.request(
        "POST", "/v1/messages", b"<xml/>", {"content-type": "text/xml", "authorization": f"Bearer {alice.token}"}
    )
    assert (answer.status, answer.code) == (415, "unsupported_media_type")
    answer = http.request("GET", "/.well-known/tetherless", None, {"accept": "text/html"})
    assert (answer.status, answer.code) == (406, "not_acceptable")


def _sized_body(to: Peer, total: int) -> bytes:
    probe = codec.encode(send_body(to, b"x" * 60000, b"k" * 16))
    overhead = len(probe) - 60000
    body = codec.encode(send_body(to, os.urandom(total - overhead), os.urandom(16)))
    assert len(body) == total
    return body


def test_body_at_limit_accepted_and_one_over_rejected(http: Http11, alice: Peer) -> None:
    target = register(http, "big")
    headers = {"content-type": codec.MSGPACK, "authorization": f"Bearer {alice.token}"}
    answer = http.request("POST", "/v1/messages", _sized_body(target, LIMIT), headers)
    assert answer.status == 201, answer.body
    answer = http.request("POST", "/v1/messages", _sized_body(target, LIMIT + 1), headers)
    assert (answer.status, answer.code) == (413, "body_too_large")


def test_batch_and_envelope_limits(http: Http11, alice: Peer) -> None:
    target = register(http, "limits")
    many = {"envelopes": [send_body(target)["envelopes"][0] for _ in range(11)]}  # type: ignore[index]
    answer = http.msgpack("POST", "/v1/messages", many, alice.token)
    assert (answer.status, answer.code) == (413, "batch_too_large")
    # The quota (5 per inbox): 5 fit, the 6th is refused whole.
    for _ in range(5):
        assert http.msgpack("POST", "/v1/messages", send_body(target), alice.token).status == 201
    answer = http.msgpack("POST", "/v1/messages", send_body(target), alice.token)
    assert (answer.status, answer.code) == (507, "inbox_full")


def test_idempotent_retry_and_conflict(http: Http11, alice: Peer) -> None:
    target = register(http, "idem")
    key = os.urandom(16)
    first = http.msgpack("POST", "/v1/messages", send_body(target, b"same", key), alice.token)
    again = http.msgpack("POST", "/v1/messages", send_body(target, b"same", key), alice.token)
    assert first.status == again.status == 201
    a, b = codec.decode(first.body, SendResponse), codec.decode(again.body, SendResponse)
    assert a.accepted[0].id == b.accepted[0].id
    assert b.accepted[0].duplicate
    assert not a.accepted[0].duplicate
    answer = http.msgpack("POST", "/v1/messages", send_body(target, b"different", key), alice.token)
    assert (answer.status, answer.code) == (409, "idempotency_conflict")


# -- routes ---------------------------------------------------------------------------------


def test_unknown_route_and_method(http: Http11) -> None:
    answer = http.get("/v1/nothing-here")
    assert (answer.status, answer.code) == (404, "not_found")
    answer = http.request("PUT", "/v1/messages", b"")
    assert (answer.status, answer.code) == (405, "method_not_allowed")
    assert answer.headers["allow"] == "POST"
    answer = http.request("DELETE", "/livez")
    assert (answer.status, answer.code) == (405, "method_not_allowed")


@pytest.mark.parametrize("query", ["after=-1", "after=abc", "limit=0", "limit=100000", "after=1&after=x"])
def test_bad_queries(http: Http11, alice: Peer, query: str) -> None:
    answer = http.get(f"/v1/inbox?{query}", alice.token)
    assert (answer.status, answer.code) == (400, "invalid_query")


# -- authentication ---------------------------------------------------------------------------


def _challenge(http: Http11, dev: Peer) -> Challenge:
    return codec.decode(http.msgpack("POST", "/v1/auth/challenge", {"device_id": dev.device_id}).body, Challenge)


# Fixed garbage (pytest-xdist workers must collect the same ids): random-looking, seeded.
@pytest.mark.parametrize(
    "signature",
    [b"", b"\x00" * 10, b"\x00" * 64, random.Random(64).randbytes(64), random.Random(65).randbytes(65)],
    ids=["empty", "short", "zeros", "garbage-64", "garbage-65"],
)
def test_bad_short_or_garbage_signature(http: Http11, alice: Peer, signature: bytes) -> None:
    challenge = _challenge(http, alice)
    answer = http.msgpack(
        "POST", "/v1/auth/session", {"device_id": alice.device_id, "nonce": challenge.nonce, "signature": signature}
    )
    assert (answer.status, answer.code) == (401, "bad_signature")


def test_signature_by_another_device(http: Http11, alice: Peer, bob: Peer) -> None:
    from protocol.auth import sign_challenge

    challenge = _challenge(http, alice)
    answer = http.msgpack(
        "POST",
        "/v1/auth/session",
        {
            "device_id": alice.device_id,
            "nonce": challenge.nonce,
            "signature": sign_challenge(bob.signing_key, challenge),
        },
    )
    assert (answer.status, answer.code) == (401, "bad_signature")


def test_replayed_and_unknown_challenge(http: Http11, alice: Peer, bob: Peer) -> None:
    from protocol.auth import sign_challenge

    challenge = _challenge(http, alice)
    request = {
        "device_id": alice.device_id,
        "nonce": challenge.nonce,
        "signature": sign_challenge(alice.signing_key, challenge),
    }
    assert http.msgpack("POST", "/v1/auth/session", request).status == 200
    answer = http.msgpack("POST", "/v1/auth/session", request)
    assert (answer.status, answer.code) == (401, "challenge_used")
    unknown = {**request, "nonce": os.urandom(32)}
    answer = http.msgpack("POST", "/v1/auth/session", unknown)
    assert (answer.status, answer.code) == (401, "challenge_unknown")
    # A challenge issued to alice cannot be used by bob.
    theirs = _challenge(http, alice)
    answer = http.msgpack(
        "POST",
        "/v1/auth/session",
        {"device_id": bob.device_id, "nonce": theirs.nonce, "signature": sign_challenge(bob.signing_key, theirs)},
    )
    assert (answer.status, answer.code) == (401, "challenge_unknown")


def test_unknown_device(http: Http11) -> None:
    answer = http.msgpack("POST", "/v1/auth/challenge", {"device_id": "a" * 32})
    assert (answer.status, answer.code) == (404, "unknown_device")
    answer = http.get(f"/v1/accounts/{'a' * 32}/devices")
    assert (answer.status, answer.code) == (404, "unknown_account")


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "missing_token"),
        ("Bearer nope", "invalid_token"),
        ("Basic dXNlcjpwYXNz", "invalid_token"),
        ("Bearer tls1_" + "A" * 43, "invalid_token"),
    ],
)
def test_bad_tokens(http: Http11, authorization: str | None, code: str) -> None:
    headers = {"authorization": authorization} if authorization else {}
    answer = http.request("GET", "/v1/inbox", None, headers)
    assert (answer.status, answer.code) == (401, code)


def test_revoked_token(http: Http11) -> None:
    dev = register(http, "revoked")
    token = login(http, dev)
    assert http.get("/v1/inbox", token).status == 200
    answer = http.request("DELETE", "/v1/auth/session", None, {"authorization": f"Bearer {token}"})
    assert answer.status == 200
    assert answer.json() == {"revoked": 1}
    answer = http.get("/v1/inbox", token)
    assert (answer.status, answer.code) == (401, "token_revoked")
    # Revoke-all covers every token of the device.
    t1, t2 = login(http, dev), login(http, dev)
    answer = http.msgpack("DELETE", "/v1/auth/session", {"all_sessions": True}, t1)
    assert answer.status == 200
    assert http.get("/v1/inbox", t2).code == "token_revoked"


def test_another_devices_inbox_and_ack(http: Http11, alice: Peer, bob: Peer) -> None:
    http.msgpack("POST", "/v1/messages", send_body(bob, b"for bob only"), alice.token)
    answer = http.get(f"/v1/devices/{bob.device_id}/inbox", alice.token)
    assert (answer.status, answer.code) == (403, "forbidden")
    answer = http.get(f"/v1/devices/{bob.device_id}/inbox/stream", alice.token)
    assert (answer.status, answer.code) == (403, "forbidden")
    answer = http.msgpack("POST", f"/v1/devices/{bob.device_id}/inbox/ack", {"up_to": 2**62}, alice.token)
    assert (answer.status, answer.code) == (403, "forbidden")
    # Acknowledging bob's envelope ids from alice's own inbox deletes nothing of bob's.
    page = codec.decode(http.get("/v1/inbox", bob.token, codec.MSGPACK).body, InboxPage)
    ids = [env.id for env in page.envelopes]
    answer = http.msgpack("POST", "/v1/inbox/ack", {"ids": ids}, alice.token)
    assert answer.status == 200
    assert codec.decode(answer.body, dict)["acknowledged"] == 0
    still = codec.decode(http.get(f"/v1/devices/{bob.device_id}/inbox", bob.token, codec.MSGPACK).body, InboxPage)
    assert [env.id for env in still.envelopes] == ids


def test_empty_ack_is_invalid(http: Http11, alice: Peer) -> None:
    answer = http.msgpack("POST", "/v1/inbox/ack", {}, alice.token)
    assert (answer.status, answer.code) == (422, "invalid_field")


def test_invalid_genesis_lists(http: Http11) -> None:
    import nacl.signing

    from protocol import device_list

    key = nacl.signing.SigningKey.generate()
    signed = device_list.genesis(key, b"b" * 32, name="x", now_ms=1)
    forged = msgspec.structs.replace(signed, device_list=msgspec.structs.replace(signed.device_list, created_at_ms=2))
    answer = http.msgpack("POST", "/v1/accounts", {"signed": forged})
    assert (answer.status, answer.code) == (401, "bad_signature")
    wrong_version = msgspec.structs.replace(signed, device_list=msgspec.structs.replace(signed.device_list, version=2))
    answer = http.msgpack("POST", "/v1/accounts", {"signed": wrong_version})
    assert (answer.status, answer.code) == (422, "invalid_device_list")
    assert http.msgpack("POST", "/v1/accounts", {"signed": signed}).status == 201
    answer = http.msgpack("POST", "/v1/accounts", {"signed": signed})
    assert (answer.status, answer.code) == (409, "account_exists")


# -- expiry (its own relay: short TTLs) --------------------------------------------------------------


def test_expired_challenge_and_token(tmp_path: Path) -> None:
    # The token is used once right after login, then awaited until it expires: its lifetime only has to
    # outlast one request on a loaded host, and the test does not guess when it ends.
    process = RelayProcess(
        tmp_path / "data",
        env={"TETHERLESS_CHALLENGE_TTL_SECONDS": "1", "TETHERLESS_SESSION_TTL_SECONDS": "5"},
    )
    process.start()
    try:
        http = Http11(process.url)
        dev = register(http)
        from protocol.auth import sign_challenge

        challenge = _challenge(http, dev)
        token = login(http, dev)
        assert http.get("/v1/inbox", token).status == 200
        time.sleep(1.2)
        answer = http.msgpack(
            "POST",
            "/v1/auth/session",
            {
                "device_id": dev.device_id,
                "nonce": challenge.nonce,
                "signature": sign_challenge(dev.signing_key, challenge),
            },
        )
        assert (answer.status, answer.code) == (401, "challenge_expired")
        deadline = time.monotonic() + 30  # bounds a hang only
        while (answer := http.get("/v1/inbox", token)).status == 200:
            assert time.monotonic() < deadline, "the token never expired"
            time.sleep(0.5)
        assert (answer.status, answer.code) == (401, "token_expired")
    finally:
        assert process.stop() == 0
