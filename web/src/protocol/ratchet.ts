/**
 * Signal's Double Ratchet without header encryption (protocol/ratchet.py, docs/crypto.md §8.2–§8.4).
 * Pure functions over immutable state, `(state, input, entropy) -> (state', output)`:
 *
 *     KDF_RK(rk, dh_out) = HKDF(salt=rk, ikm=dh_out, layout("dr-root"), 64)   -> rk' ‖ ck
 *     KDF_CK(ck)         = (HMAC(ck, 0x02), HMAC(ck, 0x01))                -> ck', mk
 *     key ‖ nonce        = HKDF(0^32, mk, layout("dr-message"), 44)
 *     ciphertext         = ChaCha20-Poly1305(key, nonce, plaintext,
 *                              aad = layout("dr-message", AD, session_id, ratchet_key, pn, n))
 *
 * Skipped message keys are bounded (MAX_SKIP per step, MAX_SKIPPED_PER_SESSION per session, oldest
 * evicted), each expiring at `now_ms + skipped_ttl_ms`; a used key is deleted. {@link decrypt} works on
 * a copy: a failure leaves the caller's state as it was.
 */
import { chacha20poly1305 } from "@noble/ciphers/chacha.js";
import { equal } from "./bytes.js";
import { type StructDef, bytes, int, list, optional, struct } from "./codec.js";
import { InvalidPayloadError } from "./errors.js";
import { hkdf, hmacSha256 } from "./kdf.js";
import type { RatchetMessage } from "./messages.js";
import { layout } from "./signing.js";
import { dh, x25519Public } from "./x25519.js";

export const MAX_SKIP = 1_000;
export const MAX_SKIPPED_PER_SESSION = 2_000;
export const MAX_CHAIN_LENGTH = 2 ** 32 - 1;
const KEY_BYTES = 32;
const NONCE_BYTES = 12;

/** A message key kept for a message that has not arrived yet. */
export interface SkippedKey {
  readonly ratchet_key: Uint8Array;
  readonly n: number;
  readonly message_key: Uint8Array;
  readonly expires_at_ms: number;
}
export const SkippedKeyDef: StructDef<SkippedKey> = {
  name: "SkippedKey",
  fields: [
    { name: "ratchet_key", type: bytes() },
    { name: "n", type: int(0) },
    { name: "message_key", type: bytes() },
    { name: "expires_at_ms", type: int(0) },
  ],
};

/** One session's ratchet (Signal's names in comments). Secret: store it only sealed (crypto.md §13). */
export interface RatchetState {
  readonly session_id: Uint8Array;
  readonly associated_data: Uint8Array; // AD from the handshake
  readonly root_key: Uint8Array; // RK
  readonly sending_private_key: Uint8Array; // DHs (private)
  readonly sending_public_key: Uint8Array; // DHs (public)
  readonly receiving_key: Uint8Array | null; // DHr
  readonly sending_chain_key: Uint8Array | null; // CKs
  readonly receiving_chain_key: Uint8Array | null; // CKr
  readonly sent: number; // Ns
  readonly received: number; // Nr
  readonly previous_sent: number; // PN
  readonly skipped: readonly SkippedKey[];
}
/** The stored form (the same bytes as protocol/ratchet.py's msgspec Struct: every field, in this order). */
export const RatchetStateDef: StructDef<RatchetState> = {
  name: "RatchetState",
  fields: [
    { name: "session_id", type: bytes() },
    { name: "associated_data", type: bytes() },
    { name: "root_key", type: bytes() },
    { name: "sending_private_key", type: bytes() },
    { name: "sending_public_key", type: bytes() },
    { name: "receiving_key", type: optional(bytes()), default: () => null },
    { name: "sending_chain_key", type: optional(bytes()), default: () => null },
    { name: "receiving_chain_key", type: optional(bytes()), default: () => null },
    { name: "sent", type: int(0), default: () => 0 },
    { name: "received", type: int(0), default: () => 0 },
    { name: "previous_sent", type: int(0), default: () => 0 },
    { name: "skipped", type: list(struct(SkippedKeyDef)), default: () => [] },
  ],
};

