/**
 * The printed recovery key (protocol/recovery.py, docs/crypto.md §3.4). `r` is 20 random bytes; the user
 * sees "tlr-" and the lowercase base32 of `r ‖ c` (36 characters in nine groups of four), where
 * `c = digest("recovery-check", r)[0:2]`. From `r` and the account id:
 *
 *     seed_sign   = HKDF(0^32, r, layout("recovery-sign", account_id), 32)    Ed25519 recovery key
 *     seed_backup = HKDF(0^32, r, layout("recovery-backup", account_id), 96)  ML-KEM-768 seed ‖ X25519 private
 *
 * Pure: the 20 random bytes are passed in.
 */
import { BASE32_ALPHABET, equal, fromBase32, toBase32 } from "./bytes.js";
import { hkdf } from "./kdf.js";
import { digest, layout, publicKeyOf } from "./signing.js";

export const SECRET_BYTES = 20;
const CHECK_BYTES = 2;
const PREFIX = "tlr-";
const TEXT_CHARS = 36;

const check = (r: Uint8Array) => digest("recovery-check", r).slice(0, CHECK_BYTES);

/** The text to print for the 20-byte secret: `tlr-xxxx-xxxx-…` (nine groups of four). */
export function newRecoverySecret(entropy20: Uint8Array): string {
  if (entropy20.length !== SECRET_BYTES) throw new RangeError(`a recovery secret is ${SECRET_BYTES} random bytes`);
  const raw = new Uint8Array(SECRET_BYTES + CHECK_BYTES);
  raw.set(entropy20);
  raw.set(check(entropy20), SECRET_BYTES);
  const text = toBase32(raw);
  return PREFIX + (text.match(/.{1,4}/g) ?? []).join("-");
}

/**
 * The 20-byte secret in `text` (case, spaces, dashes and the "tlr-" prefix optional). Throws `RangeError`
 * with a message fit for the user for a wrong length, a character outside base32 or a typo.
 */
export function parseRecoverySecret(text: string): Uint8Array {
  let compact = [...text.trim().toLowerCase()].filter((ch) => !" -\t\n".includes(ch)).join("");
  if (compact.length === TEXT_CHARS + PREFIX.length - 1 && compact.startsWith("tlr")) compact = compact.slice(3);
  if (compact.length !== TEXT_CHARS) {
    throw new RangeError(`a recovery key has ${TEXT_CHARS} characters after 'tlr-'; this one has ${compact.length}`);
  }
  if ([...compact].some((ch) => !BASE32_ALPHABET.includes(ch))) {
    throw new RangeError("a recovery key uses only the letters a-z and the digits 2-7");
  }
  let raw: Uint8Array;
  try {
    raw = fromBase32(compact);
  } catch {
    // 36 characters carry 180 bits: the 4 left over must be zero, or the last character is impossible.
    throw new RangeError("this recovery key has a typo (its last character is not possible)");
  }
  const secret = raw.slice(0, SECRET_BYTES);
  if (!equal(raw.slice(SECRET_BYTES), check(secret))) {
    throw new RangeError("this recovery key has a typo (its check characters do not match)");
  }
  return secret;
}

/** The keys derived from a recovery secret for one account. Never stored by a device. */
export interface RecoveryKeys {
  readonly signingSeed: Uint8Array;
  readonly publicKey: Uint8Array;
  /** 96 bytes: ML-KEM-768 seed (64) ‖ X25519 private key (32). */
  readonly backupSeed: Uint8Array;
}

export function recoveryKeys(r: Uint8Array, accountId: string): RecoveryKeys {
  if (r.length !== SECRET_BYTES) throw new RangeError(`a recovery secret is ${SECRET_BYTES} bytes`);
  const signingSeed = hkdf(new Uint8Array(32), r, layout("recovery-sign", accountId), 32);
  return {
    signingSeed,
    publicKey: publicKeyOf(signingSeed),
    backupSeed: hkdf(new Uint8Array(32), r, layout("recovery-backup", accountId), 96),
  };
}
