/**
 * The client's state at rest: a {@link MemoryStore} whose every commit is also written, sealed, to a
 * {@link StateBackend} (the browser's IndexedDB: idb.ts). Issue 16 item 4: the state is encrypted under an
 * AES-256-GCM key that WebCrypto created non-extractable, so script on the page can use the key but never
 * read it, and the bytes on disk are useless without the browser profile's key store.
 *
 * Format (local to one browser, never on the wire; web/README.md "State at rest"): `0x01 ‖ iv (12) ‖
 * AES-GCM(key, iv, encode(StoredStateDef, state), ad = "tetherless-web-state/1")`. The plaintext is a
 * MessagePack map through the protocol codec, so decoding validates every field like a relay answer.
 * Each commit rewrites the whole state: one record, so a crash leaves the previous commit or the new one.
 */
import { concat, equal, fromHex, toHex, utf8 } from "../protocol/bytes.js";
import { type StructDef, bytes, decode, encode, int, list, optional, str, struct } from "../protocol/codec.js";
import { TetherlessError } from "../protocol/errors.js";
import {
  type OutboundEnvelope,
  OutboundEnvelopeDef,
  PREKEY_KINDS,
  type PrekeyKind,
  type SignedDeviceList,
  SignedDeviceListDef,
} from "../protocol/messages.js";
import { type LogPlaintext, LogPlaintextDef } from "../protocol/log.js";
import { type SessionState, SessionStateDef } from "../protocol/session.js";
import { type MemoryState, MemoryStore, type StoredMessage, emptyState } from "./store.js";

export const STATE_FORMAT = 0x01;
const STATE_AD = utf8("tetherless-web-state/1") as Uint8Array<ArrayBuffer>;
const IV_BYTES = 12;

/** Where the sealed state lives: one record, replaced whole. */
export interface StateBackend {
  /** The sealed state last saved, or null for a new device. */
  load(): Promise<Uint8Array | null>;
  /** Replace the sealed state; resolves only once the write is durable (IndexedDB: the transaction completed). */
  save(sealed: Uint8Array): Promise<void>;
}

// -- the stored form (snake_case like the protocol's structs; lists, not maps: keys are data here) ----------

