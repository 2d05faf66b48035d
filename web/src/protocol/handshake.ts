/**
 * The hybrid session handshake: PQXDH with X25519 and ML-KEM-768 (protocol/handshake.py, docs/crypto.md
 * §7.3). Initiator A writes to responder B using B's verified prekey bundle:
 *
 *     DH1 = DH(IK_A, SPK_B)  DH2 = DH(EK_A, IK_B)  DH3 = DH(EK_A, SPK_B)  DH4 = DH(EK_A, OPK_B) (if present)
 *     TH  = digest("pqxdh-transcript", A.device_id, IK_A, B.device_id, IK_B, spk_id, SPK_B,
 *                  pq_id, pq_kind, SHA-256(PQPK_B), opk_id or 0, OPK_B or b"", EK_A, CT)
 *     SK  = HKDF(0^32, 0xFF^32 ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4] ‖ SS, layout("pqxdh", PQXDH_INFO, TH), 32)
 *     AD  = layout("session-ad", A.device_id, IK_A, B.device_id, IK_B, TH)
 *     session_id = digest("session-id", TH)[0:16]
 *
 * IK are the devices' X25519 `box_key`s; ML-KEM-768 private keys exist only as 64-byte seeds (d ‖ z).
 * Encapsulation is the one randomised step: {@link encapsulate} takes its randomness as a parameter, so
 * everything here is pure. Every unusable key, prekey or ciphertext length is `prekey_invalid`.
 */
import { ml_kem768 } from "@noble/post-quantum/ml-kem.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { concat } from "./bytes.js";
import { TetherlessError } from "./errors.js";
import { hkdf } from "./kdf.js";
import { digest, layout } from "./signing.js";
import { dh, X25519_KEY_BYTES, x25519Public } from "./x25519.js";

export const PQXDH_INFO = "Tetherless_X25519_SHA-256_ML-KEM-768";
export const MLKEM_SEED_BYTES = 64;
export const MLKEM_PUBLIC_KEY_BYTES = 1184;
export const MLKEM_CIPHERTEXT_BYTES = 1088;
export const MLKEM_SHARED_SECRET_BYTES = 32;
export const MLKEM_ENCAPSULATION_RANDOM_BYTES = 32;
export const SESSION_ID_BYTES = 16;
export const PQ_KIND_ONE_TIME = 1;
export const PQ_KIND_LAST_RESORT = 2;
const F = new Uint8Array(32).fill(0xff);

const invalid = (detail: string) => new TetherlessError("prekey_invalid", detail);

/** The ML-KEM-768 encapsulation key of a 64-byte seed `d ‖ z` (FIPS 203 KeyGen_internal). */
export function mlkemPublic(seed: Uint8Array): Uint8Array {
  if (seed.length !== MLKEM_SEED_BYTES) throw new RangeError("an ML-KEM-768 seed is 64 bytes");
  return ml_kem768.keygen(seed).publicKey;
}

/**
 * Throws `prekey_invalid` unless `publicKey` is an ML-KEM-768 encapsulation key: 1,184 bytes whose 768
 * 12-bit coefficients are all below q = 3329 (FIPS 203 §7.2 modulus check; what `cryptography` accepts).
 * Pure: no encapsulation, so no randomness is needed to validate a key in a device list.
 */
export function mlkemCheckPublic(publicKey: Uint8Array): void {
  if (publicKey.length !== MLKEM_PUBLIC_KEY_BYTES) throw invalid("an ML-KEM-768 public key is 1184 bytes");
  for (let i = 0; i < 1152; i += 3) {
    const b0 = publicKey[i]!;
    const b1 = publicKey[i + 1]!;
    const b2 = publicKey[i + 2]!;
    if ((b0 | ((b1 & 0x0f) << 8)) >= 3329 || ((b1 >> 4) | (b2 << 4)) >= 3329) {
      throw invalid("ML-KEM-768 public key is not valid");
    }
  }
}

/** Deterministic decapsulation with the key of `seed` (implicit rejection on a bad ciphertext). */
export function mlkemDecapsulate(seed: Uint8Array, ciphertext: Uint8Array): Uint8Array {
  if (seed.length !== MLKEM_SEED_BYTES) throw new RangeError("an ML-KEM-768 seed is 64 bytes");
  if (ciphertext.length !== MLKEM_CIPHERTEXT_BYTES) throw invalid("an ML-KEM-768 ciphertext is 1088 bytes");
  return ml_kem768.decapsulate(ciphertext, ml_kem768.keygen(seed).secretKey);
}

