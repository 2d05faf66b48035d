/**
 * Device authentication (protocol/auth.py): the device signs `layout("auth-challenge", relay, device_id,
 * nonce, expires_at_ms)` to exchange the relay's nonce for a bearer token. Binding the relay name stops
 * a malicious relay from relaying a challenge to get a signature valid at another relay. Pure.
 */
import type { Challenge } from "./messages.js";
import { layout, sign, verify } from "./signing.js";

export function challengeLayout(relay: string, deviceId: string, nonce: Uint8Array, expiresAtMs: number): Uint8Array {
  return layout("auth-challenge", relay, deviceId, nonce, expiresAtMs);
}

/** The device's answer to `challenge` (a 64-byte Ed25519 signature by the key of `seed`). */
export function signChallenge(seed: Uint8Array, challenge: Challenge): Uint8Array {
  return sign(seed, challengeLayout(challenge.relay, challenge.device_id, challenge.nonce, challenge.expires_at_ms));
}

/** Throws `bad_signature` unless `signature` answers this exact challenge. */
export function verifyChallengeSignature(signKey: Uint8Array, challenge: Challenge, signature: Uint8Array): void {
  verify(
    signKey,
    challengeLayout(challenge.relay, challenge.device_id, challenge.nonce, challenge.expires_at_ms),
    signature,
  );
}
