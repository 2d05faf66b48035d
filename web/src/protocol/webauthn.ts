/**
 * WebAuthn checks a client runs (protocol/webauthn.py, docs/crypto.md §6): assertions along a device-list
 * chain (`verify_assertion`), and the registration a security key made in this browser read into the
 * device-list format (`verify_registration`: the credential the client compares with the relay's
 * `register/complete` answer before it lists it). Every failure, malformed input included, is
 * `TetherlessError` `webauthn_invalid`. Pure.
 */
import { p256 } from "@noble/curves/nist.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { compare, concat, equal, fromBase64, fromUtf8, utf8 } from "./bytes.js";
import { type StructDef, bytes, int, list, str } from "./codec.js";
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

/** The attested credential data of a registration's authenticator data (WebAuthn §6.5.2). */
interface CredentialData {
  readonly aaguid: Uint8Array;
  readonly credentialId: Uint8Array;
  /** The COSE_Key as the authenticator encoded it. */
  readonly publicKey: CborValue;
}

interface AuthenticatorData {
  readonly rpIdHash: Uint8Array;
  readonly flags: number;
  readonly counter: number;
  readonly credentialData: CredentialData | null;
}

function parseAuthenticatorData(raw: Uint8Array): AuthenticatorData {
  if (raw.length < 37) throw invalid("authenticatorData is malformed");
  const flags = raw[32]!;
  const counter = new DataView(raw.buffer, raw.byteOffset).getUint32(33, false);
  let credentialData: CredentialData | null = null;
  try {
    const rest = raw.subarray(37);
    const reader = new CborReader(rest);
    if (flags & FLAG_AT) {
      // aaguid (16) ‖ credential id length (2) ‖ credential id ‖ COSE key
      if (rest.length < 18) throw new RangeError("truncated");
      const idLength = (rest[16]! << 8) | rest[17]!;
      reader.offset = 18 + idLength;
      if (reader.offset > rest.length) throw new RangeError("truncated");
      credentialData = {
        aaguid: rest.slice(0, 16),
        credentialId: rest.slice(18, 18 + idLength),
        publicKey: reader.read(),
      };
    }
    if (flags & FLAG_ED) reader.read();
    if (!reader.done) throw new RangeError("trailing bytes");
  } catch {
    throw invalid("authenticatorData is malformed");
  }
  return { rpIdHash: raw.slice(0, 32), flags, counter, credentialData };
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

function checkFlags(auth: AuthenticatorData, rpId: string, requireUserVerification: boolean): void {
  if (!equal(auth.rpIdHash, sha256(utf8(rpId)))) throw invalid("rpIdHash does not match the rp id");
  if (!(auth.flags & FLAG_UP)) throw invalid("the user-present flag is not set");
  if (requireUserVerification && !(auth.flags & FLAG_UV)) {
    throw invalid("user verification is required but the UV flag is not set");
  }
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
  checkFlags(auth, credential.rp_id, requireUserVerification);
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

// -- registration ---------------------------------------------------------------------------------------------

/** `POST /v1/webauthn/register/begin`'s answer (protocol/messages.py `WebAuthnRegistrationOptions`). */
export interface WebAuthnRegistrationOptions {
  challenge: Uint8Array;
  rp_id: string;
  rp_name: string;
  user_id: Uint8Array;
  user_name: string;
  /** COSE algorithm ids in the relay's order of preference. */
  algorithms: number[];
  attestation: string;
  user_verification: string;
  timeout_ms: number;
  expires_at_ms: number;
  exclude_credentials: Uint8Array[];
}
export const WebAuthnRegistrationOptionsDef: StructDef<WebAuthnRegistrationOptions> = {
  name: "WebAuthnRegistrationOptions",
  fields: [
    { name: "challenge", type: bytes(32, 32) },
    { name: "rp_id", type: str() },
    { name: "rp_name", type: str() },
    { name: "user_id", type: bytes() },
    { name: "user_name", type: str() },
    { name: "algorithms", type: list(int(Number.MIN_SAFE_INTEGER)) },
    { name: "attestation", type: str() },
    { name: "user_verification", type: str() },
    { name: "timeout_ms", type: int(Number.MIN_SAFE_INTEGER) },
    { name: "expires_at_ms", type: int(0) },
    { name: "exclude_credentials", type: list(bytes()), default: () => [] },
  ],
};

/** `POST /v1/webauthn/register/complete`: the authenticator's `create` response, raw bytes. */
export interface WebAuthnRegistration {
  credential_id: Uint8Array;
  client_data_json: Uint8Array;
  attestation_object: Uint8Array;
}
export const WebAuthnRegistrationDef: StructDef<WebAuthnRegistration> = {
  name: "WebAuthnRegistration",
  fields: [
    { name: "credential_id", type: bytes(1, 1023) },
    { name: "client_data_json", type: bytes(0, 4096) },
    { name: "attestation_object", type: bytes(0, 16384) },
  ],
};

/** A registration read and checked: the credential for a device list, and what the key said beside it. */
export interface RegisteredCredential {
  readonly credential: WebAuthnCredential;
  readonly signCount: number;
  readonly userVerified: boolean;
  readonly aaguid: Uint8Array;
  readonly attestationFormat: "none" | "packed";
  /** `packed` without a certificate is `self`; a certificate chain (`basic`) is not read here. */
  readonly attestationType: "none" | "self";
  readonly backupEligible: boolean;
  readonly backedUp: boolean;
}

function cborHead(major: number, n: number): Uint8Array {
  const m = major << 5;
  if (n < 24) return Uint8Array.of(m | n);
  if (n <= 0xff) return Uint8Array.of(m | 24, n);
  if (n <= 0xffff) return Uint8Array.of(m | 25, n >> 8, n & 0xff);
  const out = new Uint8Array(n <= 0xffffffff ? 5 : 9);
  const view = new DataView(out.buffer);
  if (n <= 0xffffffff) {
    out[0] = m | 26;
    view.setUint32(1, n, false);
  } else {
    out[0] = m | 27;
    view.setBigUint64(1, BigInt(n), false);
  }
  return out;
}

/**
 * CTAP2 canonical CBOR (python-fido2's `cbor.encode`, which the relay uses to store a COSE key): shortest
 * heads, map entries sorted by (first byte, length, bytes) of their encoded keys. The stored public key
 * is these bytes, so the browser must produce exactly them to compare its credential with the relay's.
 */
export function encodeCanonicalCbor(value: CborValue): Uint8Array {
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value)) throw new RangeError("CBOR: only safe integers are encoded");
    return value >= 0 ? cborHead(0, value) : cborHead(1, -1 - value);
  }
  if (typeof value === "boolean") return Uint8Array.of(value ? 0xf5 : 0xf4);
  if (value === null) return Uint8Array.of(0xf6);
  if (typeof value === "string") {
    const raw = utf8(value);
    return concat(cborHead(3, raw.length), raw);
  }
  if (value instanceof Uint8Array) return concat(cborHead(2, value.length), value);
  if (Array.isArray(value)) return concat(cborHead(4, value.length), ...value.map(encodeCanonicalCbor));
  const entries = [...value.entries()].map(([k, v]) => [encodeCanonicalCbor(k), encodeCanonicalCbor(v)] as const);
  entries.sort(([a], [b]) => a[0]! - b[0]! || a.length - b.length || compare(a, b));
  return concat(cborHead(5, entries.length), ...entries.flat());
}

