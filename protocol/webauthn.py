"""WebAuthn / FIDO2 checks shared by the relay and clients (docs/crypto.md §6).

Pure: no I/O, no clock, no randomness. The parsing is fido2's
(:class:`~fido2.webauthn.AuthenticatorData`,
:class:`~fido2.webauthn.CollectedClientData`,
:class:`~fido2.webauthn.AttestationObject`, :class:`~fido2.cose.CoseKey`,
:func:`~fido2.rpid.verify_rp_id`); this module decides what must hold and
turns every failure, including malformed CBOR or JSON from an attacker, into
one :class:`~protocol.errors.TetherlessError` ``webauthn_invalid``.

What is *not* checked here is the sign counter against a stored value: the
caller compares :attr:`AssertionResult.sign_count` (the relay with its store,
clients along the chain, :mod:`protocol.device_list`).

fido2 is imported inside the functions that parse WebAuthn data, not at module
level: it pulls in cryptography.x509 and the attestation formats (~150-220 ms
of CPU at start-up), and :mod:`protocol.device_list` imports this module for
every chain it checks, including the many that hold no credential (``send``,
``sync``). A list with a credential pays the import once, on first use.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from .errors import ErrorCode, TetherlessError
from .messages import WebAuthnAssertion, WebAuthnCredential

if TYPE_CHECKING:
    from fido2.cose import CoseKey
    from fido2.webauthn import AuthenticatorData, CollectedClientData

# ES256, EdDSA and the fully specified Ed25519 (docs/crypto.md §0).
ALLOWED_ALGORITHMS: Final = (-7, -8, -19)
ATTESTATION_FORMATS: Final = ("none", "packed")


def _invalid(why: str) -> TetherlessError:
    return TetherlessError(ErrorCode.WEBAUTHN_INVALID, why)


@dataclass(frozen=True, slots=True)
class AssertionResult:
    """What a verified assertion says: its sign counter and flags."""

    sign_count: int
    user_verified: bool
    backup_eligible: bool = False
    backed_up: bool = False


@dataclass(frozen=True, slots=True)
class RegisteredCredential:
    """A verified registration: the credential to put in a device list, and what the relay stores beside it."""

    credential: WebAuthnCredential
    sign_count: int
    user_verified: bool
    aaguid: bytes
    attestation_format: str
    # "none", "self" (packed without certificate) or "basic" (packed with x5c, chain NOT checked here)
    attestation_type: str
    backup_eligible: bool
    backed_up: bool


class RegistrationLike(Protocol):
    """Anything with the three fields of a ``WebAuthnRegistration`` message."""

    @property
    def credential_id(self) -> bytes: ...

    @property
    def client_data_json(self) -> bytes: ...

    @property
    def attestation_object(self) -> bytes: ...


def parse_public_key(cose_key: bytes) -> CoseKey:
    """Decode a COSE_Key (CBOR map) with an allowed algorithm. Raises ``webauthn_invalid``."""
    from fido2 import cbor  # deferred: see the module doc
    from fido2.cose import CoseKey

    try:
        decoded = cbor.decode(cose_key)
        if not isinstance(decoded, Mapping):
            raise ValueError("not a CBOR map")
        key = CoseKey.parse(decoded)
    except Exception as exc:  # attacker bytes through a third-party parser (incl. RecursionError)
        raise _invalid("credential public key is not a COSE key") from exc
    if key.ALGORITHM not in ALLOWED_ALGORITHMS:
        raise _invalid(f"credential algorithm {decoded.get(3)!r} is not allowed")
    return key


def encode_public_key(key: CoseKey) -> bytes:
    """The canonical CBOR bytes of a COSE key, as stored in :attr:`WebAuthnCredential.public_key`."""
    from fido2 import cbor  # deferred: see the module doc

    return cbor.encode(dict(key))


def _client_data(raw: bytes, expected_type: str, challenge: bytes, rp_id: str) -> CollectedClientData:
    from fido2.rpid import verify_rp_id  # deferred: see the module doc
    from fido2.webauthn import CollectedClientData

    try:
        client_data = CollectedClientData(raw)
        kind, origin, got_challenge = client_data.type, client_data.origin, client_data.challenge
        if not isinstance(kind, str) or not isinstance(origin, str):
            raise ValueError("type and origin are strings")
        origin_ok = verify_rp_id(rp_id, origin)
    except Exception as exc:  # malformed JSON, base64 or URL from an attacker
        raise _invalid("clientDataJSON is malformed") from exc
    if kind != expected_type:
        raise _invalid(f"clientDataJSON type is not {expected_type}")
    if not hmac.compare_digest(got_challenge, challenge):
        raise _invalid("clientDataJSON challenge does not match")
    if not origin_ok:
        raise _invalid(f"origin is not valid for rp id {rp_id!r}")
    return client_data


def _check_flags(auth_data: AuthenticatorData, rp_id: str, require_user_verification: bool) -> None:
    if not hmac.compare_digest(auth_data.rp_id_hash, hashlib.sha256(rp_id.encode("utf-8")).digest()):
        raise _invalid("rpIdHash does not match the rp id")
    if not auth_data.is_user_present():
        raise _invalid("the user-present flag is not set")
    if require_user_verification and not auth_data.is_user_verified():
        raise _invalid("user verification is required but the UV flag is not set")


def verify_assertion(
    credential: WebAuthnCredential,
    assertion: WebAuthnAssertion,
    *,
    challenge: bytes,
    require_user_verification: bool,
) -> AssertionResult:
    """Check a WebAuthn ``get`` assertion by ``credential`` over ``challenge``.

    Checks (docs/crypto.md §6): the credential ids match, clientDataJSON type
    ``webauthn.get``, its challenge, its origin against ``credential.rp_id``
    (``verify_rp_id``: https and the rp id or a subdomain; ``http://localhost``
    for tests), rpIdHash = SHA-256(rp id), UP, UV when required, and the
    signature over ``authenticator_data ‖ SHA-256(client_data_json)`` with
    the credential's COSE key. Raises ``webauthn_invalid`` for any failure,
    malformed input included. The sign counter is returned, not judged.
    """
    from fido2.webauthn import AuthenticatorData  # deferred: see the module doc

    if not hmac.compare_digest(assertion.credential_id, credential.credential_id):
        raise _invalid("the assertion is by another credential")
    key = parse_public_key(credential.public_key)
    client_data = _client_data(assertion.client_data_json, "webauthn.get", challenge, credential.rp_id)
    try:
        auth_data = AuthenticatorData(assertion.authenticator_data)
    except Exception as exc:  # truncated or trailing bytes, bad extension CBOR
        raise _invalid("authenticatorData is malformed") from exc
    _check_flags(auth_data, credential.rp_id, require_user_verification)
    try:
        key.verify(assertion.authenticator_data + client_data.hash, assertion.signature)
    except Exception as exc:  # cryptography's InvalidSignature, or a key/signature that does not parse
        raise _invalid("assertion signature does not verify") from exc
    return AssertionResult(
        sign_count=auth_data.counter,
        user_verified=auth_data.is_user_verified(),
        backup_eligible=auth_data.is_backup_eligible(),
        backed_up=auth_data.is_backed_up(),
    )


def verify_registration(
    registration: RegistrationLike,
    *,
    challenge: bytes,
    rp_id: str,
    added_at_ms: int,
    require_user_verification: bool = False,
    attestation_formats: tuple[str, ...] = ATTESTATION_FORMATS,
) -> RegisteredCredential:
    """Check a WebAuthn ``create`` response and return the new credential.

    Checks clientDataJSON (type ``webauthn.create``, challenge, origin for
    ``rp_id``), the attestation object (rpIdHash, UP, UV when required,
    attested credential data whose id is ``registration.credential_id``, an
    allowed algorithm) and the attestation statement with fido2's verifier
    for its format (``none``, or ``packed``: self attestation is verified
    with the credential key; with a certificate the signature is verified but
    the certificate chain is left to the caller's trust list). Raises
    ``webauthn_invalid``.
    """
    from fido2.attestation.base import NoneAttestation  # deferred: see the module doc
    from fido2.attestation.packed import PackedAttestation
    from fido2.webauthn import AttestationObject

    client_data = _client_data(registration.client_data_json, "webauthn.create", challenge, rp_id)
    try:
        attestation = AttestationObject(registration.attestation_object)
        fmt = attestation.fmt
        auth_data = attestation.auth_data
        statement: Any = attestation.att_stmt
    except Exception as exc:  # malformed CBOR, missing keys, bad authData
        raise _invalid("attestationObject is malformed") from exc
    if not isinstance(fmt, str) or fmt not in attestation_formats:
        raise _invalid(f"attestation format {fmt!r} is not accepted")
    _check_flags(auth_data, rp_id, require_user_verification)
    credential_data = auth_data.credential_data
    if credential_data is None:
        raise _invalid("attestationObject has no attested credential data")
    if not hmac.compare_digest(credential_data.credential_id, registration.credential_id):
        raise _invalid("credential id does not match the attested credential data")
    if not 1 <= len(credential_data.credential_id) <= 1023:
        raise _invalid("credential id length is out of range")
    public_key = encode_public_key(credential_data.public_key)
    parse_public_key(public_key)  # allowed algorithm, well formed
    verifier = NoneAttestation() if fmt == "none" else PackedAttestation()
    try:
        result = verifier.verify(statement, auth_data, client_data.hash)
    except Exception as exc:  # fido2's InvalidAttestation family, or malformed statements
        raise _invalid(f"{fmt} attestation does not verify") from exc
    attestation_type = {0: "none", 1: "basic", 2: "self"}.get(int(result.attestation_type), "other")
    credential = WebAuthnCredential(
        credential_id=bytes(credential_data.credential_id),
        public_key=public_key,
        rp_id=rp_id,
        added_at_ms=added_at_ms,
    )
    return RegisteredCredential(
        credential=credential,
        sign_count=auth_data.counter,
        user_verified=auth_data.is_user_verified(),
        aaguid=bytes(credential_data.aaguid),
        attestation_format=fmt,
        attestation_type=attestation_type,
        backup_eligible=auth_data.is_backup_eligible(),
        backed_up=auth_data.is_backed_up(),
    )
