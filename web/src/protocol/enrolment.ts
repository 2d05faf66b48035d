/**
 * Enrolment without a primary: the link code and what it derives (protocol/enrolment.py, docs/crypto.md
 * §5.1). A new device draws a 120-bit link secret K (15 random bytes, passed in) shown as text and as a
 * QR payload; everything else comes from K and the account's home relay name:
 *
 *     lookup_id    = HKDF(0^32, K, layout("link-lookup", relay), 10)
 *     k_offer      = HKDF(0^32, K, layout("link-offer", relay), 32)
 *     k_approve    = HKDF(0^32, K, layout("link-approve", relay), 32)
 *     offer_mac    = HMAC(k_offer, layout("link-offer", relay, lookup_id, sign_key, box_key, created_at_ms))
 *                    with a kem_key (format 3, crypto.md §3.6):
 *                    HMAC(k_offer, layout("link-offer/2", relay, lookup_id, sign_key, box_key, kem_key, created_at_ms))
 *     approval_tag = HMAC(k_approve, layout("link-approval", relay, lookup_id, account_id, version, list_hash))
 *
 * MAC checks compare in constant time and throw {@link LinkCodeMismatchError}. Pure.
 */
import { BASE32_ALPHABET, equal, fromBase32, toBase32 } from "./bytes.js";
import { hkdf, hmacSha256 } from "./kdf.js";
import { layout } from "./signing.js";

export const LINK_SECRET_BYTES = 15;
export const LOOKUP_ID_BYTES = 10;
const CODE_PREFIX = "tl-";
const QR_PREFIX = "tetherless:link?";
const CODE_CHARS = 24;

/** A MAC made with the link code does not verify: a wrong code, or not the device that shows it. */
export class LinkCodeMismatchError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "LinkCodeMismatchError";
  }
}

function checkSecret(secret: Uint8Array): Uint8Array {
  if (secret.length !== LINK_SECRET_BYTES) throw new RangeError(`a link secret is ${LINK_SECRET_BYTES} random bytes`);
  return secret;
}

/** "tl-" + base32(K) in six groups of four characters. */
export function linkCodeText(secret: Uint8Array): string {
  return CODE_PREFIX + (toBase32(checkSecret(secret)).match(/.{4}/g) ?? []).join("-");
}

/**
 * The link secret in a typed or scanned code (case, "-" and spaces ignored, "tl-" optional). Throws
 * `RangeError` with a message fit for the user for anything else.
 */
export function parseLinkCode(text: string): Uint8Array {
  let cleaned = text.replace(/\s+/g, "").toLowerCase();
  if (cleaned.startsWith(CODE_PREFIX)) cleaned = cleaned.slice(CODE_PREFIX.length);
  cleaned = cleaned.replace(/-/g, "");
  if (cleaned.length === CODE_CHARS + 2 && cleaned.startsWith("tl")) cleaned = cleaned.slice(2);
  const bad = [...new Set([...cleaned].filter((ch) => !BASE32_ALPHABET.includes(ch)))].sort();
  if (bad.length) {
    throw new RangeError(
      `the link code contains ${bad.map((c) => `'${c}'`).join(", ")} (codes use letters a-z and digits 2-7 only)`,
    );
  }
  if (cleaned.length !== CODE_CHARS) {
    throw new RangeError(
      `a link code has ${CODE_CHARS} letters and digits after 'tl-', this one has ${cleaned.length}`,
    );
  }
  return fromBase32(cleaned);
}

/** The QR payload `tetherless:link?v=1&r=<relay>&k=<base32(K)>` (the relay percent-encoded except ':'). */
export function linkQr(relay: string, secret: Uint8Array): string {
  const r = encodeURIComponent(relay).replace(/%3A/gi, ":");
  return `${QR_PREFIX}v=1&r=${r}&k=${toBase32(checkSecret(secret))}`;
}

function derive(secret: Uint8Array, domain: string, relay: string, length: number): Uint8Array {
  return hkdf(new Uint8Array(32), checkSecret(secret), layout(domain, relay), length);
}

/** The 10-byte id the offer is stored under on `relay`. */
export function lookupId(secret: Uint8Array, relay: string): Uint8Array {
  return derive(secret, "link-lookup", relay, LOOKUP_ID_BYTES);
}

/** A lookup id as it appears in URLs: 16 lowercase base32 characters. */
export function lookupIdText(raw: Uint8Array): string {
  if (raw.length !== LOOKUP_ID_BYTES) throw new RangeError(`a lookup id is ${LOOKUP_ID_BYTES} bytes`);
  return toBase32(raw);
}

export function kOffer(secret: Uint8Array, relay: string): Uint8Array {
  return derive(secret, "link-offer", relay, 32);
}

export function kApprove(secret: Uint8Array, relay: string): Uint8Array {
  return derive(secret, "link-approve", relay, 32);
}

/**
 * HMAC by k_offer over the offer's relay, lookup id, keys and time. An offer with a `kemKey` (format 3) uses
 * the domain `link-offer/2`, which covers it: a relay that strips or swaps the key breaks the MAC either way.
 */
export function offerMac(
  secret: Uint8Array,
  relay: string,
  signKey: Uint8Array,
  boxKey: Uint8Array,
  createdAtMs: number,
  kemKey: Uint8Array = new Uint8Array(0),
): Uint8Array {
  const lookup = lookupId(secret, relay);
  const message = kemKey.length
    ? layout("link-offer/2", relay, lookup, signKey, boxKey, kemKey, createdAtMs)
    : layout("link-offer", relay, lookup, signKey, boxKey, createdAtMs);
  return hmacSha256(kOffer(secret, relay), message);
}

/** HMAC by k_approve over the proposed device-list version (by its list hash). */
export function approvalTag(
  secret: Uint8Array,
  relay: string,
  accountId: string,
  version: number,
  listHash: Uint8Array,
): Uint8Array {
  return hmacSha256(
    kApprove(secret, relay),
    layout("link-approval", relay, lookupId(secret, relay), accountId, version, listHash),
  );
}

/** Check a proposal's approval tag; throws {@link LinkCodeMismatchError}. */
export function verifyApprovalTag(
  secret: Uint8Array,
  relay: string,
  accountId: string,
  version: number,
  listHash: Uint8Array,
  tag: Uint8Array,
): void {
  if (!equal(approvalTag(secret, relay, accountId, version, listHash), tag)) {
    throw new LinkCodeMismatchError("the proposal was not made by a device that knows the link code");
  }
}