/**
 * `(CT, SS) = Encaps(publicKey)` with the 32 random bytes `randomness` (FIPS 203 `m`) passed in. Throws
 * `prekey_invalid` for a key that is not a valid encapsulation key (FIPS 203 §7.2 modulus check).
 */
export function encapsulate(
  publicKey: Uint8Array,
  randomness: Uint8Array,
): { ciphertext: Uint8Array; sharedSecret: Uint8Array } {
  if (publicKey.length !== MLKEM_PUBLIC_KEY_BYTES) throw invalid("an ML-KEM-768 public key is 1184 bytes");
  if (randomness.length !== MLKEM_ENCAPSULATION_RANDOM_BYTES)
    throw new RangeError("encapsulation needs 32 random bytes");
  try {
    const { cipherText, sharedSecret } = ml_kem768.encapsulate(publicKey, randomness);
    return { ciphertext: cipherText, sharedSecret };
  } catch {
    throw invalid("ML-KEM-768 public key is not valid");
  }
}

/** The responder's prekeys as the initiator took them from a *verified* bundle (§7.3 step 1). */
export interface PeerPrekeys {
  readonly signedPrekeyId: number;
  readonly signedPrekey: Uint8Array;
  readonly pqPrekeyId: number;
  readonly pqLastResort: boolean;
  readonly pqPrekey: Uint8Array;
  readonly oneTimePrekeyId: number | null;
  readonly oneTimePrekey: Uint8Array | null;
}

/** What both sides derive; `ephemeralKey` is EK_A (public), sent in the PrekeyMessage. */
export interface HandshakeResult {
  readonly transcriptHash: Uint8Array;
  readonly sharedKey: Uint8Array;
  readonly associatedData: Uint8Array;
  readonly sessionId: Uint8Array;
  readonly ephemeralKey: Uint8Array;
}

interface DeriveInput {
  readonly initiatorDeviceId: string;
  readonly initiatorIdentityKey: Uint8Array;
  readonly responderDeviceId: string;
  readonly responderIdentityKey: Uint8Array;
  readonly prekeys: PeerPrekeys;
  readonly ephemeralKey: Uint8Array;
  readonly kemCiphertext: Uint8Array;
  readonly dhOutputs: Uint8Array[];
  readonly kemSharedSecret: Uint8Array;
}

function derive(d: DeriveInput): HandshakeResult {
  if (d.kemSharedSecret.length !== MLKEM_SHARED_SECRET_BYTES)
    throw new RangeError("an ML-KEM-768 shared secret is 32 bytes");
  const p = d.prekeys;
  const th = digest(
    "pqxdh-transcript",
    d.initiatorDeviceId,
    d.initiatorIdentityKey,
    d.responderDeviceId,
    d.responderIdentityKey,
    p.signedPrekeyId,
    p.signedPrekey,
    p.pqPrekeyId,
    p.pqLastResort ? PQ_KIND_LAST_RESORT : PQ_KIND_ONE_TIME,
    sha256(p.pqPrekey),
    p.oneTimePrekeyId ?? 0,
    p.oneTimePrekey ?? new Uint8Array(0),
    d.ephemeralKey,
    d.kemCiphertext,
  );
  const sk = hkdf(
    new Uint8Array(32),
    concat(F, ...d.dhOutputs, d.kemSharedSecret),
    layout("pqxdh", PQXDH_INFO, th),
    32,
  );
  const ad = layout(
    "session-ad",
    d.initiatorDeviceId,
    d.initiatorIdentityKey,
    d.responderDeviceId,
    d.responderIdentityKey,
    th,
  );
  return {
    transcriptHash: th,
    sharedKey: sk,
    associatedData: ad,
    sessionId: digest("session-id", th).slice(0, SESSION_ID_BYTES),
    ephemeralKey: d.ephemeralKey,
  };
}

function checkPrekeys(p: PeerPrekeys): void {
  if (p.signedPrekey.length !== X25519_KEY_BYTES) throw invalid("a signed prekey is 32 bytes");
  if ((p.oneTimePrekey === null) !== (p.oneTimePrekeyId === null))
    throw invalid("a one-time prekey needs its id and vice versa");
  if (p.oneTimePrekey !== null && p.oneTimePrekey.length !== X25519_KEY_BYTES)
    throw invalid("a one-time prekey is 32 bytes");
  if (p.pqPrekey.length !== MLKEM_PUBLIC_KEY_BYTES) throw invalid("an ML-KEM-768 public key is 1184 bytes");
}

