/**
 * WebAuthn assertion checks a client runs along a device-list chain (protocol/webauthn.py
 * `verify_assertion`, docs/crypto.md §6). Registration (attestation) checks are the relay's and are not
 * here. Every failure, malformed input included, is `TetherlessError` `webauthn_invalid`. Pure.
 */
import { p256 } from "@noble/curves/nist.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { concat, equal, fromBase64, fromUtf8, utf8 } from "./bytes.js";
import { type CborValue, CborReader, decodeCbor } from "./cbor.js";
import { TetherlessError } from "./errors.js";
import type { WebAuthnAssertion, WebAuthnCredential } from "./messages.js";
import { verify as verifyEd25519 } from "./signing.js";

/** ES256, EdDSA and the fully specified Ed25519 (docs/crypto.md §0). */
export const ALLOWED_ALGORITHMS = [-7, -8, -19] as const;

const FLAG_UP = 0x01;
const FLAG_UV = 0x04;
const FLAG_BE = 0x08;
const FLAG_BS = 0x10;
const FLAG_AT = 0x40;
const FLAG_ED = 0x80;

const invalid = (why: string) => new TetherlessError("webauthn_invalid", why);

export interface CoseKey {
  readonly algorithm: (typeof ALLOWED_ALGORITHMS)[number];
  readonly map: ReadonlyMap<number | string, CborValue>;
}

/**
 * Decode a COSE_Key (CBOR map) with an allowed algorithm (`3`). Throws `webauthn_invalid`. Like
 * protocol/webauthn.py, nothing else is judged here: the curve and the key bytes are checked when an
 * assertion is verified, so both clients accept the same device lists (the CBOR itself is read strictly
 * here; web/README.md, "gaps").
 */
export function parsePublicKey(coseKey: Uint8Array): CoseKey {
  let map: CborValue;
  try {
    map = decodeCbor(coseKey);
  } catch {
    throw invalid("credential public key is not a COSE key");
  }
  if (!(map instanceof Map)) throw invalid("credential public key is not a COSE key");
  const alg = map.get(3);
  if (alg !== -7 && alg !== -8 && alg !== -19) throw invalid(`credential algorithm ${String(alg)} is not allowed`);
  return { algorithm: alg, map };
}

/** The signature check of one COSE key (python-fido2 `CoseKey.verify`): ES256 on P-256, EdDSA on Ed25519. */
function coseSignatureOk(key: CoseKey, message: Uint8Array, signature: Uint8Array): boolean {
  const x = key.map.get(-2);
  if (key.algorithm === -7) {
    const y = key.map.get(-3);
    if (
      key.map.get(-1) !== 1 ||
      !(x instanceof Uint8Array) ||
      !(y instanceof Uint8Array) ||
      x.length > 32 ||
      y.length > 32
    ) {
      return false;
    }
    const point = new Uint8Array(65);
    point[0] = 4;
    point.set(x, 33 - x.length); // big-endian integers: shorter encodings are left-padded
    point.set(y, 65 - y.length);
    try {
      return p256.verify(signature, message, point, { format: "der", lowS: false, prehash: true });
    } catch {
      return false; // not a point on the curve, or a signature that is not DER
    }
  }
  if (key.map.get(-1) !== 6 || !(x instanceof Uint8Array)) return false;
  try {
    verifyEd25519(x, message, signature);
    return true;
  } catch {
    return false;
  }
}

/** What a verified assertion says: its sign counter and flags. */
export interface AssertionResult {
  readonly signCount: number;
  readonly userVerified: boolean;
  readonly backupEligible: boolean;
  readonly backedUp: boolean;
}

interface AuthenticatorData {
  readonly rpIdHash: Uint8Array;
  readonly flags: number;
  readonly counter: number;
}

function parseAuthenticatorData(raw: Uint8Array): AuthenticatorData {
  if (raw.length < 37) throw invalid("authenticatorData is malformed");
  const flags = raw[32]!;
  const counter = new DataView(raw.buffer, raw.byteOffset).getUint32(33, false);
  try {
    const reader = new CborReader(raw.subarray(37));
    if (flags & FLAG_AT) {
      // aaguid (16) ‖ credential id length (2) ‖ credential id ‖ COSE key
      const rest = raw.subarray(37);
      if (rest.length < 18) throw new RangeError("truncated");
      const idLength = (rest[16]! << 8) | rest[17]!;
      reader.offset = 18 + idLength;
      if (reader.offset > rest.length) throw new RangeError("truncated");
      reader.read();
    }
    if (flags & FLAG_ED) reader.read();
    if (!reader.done) throw new RangeError("trailing bytes");
  } catch {
    throw invalid("authenticatorData is malformed");
  }
  return { rpIdHash: raw.slice(0, 32), flags, counter };
}

