/**
 * Explicit, domain-separated byte layouts for everything that is signed (protocol/signing.py):
 *
 *     "tetherless/v1/" + domain + 0x00 + field*
 *
 * each field a one-byte tag and its value: "i" + u64 big-endian, "b" + u32 length + bytes,
 * "s" + u32 length + UTF-8. Signatures are never computed over an encoded (MessagePack/JSON) body.
 * Pure.
 */
import { ed25519 } from "@noble/curves/ed25519.js";
import { sha256, sha512 } from "@noble/hashes/sha2.js";
import { concat, equal, utf8 } from "./bytes.js";
import { TetherlessError } from "./errors.js";

/** A layout field: an integer (number or bigint, 0 ≤ n < 2^64), bytes, or text. */
export type Field = number | bigint | Uint8Array | string;

const PREFIX = utf8("tetherless/v1/");
const U64_MAX = (1n << 64n) - 1n;

function u32(n: number): Uint8Array {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, n, false);
  return out;
}

/**
 * The canonical bytes for `fields` under `domain`. Throws `RangeError` for an integer out of range or
 * not an integer, and `TypeError` for a boolean (there is no boolean field: pass 0 or 1).
 */
export function layout(domain: string, ...fields: Field[]): Uint8Array {
  if (!/^[\x20-\x7e]*$/.test(domain)) throw new RangeError("a layout domain is ASCII");
  const parts: Uint8Array[] = [PREFIX, utf8(domain), new Uint8Array([0])];
  for (const value of fields) {
    if (typeof value === "boolean") throw new TypeError("booleans have no layout; use an int");
    if (typeof value === "number" || typeof value === "bigint") {
      if (typeof value === "number" && !Number.isSafeInteger(value)) throw new RangeError(`not an integer: ${value}`);
      const big = BigInt(value);
      if (big < 0n || big > U64_MAX) throw new RangeError(`integer field out of range: ${value}`);
      const raw = new Uint8Array(9);
      raw[0] = 0x69; // "i"
      new DataView(raw.buffer).setBigUint64(1, big, false);
      parts.push(raw);
    } else if (value instanceof Uint8Array) {
      parts.push(new Uint8Array([0x62]), u32(value.length), value);
    } else {
      const raw = utf8(value);
      parts.push(new Uint8Array([0x73]), u32(raw.length), raw);
    }
  }
  return concat(...parts);
}

/** SHA-256 of {@link layout} (hash chains and ids). */
export function digest(domain: string, ...fields: Field[]): Uint8Array {
  return sha256(layout(domain, ...fields));
}

/** The Ed25519 public key of a 32-byte seed (RFC 8032 private key). */
export function publicKeyOf(seed: Uint8Array): Uint8Array {
  return ed25519.getPublicKey(seed);
}

/** Detached Ed25519 signature (64 bytes) by the key of `seed`. Deterministic (RFC 8032). */
export function sign(seed: Uint8Array, message: Uint8Array): Uint8Array {
  return ed25519.sign(message, seed);
}

/** Whether a 32-byte string decodes (canonically) to a point of small order (libsodium refuses such an R). */
function isSmallOrderEncoding(encoded: Uint8Array): boolean {
  try {
    return ed25519.Point.fromBytes(encoded, false).isSmallOrder();
  } catch {
    return false; // not a point at all: the verification below fails on it anyway
  }
}

/**
 * libsodium's verification equation is the cofactorless one, `encode([S]B − [k]A) == R` (RFC 8032 §5.1.7
 * allows either form); noble checks the cofactored `[8]([S]B − [k]A − R) == 0`. They differ only for
 * keys with a torsion component ("mixed order"), where a signature could verify here and fail in the
 * Python client (or the other way round), splitting two clients' view of one device list. Requiring
 * both keeps this verifier exactly as strict as libsodium's.
 */
function cofactorlessEquationHolds(publicKey: Uint8Array, message: Uint8Array, signature: Uint8Array): boolean {
  const { Point } = ed25519;
  const r = signature.subarray(0, 32);
  const s = bytesToScalar(signature.subarray(32));
  const k = bytesToScalar(sha512(concat(r, publicKey, message))) % Point.Fn.ORDER;
  const a = Point.fromBytes(publicKey, false);
  const check = Point.BASE.multiplyUnsafe(s).subtract(a.multiplyUnsafe(k));
  return equal(check.toBytes(), r);
}

function bytesToScalar(bytes: Uint8Array): bigint {
  let n = 0n;
  for (let i = bytes.length - 1; i >= 0; i--) n = (n << 8n) | BigInt(bytes[i]!);
  return n;
}

/**
 * Check a detached Ed25519 signature with the rules libsodium's `crypto_sign_verify_detached` applies
 * (what protocol/signing.py uses; docs/security.md): canonical encodings of A and R (y < p), S < L,
 * neither A nor R of small order, and the cofactorless equation. Throws `TetherlessError`
 * `bad_signature` for a wrong signature, a signature or key of the wrong length, or a malformed key.
 * Pure.
 */
export function verify(publicKey: Uint8Array, message: Uint8Array, signature: Uint8Array): void {
  let ok = false;
  if (publicKey.length === 32 && signature.length === 64) {
    const r = signature.subarray(0, 32);
    // A small-order R: noble refuses only a small-order A (strict mode); libsodium refuses both.
    if (!isSmallOrderEncoding(r)) {
      try {
        // noble checks the encodings, S < L, a small-order A and the cofactored equation; then libsodium's.
        ok =
          ed25519.verify(signature, message, publicKey, { zip215: false }) &&
          cofactorlessEquationHolds(publicKey, message, signature);
      } catch {
        ok = false;
      }
    }
  }
  if (!ok) throw new TetherlessError("bad_signature", "signature does not verify");
}
