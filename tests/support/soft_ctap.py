"""A software CTAP2 security key for CLI tests: what python-fido2's ``Fido2Client`` talks to over USB HID.

:class:`SoftCtapDevice` answers the CTAP2 CBOR commands a WebAuthn client sends (``authenticatorGetInfo``,
``authenticatorMakeCredential``, ``authenticatorGetAssertion`` incl. the silent ``up: false`` pre-flight
that filters allow lists) with real bytes: authenticator data, ``none`` attestation, ES256 signatures over
``authenticatorData ‖ clientDataHash``. Its one credential, P-256 key and sign counter live in a JSON file,
so the key "stays plugged in" across the separate ``tetherless`` processes of an e2e test.

The CLI finds it through ``TETHERLESS_FIDO2_DEVICES=tests.support.soft_ctap:devices``; :func:`devices` reads
the state file named by ``TETHERLESS_SOFT_CTAP`` (none set: no key is plugged in). Knobs in the file, for the
refusal tests: ``sign_rp_id`` (authenticator data hashed over another rp id), and copying the file makes a
clone whose counter lags behind the original's.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from threading import Event
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.cose import ES256
from fido2.ctap import STATUS, CtapDevice, CtapError
from fido2.hid import CAPABILITY, CTAPHID
from fido2.webauthn import AttestedCredentialData, AuthenticatorData

STATE_ENV = "TETHERLESS_SOFT_CTAP"
AAGUID = bytes.fromhex("50f7c7a9" * 4)

_MAKE_CREDENTIAL, _GET_ASSERTION, _GET_INFO, _SELECTION = 0x01, 0x02, 0x04, 0x0B
_FLAG_UP, _FLAG_AT = 0x01, 0x40


def _ok(response: Mapping[int, Any] | None = None) -> bytes:
    return b"\x00" + (cbor.encode(dict(response)) if response else b"")


def _error(code: CtapError.ERR) -> bytes:
    return bytes([int(code)])


class SoftCtapDevice(CtapDevice):
    """One software security key whose state (credential, key, counter) is the JSON file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.touches = 0  # user-presence prompts answered, for tests

    # -- the state file ---------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            state = {}
        return state

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        tmp.replace(self.path)

    @staticmethod
    def _key(state: Mapping[str, Any]) -> ec.EllipticCurvePrivateKey:
        return ec.derive_private_key(int(state["private_value"]), ec.SECP256R1())

    # -- CtapDevice ----------------------------------------------------------------------------------

    @property
    def capabilities(self) -> int:
        return int(CAPABILITY.CBOR)

    @classmethod
    def list_devices(cls) -> Iterator[CtapDevice]:
        yield from devices()

    def call(
        self,
        cmd: int,
        data: bytes = b"",
        event: Event | None = None,
        on_keepalive: Callable[[STATUS], None] | None = None,
    ) -> bytes:
        if cmd != CTAPHID.CBOR or not data:
            raise CtapError(CtapError.ERR.INVALID_COMMAND)
        command = data[0]
        request: Mapping[int, Any] = cbor.decode(data[1:]) if len(data) > 1 else {}
        if command == _GET_INFO:
            return _ok({1: ["FIDO_2_0"], 3: AAGUID, 4: {"rk": False, "up": True, "plat": False}, 5: 1200})
        if command == _SELECTION:
            self._touch(on_keepalive)
            return _ok()
        if command == _MAKE_CREDENTIAL:
            return self._make_credential(request, on_keepalive)
        if command == _GET_ASSERTION:
            return self._get_assertion(request, on_keepalive)
        return _error(CtapError.ERR.INVALID_COMMAND)

    def _touch(self, on_keepalive: Callable[[STATUS], None] | None) -> None:
        # A real key sends UPNEEDED keep-alives while it blinks; the client prompts the user on the first one.
        if on_keepalive is not None:
            on_keepalive(STATUS.UPNEEDED)
        self.touches += 1

    def _auth_data(self, state: Mapping[str, Any], flags: int, counter: int, attested: bytes = b"") -> bytes:
        rp_id = str(state.get("sign_rp_id") or state["rp_id"])
        rp_hash = hashlib.sha256(rp_id.encode()).digest()
        return bytes(AuthenticatorData.create(rp_hash, AuthenticatorData.FLAG(flags), counter, attested))

    def _make_credential(self, request: Mapping[int, Any], on_keepalive: Callable[[STATUS], None] | None) -> bytes:
        client_data_hash, rp = request[1], request[2]
        if not any(p.get("alg") == ES256.ALGORITHM for p in request[4]):
            return _error(CtapError.ERR.UNSUPPORTED_ALGORITHM)
        state = self._state()
        self._touch(on_keepalive)
        excluded = {bytes(c["id"]) for c in request.get(5) or []}
        if state.get("credential_id") and bytes.fromhex(state["credential_id"]) in excluded:
            return _error(CtapError.ERR.CREDENTIAL_EXCLUDED)
        key = ec.generate_private_key(ec.SECP256R1())
        cose = ES256.from_cryptography_key(key.public_key())
        credential_id = secrets.token_bytes(16)
        state.update(
            rp_id=rp["id"],
            credential_id=credential_id.hex(),
            private_value=key.private_numbers().private_value,
            counter=int(state.get("counter", 0)),
        )
        attested = bytes(AttestedCredentialData.create(AAGUID, credential_id, cose))
        auth_data = self._auth_data(state, _FLAG_UP | _FLAG_AT, state["counter"], attested)
        del client_data_hash  # "none" attestation signs nothing
        self._save(state)
        return _ok({1: "none", 2: auth_data, 3: {}})

    def _get_assertion(self, request: Mapping[int, Any], on_keepalive: Callable[[STATUS], None] | None) -> bytes:
        rp_id, client_data_hash = request[1], request[2]
        allowed = {bytes(c["id"]) for c in request.get(3) or []}
        user_presence = bool((request.get(5) or {}).get("up", True))
        state = self._state()
        ours = bytes.fromhex(state["credential_id"]) if state.get("credential_id") else b""
        if user_presence:
            self._touch(on_keepalive)
        if not ours or rp_id != state.get("rp_id") or (allowed and ours not in allowed):
            return _error(CtapError.ERR.NO_CREDENTIALS)
        counter = int(state["counter"])
        if user_presence:  # the silent pre-flight does not count as a use
            counter += 1
            state["counter"] = counter
            self._save(state)
        auth_data = self._auth_data(state, _FLAG_UP if user_presence else 0, counter)
        signature = self._key(state).sign(auth_data + client_data_hash, ec.ECDSA(hashes.SHA256()))
        return _ok({1: {"type": "public-key", "id": ours}, 2: auth_data, 3: signature})


def devices() -> list[CtapDevice]:
    """The factory ``TETHERLESS_FIDO2_DEVICES`` names: the key whose state file ``$TETHERLESS_SOFT_CTAP`` is,
    or none when it is unset."""
    path = os.environ.get(STATE_ENV)
    return [SoftCtapDevice(Path(path))] if path else []
