/**
 * The client's local state behind one interface: identity and device keys, device-list high-water marks,
 * prekey privates, ratchet sessions, the replay cache, processed envelopes and the inbox cursor. Only an
 * in-memory implementation exists yet ({@link MemoryStore}); the browser's IndexedDB store (encrypted under a
 * non-extractable WebCrypto key, issue 16 item 4) implements the same interface later.
 *
 * Every mutation the client makes for one operation runs inside one {@link ClientStore.transaction}: all of
 * it is kept or none (the custody rule: acknowledge to the relay only after the local commit).
 */
import { toHex as hex } from "../protocol/bytes.js";
import type { OutboundEnvelope, PrekeyKind, SignedDeviceList } from "../protocol/messages.js";
import type { SessionState } from "../protocol/session.js";

/** The device's secrets (never leave the store) and what it is on its relay. */
export interface DeviceIdentity {
  /** Ed25519 seed (32 bytes): the device's signing key. */
  readonly signSeed: Uint8Array;
  /** X25519 private key (32 bytes): the identity key IK, `box_key` in the list. */
  readonly boxPrivate: Uint8Array;
  /** ML-KEM-768 seed `d ‖ z` (64 bytes): `kem_key` in the format-3 list. */
  readonly kemSeed: Uint8Array;
  readonly accountId: string;
  readonly deviceId: string;
  /** `device.account@relay`, canonical. */
  readonly address: string;
  readonly relayName: string;
  /** The genesis list this device signed: posted again when account creation got no answer. */
  readonly genesis: SignedDeviceList;
}

/** One sent message's envelopes, sealed and committed before they are posted (crypto.md §8.5). */
export interface OutboxEntry {
  /** The message id (16 random bytes): the envelopes' idempotency keys derive from it. */
  readonly messageId: Uint8Array;
  readonly envelopes: readonly OutboundEnvelope[];
}

export interface ClientStore {
  identity(): DeviceIdentity | null;
  setIdentity(identity: DeviceIdentity): void;

  /** The high-water mark `(version, list_hash)` of an account's verified chain (crypto.md §3.5). */
  mark(accountId: string): readonly [number, Uint8Array] | null;
  setMark(accountId: string, mark: readonly [number, Uint8Array]): void;

  prekeyPrivate(kind: PrekeyKind, keyId: number): Uint8Array | null;
  putPrekeyPrivate(kind: PrekeyKind, keyId: number, privateKey: Uint8Array): void;
  deletePrekeyPrivate(kind: PrekeyKind, keyId: number): void;
  /** The next unused key id of `kind` (ids only grow per kind on the relay). */
  nextPrekeyId(kind: PrekeyKind): number;

  /** The session messages to `peerAddress` go out on (the newest one established or answered). */
  currentSession(peerAddress: string): SessionState | null;
  sessionById(sessionId: Uint8Array): SessionState | null;
  /** Store `state` and make it the current session with its peer. */
  putSession(state: SessionState): void;

  /** Replay cache of session starts (transcript hashes, crypto.md §7.3). */
  hasTranscript(hash: Uint8Array): boolean;
  putTranscript(hash: Uint8Array): void;

  /** Envelopes already opened (at-least-once delivery: a redelivery is not shown twice). */
  isProcessed(envelopeId: Uint8Array): boolean;
  putProcessed(envelopeId: Uint8Array): void;

  inboxCursor(): number;
  setInboxCursor(cursor: number): void;

  /** Messages sealed and not yet accepted by the relay, oldest first. */
  outbox(): OutboxEntry[];
  putOutbox(entry: OutboxEntry): void;
  /** Remove the entry of `messageId` (after the relay accepted it); idempotent. */
  deleteOutbox(messageId: Uint8Array): void;

  /** The next per-pair sequence number for messages to `peerAddress` (1, 2, …), reserved by the call. */
  takePairSeq(peerAddress: string): number;

  /** Run `fn` atomically: every change inside is kept, or (when `fn` throws) none is. Not reentrant. */
  transaction<T>(fn: () => T): T;
}

interface MemoryState {
  identity: DeviceIdentity | null;
  marks: Map<string, readonly [number, Uint8Array]>;
  prekeys: Map<string, Uint8Array>;
  prekeyIds: Map<string, number>;
  sessions: Map<string, SessionState>;
  current: Map<string, string>;
  transcripts: Set<string>;
  processed: Set<string>;
  cursor: number;
  pairSeq: Map<string, number>;
  outbox: Map<string, OutboxEntry>;
}

