"""protocol.client.fido2 without a relay: origins, device discovery and the rp-id rule, on a software CTAP2 key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol import webauthn
from protocol.client.fido2 import NoSecurityKeyError, SecurityKey, SecurityKeyError, find_devices, relay_origin
from protocol.messages import WebAuthnCredential, WebAuthnRegistrationOptions
from tests.support.soft_ctap import SoftCtapDevice


def options(rp_id: str = "relay.example.org", exclude: list[bytes] | None = None) -> WebAuthnRegistrationOptions:
    return WebAuthnRegistrationOptions(
        challenge=b"c" * 32,
        rp_id=rp_id,
        rp_name="relay",
        user_id=b"account",
        user_name="account@relay.example.org",
        algorithms=[-19, -8, -7],
        attestation="none",
        user_verification="preferred",
        timeout_ms=120_000,
        expires_at_ms=0,
        exclude_credentials=exclude or [],
    )


def test_relay_origin_is_https_with_host_and_port() -> None:
    assert relay_origin("http://127.0.0.1:8080") == "https://127.0.0.1:8080"
    assert relay_origin("https://relay.example.org/") == "https://relay.example.org"
    with pytest.raises(ValueError, match="not a relay URL"):
        relay_origin("relay.example.org")


def test_find_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TETHERLESS_SOFT_CTAP", raising=False)
    with pytest.raises(NoSecurityKeyError, match=r"^no FIDO2 security key found$"):
        find_devices("tests.support.soft_ctap:devices")
    monkeypatch.setenv("TETHERLESS_SOFT_CTAP", str(tmp_path / "key.json"))
    (device,) = find_devices("tests.support.soft_ctap:devices")
    assert isinstance(device, SoftCtapDevice)
    with pytest.raises(ValueError, match="module:function"):
        find_devices("tests.support.soft_ctap")


def test_register_and_assert_round_trip(tmp_path: Path) -> None:
    device = SoftCtapDevice(tmp_path / "key.json")
    prompts: list[int] = []
    key = SecurityKey(device, "https://relay.example.org:8443", lambda: prompts.append(1))
    registration = key.make_credential(options())
    credential = webauthn.verify_registration(
        registration, challenge=b"c" * 32, rp_id="relay.example.org", added_at_ms=0
    ).credential
    assertion = key.get_assertion(b"h" * 32, [credential])
    result = webauthn.verify_assertion(credential, assertion, challenge=b"h" * 32, require_user_verification=False)
    assert result.sign_count == 1
    assert prompts == [1, 1]  # one touch each
    with pytest.raises(SecurityKeyError, match="registered for the account already"):
        key.make_credential(options(exclude=[credential.credential_id]))


def test_foreign_rp_ids_never_reach_the_key(tmp_path: Path) -> None:
    device = SoftCtapDevice(tmp_path / "key.json")
    key = SecurityKey(device, "https://relay.example.org")
    with pytest.raises(SecurityKeyError, match=re.escape("rp id 'example.com' is not valid for the relay")):
        key.make_credential(options("example.com"))
    elsewhere = WebAuthnCredential(credential_id=b"x", public_key=b"", rp_id="example.com", added_at_ms=0)
    with pytest.raises(SecurityKeyError, match=re.escape("registered for rp id example.com")):
        key.get_assertion(b"h" * 32, [elsewhere])
    assert device.touches == 0
    assert not (tmp_path / "key.json").exists()
