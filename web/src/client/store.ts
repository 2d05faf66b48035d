/**
 * The client's local state behind one interface: identity and device keys, device-list high-water marks,
 * prekey privates, ratchet sessions, the replay cache, processed envelopes, the inbox cursor and the messages
 * shown to the user. {@link MemoryStore} keeps it in memory; `PersistentStore` (persist.ts) adds a sealed copy
 * on disk (the browser's IndexedDB, encrypted under a non-extractable WebCrypto key: issue 16 item 4).
 *
 * Every mutation the client makes for one operation runs inside one {@link ClientStore.transaction}: all of
 * it is kept or none. The custody rule (acknowledge to the relay only after the local commit, post a message
 * only after it is in the outbox on disk) is {@link ClientStore.durable}: the client awaits it before those
 * requests.
 */
import { toHex as hex } from "../protocol/bytes.js";
import type { LogPlaintext } from "../protocol/log.js";
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

/** A message as the user sees it: received (`in`) or sent (`out`), kept in the same commit as its state. */
export interface StoredMessage {
  readonly direction: "in" | "out";
  /** The sender's device address (`in`), or the address it was sent to (`out`), canonical. */
  readonly peer: string;
  readonly sentAtMs: number;
  readonly messageId: Uint8Array;
  readonly contentType: string;
  readonly body: Uint8Array;
}

/** One sent message's envelopes, sealed and committed before they are posted (crypto.md §8.5). */
export interface OutboxEntry {
  /** The message id (16 random bytes): the envelopes' idempotency keys derive from it. */
  readonly messageId: Uint8Array;
  readonly envelopes: readonly OutboundEnvelope[];
  /**
   * The message's `pair_seq` (account-log.md §9: one counter per recipient account, the same number in every
   * envelope of the message); 0 for an entry sealed before the number was kept here.
   */
  readonly pairSeq: number;
}

/**
 * A `message-sent` or `message-received` record waiting to be appended to the account log (account-log.md
 * §10 "log_pending"): queued in the same commit as what it records, removed once the relay stored it, so a
 * crash in between appends it again under the same record id (the relay keeps the first: L3).
 */
export interface LogPendingEntry {
  /** `messageRecordId(account, sender device address, message uid)` (§4.4). */
  readonly recordId: Uint8Array;
  /** `writer_seq` is 0 until the record is first sealed; then that number is kept for every retry. */
  readonly plaintext: LogPlaintext;
}

export interface ClientStore {
  identity(): DeviceIdentity | null;
  /** Set this device; null forgets it (a link whose version the relay refused: nothing of it exists there). */
  setIdentity(identity: DeviceIdentity | null): void;

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

  /**
   * The next `pair_seq` for messages to `peerAccount` (`account@relay`: account-log.md §9, one counter per
   * recipient account), 1, 2, …, reserved by the call.
   */
  takePairSeq(peerAccount: string): number;

  /** The log records not appended yet, oldest first. */
  logPending(): LogPendingEntry[];
  /** Queue (or replace: same record id) a record to append. */
  putLogPending(entry: LogPendingEntry): void;
  /** Remove a record the relay stored; idempotent. */
  deleteLogPending(recordId: Uint8Array): void;

  /** Append a message to the history the user sees (received or sent). */
  keepMessage(message: StoredMessage): void;
  /** The history, oldest first. */
  messages(): readonly StoredMessage[];

  /** Run `fn` atomically: every change inside is kept, or (when `fn` throws) none is. Not reentrant. */
  transaction<T>(fn: () => T): T;
  /**
   * Resolves once every transaction committed so far is on durable storage (at once for a store in memory);
   * rejects when writing it failed. The client awaits it before a request that must follow a local commit.
   */
  durable(): Promise<void>;
}

/** The whole state of a {@link MemoryStore} (persist.ts encodes it). */
export interface MemoryState {
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
  logPending: Map<string, LogPendingEntry>;
  messages: StoredMessage[];
  /** The app's own small values (its relay URL, what it finished setting up), not the protocol's. */
  settings: Map<string, string>;
}

/** A state with nothing in it (a new device). */
export function emptyState(): MemoryState {
  return {
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
    logPending: new Map(),
    messages: [],
    settings: new Map(),
  };
}

/** Everything in memory (tests, Node scripts): lost when the process ends. */
export class MemoryStore implements ClientStore {
  protected state: MemoryState;
  private inTransaction = false;

  constructor(state: MemoryState = emptyState()) {
    this.state = state;
  }

  identity(): DeviceIdentity | null {
    return this.state.identity;
  }
  setIdentity(identity: DeviceIdentity | null): void {
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
  takePairSeq(peerAccount: string): number {
    // Counters stored before they were per account were per recipient device (`device.account@relay`): the
    // account's counter starts above the highest of them, so no number is used twice toward one account.
    let last = this.state.pairSeq.get(peerAccount) ?? 0;
    for (const [name, value] of this.state.pairSeq) if (name.endsWith(`.${peerAccount}`)) last = Math.max(last, value);
    this.state.pairSeq.set(peerAccount, last + 1);
    return last + 1;
  }
  logPending(): LogPendingEntry[] {
    return [...this.state.logPending.values()];
  }
  putLogPending(entry: LogPendingEntry): void {
    this.state.logPending.set(hex(entry.recordId), entry);
  }
  deleteLogPending(recordId: Uint8Array): void {
    this.state.logPending.delete(hex(recordId));
  }
  keepMessage(message: StoredMessage): void {
    this.state.messages.push(message);
  }
  messages(): readonly StoredMessage[] {
    return this.state.messages;
  }
  setting(name: string): string | null {
    return this.state.settings.get(name) ?? null;
  }
  setSetting(name: string, value: string): void {
    this.state.settings.set(name, value);
  }
  durable(): Promise<void> {
    return Promise.resolve();
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
      logPending: new Map(this.state.logPending),
      messages: [...this.state.messages],
      settings: new Map(this.state.settings),
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
