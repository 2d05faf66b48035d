/**
 * The account log as this browser reads it (docs/account-log.md §3.3, §4.6, §5.1 v3, §5.5, §5.6;
 * protocol/client/sync.py `read_log`): page the log from the stored cursor, verify every key record against
 * the verified device list of the version it names, unwrap this device's grants (every epoch key, so a newly
 * linked device replays the whole history), open the signed records, judge each writer's order and close-out
 * marks, and add the sent and received messages to the history the user sees.
 *
 * One bad record never blocks the others: it is refused (a warning with its stable code), and the cursor
 * moves past it. A record under an epoch this device holds no key for stops the reader there (the cursor
 * stays before it) until a device grants the key. The state lives in the store's sealed state (one setting,
 * committed with the messages it produced).
 *
 * Not read here (yet): legacy v1 key records and unsigned records (a format-1 account's history), snapshots
 * (the reader pages from the start; retention gaps are reported, not loaded), recovery backups (skipped: this
 * device never holds the recovery secret). Not done: rotations (a revocation's new epoch is written by a CLI
 * device), the §4.6 "wait" for records of removed writers (they are judged by the close-out marks only).
 */
import { equal, fromHex, toHex } from "../protocol/bytes.js";
import { verifyChain } from "../protocol/deviceList.js";
import { TetherlessError } from "../protocol/errors.js";
import { encapsulateFor } from "../protocol/hybrid.js";
import { formatAddress } from "../protocol/ids.js";
import {
  type KeyEpochRecordV2,
  type LogPlaintext,
  decodeKeyRecordV2,
  decodeRecoveryBackup,
  judgeWriterSeq,
  keyCommitment,
  makeKeyRecordV2,
  messageRecordId,
  openSignedRecord,
  sealSignedRecord,
  unwrapGrantV2,
  verifyKeyRecordV2,
  type WriterState,
} from "../protocol/log.js";
import type { DeviceEntry } from "../protocol/messages.js";
import { AppendRequestDef, AppendResponseDef, type LogRecord, LogPageDef } from "../protocol/wire.js";
import { type ClientDeps, platformDeps } from "./client.js";
import type { RelayApi } from "./http.js";
import type { DeviceIdentity, MemoryStore, StoredMessage } from "./store.js";

const SETTING = "account-log";
const PAGE = 500;

/** What this device knows about one epoch (sync.py `EpochInfo`). */
interface EpochInfo {
  position: number;
  listVersion: number;
  /** Device id → Ed25519 key of every device its verified key records granted it. */
  writers: Map<string, Uint8Array>;
}

interface LogState {
  cursor: number;
  keys: Map<number, Uint8Array>;
  commitments: Map<number, Uint8Array>;
  epochs: Map<number, EpochInfo>;
  writerMarks: Map<string, WriterState>;
  applied: Set<string>;
  /** The last `writer_seq` this device used. */
  writerSeq: number;
}

/** A record this device will not trust (account-log.md §18.1): skipped, reported with its stable code. */
export interface LogWarning {
  readonly code: string;
  readonly detail: string;
}

/** The device was removed from its account's verified list: it stops syncing and sending. */
export class DeviceRevokedError extends TetherlessError {
  constructor(detail: string) {
    super("device_revoked", detail);
    this.name = "DeviceRevokedError";
  }
}

export interface SyncResult {
  readonly added: StoredMessage[];
  readonly warnings: LogWarning[];
  /** Records wait for a key this device was not granted yet (the cursor stays before them). */
  readonly waitingForKey: boolean;
}

// The state is JSON inside the sealed store (hex for bytes): small, and its schema is this file's alone.
type Json = {
  cursor: number;
  keys: [number, string][];
  commitments: [number, string][];
  epochs: [number, { position: number; listVersion: number; writers: [string, string][] }][];
  writerMarks: [string, { high: number; closedAt?: number }][];
  applied: string[];
  writerSeq: number;
};

