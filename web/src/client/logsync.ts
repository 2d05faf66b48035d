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
 * Writes (§5.3–§5.6; sync.py `ensure_epoch`): after reading to the head, {@link LogSync.sync} appends the key
 * record that is due ({@link nextKeyRecord}): epoch 1 when the log has none (a browser-created account, before
 * its first log write), a grant-only record carrying every epoch key held to current devices without the
 * newest epoch (an approved device replays the whole history), or a rotation when a device granted the newest
 * epoch left the verified list (a revocation, with the removed writers' close-out marks: a v3 record) or the
 * schedule is due. Records wait (never appended under the old epoch) while a rotation is due.
 * Snapshots written by any device are loaded when this device starts from far behind (snapshots.ts); the
 * hold-back of §9 is holdback.ts.
 *
 * Not read here: legacy v1 key records and unsigned records (a format-1 account's history), recovery backups
 * (skipped: this device never holds the recovery secret). Not done: the §4.6 "wait" for records of removed
 * writers (they are judged by the close-out marks only), keys through sessions for format-2 entries without a
 * `kem_key` (their grant is empty), writing snapshots.
 */
import { equal, fromHex, toHex } from "../protocol/bytes.js";
import { receivesAccountKeyGrants, verifyChain } from "../protocol/deviceList.js";
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
  nextKeyRecord,
  openSignedRecord,
  rotationReason,
  sealSignedRecord,
  unwrapGrantV2,
  verifyKeyRecordV2,
  type WriterState,
} from "../protocol/log.js";
import type { DeviceEntry } from "../protocol/messages.js";
import { AppendRequestDef, AppendResponseDef, type LogRecord, LogPageDef } from "../protocol/wire.js";
import { type ClientDeps, platformDeps } from "./client.js";
import { RelayError } from "./errors.js";
import { isHeld, receivedFromLog } from "./holdback.js";
import type { RelayApi } from "./http.js";
import { type SnapshotRef, checkManifest, fetchSnapshotState, pageAfter, snapshotToLoad } from "./snapshots.js";
import type { DeviceIdentity, MemoryStore, StoredMessage } from "./store.js";

const SETTING = "account-log";
const PAGE = 500;
/** A key record append refused for one of these is decided again after reading the log (sync.py). */
const REKEY_CODES = new Set(["log_conflict", "log_epoch_stale", "log_rekey_required"]);
/** Rounds of read → key record → read again per {@link LogSync.sync} (sync.py gives up after 3 refusals). */
const ROUNDS = 3;

/** What this device knows about one epoch (sync.py `EpochInfo` and its `epoch_records` counter). */
interface EpochInfo {
  position: number;
  listVersion: number;
  /** Device id → Ed25519 key of every device its verified key records granted it. */
  writers: Map<string, Uint8Array>;
  /** The creator's signed `created_at_ms` (the rotation schedule). */
  createdAtMs: number;
  /** Records applied under it (the rotation schedule). */
  records: number;
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
  /** The highest epoch a verified `key` record names (sync.py `key_epochs_seen`), also a grant-only one. */
  keyEpochSeen: number;
  /** Snapshots refused once (hex ids): never chosen again (§6.1 "Signed snapshots"). */
  refusedSnapshots: Set<string>;
  /** The snapshot chosen to start from (§6.3), until it is loaded, refused or superseded (snapshots.py loads). */
  pendingSnapshot: SnapshotRef | null;
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
  /** The key records this device appended in this sync (epoch 1, grants, rotations), oldest first. */
  readonly written: readonly KeyRecordWritten[];
}

/** A key record this device appended. */
export interface KeyRecordWritten {
  readonly epoch: number;
  readonly rotation: boolean;
  readonly position: number;
  /** The devices it grants. */
  readonly granted: readonly string[];
  /** The writers it closed (a v3 rotation), with their marks. */
  readonly closed: ReadonlyMap<string, number>;
}

// The state is JSON inside the sealed store (hex for bytes): small, and its schema is this file's alone.
// Fields added since the first version are optional: a state saved before them loads with their defaults.
type Json = {
  cursor: number;
  keys: [number, string][];
  commitments: [number, string][];
  epochs: [
    number,
    { position: number; listVersion: number; writers: [string, string][]; createdAtMs?: number; records?: number },
  ][];
  writerMarks: [string, { high: number; closedAt?: number }][];
  applied: string[];
  writerSeq: number;
  keyEpochSeen?: number;
  refusedSnapshots?: string[];
  pendingSnapshot?: (Omit<SnapshotRef, "snapshot_id"> & { snapshot_id: string }) | null;
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
      keyEpochSeen: 0,
      refusedSnapshots: new Set(),
      pendingSnapshot: null,
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
          // Unknown for an epoch read before the schedule was kept: its time never makes it due.
          createdAtMs: i.createdAtMs ?? Number.MAX_SAFE_INTEGER,
          records: i.records ?? 0,
        },
      ]),
    ),
    writerMarks: new Map(j.writerMarks),
    applied: new Set(j.applied),
    writerSeq: j.writerSeq,
    keyEpochSeen: j.keyEpochSeen ?? Math.max(0, ...j.epochs.map(([e]) => e)),
    refusedSnapshots: new Set(j.refusedSnapshots ?? []),
    pendingSnapshot: j.pendingSnapshot
      ? { ...j.pendingSnapshot, snapshot_id: fromHex(j.pendingSnapshot.snapshot_id) }
      : null,
  };
}

