/**
 * Sealed sender on sessions: v2 envelope payloads (protocol/session.py, docs/crypto.md §7.3 steps 4–5,
 * §9, §14):
 *
 *     ciphertext = SealedBox(recipient.box_key, pad(inner), ephemeral)
 *     inner (v2) = 0x02 ‖ msgpack(SealedV2 [sender, sender_list_version, kind, session_id, body])
 *
 * `body` is an encoded PrekeyMessage (kind 1: the initiator's messages until it has decrypted anything
 * from the peer) or RatchetMessage (kind 2) whose plaintext is an encoded Content. The outer layer is
 * v1's, so the relay cannot tell v1 from v2; {@link parseInner} dispatches on the first byte.
 *
 * Pure: the caller supplies entropy, the ML-KEM encapsulation result, the clock, the verified peer keys
 * and the prekey privates, and stores the returned {@link SessionState} *before* submitting (§8.5). Every
 * failure to open is `InvalidPayloadError` and returns no state.
 */
import { concat, equal } from "./bytes.js";
import { type StructDef, bool, bytes, decode, encode, int, optional, str, struct } from "./codec.js";
import { InvalidPayloadError, TetherlessError } from "./errors.js";
import * as handshake from "./handshake.js";
import { canonicalAddress, parseAddress } from "./ids.js";
import {
  type Content,
  ContentDef,
  type PrekeyMessage,
  PrekeyMessageDef,
  type RatchetMessage,
  RatchetMessageDef,
  type SealedV2,
  SealedV2Def,
} from "./messages.js";
import { pad } from "./padding.js";
import { unpad } from "./payload.js";
import * as ratchet from "./ratchet.js";
import { openBox, sealBox } from "./sealedbox.js";

export const VERSION_2 = 0x02;
export const KIND_PREKEY = 1;
export const KIND_MESSAGE = 2;
/** Entropy per sealed message: the outer sealed-box ephemeral key (32) + a next ratchet key (32). */
export const ENTROPY_BYTES = 64;

/** The handshake fields the initiator repeats in every message until the peer has answered. */
export interface PendingPrekey {
  readonly signed_prekey_id: number;
  readonly pq_prekey_id: number;
  readonly pq_last_resort: boolean;
  readonly one_time_prekey_id: number | null;
  readonly ephemeral_key: Uint8Array;
  readonly kem_ciphertext: Uint8Array;
}
export const PendingPrekeyDef: StructDef<PendingPrekey> = {
  name: "PendingPrekey",
  fields: [
    { name: "signed_prekey_id", type: int(0) },
    { name: "pq_prekey_id", type: int(0) },
    { name: "pq_last_resort", type: bool },
    { name: "one_time_prekey_id", type: optional(int(0)) },
    { name: "ephemeral_key", type: bytes() },
    { name: "kem_ciphertext", type: bytes() },
  ],
};

/** A session with one peer device, as stored (sealed) by the client. */
export interface SessionState {
  readonly session_id: Uint8Array;
  readonly transcript_hash: Uint8Array;
  readonly own_address: string;
  readonly peer_address: string;
  readonly peer_identity_key: Uint8Array;
  readonly ratchet: ratchet.RatchetState;
  readonly created_at_ms: number;
  readonly last_received_ms: number;
  readonly pending_prekey: PendingPrekey | null;
}
/** The stored form: the same bytes as protocol/session.py's msgspec Struct. */
export const SessionStateDef: StructDef<SessionState> = {
  name: "SessionState",
  fields: [
    { name: "session_id", type: bytes() },
    { name: "transcript_hash", type: bytes() },
    { name: "own_address", type: str() },
    { name: "peer_address", type: str() },
    { name: "peer_identity_key", type: bytes() },
    { name: "ratchet", type: struct(ratchet.RatchetStateDef) },
    { name: "created_at_ms", type: int(0) },
    { name: "last_received_ms", type: int(0), default: () => 0 },
    { name: "pending_prekey", type: optional(struct(PendingPrekeyDef)), default: () => null },
  ],
};

/** The private prekeys a PrekeyMessage names, loaded by the caller (an unknown id is rejected there). */
export interface ResponderKeys {
  readonly signedPrekeyPrivate: Uint8Array;
  readonly pqSeed: Uint8Array;
  readonly oneTimePrekeyPrivate: Uint8Array | null;
}

function deviceAddress(text: string): { canonical: string; device: string } {
  const address = parseAddress(text);
  if (!address.device) throw new RangeError("sessions are between device addresses");
  return { canonical: canonicalAddress(text), device: address.device };
}

