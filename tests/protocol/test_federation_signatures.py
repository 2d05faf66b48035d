"""RFC 9421 / RFC 9530 signing and verification of federation requests (protocol/federation.py), pure."""

from __future__ import annotations

import base64
import hashlib

import nacl.signing
import pytest

from protocol import federation
from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import RelayKey

# RFC 9421 Appendix B.1.4 "test-key-ed25519" (PKCS#8 / SPKI DER; the raw key is the last 32 bytes).
RFC_PRIVATE = base64.b64decode("MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF")[-32:]
RFC_PUBLIC = base64.b64decode("MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=")[-32:]

# Our own vector: a fixed key, time and nonce.
SEED = bytes(range(32))
KEY = nacl.signing.SigningKey(SEED)
NOW = 1_800_000_000
BODY = b'{"envelopes": []}'
REQUEST = {"method": "POST", "authority": "b.example:8443", "path": "/federation/v1/deliver", "body": BODY}


def sign(**overrides: object) -> list[tuple[str, str]]:
    args: dict[str, object] = {
        **REQUEST,
        "origin": "a.example",
        "destination": "b.example",
        "created": NOW,
        "nonce": "bm9uY2Utbm9uY2Utbm9uY2Ut",
    }
    args.update(overrides)
    return federation.sign_request(KEY, **args)  # type: ignore[arg-type]


def full_check(headers: list[tuple[str, str]], *, body: bytes = BODY, now: int = NOW, own: str = "b.example") -> None:
    signed = federation.parse_signed_request(headers)
    federation.check_signed_request(
        signed, body=body, content_digest_header=dict(headers).get("content-digest"), own_name=own, now=now, window=300
    )
    published = [RelayKey(key_id=federation.relay_key_id(bytes(KEY.verify_key)), public_key=bytes(KEY.verify_key))]
    key = federation.select_relay_key(published, signed.key_id, now * 1000)
    authority, path = str(REQUEST["authority"]), str(REQUEST["path"])
    federation.verify_signature(signed, key, method="POST", authority=authority, path=path, headers=headers)


def code_of(headers: list[tuple[str, str]], **kwargs: object) -> ErrorCode:
    with pytest.raises(TetherlessError) as info:
        full_check(headers, **kwargs)  # type: ignore[arg-type]
    return info.value.code


def test_rfc9421_b26_ed25519_vector() -> None:
    """The signature base builder reproduces RFC 9421 Appendix B.2.6 byte for byte (Ed25519 is deterministic)."""
    key = nacl.signing.SigningKey(RFC_PRIVATE)
    assert bytes(key.verify_key) == RFC_PUBLIC
    components = ["date", "@method", "@path", "@authority", "content-type", "content-length"]
    headers = [
        ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
        ("content-type", "application/json"),
        ("content-length", "18"),
    ]
    params: federation.Params = [("created", 1618884473), ("keyid", "test-key-ed25519")]
    base = federation.signature_base(
        components, params, method="POST", authority="example.com", path="/foo", headers=headers
    )
    assert base == (
        b'"date": Tue, 20 Apr 2021 02:07:55 GMT\n"@method": POST\n"@path": /foo\n"@authority": example.com\n'
        b'"content-type": application/json\n"content-length": 18\n'
        b'"@signature-params": ("date" "@method" "@path" "@authority" "content-type" "content-length")'
        b';created=1618884473;keyid="test-key-ed25519"'
    )
    signature = bytes(key.sign(base).signature)
    assert base64.b64encode(signature).decode() == (
        "wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw=="
    )
    # and the header the RFC shows parses back to the same parameters
    parsed = federation.parse_dictionary(
        'sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length")'
        ';created=1618884473;keyid="test-key-ed25519"'
    )["sig-b26"]
    assert isinstance(parsed, federation.InnerList)
    assert [item for item, _ in parsed.items] == components
    assert parsed.params == params


def test_our_vector_is_stable() -> None:
    headers = dict(sign())
    assert headers["content-digest"] == "sha-256=:" + base64.b64encode(hashlib.sha256(BODY).digest()).decode() + ":"
    key_id = federation.relay_key_id(bytes(KEY.verify_key))
    assert len(key_id) == 16
    assert headers["signature-input"] == (
        'tl=("@method" "@authority" "@path" "content-digest" "tetherless-origin" "tetherless-destination")'
        f';created={NOW};expires={NOW + 300};nonce="bm9uY2Utbm9uY2Utbm9uY2Ut";keyid="{key_id}"'
        ';alg="ed25519";tag="tetherless-federation-v1"'
    )
    base = federation.signature_base(
        federation.COVERED_COMPONENTS,
        federation.parse_signed_request(list(headers.items())).params,
        method="POST",
        authority="b.example:8443",
        path="/federation/v1/deliver",
        headers=list(headers.items()),
    )
    assert base.decode().splitlines()[:6] == [
        '"@method": POST',
        '"@authority": b.example:8443',
        '"@path": /federation/v1/deliver',
        f'"content-digest": {headers["content-digest"]}',
        '"tetherless-origin": a.example',
        '"tetherless-destination": b.example',
    ]
    assert headers["signature"] == "tl=:" + base64.b64encode(KEY.sign(base).signature).decode() + ":"
    full_check(list(headers.items()))