interface StoredIdentity {
  sign_seed: Uint8Array;
  box_private: Uint8Array;
  kem_seed: Uint8Array;
  account_id: string;
  device_id: string;
  address: string;
  relay_name: string;
  genesis: SignedDeviceList;
}
const StoredIdentityDef: StructDef<StoredIdentity> = {
  name: "StoredIdentity",
  fields: [
    { name: "sign_seed", type: bytes(32, 32) },
    { name: "box_private", type: bytes(32, 32) },
    { name: "kem_seed", type: bytes(64, 64) },
    { name: "account_id", type: str() },
    { name: "device_id", type: str() },
    { name: "address", type: str() },
    { name: "relay_name", type: str() },
    { name: "genesis", type: struct(SignedDeviceListDef) },
  ],
};
interface StoredMark {
  account_id: string;
  version: number;
  list_hash: Uint8Array;
}
const StoredMarkDef: StructDef<StoredMark> = {
  name: "StoredMark",
  fields: [
    { name: "account_id", type: str() },
    { name: "version", type: int(1) },
    { name: "list_hash", type: bytes(32, 32) },
  ],
};
interface StoredPrekey {
  kind: PrekeyKind;
  key_id: number;
  private_key: Uint8Array;
}
const StoredPrekeyDef: StructDef<StoredPrekey> = {
  name: "StoredPrekey",
  fields: [
    { name: "kind", type: str({ oneOf: PREKEY_KINDS }) },
    { name: "key_id", type: int(0) },
    { name: "private_key", type: bytes(32, 64) },
  ],
};
interface StoredCounter {
  name: string;
  value: number;
}
const StoredCounterDef: StructDef<StoredCounter> = {
  name: "StoredCounter",
  fields: [
    { name: "name", type: str() },
    { name: "value", type: int(0) },
  ],
};
interface StoredCurrent {
  peer_address: string;
  session_id: Uint8Array;
}
const StoredCurrentDef: StructDef<StoredCurrent> = {
  name: "StoredCurrent",
  fields: [
    { name: "peer_address", type: str() },
    { name: "session_id", type: bytes() },
  ],
};
interface StoredOutbox {
  message_id: Uint8Array;
  envelopes: OutboundEnvelope[];
  pair_seq: number;
}
const StoredOutboxDef: StructDef<StoredOutbox> = {
  name: "StoredOutbox",
  fields: [
    { name: "message_id", type: bytes(16, 16) },
    { name: "envelopes", type: list(struct(OutboundEnvelopeDef), 1) },
    // Added with the log's message-sent records: an entry saved before has none (its record says 0).
    { name: "pair_seq", type: int(0), default: () => 0 },
  ],
};
interface StoredLogPending {
  record_id: Uint8Array;
  plaintext: LogPlaintext;
}
const StoredLogPendingDef: StructDef<StoredLogPending> = {
  name: "StoredLogPending",
  fields: [
    { name: "record_id", type: bytes(16, 16) },
    { name: "plaintext", type: struct(LogPlaintextDef) },
  ],
};
interface StoredMessageRecord {
  direction: string;
  peer: string;
  sent_at_ms: number;
  message_id: Uint8Array;
  content_type: string;
  body: Uint8Array;
}
const StoredMessageDef: StructDef<StoredMessageRecord> = {
  name: "StoredMessage",
  fields: [
    { name: "direction", type: str({ oneOf: ["in", "out"] }) },
    { name: "peer", type: str() },
    { name: "sent_at_ms", type: int(0) },
    { name: "message_id", type: bytes() },
    { name: "content_type", type: str() },
    { name: "body", type: bytes() },
  ],
};
interface StoredSetting {
  name: string;
  value: string;
}
const StoredSettingDef: StructDef<StoredSetting> = {
  name: "StoredSetting",
  fields: [
    { name: "name", type: str() },
    { name: "value", type: str() },
  ],
};
interface StoredState {
  identity: StoredIdentity | null;
  marks: StoredMark[];
  prekeys: StoredPrekey[];
  prekey_ids: StoredCounter[];
  sessions: SessionState[];
  current: StoredCurrent[];
  transcripts: Uint8Array[];
  processed: Uint8Array[];
  cursor: number;
  pair_seq: StoredCounter[];
  outbox: StoredOutbox[];
  messages: StoredMessageRecord[];
  settings: StoredSetting[];
  log_pending: StoredLogPending[];
}
const StoredStateDef: StructDef<StoredState> = {
  name: "StoredState",
  fields: [
    { name: "identity", type: optional(struct(StoredIdentityDef)) },
    { name: "marks", type: list(struct(StoredMarkDef)) },
    { name: "prekeys", type: list(struct(StoredPrekeyDef)) },
    { name: "prekey_ids", type: list(struct(StoredCounterDef)) },
    { name: "sessions", type: list(struct(SessionStateDef)) },
    { name: "current", type: list(struct(StoredCurrentDef)) },
    { name: "transcripts", type: list(bytes()) },
    { name: "processed", type: list(bytes()) },
    { name: "cursor", type: int(0) },
    { name: "pair_seq", type: list(struct(StoredCounterDef)) },
    { name: "outbox", type: list(struct(StoredOutboxDef)) },
    { name: "messages", type: list(struct(StoredMessageDef)) },
    { name: "settings", type: list(struct(StoredSettingDef)) },
    // Added with the log's message records (a state saved before has none pending).
    { name: "log_pending", type: list(struct(StoredLogPendingDef)), default: () => [] },
  ],
};

const counters = (m: ReadonlyMap<string, number>): StoredCounter[] => [...m].map(([name, value]) => ({ name, value }));