function attestationParts(raw: Uint8Array): {
  fmt: string;
  authData: Uint8Array;
  statement: Map<number | string, CborValue>;
} {
  let parsed: CborValue;
  try {
    parsed = decodeCbor(raw);
  } catch {
    throw invalid("attestationObject is malformed");
  }
  const fmt = parsed instanceof Map ? parsed.get("fmt") : undefined;
  const authData = parsed instanceof Map ? parsed.get("authData") : undefined;
  const statement = parsed instanceof Map ? parsed.get("attStmt") : undefined;
  if (typeof fmt !== "string" || !(authData instanceof Uint8Array) || !(statement instanceof Map)) {
    throw invalid("attestationObject is malformed");
  }
  return { fmt, authData, statement };
}

/**
 * Read the response of `navigator.credentials.create` into the credential a device list holds, with the
 * checks of protocol/webauthn.py `verify_registration`: clientDataJSON (type `webauthn.create`, the
 * challenge, an origin valid for `rpId`), the attestation object (format `none` or `packed`, rpIdHash, UP,
 * UV when required, attested credential data whose id is `registration.credential_id`, 1–1023 bytes, an
 * allowed algorithm) and its statement: `none` must be empty, `packed` self attestation must verify with
 * the credential's own key. A `packed` statement with a certificate (`x5c`) is refused here (the browser
 * asks for attestation `none`; the relay checks certificates). The public key is re-encoded canonically
 * (python-fido2's `cbor.encode(dict(key))`), so it equals the relay's. Throws `webauthn_invalid`.
 */
export function readRegistration(
  registration: WebAuthnRegistration,
  challenge: Uint8Array,
  rpId: string,
  addedAtMs: number,
  requireUserVerification = false,
): RegisteredCredential {
  checkClientData(registration.client_data_json, "webauthn.create", challenge, rpId);
  const { fmt, authData, statement } = attestationParts(registration.attestation_object);
  if (fmt !== "none" && fmt !== "packed") throw invalid(`attestation format ${JSON.stringify(fmt)} is not accepted`);
  const auth = parseAuthenticatorData(authData);
  checkFlags(auth, rpId, requireUserVerification);
  const data = auth.credentialData;
  if (!data) throw invalid("attestationObject has no attested credential data");
  if (!equal(data.credentialId, registration.credential_id)) {
    throw invalid("credential id does not match the attested credential data");
  }
  if (data.credentialId.length < 1 || data.credentialId.length > 1023) {
    throw invalid("credential id length is out of range");
  }
  if (!(data.publicKey instanceof Map)) throw invalid("credential public key is not a COSE key");
  const publicKey = encodeCanonicalCbor(data.publicKey);
  const key = parsePublicKey(publicKey);
  let attestationType: "none" | "self" = "none";
  if (fmt === "none") {
    if (statement.size !== 0) throw invalid("none attestation does not verify");
  } else {
    const alg = statement.get("alg");
    const sig = statement.get("sig");
    if (statement.has("x5c")) throw invalid("packed attestation with a certificate is not read by the web client");
    if (alg !== key.algorithm || !(sig instanceof Uint8Array)) throw invalid("packed attestation does not verify");
    const signed = concat(authData, sha256(registration.client_data_json));
    if (!coseSignatureOk(key, signed, sig)) throw invalid("packed attestation does not verify");
    attestationType = "self";
  }
  return {
    credential: {
      credential_id: data.credentialId,
      public_key: publicKey,
      rp_id: rpId,
      added_at_ms: addedAtMs,
    },
    signCount: auth.counter,
    userVerified: (auth.flags & FLAG_UV) !== 0,
    aaguid: data.aaguid,
    attestationFormat: fmt,
    attestationType,
    backupEligible: (auth.flags & FLAG_BE) !== 0,
    backedUp: (auth.flags & FLAG_BS) !== 0,
  };
}
