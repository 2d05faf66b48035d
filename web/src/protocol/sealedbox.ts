/**
 * libsodium's `crypto_box_seal`, with the ephemeral key passed in (protocol/payload.py `seal_box`):
 *
 *     epk    = X25519 public key of esk
 *     nonce  = BLAKE2b-192(epk ‖ recipient_pk)           (unkeyed, no salt or personalisation)
 *     k      = HSalsa20(X25519(esk, recipient_pk), 0^16)  (crypto_box_beforenm)
 *     output = epk ‖ XSalsa20-Poly1305(k, nonce, m)       (secretbox: tag ‖ ciphertext)
 *
 * The primitives are noble's; this module only composes them as libsodium does. Pure.
 */
import { hsalsa, xsalsa20poly1305 } from "@noble/ciphers/salsa.js";
import { blake2b } from "@noble/hashes/blake2.js";
import { concat, utf8 } from "./bytes.js";
import { InvalidPayloadError } from "./errors.js";
import { dh, X25519_KEY_BYTES, x25519Public } from "./x25519.js";

export const SEAL_OVERHEAD_BYTES = 48; // ephemeral public key (32) + Poly1305 tag (16)
const NONCE_BYTES = 24;
const SIGMA = utf8("expand 32-byte k");

function words(bytes: Uint8Array): Uint32Array {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Uint32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getUint32(4 * i, true);
  return out;
}

function fromWords(w: Uint32Array): Uint8Array {
  const out = new Uint8Array(w.length * 4);
  const view = new DataView(out.buffer);
  for (let i = 0; i < w.length; i++) view.setUint32(4 * i, w[i]!, true);
  return out;
}

/** `crypto_box_beforenm`: HSalsa20 of the X25519 shared secret under a zero input block. */
function boxKey(privateKey: Uint8Array, publicKey: Uint8Array): Uint8Array {
  const shared = dh(privateKey, publicKey);
  const out = new Uint32Array(8);
  hsalsa(words(SIGMA), words(shared), new Uint32Array(4), out);
  return fromWords(out);
}

function sealNonce(ephemeralPublic: Uint8Array, recipientPublic: Uint8Array): Uint8Array {
  return blake2b(concat(ephemeralPublic, recipientPublic), { dkLen: NONCE_BYTES });
}

/**
 * Seal `plaintext` to `recipientBoxKey` with the ephemeral private key `ephemeralPrivateKey` (32 fresh
 * random bytes, never reused). Throws `RangeError` for a wrong key length and `TetherlessError`
 * `prekey_invalid` for an unusable (low-order) recipient key. Pure and deterministic.
 */
export function sealBox(
  plaintext: Uint8Array,
  recipientBoxKey: Uint8Array,
  ephemeralPrivateKey: Uint8Array,
): Uint8Array {
  if (ephemeralPrivateKey.length !== X25519_KEY_BYTES || recipientBoxKey.length !== X25519_KEY_BYTES) {
    throw new RangeError("X25519 keys are 32 bytes");
  }
  const ephemeralPublic = x25519Public(ephemeralPrivateKey);
  const key = boxKey(ephemeralPrivateKey, recipientBoxKey);
  return concat(ephemeralPublic, xsalsa20poly1305(key, sealNonce(ephemeralPublic, recipientBoxKey)).encrypt(plaintext));
}

/** Open a sealed box; throws `InvalidPayloadError` `malformed_body` when it does not decrypt. */
export function openBox(ciphertext: Uint8Array, boxPrivateKey: Uint8Array): Uint8Array {
  if (boxPrivateKey.length !== X25519_KEY_BYTES) throw new RangeError("an X25519 private key is 32 bytes");
  if (ciphertext.length < SEAL_OVERHEAD_BYTES)
    throw new InvalidPayloadError("malformed_body", "ciphertext does not decrypt");
  const ephemeralPublic = ciphertext.subarray(0, X25519_KEY_BYTES);
  try {
    const key = boxKey(boxPrivateKey, ephemeralPublic);
    const nonce = sealNonce(ephemeralPublic, x25519Public(boxPrivateKey));
    return xsalsa20poly1305(key, nonce).decrypt(ciphertext.subarray(X25519_KEY_BYTES));
  } catch {
    // A low-order ephemeral key (all-zero X25519) or a failed Poly1305 tag: both mean "not for us".
    throw new InvalidPayloadError("malformed_body", "ciphertext does not decrypt");
  }
}