/** The state's bytes (the plaintext that is sealed). Never throws for a state the client built. */
export function encodeState(state: MemoryState): Uint8Array {
  const id = state.identity;
  return encode(StoredStateDef, {
    identity: id && {
      sign_seed: id.signSeed,
      box_private: id.boxPrivate,
      kem_seed: id.kemSeed,
      account_id: id.accountId,
      device_id: id.deviceId,
      address: id.address,
      relay_name: id.relayName,
      genesis: id.genesis,
    },
    marks: [...state.marks].map(([account_id, [version, list_hash]]) => ({ account_id, version, list_hash })),
    prekeys: [...state.prekeys].map(([key, private_key]) => {
      const slash = key.lastIndexOf("/");
      return { kind: key.slice(0, slash) as PrekeyKind, key_id: Number(key.slice(slash + 1)), private_key };
    }),
    prekey_ids: counters(state.prekeyIds),
    sessions: [...state.sessions.values()],
    current: [...state.current].map(([peer_address, id]) => ({ peer_address, session_id: fromHex(id) })),
    transcripts: [...state.transcripts].map(fromHex),
    processed: [...state.processed].map(fromHex),
    cursor: state.cursor,
    pair_seq: counters(state.pairSeq),
    outbox: [...state.outbox.values()].map((e) => ({
      message_id: e.messageId,
      envelopes: [...e.envelopes],
      pair_seq: e.pairSeq,
    })),
    messages: state.messages.map((m) => ({
      direction: m.direction,
      peer: m.peer,
      sent_at_ms: m.sentAtMs,
      message_id: m.messageId,
      content_type: m.contentType,
      body: m.body,
    })),
    settings: [...state.settings].map(([name, value]) => ({ name, value })),
    log_pending: [...state.logPending.values()].map((e) => ({ record_id: e.recordId, plaintext: e.plaintext })),
  });
}

/** The state in `plaintext`. Throws `TetherlessError` (`malformed_body`, `invalid_field`) when it does not decode. */
export function decodeState(plaintext: Uint8Array): MemoryState {
  const s = decode(StoredStateDef, plaintext);
  const state = emptyState();
  const id = s.identity;
  state.identity = id && {
    signSeed: id.sign_seed,
    boxPrivate: id.box_private,
    kemSeed: id.kem_seed,
    accountId: id.account_id,
    deviceId: id.device_id,
    address: id.address,
    relayName: id.relay_name,
    genesis: id.genesis,
  };
  for (const m of s.marks) state.marks.set(m.account_id, [m.version, m.list_hash]);
  for (const p of s.prekeys) state.prekeys.set(`${p.kind}/${p.key_id}`, p.private_key);
  for (const c of s.prekey_ids) state.prekeyIds.set(c.name, c.value);
  for (const session of s.sessions) state.sessions.set(toHex(session.session_id), session);
  for (const c of s.current) state.current.set(c.peer_address, toHex(c.session_id));
  for (const t of s.transcripts) state.transcripts.add(toHex(t));
  for (const p of s.processed) state.processed.add(toHex(p));
  state.cursor = s.cursor;
  for (const c of s.pair_seq) state.pairSeq.set(c.name, c.value);
  for (const e of s.outbox) {
    state.outbox.set(toHex(e.message_id), { messageId: e.message_id, envelopes: e.envelopes, pairSeq: e.pair_seq });
  }
  for (const e of s.log_pending)
    state.logPending.set(toHex(e.record_id), { recordId: e.record_id, plaintext: e.plaintext });
  state.messages = s.messages.map((m): StoredMessage => ({
    direction: m.direction as StoredMessage["direction"],
    peer: m.peer,
    sentAtMs: m.sent_at_ms,
    messageId: m.message_id,
    contentType: m.content_type,
    body: m.body,
  }));
  for (const setting of s.settings) state.settings.set(setting.name, setting.value);
  return state;
}

/**
 * `0x01 ‖ iv ‖ AES-GCM(key, iv, plaintext, ad)`; `iv` is 12 fresh random bytes. `ad` names what the record
 * is (the state; an outbox entry and its id: outbox.ts), so one record cannot be passed off as another.
 */