function load(store: MemoryStore): LogState {
  const raw = store.setting(SETTING);
  if (!raw) {
    return {
      cursor: 0,
      keys: new Map(),
      commitments: new Map(),
      epochs: new Map(),
      writerMarks: new Map(),
      applied: new Set(),
      writerSeq: 0,
    };
  }
  const j = JSON.parse(raw) as Json;
  return {
    cursor: j.cursor,
    keys: new Map(j.keys.map(([e, k]) => [e, fromHex(k)])),
    commitments: new Map(j.commitments.map(([e, c]) => [e, fromHex(c)])),
    epochs: new Map(
      j.epochs.map(([e, i]) => [
        e,
        {
          position: i.position,
          listVersion: i.listVersion,
          writers: new Map(i.writers.map(([d, k]) => [d, fromHex(k)])),
        },
      ]),
    ),
    writerMarks: new Map(j.writerMarks),
    applied: new Set(j.applied),
    writerSeq: j.writerSeq,
  };
}

function save(store: MemoryStore, s: LogState): void {
  const j: Json = {
    cursor: s.cursor,
    keys: [...s.keys].map(([e, k]) => [e, toHex(k)]),
    commitments: [...s.commitments].map(([e, c]) => [e, toHex(c)]),
    epochs: [...s.epochs].map(([e, i]) => [
      e,
      { position: i.position, listVersion: i.listVersion, writers: [...i.writers].map(([d, k]) => [d, toHex(k)]) },
    ]),
    writerMarks: [...s.writerMarks],
    applied: [...s.applied],
    writerSeq: s.writerSeq,
  };
  store.setSetting(SETTING, JSON.stringify(j));
}

export class LogSync {
  private readonly api: RelayApi;
  private readonly store: MemoryStore;
  private readonly deps: ClientDeps;

  constructor(api: RelayApi, store: MemoryStore, deps: ClientDeps = platformDeps) {
    this.api = api;
    this.store = store;
    this.deps = deps;
  }

  private get me(): DeviceIdentity {
    const me = this.store.identity();
    if (!me) throw new Error("no device in this store");
    return me;
  }

  /** How many epoch keys this device holds (0: no device granted it the history yet). */
  heldEpochs(): number {
    return load(this.store).keys.size;
  }

  /**
   * Read the log from the cursor to the head and apply it (see the module comment). Throws
   * {@link DeviceRevokedError} when this device is not in its account's verified list, the chain's errors
   * (`invalid_device_list`, `bad_signature`, …), {@link RelayError} (`device_revoked`, …) and `TransportError`.
   * Idempotent: a record applied twice changes nothing. Each page is committed (and durable) before the next
   * is read; cancelling between pages keeps what was committed.
   */
  async sync(): Promise<SyncResult> {
    const me = this.me;
    const chain = await this.api.deviceChain(me.accountId);
    const verified = verifyChain(chain, me.accountId, this.store.mark(me.accountId) ?? undefined);
    this.store.transaction(() => this.store.setMark(me.accountId, verified.mark));
    if (!verified.devices.some((d) => d.device_id === me.deviceId)) {
      throw new DeviceRevokedError(
        `this device was removed from its account (device list version ${verified.head.version})`,
      );
    }
    // The chain verified as a whole, so every version in it is the account's list at that version.
    const listAt = (version: number): DeviceEntry[] | null => {
      const signed = chain.versions[version - 1];
      return signed && signed.device_list.version === version ? signed.device_list.devices : null;
    };
    const added: StoredMessage[] = [];
    const warnings: LogWarning[] = [];
    let waitingForKey = false;
    for (;;) {
      const state = load(this.store);
      const page = await this.api.call("GET", `/v1/log?after=${state.cursor}&limit=${PAGE}`, {
        response: LogPageDef,
        auth: true,
      });
      for (const r of page.records) {
        if (r.position <= state.cursor) {
          throw new TetherlessError(
            "malformed_body",
            "the relay served a log record at or below the requested position",
          );
        }
      }
      const stop = this.store.transaction(() => {
        // Key records first (sync.py `_apply_keys`): a record placed before the rotation that closes its writer
        // is judged with the rotation's marks.
        for (const r of page.records) if (r.kind === "key") this.applyKey(state, r, listAt, warnings);
        for (const r of page.records) {
          if (r.kind === "event" || r.kind === "state") {
            if (!state.keys.has(r.epoch)) {
              warnings.push({
                code: "log_key_missing",
                detail: `no key for epoch ${r.epoch}: log records from position ${r.position} wait until a device of this account grants it`,
              });
              save(this.store, state); // what was applied before it stays applied; the cursor stays before it
              return true;
            }
            try {
              const plaintext = this.openEvent(state, r);
              if (plaintext) {
                const message = this.applyMessage(plaintext);
                if (message) added.push(message);
              }
              state.applied.add(toHex(r.record_id));
            } catch (error) {
              if (!(error instanceof TetherlessError)) throw error;
              warnings.push({
                code: error.code,
                detail: `refused log record at position ${r.position} (epoch ${r.epoch}): ${error.detail}`,
              });
            }
          }
          state.cursor = r.position;
        }
        state.cursor = Math.max(state.cursor, page.records.length ? state.cursor : page.next_after);
        save(this.store, state);
        return false;
      });
      await this.store.durable();
      if (stop) {
        waitingForKey = true;
        break;
      }
      if (!page.more) break;
    }
    return { added, warnings, waitingForKey };
  }