export interface InitiateInput {
  readonly ownDeviceId: string;
  readonly identityPrivateKey: Uint8Array;
  readonly peerDeviceId: string;
  /** The peer's `box_key` from its verified device list. */
  readonly peerIdentityKey: Uint8Array;
  readonly prekeys: PeerPrekeys;
  readonly ephemeralPrivateKey: Uint8Array;
  readonly kemCiphertext: Uint8Array;
  readonly kemSharedSecret: Uint8Array;
}

/** A's side (§7.3 steps 2–3). Throws `prekey_invalid` for a bad length, a low-order key or a bad ciphertext size. */
export function initiate(i: InitiateInput): HandshakeResult {
  checkPrekeys(i.prekeys);
  if (i.kemCiphertext.length !== MLKEM_CIPHERTEXT_BYTES) throw invalid("an ML-KEM-768 ciphertext is 1088 bytes");
  const dhs = [
    dh(i.identityPrivateKey, i.prekeys.signedPrekey),
    dh(i.ephemeralPrivateKey, i.peerIdentityKey),
    dh(i.ephemeralPrivateKey, i.prekeys.signedPrekey),
  ];
  if (i.prekeys.oneTimePrekey !== null) dhs.push(dh(i.ephemeralPrivateKey, i.prekeys.oneTimePrekey));
  return derive({
    initiatorDeviceId: i.ownDeviceId,
    initiatorIdentityKey: x25519Public(i.identityPrivateKey),
    responderDeviceId: i.peerDeviceId,
    responderIdentityKey: i.peerIdentityKey,
    prekeys: i.prekeys,
    ephemeralKey: x25519Public(i.ephemeralPrivateKey),
    kemCiphertext: i.kemCiphertext,
    dhOutputs: dhs,
    kemSharedSecret: i.kemSharedSecret,
  });
}

export interface RespondInput {
  readonly ownDeviceId: string;
  readonly identityPrivateKey: Uint8Array;
  readonly peerDeviceId: string;
  /** A's `box_key` from A's verified device list. */
  readonly peerIdentityKey: Uint8Array;
  readonly signedPrekeyId: number;
  readonly signedPrekeyPrivate: Uint8Array;
  readonly pqPrekeyId: number;
  readonly pqLastResort: boolean;
  readonly pqSeed: Uint8Array;
  readonly oneTimePrekeyId: number | null;
  readonly oneTimePrekeyPrivate: Uint8Array | null;
  readonly ephemeralKey: Uint8Array;
  readonly kemCiphertext: Uint8Array;
}

/**
 * B's side (§7.3 step 5), deterministic. Throws `prekey_invalid` for a bad length or low-order key; a
 * wrong ciphertext does not throw (ML-KEM rejects implicitly): the first ratchet message fails instead.
 */
export function respond(r: RespondInput): HandshakeResult {
  if ((r.oneTimePrekeyId === null) !== (r.oneTimePrekeyPrivate === null))
    throw invalid("a one-time prekey needs its id and vice versa");
  const ss = mlkemDecapsulate(r.pqSeed, r.kemCiphertext);
  const dhs = [
    dh(r.signedPrekeyPrivate, r.peerIdentityKey),
    dh(r.identityPrivateKey, r.ephemeralKey),
    dh(r.signedPrekeyPrivate, r.ephemeralKey),
  ];
  let oneTimePublic: Uint8Array | null = null;
  if (r.oneTimePrekeyPrivate !== null) {
    dhs.push(dh(r.oneTimePrekeyPrivate, r.ephemeralKey));
    oneTimePublic = x25519Public(r.oneTimePrekeyPrivate);
  }
  return derive({
    initiatorDeviceId: r.peerDeviceId,
    initiatorIdentityKey: r.peerIdentityKey,
    responderDeviceId: r.ownDeviceId,
    responderIdentityKey: x25519Public(r.identityPrivateKey),
    prekeys: {
      signedPrekeyId: r.signedPrekeyId,
      signedPrekey: x25519Public(r.signedPrekeyPrivate),
      pqPrekeyId: r.pqPrekeyId,
      pqLastResort: r.pqLastResort,
      pqPrekey: mlkemPublic(r.pqSeed),
      oneTimePrekeyId: r.oneTimePrekeyId,
      oneTimePrekey: oneTimePublic,
    },
    ephemeralKey: r.ephemeralKey,
    kemCiphertext: r.kemCiphertext,
    dhOutputs: dhs,
    kemSharedSecret: ss,
  });
}