/** The initiator's new session (§7.3 steps 2–4) from a verified bundle and `(CT, SS)`. Throws `prekey_invalid`. */
export function start(s: {
  ownAddress: string;
  identityPrivateKey: Uint8Array;
  peerAddress: string;
  peerIdentityKey: Uint8Array;
  prekeys: handshake.PeerPrekeys;
  ephemeralPrivateKey: Uint8Array;
  ratchetEntropy: Uint8Array;
  kemCiphertext: Uint8Array;
  kemSharedSecret: Uint8Array;
  nowMs: number;
}): SessionState {
  const own = deviceAddress(s.ownAddress);
  const peer = deviceAddress(s.peerAddress);
  const result = handshake.initiate({
    ownDeviceId: own.device,
    identityPrivateKey: s.identityPrivateKey,
    peerDeviceId: peer.device,
    peerIdentityKey: s.peerIdentityKey,
    prekeys: s.prekeys,
    ephemeralPrivateKey: s.ephemeralPrivateKey,
    kemCiphertext: s.kemCiphertext,
    kemSharedSecret: s.kemSharedSecret,
  });
  return {
    session_id: result.sessionId,
    transcript_hash: result.transcriptHash,
    own_address: own.canonical,
    peer_address: peer.canonical,
    peer_identity_key: s.peerIdentityKey,
    ratchet: ratchet.initAlice({
      sharedKey: result.sharedKey,
      associatedData: result.associatedData,
      sessionId: result.sessionId,
      peerRatchetKey: s.prekeys.signedPrekey,
      entropy: s.ratchetEntropy,
    }),
    created_at_ms: s.nowMs,
    last_received_ms: 0,
    pending_prekey: {
      signed_prekey_id: s.prekeys.signedPrekeyId,
      pq_prekey_id: s.prekeys.pqPrekeyId,
      pq_last_resort: s.prekeys.pqLastResort,
      one_time_prekey_id: s.prekeys.oneTimePrekeyId,
      ephemeral_key: result.ephemeralKey,
      kem_ciphertext: s.kemCiphertext,
    },
  };
}

/**
 * Encrypt one message on `session`: returns (advanced state, envelope ciphertext). `entropy` is
 * {@link ENTROPY_BYTES} fresh bytes (the first 32 are the outer ephemeral key). Store the returned state
 * before submitting the ciphertext.
 */
export function seal(
  session: SessionState,
  m: {
    senderListVersion: number;
    recipientBoxKey: Uint8Array;
    sentAtMs: number;
    messageId: Uint8Array;
    contentType: string;
    body: Uint8Array;
    entropy: Uint8Array;
  },
): [SessionState, Uint8Array] {
  if (m.entropy.length !== ENTROPY_BYTES) throw new RangeError(`sealing needs ${ENTROPY_BYTES} bytes of entropy`);
  const content: Content = {
    recipient: session.peer_address,
    sent_at_ms: m.sentAtMs,
    message_id: m.messageId,
    content_type: m.contentType,
    body: m.body,
  };
  const [state, message] = ratchet.encrypt(session.ratchet, encode(ContentDef, content));
  const pending = session.pending_prekey;
  const kind = pending !== null ? KIND_PREKEY : KIND_MESSAGE;
  const innerBody =
    pending !== null
      ? encode(PrekeyMessageDef, {
          signed_prekey_id: pending.signed_prekey_id,
          pq_prekey_id: pending.pq_prekey_id,
          pq_last_resort: pending.pq_last_resort,
          one_time_prekey_id: pending.one_time_prekey_id,
          ephemeral_key: pending.ephemeral_key,
          kem_ciphertext: pending.kem_ciphertext,
          message,
        })
      : encode(RatchetMessageDef, message);
  const sealed: SealedV2 = {
    sender: session.own_address,
    sender_list_version: m.senderListVersion,
    kind,
    session_id: session.session_id,
    body: innerBody,
  };
  const inner = concat(new Uint8Array([VERSION_2]), encode(SealedV2Def, sealed));
  const ciphertext = sealBox(pad(inner), m.recipientBoxKey, m.entropy.subarray(0, 32));
  return [{ ...session, ratchet: state }, ciphertext];
}

/** Open the sealed box and unpad: the inner plaintext of either version. Throws `InvalidPayloadError`. */
export function openOuter(ciphertext: Uint8Array, boxPrivateKey: Uint8Array): Uint8Array {
  return unpad(openBox(ciphertext, boxPrivateKey));
}

function malformed(what: string, error: unknown): InvalidPayloadError {
  if (error instanceof TetherlessError) return new InvalidPayloadError("malformed_body", `${what}: ${error.detail}`);
  throw error;
}

/**
 * Dispatch on the first byte (§14): `null` for a v1 SealedContent map (0x80–0x8f, 0xde, 0xdf), the
 * SealedV2 for 0x02. Throws `malformed_body` for an empty plaintext, any other first byte, or an
 * undecodable SealedV2.
 */
export function parseInner(inner: Uint8Array): SealedV2 | null {
  const first = inner[0];
  if (first === undefined) throw new InvalidPayloadError("malformed_body", "empty plaintext");
  if ((first >= 0x80 && first <= 0x8f) || first === 0xde || first === 0xdf) return null;
  if (first !== VERSION_2) {
    throw new InvalidPayloadError("malformed_body", `unknown payload version 0x${first.toString(16).padStart(2, "0")}`);
  }
  try {
    const sealed = decode(SealedV2Def, inner.subarray(1));
    parseAddress(sealed.sender);
    return sealed;
  } catch (error) {
    throw malformed("sealed v2", error);
  }
}

