"""A software FIDO2 authenticator for tests (docs/crypto.md §15).

It produces the real bytes a platform authenticator and browser would:
``authenticatorData`` (rpIdHash, flags, counter, attested credential data with
an ES256 COSE key), a CBOR ``attestationObject`` (``none`` or ``packed`` self
attestation) and ``clientDataJSON``. Its output parses with fido2's own
classes; every knob exists to produce one of the invalid cases the tests need
(wrong origin, rp id or type, missing UP/UV, fixed counters, bad signatures).

Signatures use RFC 6979 deterministic ECDSA, so a fixed key gives fixed
vectors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.cose import ES256
from fido2.utils import websafe_encode
from fido2.webauthn import AttestedCredentialData, AuthenticatorData

from protocol.messages import WebAuthnAssertion, WebAuthnCredential, WebAuthnRegistration

FLAG_UP = 0x01
FLAG_UV = 0x04
FLAG_AT = 0x40
AAGUID = bytes.fromhex("7e57ab1e" * 4)


def client_data_json(kind: str, challenge: bytes, origin: str) -> bytes:
    """clientDataJSON as browsers write it (compact, in this key order)."""
    data = {"type": kind, "challenge": websafe_encode(challenge), "origin": origin, "crossOrigin": False}
    return json.dumps(data, separators=(",", ":")).encode()


@dataclass
class SoftAuthenticator:
    """One credential on a software authenticator.

    ``SoftAuthenticator(rp_id)`` makes a fresh P-256 key; pass ``private_value``
    for a fixed key (vectors). ``counter`` is the sign counter: it increments
    before every assertion unless ``fixed_counter`` (then it stays, e.g. 0 for
    authenticators without counters).
    """

    rp_id: str
    origin: str | None = None
    private_value: int | None = None
    credential_id: bytes = b""
    counter: int = 0
    fixed_counter: bool = False
    aaguid: bytes = AAGUID

    def __post_init__(self) -> None:
        if self.origin is None:
            self.origin = f"https://{self.rp_id}"
        if self.private_value is None:
            self._key = ec.generate_private_key(ec.SECP256R1())
        else:
            self._key = ec.derive_private_key(self.private_value, ec.SECP256R1())
        self.cose_key = ES256.from_cryptography_key(self._key.public_key())
        if not self.credential_id:
            self.credential_id = hashlib.sha256(cbor.encode(dict(self.cose_key))).digest()[:16]

    def _sign(self, message: bytes) -> bytes:
        return self._key.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))

    def public_key(self) -> bytes:
        """The credential's COSE_Key bytes (as in :attr:`WebAuthnCredential.public_key`)."""
        return cbor.encode(dict(self.cose_key))

    def credential(self, added_at_ms: int = 0) -> WebAuthnCredential:
        return WebAuthnCredential(
            credential_id=self.credential_id, public_key=self.public_key(), rp_id=self.rp_id, added_at_ms=added_at_ms
        )

    def _auth_data(self, rp_id: str | None, flags: int, counter: int, credential_data: bytes = b"") -> bytes:
        rp_hash = hashlib.sha256((rp_id if rp_id is not None else self.rp_id).encode()).digest()
        return bytes(AuthenticatorData.create(rp_hash, AuthenticatorData.FLAG(flags), counter, credential_data))

    def make_credential(
        self,
        challenge: bytes,
        *,
        fmt: str = "none",
        user_verified: bool = False,
        user_present: bool = True,
        origin: str | None = None,
        rp_id: str | None = None,
        kind: str = "webauthn.create",
    ) -> WebAuthnRegistration:
        """A ``create`` response: attestation ``none`` or ``packed`` self attestation."""
        client_data = client_data_json(kind, challenge, origin if origin is not None else self.origin or "")
        attested = AttestedCredentialData.create(self.aaguid, self.credential_id, self.cose_key)
        flags = FLAG_AT | (FLAG_UP if user_present else 0) | (FLAG_UV if user_verified else 0)
        auth_data = self._auth_data(rp_id, flags, self.counter, bytes(attested))
        if fmt == "none":
            statement: dict[str, object] = {}
        elif fmt == "packed":
            signature = self._sign(auth_data + hashlib.sha256(client_data).digest())
            statement = {"alg": ES256.ALGORITHM, "sig": signature}
        else:
            raise ValueError(f"unsupported attestation format {fmt!r}")
        attestation_object = cbor.encode({"fmt": fmt, "authData": auth_data, "attStmt": statement})
        return WebAuthnRegistration(
            credential_id=self.credential_id, client_data_json=client_data, attestation_object=attestation_object
        )

    def get_assertion(
        self,
        challenge: bytes,
        *,
        user_verified: bool = False,
        user_present: bool = True,
        counter: int | None = None,
        origin: str | None = None,
        rp_id: str | None = None,
        kind: str = "webauthn.get",
    ) -> WebAuthnAssertion:
        """A ``get`` assertion over ``challenge`` (for a device list: its ``list_hash``).

        ``counter`` overrides the sign counter for this assertion only.
        """
        if counter is None:
            if not self.fixed_counter:
                self.counter += 1
            counter = self.counter
        client_data = client_data_json(kind, challenge, origin if origin is not None else self.origin or "")
        flags = (FLAG_UP if user_present else 0) | (FLAG_UV if user_verified else 0)
        auth_data = self._auth_data(rp_id, flags, counter)
        signature = self._sign(auth_data + hashlib.sha256(client_data).digest())
        return WebAuthnAssertion(
            credential_id=self.credential_id,
            authenticator_data=auth_data,
            client_data_json=client_data,
            signature=signature,
        )