// -- KDFs ------------------------------------------------------------------------------------------------

export function kdfRk(rootKey: Uint8Array, dhOut: Uint8Array): [Uint8Array, Uint8Array] {
  const out = hkdf(rootKey, dhOut, layout("dr-root"), 64);
  return [out.slice(0, 32), out.slice(32)];
}

export function kdfCk(chainKey: Uint8Array): [Uint8Array, Uint8Array] {
  return [hmacSha256(chainKey, new Uint8Array([2])), hmacSha256(chainKey, new Uint8Array([1]))];
}

function messageKeyMaterial(messageKey: Uint8Array): [Uint8Array, Uint8Array] {
  const out = hkdf(new Uint8Array(32), messageKey, layout("dr-message"), KEY_BYTES + NONCE_BYTES);
  return [out.slice(0, KEY_BYTES), out.slice(KEY_BYTES)];
}

function messageAad(state: RatchetState, ratchetKey: Uint8Array, previousChainLength: number, n: number): Uint8Array {
  return layout("dr-message", state.associated_data, state.session_id, ratchetKey, previousChainLength, n);
}

// -- initialisation --------------------------------------------------------------------------------------

function checkEntropy(entropy: Uint8Array): void {
  if (entropy.length !== 32) throw new RangeError("a ratchet key needs 32 bytes of entropy");
}

/** `RatchetInitAlice(SK, SPK_B)`: `entropy` (32 bytes) is A's first ratchet private key. */
export function initAlice(a: {
  sharedKey: Uint8Array;
  associatedData: Uint8Array;
  sessionId: Uint8Array;
  peerRatchetKey: Uint8Array;
  entropy: Uint8Array;
}): RatchetState {
  checkEntropy(a.entropy);
  const [rootKey, chainKey] = kdfRk(a.sharedKey, dh(a.entropy, a.peerRatchetKey));
  return {
    session_id: a.sessionId,
    associated_data: a.associatedData,
    root_key: rootKey,
    sending_private_key: a.entropy,
    sending_public_key: x25519Public(a.entropy),
    receiving_key: a.peerRatchetKey,
    sending_chain_key: chainKey,
    receiving_chain_key: null,
    sent: 0,
    received: 0,
    previous_sent: 0,
    skipped: [],
  };
}

/** `RatchetInitBob(SK, SPK_B key pair)`. */
export function initBob(b: {
  sharedKey: Uint8Array;
  associatedData: Uint8Array;
  sessionId: Uint8Array;
  ratchetPrivateKey: Uint8Array;
}): RatchetState {
  return {
    session_id: b.sessionId,
    associated_data: b.associatedData,
    root_key: b.sharedKey,
    sending_private_key: b.ratchetPrivateKey,
    sending_public_key: x25519Public(b.ratchetPrivateKey),
    receiving_key: null,
    sending_chain_key: null,
    receiving_chain_key: null,
    sent: 0,
    received: 0,
    previous_sent: 0,
    skipped: [],
  };
}

// -- encrypt / decrypt -----------------------------------------------------------------------------------

/**
 * `RatchetEncrypt`. Throws `RangeError` when the session cannot send (Bob before any message, or a
 * sending chain at 2^32 − 1: start a new session). Pure: returns the advanced state.
 */
export function encrypt(state: RatchetState, plaintext: Uint8Array): [RatchetState, RatchetMessage] {
  if (state.sending_chain_key === null)
    throw new RangeError("this session cannot send before it has received a message");
  if (state.sent >= MAX_CHAIN_LENGTH) throw new RangeError("sending chain exhausted: start a new session");
  const [chainKey, messageKey] = kdfCk(state.sending_chain_key);
  const [key, nonce] = messageKeyMaterial(messageKey);
  const aad = messageAad(state, state.sending_public_key, state.previous_sent, state.sent);
  const message: RatchetMessage = {
    ratchet_key: state.sending_public_key,
    previous_chain_length: state.previous_sent,
    n: state.sent,
    ciphertext: chacha20poly1305(key, nonce, aad).encrypt(plaintext),
  };
  return [{ ...state, sending_chain_key: chainKey, sent: state.sent + 1 }, message];
}

