"""protocol.webauthn against the software authenticator, and the authenticator against fido2's own parsers."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from fido2 import cbor
from fido2.attestation.base import InvalidSignature, NoneAttestation
from fido2.attestation.packed import PackedAttestation
from fido2.cose import ES384, CoseKey, EdDSA
from fido2.webauthn import AttestationObject, AuthenticatorData, CollectedClientData
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import webauthn
from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import WebAuthnAssertion, WebAuthnCredential
from tests.support.soft_authenticator import SoftAuthenticator, client_data_json

RP = "relay.example"
CHALLENGE = hashlib.sha256(b"a list hash").digest()


def invalid(call: object, *args: object, **kwargs: object) -> TetherlessError:
    assert callable(call)
    with pytest.raises(TetherlessError) as info:
        call(*args, **kwargs)
    assert info.value.code is ErrorCode.WEBAUTHN_INVALID
    return info.value


def refused(detail: str, call: object, *args: object, **kwargs: object) -> None:
    """``webauthn_invalid`` with exactly this detail: the check that refused is the one the test names."""
    assert invalid(call, *args, **kwargs).detail == detail


def check(auth: SoftAuthenticator, assertion: WebAuthnAssertion, *, uv: bool = False) -> webauthn.AssertionResult:
    return webauthn.verify_assertion(auth.credential(), assertion, challenge=CHALLENGE, require_user_verification=uv)


# -- the software authenticator speaks real WebAuthn ------------------------------------------------


@pytest.mark.parametrize("fmt", ["none", "packed"])
def test_registration_parses_with_fido2(fmt: str) -> None:
    auth = SoftAuthenticator(RP, counter=7)
    registration = auth.make_credential(CHALLENGE, fmt=fmt, user_verified=True)
    attestation = AttestationObject(registration.attestation_object)
    assert attestation.fmt == fmt
    data = attestation.auth_data
    assert data.rp_id_hash == hashlib.sha256(RP.encode()).digest()
    assert (data.is_user_present(), data.is_user_verified(), data.is_attested()) == (True, True, True)
    assert data.counter == 7
    assert data.credential_data is not None
    assert data.credential_data.credential_id == auth.credential_id
    assert data.credential_data.public_key == auth.cose_key
    client_data = CollectedClientData(registration.client_data_json)
    assert (client_data.type, client_data.challenge, client_data.origin) == (
        "webauthn.create",
        CHALLENGE,
        f"https://{RP}",
    )
    verifier = PackedAttestation() if fmt == "packed" else NoneAttestation()
    result = verifier.verify(attestation.att_stmt, data, client_data.hash)
    assert result.trust_path == []


def test_packed_self_attestation_with_a_wrong_signature_fails_in_fido2() -> None:
    auth = SoftAuthenticator(RP)
    registration = auth.make_credential(CHALLENGE, fmt="packed")
    attestation = AttestationObject(registration.attestation_object)
    other_hash = hashlib.sha256(b"other client data").digest()
    with pytest.raises(InvalidSignature):
        PackedAttestation().verify(attestation.att_stmt, attestation.auth_data, other_hash)


def test_assertion_parses_with_fido2_and_verifies_with_the_cose_key() -> None:
    auth = SoftAuthenticator(RP)
    assertion = auth.get_assertion(CHALLENGE, user_verified=True)
    data = AuthenticatorData(assertion.authenticator_data)
    assert (data.is_user_present(), data.is_user_verified(), data.is_attested()) == (True, True, False)
    assert data.counter == 1
    key = CoseKey.parse(cbor.decode(auth.public_key()))
    key.verify(assertion.authenticator_data + CollectedClientData(assertion.client_data_json).hash, assertion.signature)


def test_counter_increments_unless_fixed() -> None:
    auth = SoftAuthenticator(RP)
    assert [check(auth, auth.get_assertion(CHALLENGE)).sign_count for _ in range(3)] == [1, 2, 3]
    fixed = SoftAuthenticator(RP, fixed_counter=True)
    assert [check(fixed, fixed.get_assertion(CHALLENGE)).sign_count for _ in range(2)] == [0, 0]
    assert check(auth, auth.get_assertion(CHALLENGE, counter=1)).sign_count == 1


def test_fixed_key_is_deterministic() -> None:
    a, b = SoftAuthenticator(RP, private_value=42), SoftAuthenticator(RP, private_value=42)
    assert a.credential() == b.credential()
    assert a.get_assertion(CHALLENGE) == b.get_assertion(CHALLENGE)


# -- assertions ------------------------------------------------------------------------------------


def test_valid_assertion() -> None:
    auth = SoftAuthenticator(RP)
    result = check(auth, auth.get_assertion(CHALLENGE, user_verified=True), uv=True)
    assert result == webauthn.AssertionResult(sign_count=1, user_verified=True)


@pytest.mark.parametrize("origin", [f"https://login.{RP}", f"https://{RP}:8443"])
def test_subdomain_and_port_origins_are_accepted(origin: str) -> None:
    auth = SoftAuthenticator(RP)
    check(auth, auth.get_assertion(CHALLENGE, origin=origin))


def test_localhost_over_http_is_accepted_for_tests() -> None:
    auth = SoftAuthenticator("localhost", origin="http://localhost:8080")
    check(auth, auth.get_assertion(CHALLENGE))


@pytest.mark.parametrize(
    "origin",
    [f"http://{RP}", "https://evil.example", f"https://{RP}.evil.example", "https://example", "not a url", ""],
)
def test_wrong_origin(origin: str) -> None:
    auth = SoftAuthenticator(RP)
    refused(f"origin is not valid for rp id {RP!r}", check, auth, auth.get_assertion(CHALLENGE, origin=origin))


def test_wrong_challenge() -> None:
    auth = SoftAuthenticator(RP)
    other = hashlib.sha256(b"another list").digest()
    refused("clientDataJSON challenge does not match", check, auth, auth.get_assertion(other))


def test_wrong_rp_id_hash() -> None:
    auth = SoftAuthenticator(RP)
    refused("rpIdHash does not match the rp id", check, auth, auth.get_assertion(CHALLENGE, rp_id="evil.example"))


def test_credential_for_another_rp_id() -> None:
    auth = SoftAuthenticator(RP)
    credential = msgspec.structs.replace(auth.credential(), rp_id="other.example")
    refused(
        "origin is not valid for rp id 'other.example'",
        webauthn.verify_assertion,
        credential,
        auth.get_assertion(CHALLENGE),
        challenge=CHALLENGE,
        require_user_verification=False,
    )


def test_wrong_type() -> None:
    auth = SoftAuthenticator(RP)
    refused(
        "clientDataJSON type is not webauthn.get", check, auth, auth.get_assertion(CHALLENGE, kind="webauthn.create")
    )


def test_missing_user_presence() -> None:
    auth = SoftAuthenticator(RP)
    refused("the user-present flag is not set", check, auth, auth.get_assertion(CHALLENGE, user_present=False))


def test_missing_user_verification_when_required() -> None:
    auth = SoftAuthenticator(RP)
    assertion = auth.get_assertion(CHALLENGE)
    assert check(auth, assertion).user_verified is False
    refused("user verification is required but the UV flag is not set", check, auth, assertion, uv=True)


def test_bad_signature() -> None:
    auth = SoftAuthenticator(RP)
    good = auth.get_assertion(CHALLENGE)
    other = SoftAuthenticator(RP, credential_id=auth.credential_id).get_assertion(CHALLENGE)
    for assertion in (
        msgspec.structs.replace(good, signature=other.signature),
        msgspec.structs.replace(good, signature=b""),
        msgspec.structs.replace(good, signature=b"\x30" * 70),
        msgspec.structs.replace(good, authenticator_data=good.authenticator_data[:-1] + b"\x07"),
    ):
        refused("assertion signature does not verify", check, auth, assertion)


def test_changed_client_data_breaks_the_signature() -> None:
    auth = SoftAuthenticator(RP)
    good = auth.get_assertion(CHALLENGE)
    data = json.loads(good.client_data_json)
    data["extra"] = "x"
    changed = msgspec.structs.replace(good, client_data_json=json.dumps(data).encode())
    refused("assertion signature does not verify", check, auth, changed)


def test_unknown_credential() -> None:
    auth, other = SoftAuthenticator(RP), SoftAuthenticator(RP)
    refused("the assertion is by another credential", check, auth, other.get_assertion(CHALLENGE))


NOT_COSE = "credential public key is not a COSE key"


@pytest.mark.parametrize(
    ("public_key", "detail"),
    [
        (b"", NOT_COSE),
        (b"\xff", NOT_COSE),
        (cbor.encode([1, 2]), NOT_COSE),
        (cbor.encode({1: 2}), NOT_COSE),
        (
            cbor.encode(dict(ES384.from_cryptography_key(ec.generate_private_key(ec.SECP384R1()).public_key()))),
            "credential algorithm -35 is not allowed",
        ),
        (cbor.encode({1: 2, 3: -7, -1: 1}), "assertion signature does not verify"),  # parses; no usable point
    ],
)
def test_bad_or_disallowed_public_keys(public_key: bytes, detail: str) -> None:
    auth = SoftAuthenticator(RP)
    credential = msgspec.structs.replace(auth.credential(), public_key=public_key or b"\x00")
    refused(
        detail,
        webauthn.verify_assertion,
        credential,
        auth.get_assertion(CHALLENGE),
        challenge=CHALLENGE,
        require_user_verification=False,
    )


def test_eddsa_credentials_are_allowed() -> None:
    private = ed25519.Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)
    key = EdDSA.from_cryptography_key(private.public_key())
    credential = WebAuthnCredential(credential_id=b"ed", public_key=cbor.encode(dict(key)), rp_id=RP, added_at_ms=0)
    client_data = client_data_json("webauthn.get", CHALLENGE, f"https://{RP}")
    auth_data = bytes(AuthenticatorData.create(hashlib.sha256(RP.encode()).digest(), AuthenticatorData.FLAG.UP, 5))
    signature = private.sign(auth_data + hashlib.sha256(client_data).digest())
    assertion = WebAuthnAssertion(
        credential_id=b"ed", authenticator_data=auth_data, client_data_json=client_data, signature=signature
    )
    result = webauthn.verify_assertion(credential, assertion, challenge=CHALLENGE, require_user_verification=False)
    assert result.sign_count == 5


@pytest.mark.parametrize(
    "client_data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b"{}",
        b'{"type":"webauthn.get"}',
        b'{"type":1,"challenge":"","origin":"https://relay.example"}',
        b'{"type":"webauthn.get","challenge":"","origin":["x"]}',
        b'{"type":"webauthn.get","challenge":"","origin":"https://[::1"}',
        b"[" * 3000 + b"]" * 3000,
    ],
)
def test_malformed_client_data(client_data: bytes) -> None:
    auth = SoftAuthenticator(RP)
    assertion = msgspec.structs.replace(auth.get_assertion(CHALLENGE), client_data_json=client_data)
    refused("clientDataJSON is malformed", check, auth, assertion)


def test_undecodable_challenge_is_a_challenge_mismatch() -> None:
    # fido2 decodes "***" leniently (to nothing): it is refused, by the challenge comparison.
    auth = SoftAuthenticator(RP)
    client_data = b'{"type":"webauthn.get","challenge":"***","origin":"https://relay.example"}'
    assertion = msgspec.structs.replace(auth.get_assertion(CHALLENGE), client_data_json=client_data)
    refused("clientDataJSON challenge does not match", check, auth, assertion)


@pytest.mark.parametrize("cut", [0, 1, 32, 36])
def test_truncated_authenticator_data(cut: int) -> None:
    auth = SoftAuthenticator(RP)
    good = auth.get_assertion(CHALLENGE)
    truncated = msgspec.structs.replace(good, authenticator_data=good.authenticator_data[:cut])
    refused("authenticatorData is malformed", check, auth, truncated)


def test_authenticator_data_with_trailing_bytes_or_missing_extensions() -> None:
    auth = SoftAuthenticator(RP)
    good = auth.get_assertion(CHALLENGE)
    check(auth, good)
    trailing = msgspec.structs.replace(good, authenticator_data=good.authenticator_data + b"\x00")
    refused("authenticatorData is malformed", check, auth, trailing)
    flagged = bytearray(good.authenticator_data)
    flagged[32] |= 0x80  # ED: extension CBOR should follow, nothing does
    refused(
        "authenticatorData is malformed", check, auth, msgspec.structs.replace(good, authenticator_data=bytes(flagged))
    )


@settings(max_examples=200, deadline=None)
@given(
    authenticator_data=st.binary(max_size=200),
    client_data=st.binary(max_size=200) | st.just(client_data_json("webauthn.get", CHALLENGE, f"https://{RP}")),
    signature=st.binary(max_size=80),
)
def test_garbage_only_ever_raises_webauthn_invalid(
    authenticator_data: bytes, client_data: bytes, signature: bytes
) -> None:
    auth = SoftAuthenticator(RP, private_value=3)
    assertion = WebAuthnAssertion(
        credential_id=auth.credential_id,
        authenticator_data=authenticator_data,
        client_data_json=client_data,
        signature=signature,
    )
    invalid(check, auth, assertion)


@settings(max_examples=100, deadline=None)
@given(public_key=st.binary(min_size=1, max_size=300))
def test_garbage_keys_only_ever_raise_webauthn_invalid(public_key: bytes) -> None:
    invalid(webauthn.parse_public_key, public_key)


# -- registrations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "kind"), [("none", "none"), ("packed", "self")])
def test_registration(fmt: str, kind: str) -> None:
    auth = SoftAuthenticator(RP, counter=3)
    result = webauthn.verify_registration(
        auth.make_credential(CHALLENGE, fmt=fmt, user_verified=True),
        challenge=CHALLENGE,
        rp_id=RP,
        added_at_ms=99,
        require_user_verification=True,
    )
    assert result.credential == auth.credential(99)
    assert (result.sign_count, result.user_verified, result.attestation_format, result.attestation_type) == (
        3,
        True,
        fmt,
        kind,
    )
    assert result.aaguid == auth.aaguid
    # and the credential it returns verifies the authenticator's assertions
    webauthn.verify_assertion(
        result.credential, auth.get_assertion(CHALLENGE), challenge=CHALLENGE, require_user_verification=False
    )


def _register(registration: object, *, uv: bool = False, formats: tuple[str, ...] = ("none", "packed")) -> None:
    webauthn.verify_registration(
        registration,  # type: ignore[arg-type]
        challenge=CHALLENGE,
        rp_id=RP,
        added_at_ms=0,
        require_user_verification=uv,
        attestation_formats=formats,
    )


def test_registration_rejections() -> None:
    auth = SoftAuthenticator(RP)
    make = auth.make_credential
    refused("clientDataJSON challenge does not match", _register, make(b"other challenge"))
    refused(f"origin is not valid for rp id {RP!r}", _register, make(CHALLENGE, origin="https://evil.example"))
    refused("rpIdHash does not match the rp id", _register, make(CHALLENGE, rp_id="evil.example"))
    refused("clientDataJSON type is not webauthn.create", _register, make(CHALLENGE, kind="webauthn.get"))
    refused("the user-present flag is not set", _register, make(CHALLENGE, user_present=False))
    refused("user verification is required but the UV flag is not set", _register, make(CHALLENGE), uv=True)
    refused("attestation format 'packed' is not accepted", _register, make(CHALLENGE, fmt="packed"), formats=("none",))
    good = make(CHALLENGE, fmt="packed")
    refused(
        "credential id does not match the attested credential data",
        _register,
        msgspec.structs.replace(good, credential_id=b"another id"),
    )
    for garbage in (b"\xa0", b"garbage"):
        refused("attestationObject is malformed", _register, msgspec.structs.replace(good, attestation_object=garbage))
    refused("clientDataJSON is malformed", _register, msgspec.structs.replace(good, client_data_json=b"{}"))
    # a packed statement whose signature covers other client data
    other = make(hashlib.sha256(b"x").digest(), fmt="packed")
    refused(
        "packed attestation does not verify",
        _register,
        msgspec.structs.replace(other, client_data_json=good.client_data_json),
    )
    # a "none" statement that is not empty
    attestation = cbor.decode(make(CHALLENGE).attestation_object)
    assert isinstance(attestation, dict)
    attestation["attStmt"] = {"sig": b"x"}
    refused(
        "none attestation does not verify",
        _register,
        msgspec.structs.replace(good, attestation_object=cbor.encode(attestation)),
    )
    # an unknown format
    attestation["fmt"] = "tpm"
    refused(
        "attestation format 'tpm' is not accepted",
        _register,
        msgspec.structs.replace(good, attestation_object=cbor.encode(attestation)),
    )


@pytest.mark.parametrize(("length", "accepted"), [(1, True), (1023, True), (1024, False)])
def test_registration_credential_id_length(length: int, accepted: bool) -> None:
    auth = SoftAuthenticator(RP, credential_id=b"c" * length)
    registration = auth.make_credential(CHALLENGE)
    if accepted:
        _register(registration)
    else:
        refused("credential id length is out of range", _register, registration)


def test_registration_does_not_require_user_verification_by_default() -> None:
    auth = SoftAuthenticator(RP)
    result = webauthn.verify_registration(
        auth.make_credential(CHALLENGE, user_verified=False), challenge=CHALLENGE, rp_id=RP, added_at_ms=0
    )
    assert result.user_verified is False


def test_registration_without_attested_credential_data() -> None:
    auth = SoftAuthenticator(RP)
    registration = auth.make_credential(CHALLENGE)
    attestation = cbor.decode(registration.attestation_object)
    assert isinstance(attestation, dict)
    attestation["authData"] = bytes(
        AuthenticatorData.create(hashlib.sha256(RP.encode()).digest(), AuthenticatorData.FLAG.UP, 0)
    )
    refused(
        "attestationObject has no attested credential data",
        _register,
        msgspec.structs.replace(registration, attestation_object=cbor.encode(attestation)),
    )


@pytest.mark.parametrize(("flags", "expected"), [(0x08, (True, False)), (0x18, (True, True))])
def test_backup_flags_are_reported(flags: int, expected: tuple[bool, bool]) -> None:
    """BE (0x08) and BS (0x10) from authenticatorData, in a registration and in an assertion."""
    auth = SoftAuthenticator(RP)
    registration = auth.make_credential(CHALLENGE)
    attestation = cbor.decode(registration.attestation_object)
    assert isinstance(attestation, dict)
    data = AuthenticatorData(attestation["authData"])
    assert data.credential_data is not None
    attestation["authData"] = bytes(
        AuthenticatorData.create(
            data.rp_id_hash, AuthenticatorData.FLAG(data.flags | flags), data.counter, bytes(data.credential_data)
        )
    )
    registered = webauthn.verify_registration(
        msgspec.structs.replace(registration, attestation_object=cbor.encode(attestation)),
        challenge=CHALLENGE,
        rp_id=RP,
        added_at_ms=0,
    )
    assert (registered.backup_eligible, registered.backed_up) == expected
    private = ed25519.Ed25519PrivateKey.from_private_bytes(b"\x06" * 32)
    key = EdDSA.from_cryptography_key(private.public_key())
    credential = WebAuthnCredential(credential_id=b"ed", public_key=cbor.encode(dict(key)), rp_id=RP, added_at_ms=0)
    client_data = client_data_json("webauthn.get", CHALLENGE, f"https://{RP}")
    auth_data = bytes(
        AuthenticatorData.create(
            hashlib.sha256(RP.encode()).digest(), AuthenticatorData.FLAG(AuthenticatorData.FLAG.UP | flags), 1
        )
    )
    assertion = WebAuthnAssertion(
        credential_id=b"ed",
        authenticator_data=auth_data,
        client_data_json=client_data,
        signature=private.sign(auth_data + hashlib.sha256(client_data).digest()),
    )
    result = webauthn.verify_assertion(credential, assertion, challenge=CHALLENGE, require_user_verification=False)
    assert (result.backup_eligible, result.backed_up) == expected