function save(store: MemoryStore, s: LogState): void {
  const j: Json = {
    cursor: s.cursor,
    keys: [...s.keys].map(([e, k]) => [e, toHex(k)]),
    commitments: [...s.commitments].map(([e, c]) => [e, toHex(c)]),
    epochs: [...s.epochs].map(([e, i]) => [
      e,
      {
        position: i.position,
        listVersion: i.listVersion,
        writers: [...i.writers].map(([d, k]) => [d, toHex(k)]),
        createdAtMs: i.createdAtMs,
        records: i.records,
      },
    ]),
    writerMarks: [...s.writerMarks],
    applied: [...s.applied],
    writerSeq: s.writerSeq,
    keyEpochSeen: s.keyEpochSeen,
    refusedSnapshots: [...s.refusedSnapshots],
    pendingSnapshot: s.pendingSnapshot
      ? { ...s.pendingSnapshot, snapshot_id: toHex(s.pendingSnapshot.snapshot_id) }
      : null,
  };
  store.setSetting(SETTING, JSON.stringify(j));
}

/** The newest epoch this device accepted a creating record for (0: none). */
function newestEpoch(state: LogState): number {
  return Math.max(0, ...state.epochs.keys());
}

type ListAt = (version: number) => DeviceEntry[] | null;

export class LogSync {
  private readonly api: RelayApi;
  private readonly store: MemoryStore;
  private readonly deps: ClientDeps;
  /** The verified list read by the last {@link sync}: its version, format and devices. */
  private current: { version: number; format: number; devices: DeviceEntry[] } | null = null;
  /** The snapshot decision is taken once per instance (sync.py: once per connection). */
  private snapshotChecked = false;

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

  /** The newest epoch this device knows, and the devices its key records granted it (tests, the UI). */
  newestEpoch(): { epoch: number; granted: string[] } {
    const state = load(this.store);
    const epoch = newestEpoch(state);
    return { epoch, granted: [...(state.epochs.get(epoch)?.writers.keys() ?? [])] };
  }