/**
 * Whether `origin` may use `rpId` (python-fido2 `verify_rp_id`): https (or http on localhost and
 * *.localhost, for tests) and a host equal to the rp id or a subdomain of it. python-fido2 also refuses an
 * rp id that is a public suffix; that list is not shipped here (see web/README.md, "gaps").
 */
export function originMatchesRpId(rpId: string, origin: string): boolean {
  if (!rpId) return false;
  let url: URL;
  try {
    url = new URL(origin);
  } catch {
    return false;
  }
  const host = url.hostname.replace(/^\[|\]$/g, "").toLowerCase();
  const secure =
    url.protocol === "https:" || (url.protocol === "http:" && (host === "localhost" || host.endsWith(".localhost")));
  if (!secure) return false;
  return host === rpId || host.endsWith(`.${rpId}`);
}

function base64UrlDecode(text: string): Uint8Array {
  const standard = text.replace(/-/g, "+").replace(/_/g, "/").replace(/=+$/, "");
  return fromBase64(standard + "=".repeat((4 - (standard.length % 4)) % 4));
}

function checkClientData(raw: Uint8Array, expectedType: string, challenge: Uint8Array, rpId: string): void {
  let type: unknown;
  let origin: unknown;
  let got: Uint8Array;
  try {
    const parsed = JSON.parse(fromUtf8(raw)) as Record<string, unknown>;
    type = parsed.type;
    origin = parsed.origin;
    if (typeof parsed.challenge !== "string") throw new TypeError("no challenge");
    got = base64UrlDecode(parsed.challenge);
  } catch {
    throw invalid("clientDataJSON is malformed");
  }
  if (typeof type !== "string" || typeof origin !== "string") throw invalid("clientDataJSON is malformed");
  if (type !== expectedType) throw invalid(`clientDataJSON type is not ${expectedType}`);
  if (!equal(got, challenge)) throw invalid("clientDataJSON challenge does not match");
  if (!originMatchesRpId(rpId, origin)) throw invalid(`origin is not valid for rp id ${JSON.stringify(rpId)}`);
}

/**
 * Check a WebAuthn `get` assertion by `credential` over `challenge`: credential ids match,
 * clientDataJSON type `webauthn.get`, its challenge, its origin against the credential's rp id,
 * rpIdHash = SHA-256(rp id), UP, UV when required, and the signature over
 * `authenticator_data ‖ SHA-256(client_data_json)` with the credential's COSE key (ES256 signatures are
 * DER and may be high-S, as WebAuthn authenticators make them). The sign counter is returned, not judged.
 * Throws `webauthn_invalid`.
 */
export function verifyAssertion(
  credential: WebAuthnCredential,
  assertion: WebAuthnAssertion,
  challenge: Uint8Array,
  requireUserVerification: boolean,
): AssertionResult {
  if (!equal(assertion.credential_id, credential.credential_id))
    throw invalid("the assertion is by another credential");
  const key = parsePublicKey(credential.public_key);
  checkClientData(assertion.client_data_json, "webauthn.get", challenge, credential.rp_id);
  const auth = parseAuthenticatorData(assertion.authenticator_data);
  if (!equal(auth.rpIdHash, sha256(utf8(credential.rp_id)))) throw invalid("rpIdHash does not match the rp id");
  if (!(auth.flags & FLAG_UP)) throw invalid("the user-present flag is not set");
  if (requireUserVerification && !(auth.flags & FLAG_UV)) {
    throw invalid("user verification is required but the UV flag is not set");
  }
  const signed = concat(assertion.authenticator_data, sha256(assertion.client_data_json));
  const ok = coseSignatureOk(key, signed, assertion.signature);
  if (!ok) throw invalid("assertion signature does not verify");
  return {
    signCount: auth.counter,
    userVerified: (auth.flags & FLAG_UV) !== 0,
    backupEligible: (auth.flags & FLAG_BE) !== 0,
    backedUp: (auth.flags & FLAG_BS) !== 0,
  };
}
