"""Device authentication: the challenge a device signs to get a session token.

The relay issues a random nonce bound to its own name, the device and an
expiry; the device signs :func:`challenge_layout`; the relay checks the
signature with the device's registered key and exchanges the nonce (once)
for a bearer token. Binding the relay name stops a malicious relay from
relaying a challenge to get a signature valid at another relay.
"""

from __future__ import annotations

import nacl.signing

from . import signing
from .messages import Challenge


def challenge_layout(relay: str, device_id: str, nonce: bytes, expires_at_ms: int) -> bytes:
    return signing.layout("auth-challenge", relay, device_id, nonce, expires_at_ms)


def sign_challenge(signing_key: nacl.signing.SigningKey, challenge: Challenge) -> bytes:
    """The device's answer to ``challenge`` (a 64-byte Ed25519 signature)."""
    return signing.sign(
        signing_key, challenge_layout(challenge.relay, challenge.device_id, challenge.nonce, challenge.expires_at_ms)
    )


def verify_challenge_signature(
    sign_key: bytes, relay: str, device_id: str, nonce: bytes, expires_at_ms: int, signature: bytes
) -> None:
    """Raises ``bad_signature`` unless ``signature`` answers this exact challenge."""
    signing.verify(sign_key, challenge_layout(relay, device_id, nonce, expires_at_ms), signature)