def test_content_digest_rfc9530() -> None:
    assert federation.content_digest(b"") == "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
    federation.check_content_digest("sha-512=:AAAA:, sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:", b"")
    for header in (None, "", "sha-512=:AAAA:", "sha-256=:AAAA:", "sha-256=nope", "sha-256=:%%%:"):
        with pytest.raises(TetherlessError) as info:
            federation.check_content_digest(header, b"")
        assert info.value.code is ErrorCode.DIGEST_MISMATCH


def test_missing_signature() -> None:
    headers = [(k, v) for k, v in sign() if k not in ("signature", "signature-input")]
    assert code_of(headers) is ErrorCode.SIGNATURE_MISSING
    assert code_of([(k, v) for k, v in sign() if k != "signature"]) is ErrorCode.SIGNATURE_MISSING
    other_tag = [(k, v.replace("tetherless-federation-v1", "other")) for k, v in sign()]
    assert code_of(other_tag) is ErrorCode.SIGNATURE_MISSING


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("flipped signature", lambda v: v[:-3] + ("A" if v[-3] != "A" else "B") + v[-2:]),
        ("short signature", lambda v: "tl=:AAAA:"),
        ("not a byte sequence", lambda v: 'tl="abc"'),
        ("garbage", lambda v: "tl=:::"),
    ],
)
def test_bad_signature(name: str, mutate: object) -> None:
    headers = [(k, mutate(v) if k == "signature" else v) for k, v in sign()]  # type: ignore[operator]
    assert code_of(headers) is ErrorCode.BAD_SIGNATURE, name


def test_signature_over_other_components_or_values() -> None:
    # fewer covered components
    fewer = [(k, v.replace(' "tetherless-destination"', "") if k == "signature-input" else v) for k, v in sign()]
    assert code_of(fewer) is ErrorCode.BAD_SIGNATURE
    # another path / authority / origin than the one signed
    headers = sign()
    signed = federation.parse_signed_request(headers)
    key = bytes(KEY.verify_key)
    for change in ({"path": "/federation/v1/other"}, {"authority": "evil.example"}, {"method": "PUT"}):
        request = {**REQUEST, **change}
        with pytest.raises(TetherlessError) as info:
            federation.verify_signature(
                signed,
                key,
                method=request["method"],  # type: ignore[arg-type]
                authority=request["authority"],  # type: ignore[arg-type]
                path=request["path"],  # type: ignore[arg-type]
                headers=headers,
            )
        assert info.value.code is ErrorCode.BAD_SIGNATURE
    swapped_origin = [(k, "c.example" if k == "tetherless-origin" else v) for k, v in headers]
    assert code_of(swapped_origin) is ErrorCode.BAD_SIGNATURE
    assert code_of([(k, v.replace('alg="ed25519"', 'alg="rsa-pss-sha512"')) for k, v in headers]) is (
        ErrorCode.BAD_SIGNATURE
    )


def test_stale_and_future_signatures() -> None:
    assert code_of(sign(created=NOW - 301)) is ErrorCode.SIGNATURE_EXPIRED
    assert code_of(sign(created=NOW + 301)) is ErrorCode.SIGNATURE_EXPIRED
    assert code_of(sign(created=NOW - 10, validity_seconds=5)) is ErrorCode.SIGNATURE_EXPIRED  # past expires
    assert code_of(sign(validity_seconds=3600)) is ErrorCode.SIGNATURE_EXPIRED  # claims too long a validity
    full_check(sign(created=NOW - 299, validity_seconds=300))


def test_wrong_destination() -> None:
    assert code_of(sign(destination="c.example")) is ErrorCode.WRONG_DESTINATION
    assert code_of(sign(), own="c.example") is ErrorCode.WRONG_DESTINATION


def test_tampered_body() -> None:
    assert code_of(sign(), body=b"something else") is ErrorCode.DIGEST_MISMATCH


def test_unknown_and_retired_keys() -> None:
    public = bytes(KEY.verify_key)
    key_id = federation.relay_key_id(public)
    with pytest.raises(TetherlessError) as info:
        federation.select_relay_key([], key_id, 0)
    assert info.value.code is ErrorCode.UNKNOWN_RELAY_KEY
    retired = [RelayKey(key_id=key_id, public_key=public, valid_until_ms=1000)]
    assert federation.select_relay_key(retired, key_id, 999) == public
    with pytest.raises(TetherlessError) as info:
        federation.select_relay_key(retired, key_id, 1001)
    assert info.value.code is ErrorCode.UNKNOWN_RELAY_KEY
    # a published entry whose key id does not match its key is ignored
    lying = [RelayKey(key_id=key_id, public_key=bytes(32))]
    with pytest.raises(TetherlessError):
        federation.select_relay_key(lying, key_id, 0)


@pytest.mark.parametrize(
    "text",
    ['tl=("a"', 'tl=("a");created=1.5', "tl=(a b)x", 'tl="unterminated', "tl=?2", "Tl=1", "tl=1,", "tl=\x00"],
)
def test_structured_field_parser_rejects_garbage(text: str) -> None:
    with pytest.raises(TetherlessError) as info:
        federation.parse_dictionary(text)
    assert info.value.code is ErrorCode.BAD_SIGNATURE


def test_structured_field_round_trip() -> None:
    params: federation.Params = [("created", 5), ("nonce", 'a"b\\c'), ("flag", True)]
    text = federation.serialize_inner_list(["@method", "x"], params)
    member = federation.parse_dictionary("sig=" + text)["sig"]
    assert isinstance(member, federation.InnerList)
    assert member.params == params
    assert federation.serialize_inner_list([i for i, _ in member.items], member.params) == text  # type: ignore[misc]
