/**
 * X25519 with the refusal every construction here relies on (docs/crypto.md §0): an all-zero shared
 * secret (a low-order peer key) is an error, as in libsodium and OpenSSL. Pure.
 */
import { x25519 } from "@noble/curves/ed25519.js";
import { TetherlessError } from "./errors.js";

export const X25519_KEY_BYTES = 32;

/** The X25519 public key of a 32-byte private key (RFC 7748 clamping applies); `RangeError` for a bad length. */
export function x25519Public(privateKey: Uint8Array): Uint8Array {
  if (privateKey.length !== X25519_KEY_BYTES) throw new RangeError("an X25519 private key is 32 bytes");
  return x25519.getPublicKey(privateKey);
}

/** X25519(private, public); throws `prekey_invalid` for a bad length or an all-zero output. */
export function dh(privateKey: Uint8Array, publicKey: Uint8Array): Uint8Array {
  if (privateKey.length !== X25519_KEY_BYTES || publicKey.length !== X25519_KEY_BYTES) {
    throw new TetherlessError("prekey_invalid", "X25519 keys are 32 bytes");
  }
  let out: Uint8Array;
  try {
    out = x25519.getSharedSecret(privateKey, publicKey);
  } catch {
    throw new TetherlessError("prekey_invalid", "X25519 output is all zero (low-order key)");
  }
  // noble already throws for an all-zero result (caught above); this keeps the rule if that ever changes.
  if (out.every((b) => b === 0))
    throw new TetherlessError("prekey_invalid", "X25519 output is all zero (low-order key)");
  return out;
}
