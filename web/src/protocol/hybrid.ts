/**
 * The post-quantum hybrid wrap, X25519 + ML-KEM-768 to a pair of public keys (docs/crypto.md §12.1;
 * protocol/hybrid.py). Used for account-key grants in the log (account-log.md §5.5):
 *
 *     ss_x = X25519(esk, pk_x)     epk = X25519(esk, G)     (ct_m, ss_m) = ML-KEM-768.Encaps(pk_m)
 *     k    = HKDF-SHA-256(salt = layout("hybrid-wrap-salt"), ikm = layout("hybrid-wrap-ikm", ss_m, ss_x),
 *                         info = layout("hybrid-wrap", context, epk, ct_m, pk_x, SHA-256(pk_m)), 32)
 *     wrap = epk(32) ‖ ct_m(1088) ‖ ChaCha20-Poly1305(k, nonce = 0^12, payload, ad = context)
 *
 * Pure: the ephemeral X25519 key and the ML-KEM encapsulation randomness are passed in.
 */
import { chacha20poly1305 } from "@noble/ciphers/chacha.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { concat } from "./bytes.js";
import { TetherlessError } from "./errors.js";
import {
  MLKEM_CIPHERTEXT_BYTES,
  MLKEM_PUBLIC_KEY_BYTES,
  MLKEM_SEED_BYTES,
  encapsulate,
  mlkemDecapsulate,
  mlkemPublic,
} from "./handshake.js";
import { hkdf } from "./kdf.js";
import { layout } from "./signing.js";
import { X25519_KEY_BYTES, dh, x25519Public } from "./x25519.js";

export const TAG_BYTES = 16;
/** The bytes a wrap adds to its payload: epk, the ML-KEM ciphertext and the AEAD tag. */
export const OVERHEAD_BYTES = X25519_KEY_BYTES + MLKEM_CIPHERTEXT_BYTES + TAG_BYTES; // 1136
const NONCE = new Uint8Array(12);

/** The two public keys a wrap is addressed to: X25519 (32 bytes) and ML-KEM-768 (1,184 bytes). */
export interface HybridRecipient {
  readonly x25519Public: Uint8Array;
  readonly kemPublic: Uint8Array;
}

/** A wrap that does not open (`malformed_body`): wrong keys, a tampered share, context or payload. */
export class HybridWrapError extends TetherlessError {
  constructor(detail: string) {
    super("malformed_body", detail);
    this.name = "HybridWrapError";
  }
}

/** The combiner: the 32-byte wrap key from both shared secrets, both ciphertexts and both recipient keys. */
export function deriveKey(p: {
  context: Uint8Array;
  x25519Shared: Uint8Array;
  kemShared: Uint8Array;
  ephemeralPublic: Uint8Array;
  kemCiphertext: Uint8Array;
  recipient: HybridRecipient;
}): Uint8Array {
  if (p.x25519Shared.length !== 32 || p.kemShared.length !== 32)
    throw new RangeError("both shared secrets are 32 bytes");
  const info = layout(
    "hybrid-wrap",
    p.context,
    p.ephemeralPublic,
    p.kemCiphertext,
    p.recipient.x25519Public,
    sha256(p.recipient.kemPublic),
  );
  return hkdf(layout("hybrid-wrap-salt"), layout("hybrid-wrap-ikm", p.kemShared, p.x25519Shared), info, 32);
}

/**
 * The fresh inputs of one wrap: an X25519 private key (32 random bytes) and a fresh ML-KEM encapsulation
 * `(ct_m, ss_m)` to the recipient's key (from {@link encapsulateFor}, or recorded in a vector file).
 */
export interface WrapInput {
  readonly ephemeralPrivate: Uint8Array;
  readonly kemCiphertext: Uint8Array;
  readonly kemShared: Uint8Array;
}