  private applyKey(
    state: LogState,
    r: LogRecord,
    listAt: (version: number) => DeviceEntry[] | null,
    warnings: LogWarning[],
  ): void {
    if (decodeRecoveryBackup(r.ciphertext)) return; // for the recovery key's holder only (§5.7)
    const me = this.me;
    let record: KeyEpochRecordV2;
    let devices: DeviceEntry[];
    let keys: Map<number, Uint8Array>;
    try {
      record = decodeKeyRecordV2(r.ciphertext);
      const body = record.body;
      if (r.device_list_version !== null && r.device_list_version !== body.device_list_version) {
        throw new TetherlessError("bad_signature", "key record names another device list version than its header");
      }
      const list = listAt(body.device_list_version);
      if (!list) {
        throw new TetherlessError(
          "bad_signature",
          `key record names device list version ${body.device_list_version}, which does not exist`,
        );
      }
      devices = list;
      verifyKeyRecordV2(record, me.accountId, r.epoch, devices);
      const creates = r.epoch === 1 || body.rotation;
      const previous = state.epochs.get(r.epoch - 1);
      if (creates && previous && body.device_list_version < previous.listVersion) {
        throw new TetherlessError("bad_signature", "key record names an older device list than the epoch before it");
      }
      keys = unwrapGrantV2(record, me.deviceId, me.boxPrivate, me.kemSeed) ?? new Map();
    } catch (error) {
      if (!(error instanceof TetherlessError)) throw error;
      warnings.push({
        code: error.code,
        detail: `refused log record at position ${r.position} (epoch ${r.epoch}): ${error.detail}`,
      });
      return;
    }
    const body = record.body;
    const byId = new Map(devices.map((d) => [d.device_id, d]));
    for (const c of body.commitments) if (!state.commitments.has(c.epoch)) state.commitments.set(c.epoch, c.commitment);
    for (const m of record.closed) {
      const mark = state.writerMarks.get(m.device_id);
      if (mark?.closedAt === undefined)
        state.writerMarks.set(m.device_id, { high: mark?.high ?? 0, closedAt: m.last_seq });
    }
    const writers = new Map(body.grants.map((g) => [g.device_id, byId.get(g.device_id)!.sign_key]));
    const info = state.epochs.get(r.epoch);
    if (info) for (const [d, k] of writers) info.writers.set(d, k);
    else if (r.epoch === 1 || body.rotation) {
      state.epochs.set(r.epoch, { position: r.position, listVersion: body.device_list_version, writers });
    }
    for (const [epoch, key] of keys) {
      // Each key must match the commitment its own epoch's record made (the first one seen).
      const commitment = state.commitments.get(epoch);
      if (commitment && toHex(keyCommitment(me.accountId, epoch, key)) === toHex(commitment))
        state.keys.set(epoch, key);
    }
  }