type Work = { -readonly [K in keyof RatchetState]: RatchetState[K] } & { skipped: SkippedKey[] };

function skipUntil(work: Work, until: number, expiresAtMs: number): void {
  if (until - work.received > MAX_SKIP)
    throw new InvalidPayloadError("malformed_body", "message is too far ahead in its chain");
  if (work.receiving_chain_key === null || work.receiving_key === null) return;
  while (work.received < until) {
    const [chainKey, messageKey] = kdfCk(work.receiving_chain_key);
    work.receiving_chain_key = chainKey;
    work.skipped.push({
      ratchet_key: work.receiving_key,
      n: work.received,
      message_key: messageKey,
      expires_at_ms: expiresAtMs,
    });
    work.received += 1;
  }
  if (work.skipped.length > MAX_SKIPPED_PER_SESSION)
    work.skipped.splice(0, work.skipped.length - MAX_SKIPPED_PER_SESSION);
}

function dhRatchet(work: Work, ratchetKey: Uint8Array, entropy: Uint8Array): void {
  work.previous_sent = work.sent;
  work.sent = 0;
  work.received = 0;
  work.receiving_key = ratchetKey;
  [work.root_key, work.receiving_chain_key] = kdfRk(work.root_key, dh(work.sending_private_key, ratchetKey));
  work.sending_private_key = entropy;
  work.sending_public_key = x25519Public(entropy);
  [work.root_key, work.sending_chain_key] = kdfRk(work.root_key, dh(work.sending_private_key, ratchetKey));
}

function openWith(state: RatchetState, messageKey: Uint8Array, message: RatchetMessage): Uint8Array {
  const [key, nonce] = messageKeyMaterial(messageKey);
  const aad = messageAad(state, message.ratchet_key, message.previous_chain_length, message.n);
  try {
    return chacha20poly1305(key, nonce, aad).decrypt(message.ciphertext);
  } catch {
    throw new InvalidPayloadError("malformed_body", "ratchet message does not decrypt");
  }
}

/**
 * `RatchetDecrypt` on a copy of `state`; returns (new state, plaintext). `entropy` (32 bytes) becomes the
 * next sending ratchet key if this message starts a DH ratchet step. Expired skipped keys are dropped.
 * Throws `InvalidPayloadError` `malformed_body` (does not decrypt, a replay of a used key, too far ahead,
 * a low-order ratchet key); `state` is never changed.
 */
export function decrypt(
  state: RatchetState,
  message: RatchetMessage,
  opts: { entropy: Uint8Array; nowMs: number; skippedTtlMs: number },
): [RatchetState, Uint8Array] {
  checkEntropy(opts.entropy);
  const work: Work = { ...state, skipped: state.skipped.filter((k) => k.expires_at_ms > opts.nowMs) };
  const index = work.skipped.findIndex((k) => k.n === message.n && equal(k.ratchet_key, message.ratchet_key));
  if (index >= 0) {
    const plaintext = openWith(state, work.skipped[index]!.message_key, message);
    work.skipped.splice(index, 1);
    return [work, plaintext];
  }
  const expiresAtMs = opts.nowMs + opts.skippedTtlMs;
  try {
    if (work.receiving_key === null || !equal(message.ratchet_key, work.receiving_key)) {
      skipUntil(work, message.previous_chain_length, expiresAtMs);
      dhRatchet(work, message.ratchet_key, opts.entropy);
    }
    skipUntil(work, message.n, expiresAtMs);
  } catch (error) {
    if (error instanceof InvalidPayloadError) throw error;
    throw new InvalidPayloadError("malformed_body", "bad ratchet key"); // a low-order key (prekey_invalid from dh)
  }
  if (message.n < work.received || work.receiving_chain_key === null) {
    throw new InvalidPayloadError("malformed_body", "message key already used or unknown");
  }
  const [chainKey, messageKey] = kdfCk(work.receiving_chain_key);
  work.receiving_chain_key = chainKey;
  work.received += 1;
  const plaintext = openWith(state, messageKey, message);
  return [work, plaintext];
}