/**
 * A {@link WrapInput} for `kemPublic` from 64 random bytes (32 for the X25519 key, 32 for ML-KEM's `m`).
 * Throws `prekey_invalid` for an ML-KEM key that is not valid.
 */
export function encapsulateFor(kemPublic: Uint8Array, random64: Uint8Array): WrapInput {
  if (random64.length !== 64) throw new RangeError("a wrap needs 64 random bytes");
  const { ciphertext, sharedSecret } = encapsulate(kemPublic, random64.subarray(32));
  return { ephemeralPrivate: random64.slice(0, 32), kemCiphertext: ciphertext, kemShared: sharedSecret };
}

/**
 * Wrap `payload` to `recipient` under `context`. Deterministic given `input`. Throws `RangeError` for
 * wrong lengths and {@link HybridWrapError} for a low-order X25519 key.
 */
export function seal(
  recipient: HybridRecipient,
  payload: Uint8Array,
  context: Uint8Array,
  input: WrapInput,
): Uint8Array {
  const { ephemeralPrivate, kemCiphertext, kemShared } = input;
  if (recipient.x25519Public.length !== X25519_KEY_BYTES || recipient.kemPublic.length !== MLKEM_PUBLIC_KEY_BYTES) {
    throw new RangeError("a hybrid recipient is an X25519 key (32 bytes) and an ML-KEM-768 key (1184 bytes)");
  }
  if (ephemeralPrivate.length !== X25519_KEY_BYTES || kemCiphertext.length !== MLKEM_CIPHERTEXT_BYTES) {
    throw new RangeError("ephemeral key 32 bytes, ML-KEM ciphertext 1088 bytes");
  }
  const ephemeralPublic = x25519Public(ephemeralPrivate);
  const key = deriveKey({
    context,
    x25519Shared: dhOrRefuse(ephemeralPrivate, recipient.x25519Public),
    kemShared,
    ephemeralPublic,
    kemCiphertext,
    recipient,
  });
  return concat(ephemeralPublic, kemCiphertext, chacha20poly1305(key, NONCE, context).encrypt(payload));
}

/**
 * Inverse of {@link seal} with the recipient's private keys (X25519 key, 64-byte ML-KEM seed). Throws
 * {@link HybridWrapError} (`malformed_body`) when anything changed: either share, the context, the payload,
 * or the wrap was for other keys; `RangeError` for a seed of the wrong length.
 */
export function openWrap(
  x25519Private: Uint8Array,
  kemSeed: Uint8Array,
  wrapped: Uint8Array,
  context: Uint8Array,
): Uint8Array {
  if (wrapped.length < OVERHEAD_BYTES) throw new HybridWrapError("hybrid wrap is truncated");
  if (kemSeed.length !== MLKEM_SEED_BYTES) throw new RangeError("an ML-KEM-768 seed is 64 bytes");
  const ephemeralPublic = wrapped.subarray(0, X25519_KEY_BYTES);
  const kemCiphertext = wrapped.subarray(X25519_KEY_BYTES, X25519_KEY_BYTES + MLKEM_CIPHERTEXT_BYTES);
  const recipient = { x25519Public: x25519Public(x25519Private), kemPublic: mlkemPublic(kemSeed) };
  const key = deriveKey({
    context,
    x25519Shared: dhOrRefuse(x25519Private, ephemeralPublic),
    kemShared: mlkemDecapsulate(kemSeed, kemCiphertext),
    ephemeralPublic,
    kemCiphertext,
    recipient,
  });
  try {
    return chacha20poly1305(key, NONCE, context).decrypt(wrapped.subarray(X25519_KEY_BYTES + MLKEM_CIPHERTEXT_BYTES));
  } catch {
    throw new HybridWrapError("hybrid wrap does not open");
  }
}

function dhOrRefuse(privateKey: Uint8Array, publicKey: Uint8Array): Uint8Array {
  try {
    return dh(privateKey, publicKey);
  } catch {
    throw new HybridWrapError("hybrid wrap: unusable X25519 key");
  }
}