/** The PrekeyMessage of a kind-1 SealedV2; `malformed_body` otherwise. */
export function prekeyMessage(sealed: SealedV2): PrekeyMessage {
  if (sealed.kind !== KIND_PREKEY) throw new InvalidPayloadError("malformed_body", "not a prekey message");
  try {
    return decode(PrekeyMessageDef, sealed.body);
  } catch (error) {
    throw malformed("prekey message", error);
  }
}

function ratchetMessage(sealed: SealedV2): RatchetMessage {
  if (sealed.kind === KIND_PREKEY) return prekeyMessage(sealed).message;
  try {
    return decode(RatchetMessageDef, sealed.body);
  } catch (error) {
    throw malformed("ratchet message", error);
  }
}

function contentFor(plaintext: Uint8Array, ownAddress: string): Content {
  let content: Content;
  let recipient: string;
  try {
    content = decode(ContentDef, plaintext);
    recipient = canonicalAddress(content.recipient);
  } catch (error) {
    throw malformed("content", error);
  }
  if (recipient !== canonicalAddress(ownAddress)) {
    throw new InvalidPayloadError("bad_signature", "message was encrypted for another recipient");
  }
  return content;
}

export interface OpenOptions {
  /** 32 bytes for a possible DH ratchet step. */
  readonly entropy: Uint8Array;
  readonly nowMs: number;
  readonly skippedTtlMs: number;
}

/**
 * Decrypt a SealedV2 (either kind) on an existing session, which must match its sender and session id.
 * Success clears the pending prekey fields (the peer has answered). Throws `InvalidPayloadError`;
 * `session` stays valid.
 */
export function decrypt(session: SessionState, sealed: SealedV2, opts: OpenOptions): [SessionState, Content] {
  let sender: string;
  try {
    sender = canonicalAddress(sealed.sender);
  } catch (error) {
    throw malformed("sender", error);
  }
  if (sender !== session.peer_address || !equal(sealed.session_id, session.session_id)) {
    throw new InvalidPayloadError("bad_signature", "message is not for this session");
  }
  const message = ratchetMessage(sealed);
  const [state, plaintext] = ratchet.decrypt(session.ratchet, message, opts);
  const content = contentFor(plaintext, session.own_address);
  return [{ ...session, ratchet: state, pending_prekey: null, last_received_ms: opts.nowMs }, content];
}

/**
 * The responder's side (§7.3 step 5) for a kind-1 message with no session yet. `senderIdentityKey` is
 * the sender's `box_key` from its *verified* list; `keys` are the privates the message names. Recomputes
 * SK, checks the session id, decrypts; only a success returns a session (the caller then deletes the
 * one-time privates and records the transcript hash in its replay cache). Throws `InvalidPayloadError`.
 */
export function acceptPrekey(
  a: {
    ownAddress: string;
    identityPrivateKey: Uint8Array;
    sealed: SealedV2;
    senderIdentityKey: Uint8Array;
    keys: ResponderKeys;
  } & OpenOptions,
): [SessionState, Content] {
  const message = prekeyMessage(a.sealed);
  const sender = parseAddress(a.sealed.sender);
  const own = parseAddress(a.ownAddress);
  if (!sender.device || !own.device)
    throw new InvalidPayloadError("malformed_body", "sessions are between device addresses");
  if ((message.one_time_prekey_id === null) !== (a.keys.oneTimePrekeyPrivate === null)) {
    throw new InvalidPayloadError("malformed_body", "one-time prekey does not match the message");
  }
  let result: handshake.HandshakeResult;
  try {
    result = handshake.respond({
      ownDeviceId: own.device,
      identityPrivateKey: a.identityPrivateKey,
      peerDeviceId: sender.device,
      peerIdentityKey: a.senderIdentityKey,
      signedPrekeyId: message.signed_prekey_id,
      signedPrekeyPrivate: a.keys.signedPrekeyPrivate,
      pqPrekeyId: message.pq_prekey_id,
      pqLastResort: message.pq_last_resort,
      pqSeed: a.keys.pqSeed,
      oneTimePrekeyId: message.one_time_prekey_id,
      oneTimePrekeyPrivate: a.keys.oneTimePrekeyPrivate,
      ephemeralKey: message.ephemeral_key,
      kemCiphertext: message.kem_ciphertext,
    });
  } catch (error) {
    throw malformed("handshake", error);
  }
  if (!equal(result.sessionId, a.sealed.session_id)) {
    throw new InvalidPayloadError("bad_signature", "session id does not match the handshake");
  }
  const session: SessionState = {
    session_id: result.sessionId,
    transcript_hash: result.transcriptHash,
    own_address: canonicalAddress(a.ownAddress),
    peer_address: canonicalAddress(a.sealed.sender),
    peer_identity_key: a.senderIdentityKey,
    ratchet: ratchet.initBob({
      sharedKey: result.sharedKey,
      associatedData: result.associatedData,
      sessionId: result.sessionId,
      ratchetPrivateKey: a.keys.signedPrekeyPrivate,
    }),
    created_at_ms: a.nowMs,
    last_received_ms: 0,
    pending_prekey: null,
  };
  return decrypt(session, a.sealed, a);
}