export async function sealState(
  key: CryptoKey,
  plaintext: Uint8Array,
  iv: Uint8Array,
  ad: Uint8Array = STATE_AD,
): Promise<Uint8Array> {
  if (iv.length !== IV_BYTES) throw new RangeError("the IV is 12 bytes");
  const ciphertext = await globalThis.crypto.subtle.encrypt(
    { name: "AES-GCM", iv: iv as Uint8Array<ArrayBuffer>, additionalData: ad as Uint8Array<ArrayBuffer> },
    key,
    plaintext as Uint8Array<ArrayBuffer>,
  );
  return concat(Uint8Array.of(STATE_FORMAT), iv, new Uint8Array(ciphertext));
}

/**
 * The plaintext of {@link sealState}'s output. Throws `TetherlessError` `malformed_body` for another format
 * or a record that does not open under `key` (changed on disk, or sealed under another key).
 */
export async function openState(key: CryptoKey, sealed: Uint8Array, ad: Uint8Array = STATE_AD): Promise<Uint8Array> {
  if (sealed.length < 1 + IV_BYTES + 16 || sealed[0] !== STATE_FORMAT) {
    throw new TetherlessError("malformed_body", "the stored state is not in a format this client reads");
  }
  try {
    const plaintext = await globalThis.crypto.subtle.decrypt(
      { name: "AES-GCM", iv: sealed.slice(1, 1 + IV_BYTES), additionalData: ad as Uint8Array<ArrayBuffer> },
      key,
      sealed.slice(1 + IV_BYTES),
    );
    return new Uint8Array(plaintext);
  } catch {
    throw new TetherlessError("malformed_body", "the stored state does not open under this browser's key");
  }
}

/**
 * A {@link MemoryStore} that writes each committed transaction, sealed under `key`, to `backend`, in commit
 * order. Reads are from memory (one tab owns the device: the app takes a Web Lock first).
 */
export class PersistentStore extends MemoryStore {
  private readonly backend: StateBackend;
  private readonly key: CryptoKey;
  private readonly random: (n: number) => Uint8Array;
  private written: Promise<void> = Promise.resolve();
  private lastWritten: Uint8Array | null = null;

  private constructor(state: MemoryState, backend: StateBackend, key: CryptoKey, random: (n: number) => Uint8Array) {
    super(state);
    this.backend = backend;
    this.key = key;
    this.random = random;
  }

  /**
   * The store saved in `backend` (a new, empty one when it holds nothing). Throws `TetherlessError`
   * `malformed_body` when the saved state does not open under `key` or does not decode; the caller decides
   * (the app shows it and keeps the record: nothing is overwritten).
   */
  static async open(
    backend: StateBackend,
    key: CryptoKey,
    random: (n: number) => Uint8Array = (n) => globalThis.crypto.getRandomValues(new Uint8Array(n)),
  ): Promise<PersistentStore> {
    const sealed = await backend.load();
    const state = sealed === null ? emptyState() : decodeState(await openState(key, sealed));
    return new PersistentStore(state, backend, key, random);
  }

  override transaction<T>(fn: () => T): T {
    const result = super.transaction(fn);
    // The snapshot is taken now, synchronously, so a later transaction cannot leak into this write; writes
    // are chained so they land in commit order, and each is the whole state, so the last one holds all.
    const plaintext = encodeState(this.state);
    // A commit that changed nothing (a poll of an empty inbox) needs no write: the pending one holds it.
    if (this.lastWritten !== null && equal(plaintext, this.lastWritten)) return result;
    this.lastWritten = plaintext;
    const previous = this.written.catch(() => undefined);
    this.written = previous.then(async () => {
      try {
        await this.backend.save(await sealState(this.key, plaintext, this.random(IV_BYTES)));
      } catch (error) {
        this.lastWritten = null; // not on disk: the next commit writes again, changed or not
        throw error;
      }
    });
    return result;
  }

  /** Resolves when the last commit is written; rejects with the backend's error when that write failed. */
  override durable(): Promise<void> {
    return this.written;
  }
}