  /**
   * Read the log from the cursor to the head and apply it (see the module comment), then append the key record
   * that is due (epoch 1, a grant, a rotation: {@link nextKeyRecord}) and read again, at most {@link ROUNDS}
   * times (a `409` on the key record: another device wrote first; the next call decides again). Throws
   * {@link DeviceRevokedError} when this device is not in its account's verified list, the chain's errors
   * (`invalid_device_list`, `bad_signature`, …), {@link RelayError} (`device_revoked`, …) and `TransportError`.
   * Idempotent: a record applied twice changes nothing, and a key record is written only while it is due.
   * Each page is committed (and durable) before the next is read; cancelling between pages keeps what was
   * committed; a key record whose answer was lost is read back (it grants this device too).
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
    this.current = { version: verified.head.version, format: verified.head.format, devices: verified.devices };
    // The chain verified as a whole, so every version in it is the account's list at that version.
    const listAt: ListAt = (version) => {
      const signed = chain.versions[version - 1];
      return signed && signed.device_list.version === version ? signed.device_list.devices : null;
    };
    const added: StoredMessage[] = [];
    const warnings: LogWarning[] = [];
    const written: KeyRecordWritten[] = [];
    let waitingForKey = false;
    for (let round = 0; round < ROUNDS; round++) {
      waitingForKey = await this.read(listAt, added, warnings);
      if (waitingForKey) break; // never decide about epochs on a partial view (sync.py `blocked_on_key`)
      const outcome = await this.ensureEpoch();
      if (outcome === null) break;
      if (outcome !== "conflict") written.push(outcome);
    }
    return { added, warnings, waitingForKey, written };
  }

  /** Page from the cursor to the head (after a snapshot, when one is loaded). True: records wait for a key. */
  private async read(listAt: ListAt, added: StoredMessage[], warnings: LogWarning[]): Promise<boolean> {
    if (!this.snapshotChecked) {
      this.snapshotChecked = true;
      const state = load(this.store);
      const ref = state.pendingSnapshot ? null : await snapshotToLoad(this.api, state.cursor, state.refusedSnapshots);
      if (ref) {
        this.store.transaction(() => {
          const chosen = load(this.store);
          chosen.pendingSnapshot = ref;
          save(this.store, chosen);
        });
        await this.store.durable();
      }
    }
    const pending = load(this.store).pendingSnapshot;
    if (pending && !(await this.loadSnapshot(pending, listAt, added, warnings))) {
      warnings.push({
        code: "log_key_missing",
        detail: `no key for epoch ${pending.epoch}: the snapshot at log position ${pending.position} waits until a device of this account grants it`,
      });
      return true;
    }
    for (;;) {
      const cursor = load(this.store).cursor;
      const page = await this.api.call("GET", `/v1/log?after=${cursor}&limit=${PAGE}`, {
        response: LogPageDef,
        auth: true,
      });
      let previous = cursor;
      for (const r of page.records) {
        if (r.position <= previous) {
          throw new TetherlessError("malformed_body", "the relay served log records out of position order");
        }
        // Dense above the horizon (L1): skipped positions were deleted or are withheld (sync.py `_positions_dense`).
        const floor = Math.max(previous, page.horizon);
        if (r.position - 1 > floor) warnings.push(missing(floor + 1, r.position - 1));
        previous = r.position;
      }
      if (!page.records.length && page.more) {
        // Nothing although the relay claims more up to its head: stop rather than ask again forever.
        const floor = Math.max(cursor, page.horizon);
        if (page.head > floor) warnings.push(missing(floor + 1, page.head));
        return false;
      }
      const stop = this.store.transaction(() => {
        // Read again inside the commit: another sync of this store (a revocation's, the poll's) may have moved
        // on while the page was fetched; what it applied is not applied twice.
        const state = load(this.store);
        const records = page.records.filter((r) => r.position > state.cursor);
        // Key records first (sync.py `_apply_keys`): a record placed before the rotation that closes its writer
        // is judged with the rotation's marks.
        for (const r of records) if (r.kind === "key") this.applyKey(state, r, listAt, warnings);
        for (const r of records) {
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
                const message = this.applyMessage(plaintext, r.record_id);
                if (message) added.push(message);
                const info = state.epochs.get(r.epoch);
                if (info) info.records += 1;
              }
              state.applied.add(toHex(r.record_id));
            } catch (error) {
              if (!(error instanceof TetherlessError)) throw error;
              warnings.push(refusal(r, error));
            }
          }
          state.cursor = r.position;
        }
        if (!page.records.length) state.cursor = Math.max(state.cursor, page.next_after);
        save(this.store, state);
        return false;
      });
      await this.store.durable();
      if (stop) return true;
      if (!page.more) return false;
    }
  }

  /**
   * Start from the snapshot `ref` (account-log.md §6.1, §6.3; snapshots.py `_bootstrap`): page the records after
   * its `covers`, open the parts with the epoch key this device holds or its own grant after `covers` gives,
   * apply the key records the snapshot carries and those after `covers` (the ordinary checks), check the signed
   * manifest, then load its history and move the cursor to `covers`, in one transaction. False while no key
   * for it is here (it stays chosen: the reader waits for a grant, as for any record). A snapshot the relay no
   * longer serves is dropped (the next sync chooses again); one that fails a check is refused
   * (`snapshot_refused`), never chosen again, and the log is read instead: a snapshot is only a shortcut.
   */
  private async loadSnapshot(
    ref: SnapshotRef,
    listAt: ListAt,
    added: StoredMessage[],
    warnings: LogWarning[],
  ): Promise<boolean> {
    const me = this.me;
    const records = await pageAfter(this.api, ref.covers);
    const before = load(this.store);
    let key = before.keys.get(ref.epoch);
    if (!key) {
      // This device's grant after `covers` (checked: list, signature, commitments), not applied yet.
      for (const r of records) {
        if (r.kind !== "key" || r.epoch < ref.epoch || decodeRecoveryBackup(r.ciphertext)) continue;
        try {
          const record = decodeKeyRecordV2(r.ciphertext);
          const devices = listAt(record.body.device_list_version);
          if (!devices) continue;
          verifyKeyRecordV2(record, me.accountId, r.epoch, devices);
          key = unwrapGrantV2(record, me.deviceId, me.boxPrivate, me.kemSeed)?.get(ref.epoch);
        } catch (error) {
          if (!(error instanceof TetherlessError)) throw error;
        }
        if (key) break;
      }
    }
    if (!key) return false;
    const opened = key;
    try {
      const fetched = await fetchSnapshotState(this.api, ref, opened, me.accountId);
      if (!fetched) {
        // Superseded since it was chosen: read on from the cursor; the next sync chooses the newest.
        this.store.transaction(() => {
          const state = load(this.store);
          state.pendingSnapshot = null;
          save(this.store, state);
        });
        return true;
      }
      this.store.transaction(() => {
        const state = load(this.store);
        const copies: LogRecord[] = [...fetched.state.key_records]
          .sort((a, b) => a.position - b.position)
          .map((k) => ({
            position: k.position,
            record_id: k.record_id,
            kind: "key",
            epoch: k.epoch,
            committed_at_ms: k.committed_at_ms,
            ciphertext: k.ciphertext,
            size: k.ciphertext.length,
            snapshot_id: null,
            covers: null,
            parts: null,
            device_list_version: k.device_list_version,
          }));
        const ignored: LogWarning[] = []; // refusals are reported when the records after covers are read
        for (const r of [...copies, ...records.filter((r) => r.kind === "key")]) {
          this.applyKey(state, r, listAt, r.position <= ref.covers ? warnings : ignored);
        }
        const accepted = state.keys.get(ref.epoch);
        if (!accepted || !equal(accepted, opened)) {
          throw new TetherlessError(
            "bad_signature",
            "the key that opened the snapshot is not the epoch's verified key",
          );
        }
        checkManifest({
          ref,
          records,
          partHashes: fetched.partHashes,
          key: opened,
          accountId: me.accountId,
          info: state.epochs.get(ref.epoch) ?? null,
          laterEpochBefore: [...state.epochs].some(([e, i]) => e > ref.epoch && i.position < ref.position),
          current: this.current?.devices ?? [],
        });
        for (const m of fetched.state.messages) {
          const direction = m.direction === "sent" ? "out" : "in";
          if (direction === "in") receivedFromLog(this.store, m.record_id, m.sender, m.pair_seq, this.deps.now());
          state.applied.add(toHex(m.record_id));
          if (this.store.messages().some((s) => s.direction === direction && equal(s.messageId, m.message_uid))) {
            continue;
          }
          const message: StoredMessage = {
            direction,
            peer: direction === "out" ? (m.recipients[0] ?? "") : m.sender,
            sentAtMs: m.sent_at_ms,
            messageId: m.message_uid,
            contentType: m.content_type,
            body: m.body,
          };
          this.store.keepMessage(message);
          added.push(message);
        }
        state.cursor = Math.max(state.cursor, ref.covers);
        state.pendingSnapshot = null;
        save(this.store, state);
      });
    } catch (error) {
      if (!(error instanceof TetherlessError)) throw error;
      warnings.push({
        code: "snapshot_refused",
        detail: `refused snapshot at position ${ref.position} (epoch ${ref.epoch}, covers ${ref.covers}): ${error.code}: ${error.detail}; reading the log instead`,
      });
      this.store.transaction(() => {
        const state = load(this.store);
        state.refusedSnapshots.add(toHex(ref.snapshot_id));
        state.pendingSnapshot = null;
        save(this.store, state);
      });
    }
    await this.store.durable();
    return true;
  }

  private applyKey(state: LogState, r: LogRecord, listAt: ListAt, warnings: LogWarning[]): void {
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
      warnings.push(refusal(r, error));
      return;
    }
    const body = record.body;
    state.keyEpochSeen = Math.max(state.keyEpochSeen, r.epoch);
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
      state.epochs.set(r.epoch, {
        position: r.position,
        listVersion: body.device_list_version,
        writers,
        createdAtMs: body.created_at_ms,
        records: 0,
      });
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
  private applyMessage(p: LogPlaintext, recordId: Uint8Array): StoredMessage | null {
    const body = p.body;
    if (body.type === "device-state") return null;
    const direction = body.type === "message-sent" ? "out" : "in";
    // Its pair_seq counts as here for the hold-back (§9); a held copy of it is logged already.
    if (body.type === "message-received")
      receivedFromLog(this.store, recordId, body.sender, body.pair_seq, this.deps.now());
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
   * Append the key record that is due after a full read (sync.py `ensure_epoch`; {@link nextKeyRecord}): a v2
   * record (v3 when a rotation closes removed writers) with hybrid grants, `expected_head` = the cursor.
   * Returns what it wrote, `"conflict"` when the relay refused it for another device's write or an unseen
   * revocation (read again, decide again), or null when nothing is due (or this device cannot write it: no
   * key of the newest epoch, a format-1 list, a key record this client does not read). Throws
   * {@link RelayError} (other codes) and `TransportError`.
   */
  private async ensureEpoch(): Promise<KeyRecordWritten | "conflict" | null> {
    const me = this.me;
    const current = this.current;
    if (!current || current.format < 2) return null; // a format-1 account keeps v1 key records (CLI devices)
    const state = load(this.store);
    if (state.keyEpochSeen > newestEpoch(state)) return null; // an epoch whose creating record it has not read
    const unclosed = new Map<string, number>();
    for (const info of state.epochs.values()) {
      for (const writer of info.writers.keys()) {
        const mark = state.writerMarks.get(writer);
        if (mark?.closedAt === undefined) unclosed.set(writer, mark?.high ?? 0);
      }
    }
    const plan = nextKeyRecord({
      facts: new Map(
        [...state.epochs].map(([e, i]) => [
          e,
          { granted: new Set(i.writers.keys()), createdAtMs: i.createdAtMs, records: i.records },
        ]),
      ),
      held: new Set(state.keys.keys()),
      receiving: current.devices.filter(receivesAccountKeyGrants),
      unclosedWriters: unclosed,
      nowMs: this.deps.now(),
    });
    if (!plan) return null;
    const keys = new Map(plan.carries.map((e) => [e, state.keys.get(e)!]));
    const fresh = plan.rotation ? this.deps.random(32) : null;
    if (fresh) keys.set(plan.epoch, fresh);
    const createdAtMs = this.deps.now();
    const ciphertext = makeKeyRecordV2({
      creatorSeed: me.signSeed,
      accountId: me.accountId,
      creatorDevice: me.deviceId,
      epoch: plan.epoch,
      keys,
      rotation: plan.rotation,
      deviceListVersion: current.version,
      devices: plan.devices,
      createdAtMs,
      wraps: plan.devices.filter((d) => d.kem_key.length).map((d) => encapsulateFor(d.kem_key, this.deps.random(64))),
      closed: plan.closed,
    });
    const record = {
      record_id: this.deps.random(16),
      kind: "key",
      epoch: plan.epoch,
      ciphertext,
      snapshot_id: null,
      covers: null,
      parts: null,
      device_list_version: current.version,
    };
    let position: number;
    try {
      const response = await this.api.call("POST", "/v1/log", {
        request: { def: AppendRequestDef, value: { records: [record], expected_head: state.cursor } },
        response: AppendResponseDef,
        auth: true,
      });
      position = response.results[0]?.position ?? 0;
    } catch (error) {
      if (error instanceof RelayError && REKEY_CODES.has(error.code)) return "conflict";
      throw error;
    }
    if (fresh) {
      // The new epoch at once (its record grants this device too: a lost answer is recovered by reading it).
      this.store.transaction(() => {
        const after = load(this.store);
        after.keys.set(plan.epoch, fresh);
        after.commitments.set(plan.epoch, keyCommitment(me.accountId, plan.epoch, fresh));
        if (!after.epochs.has(plan.epoch)) {
          after.epochs.set(plan.epoch, {
            position,
            listVersion: current.version,
            writers: new Map(plan.devices.map((d) => [d.device_id, d.sign_key])),
            createdAtMs,
            records: 0,
          });
        }
        after.keyEpochSeen = Math.max(after.keyEpochSeen, plan.epoch);
        save(this.store, after);
      });
      await this.store.durable();
    }
    return {
      epoch: plan.epoch,
      rotation: plan.rotation,
      position,
      granted: plan.devices.map((d) => d.device_id),
      closed: plan.closed,
    };
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
   * the post or the receive: client.ts), oldest first, except those held back (§9: holdback.ts)
   * (account-log.md §4.6; sync.py `append_pending`): a signed record under the newest epoch, under its
   * deterministic record id (§4.4), so two devices logging the same message write one record; then it leaves
   * the queue. Its `writer_seq` is taken (and committed) when it is first sealed and kept for every retry, so a
   * lost answer reuses the number rather than leaving a gap. Appends nothing while this device holds no key of
   * the newest epoch or a rotation is due (§5.6: never a record under an epoch a removed device holds; the
   * next {@link sync} rotates): `waitingForKey`. Throws {@link RelayError} (`log_epoch_stale`,
   * `log_rekey_required`: a rotation this device has not read yet) and `TransportError`; the unappended records
   * stay queued. Idempotent (the relay keeps the first copy of a record id: L3). Cancelling leaves each record
   * queued or appended; a queued one is appended again, harmlessly.
   */
  async appendPending(): Promise<{ appended: number; waitingForKey: boolean }> {
    const me = this.me;
    let appended = 0;
    for (const entry of this.store.logPending()) {
      const { recordId } = entry;
      if (isHeld(this.store, recordId)) continue;
      const state = load(this.store);
      const epoch = newestEpoch(state);
      if (!epoch || !state.keys.has(epoch)) return { appended, waitingForKey: true };
      if (state.applied.has(toHex(recordId))) {
        // Read back from the log already (this device's earlier append, or another device's copy).
        this.store.transaction(() => this.store.deleteLogPending(recordId));
        continue;
      }
      if (await this.rotationDue(state, epoch)) return { appended, waitingForKey: true };
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

  /** Whether nothing more may be written under `epoch` (§5.6), against the verified list (fetched if not read). */
  private async rotationDue(state: LogState, epoch: number): Promise<boolean> {
    const info = state.epochs.get(epoch)!;
    if (!this.current) {
      const me = this.me;
      const verified = verifyChain(
        await this.api.deviceChain(me.accountId),
        me.accountId,
        this.store.mark(me.accountId) ?? undefined,
      );
      this.store.transaction(() => this.store.setMark(me.accountId, verified.mark));
      this.current = { version: verified.head.version, format: verified.head.format, devices: verified.devices };
    }
    const facts = { granted: new Set(info.writers.keys()), createdAtMs: info.createdAtMs, records: info.records };
    return rotationReason(epoch, facts, this.current.devices, this.deps.now()) !== null;
  }

  /**
   * Read the log and write what is due ({@link sync}), which grants every epoch key this device holds to each
   * current device without the newest epoch (account-log.md §5.5 "approval carries the history"; sync.py
   * `ensure_epoch` and `history_granted`); then say whether `deviceId` holds the newest epoch: `"granted"`,
   * `"not-joined"` while the device is not in the verified list, `"no-key"` when this device could not grant it
   * (it holds no key of the newest epoch, or the account has no epoch it can write). Throws as {@link sync}.
   * Idempotent.
   */
  async grantHistory(deviceId: string): Promise<"granted" | "not-joined" | "no-key"> {
    await this.sync();
    if (!this.current?.devices.some((d) => d.device_id === deviceId)) return "not-joined";
    const { granted } = this.newestEpoch();
    return granted.includes(deviceId) ? "granted" : "no-key";
  }

  /** This device's address as a log record names it (the sender of what it sends). */
  ownAddress(): string {
    const me = this.me;
    return formatAddress({ account: me.accountId, device: me.deviceId, relay: me.relayName });
  }
}

function refusal(r: LogRecord, error: TetherlessError): LogWarning {
  return {
    code: error.code,
    detail: `refused log record at position ${r.position} (epoch ${r.epoch}): ${error.detail}`,
  };
}

function missing(first: number, last: number): LogWarning {
  return {
    code: "log_records_missing",
    detail: `log positions ${first}-${last} are missing below the relay's head: the relay deleted or withholds them`,
  };
}