/** Everything in memory (tests, Node scripts): lost when the process ends. */
export class MemoryStore implements ClientStore {
  private state: MemoryState = {
    identity: null,
    marks: new Map(),
    prekeys: new Map(),
    prekeyIds: new Map(),
    sessions: new Map(),
    current: new Map(),
    transcripts: new Set(),
    processed: new Set(),
    cursor: 0,
    pairSeq: new Map(),
    outbox: new Map(),
  };
  private inTransaction = false;

  identity(): DeviceIdentity | null {
    return this.state.identity;
  }
  setIdentity(identity: DeviceIdentity): void {
    this.state.identity = identity;
  }
  mark(accountId: string): readonly [number, Uint8Array] | null {
    return this.state.marks.get(accountId) ?? null;
  }
  setMark(accountId: string, mark: readonly [number, Uint8Array]): void {
    this.state.marks.set(accountId, mark);
  }
  prekeyPrivate(kind: PrekeyKind, keyId: number): Uint8Array | null {
    return this.state.prekeys.get(`${kind}/${keyId}`) ?? null;
  }
  putPrekeyPrivate(kind: PrekeyKind, keyId: number, privateKey: Uint8Array): void {
    this.state.prekeys.set(`${kind}/${keyId}`, privateKey);
  }
  deletePrekeyPrivate(kind: PrekeyKind, keyId: number): void {
    this.state.prekeys.delete(`${kind}/${keyId}`);
  }
  nextPrekeyId(kind: PrekeyKind): number {
    const next = (this.state.prekeyIds.get(kind) ?? 0) + 1;
    this.state.prekeyIds.set(kind, next);
    return next;
  }
  currentSession(peerAddress: string): SessionState | null {
    const id = this.state.current.get(peerAddress);
    return id === undefined ? null : (this.state.sessions.get(id) ?? null);
  }
  sessionById(sessionId: Uint8Array): SessionState | null {
    return this.state.sessions.get(hex(sessionId)) ?? null;
  }
  putSession(state: SessionState): void {
    this.state.sessions.set(hex(state.session_id), state);
    this.state.current.set(state.peer_address, hex(state.session_id));
  }
  hasTranscript(hash: Uint8Array): boolean {
    return this.state.transcripts.has(hex(hash));
  }
  putTranscript(hash: Uint8Array): void {
    this.state.transcripts.add(hex(hash));
  }
  isProcessed(envelopeId: Uint8Array): boolean {
    return this.state.processed.has(hex(envelopeId));
  }
  putProcessed(envelopeId: Uint8Array): void {
    this.state.processed.add(hex(envelopeId));
  }
  inboxCursor(): number {
    return this.state.cursor;
  }
  setInboxCursor(cursor: number): void {
    this.state.cursor = cursor;
  }
  outbox(): OutboxEntry[] {
    return [...this.state.outbox.values()];
  }
  putOutbox(entry: OutboxEntry): void {
    this.state.outbox.set(hex(entry.messageId), entry);
  }
  deleteOutbox(messageId: Uint8Array): void {
    this.state.outbox.delete(hex(messageId));
  }
  takePairSeq(peerAddress: string): number {
    const next = (this.state.pairSeq.get(peerAddress) ?? 0) + 1;
    this.state.pairSeq.set(peerAddress, next);
    return next;
  }
  transaction<T>(fn: () => T): T {
    if (this.inTransaction) throw new Error("MemoryStore.transaction is not reentrant");
    // Values are never mutated in place (states are replaced), so a shallow copy of each container restores.
    const saved: MemoryState = {
      ...this.state,
      marks: new Map(this.state.marks),
      prekeys: new Map(this.state.prekeys),
      prekeyIds: new Map(this.state.prekeyIds),
      sessions: new Map(this.state.sessions),
      current: new Map(this.state.current),
      transcripts: new Set(this.state.transcripts),
      processed: new Set(this.state.processed),
      pairSeq: new Map(this.state.pairSeq),
      outbox: new Map(this.state.outbox),
    };
    this.inTransaction = true;
    try {
      return fn();
    } catch (error) {
      this.state = saved;
      throw error;
    } finally {
      this.inTransaction = false;
    }
  }
}