  /** Open and judge one signed record (sync.py `_open_event`); null for a harmless replay. Throws as refused. */
  private openEvent(state: LogState, r: LogRecord): LogPlaintext | null {
    const newer = [...state.epochs].filter(([e, i]) => e > r.epoch && i.position < r.position);
    if (newer.length) {
      throw new TetherlessError(
        "log_epoch_stale",
        `written under epoch ${r.epoch} after epoch ${Math.min(...newer.map(([e]) => e))} was created`,
      );
    }
    const info = state.epochs.get(r.epoch);
    if (!info)
      throw new TetherlessError("malformed_body", "a record under a legacy (v1) epoch: not read by this client");
    const plaintext = openSignedRecord(state.keys.get(r.epoch)!, r.ciphertext, info.writers, {
      accountId: this.me.accountId,
      recordId: r.record_id,
      epoch: r.epoch,
      kind: r.kind as "event" | "state",
    });
    const writer = plaintext.writer_device;
    const mark = state.writerMarks.get(writer);
    const verdict = judgeWriterSeq(writer, plaintext.writer_seq, mark, state.applied.has(toHex(r.record_id)));
    if (verdict === "replay") return null;
    state.writerMarks.set(writer, { ...mark, high: plaintext.writer_seq });
    if (writer === this.me.deviceId) state.writerSeq = Math.max(state.writerSeq, plaintext.writer_seq);
    return plaintext;
  }

  /** A logged message into the shown history, unless it is there already (from this device's own inbox). */
  private applyMessage(p: LogPlaintext): StoredMessage | null {
    const body = p.body;
    if (body.type === "device-state") return null;
    const direction = body.type === "message-sent" ? "out" : "in";
    const uid = toHex(body.message_uid);
    if (this.store.messages().some((m) => m.direction === direction && toHex(m.messageId) === uid)) return null;
    const message: StoredMessage = {
      direction,
      peer: body.type === "message-sent" ? (body.recipients[0] ?? "") : body.sender,
      sentAtMs: body.sent_at_ms,
      messageId: body.message_uid,
      contentType: body.content_type,
      body: body.body,
    };
    this.store.keepMessage(message);
    return message;
  }

  /**
   * Queue a message this device sent or received for the log (account-log.md §4.5) and append what is
   * pending ({@link appendPending}). Resolves to whether the record is in the log now (false: no epoch key
   * yet, it stays queued). Throws as {@link appendPending}. Idempotent per message (the same record id).
   */
  async appendMessage(body: LogPlaintext["body"]): Promise<boolean> {
    if (body.type === "device-state") throw new RangeError("only messages are logged here");
    const me = this.me;
    const recordId = messageRecordId(me.accountId, body.sender, body.message_uid);
    const plaintext = { writer_device: me.deviceId, writer_seq: 0, created_at_ms: this.deps.now(), body };
    this.store.transaction(() => this.store.putLogPending({ recordId, plaintext }));
    await this.store.durable();
    await this.appendPending();
    return !this.store.logPending().some((e) => equal(e.recordId, recordId));
  }

  /**
   * Append every pending `message-sent` / `message-received` record (queued by the client in the commit of
   * the post or the receive: client.ts), oldest first (account-log.md §4.6; sync.py `append_pending`): a
   * signed record under the newest epoch this device holds, under its deterministic record id (§4.4), so
   * two devices logging the same message write one record; then it leaves the queue. Its `writer_seq` is
   * taken (and committed) when it is first sealed and kept for every retry, so a lost answer reuses the
   * number rather than leaving a gap. Returns how many were appended and whether some wait for a key (this
   * device holds no epoch key yet). Throws {@link RelayError} (`log_epoch_stale`, `log_rekey_required`: a
   * rotation is due, written by another device) and `TransportError`; the unappended records stay queued.
   * Idempotent (the relay keeps the first copy of a record id: L3). Cancelling leaves each record queued
   * or appended; a queued one is appended again, harmlessly.
   */
  async appendPending(): Promise<{ appended: number; waitingForKey: boolean }> {
    const me = this.me;
    let appended = 0;
    for (const entry of this.store.logPending()) {
      const state = load(this.store);
      const epoch = Math.max(0, ...[...state.keys.keys()].filter((e) => state.epochs.has(e)));
      if (!epoch) return { appended, waitingForKey: true };
      const { recordId } = entry;
      if (state.applied.has(toHex(recordId))) {
        // Read back from the log already (this device's earlier append, or another device's copy).
        this.store.transaction(() => this.store.deleteLogPending(recordId));
        continue;
      }
      let plaintext = entry.plaintext;
      if (plaintext.writer_seq === 0) {
        plaintext = { ...plaintext, writer_seq: state.writerSeq + 1 };
        const numbered = plaintext;
        this.store.transaction(() => {
          state.writerSeq = numbered.writer_seq;
          save(this.store, state);
          this.store.putLogPending({ recordId, plaintext: numbered });
        });
        await this.store.durable();
      }
      const ciphertext = sealSignedRecord(
        state.keys.get(epoch)!,
        plaintext,
        me.signSeed,
        { accountId: me.accountId, recordId, epoch },
        this.deps.random(24),
      );
      await this.api.call("POST", "/v1/log", {
        request: {
          def: AppendRequestDef,
          value: {
            records: [
              {
                record_id: recordId,
                kind: "event",
                epoch,
                ciphertext,
                snapshot_id: null,
                covers: null,
                parts: null,
                device_list_version: null,
              },
            ],
            expected_head: null,
          },
        },
        response: AppendResponseDef,
        auth: true,
      });
      this.store.transaction(() => this.store.deleteLogPending(recordId));
      appended += 1;
    }
    await this.store.durable();
    return { appended, waitingForKey: false };
  }

  /**
   * Grant every epoch key this device holds to `deviceId`, a device of the verified list (account-log.md
   * §5.5 "approval carries the history"; sync.py `ensure_epoch`): a grant-only v2 key record under the newest
   * epoch, naming the list version that holds the device, appended with `expected_head` = the head just read
   * (a concurrent rotation makes it `log_conflict`: call again). Returns `"not-joined"` while the device is not
   * in the verified list, `"no-key"` when this device holds no key of the newest epoch (or the device has no
   * `kem_key`: a format-2 entry gets keys through sessions, not done here). Throws {@link RelayError} and `TransportError`. Idempotent in effect:
   * a second grant of the same keys only repeats them.
   */
  async grantHistory(deviceId: string): Promise<"granted" | "not-joined" | "no-key"> {
    await this.sync();
    const me = this.me;
    const verified = verifyChain(
      await this.api.deviceChain(me.accountId),
      me.accountId,
      this.store.mark(me.accountId) ?? undefined,
    );
    this.store.transaction(() => this.store.setMark(me.accountId, verified.mark));
    const entry = verified.devices.find((d) => d.device_id === deviceId);
    const state = load(this.store);
    const epoch = Math.max(0, ...state.epochs.keys());
    if (!entry) return "not-joined";
    if (!entry.kem_key.length || !state.keys.has(epoch)) return "no-key";
    const ciphertext = makeKeyRecordV2({
      creatorSeed: me.signSeed,
      accountId: me.accountId,
      creatorDevice: me.deviceId,
      epoch,
      keys: state.keys,
      rotation: false,
      deviceListVersion: verified.head.version,
      devices: [entry],
      createdAtMs: this.deps.now(),
      wraps: [encapsulateFor(entry.kem_key, this.deps.random(64))],
    });
    const record = {
      record_id: this.deps.random(16),
      kind: "key",
      epoch,
      ciphertext,
      snapshot_id: null,
      covers: null,
      parts: null,
      device_list_version: verified.head.version,
    };
    await this.api.call("POST", "/v1/log", {
      request: { def: AppendRequestDef, value: { records: [record], expected_head: state.cursor } },
      response: AppendResponseDef,
      auth: true,
    });
    return "granted";
  }

  /** This device's address as a log record names it (the sender of what it sends). */
  ownAddress(): string {
    const me = this.me;
    return formatAddress({ account: me.accountId, device: me.deviceId, relay: me.relayName });
  }
}
