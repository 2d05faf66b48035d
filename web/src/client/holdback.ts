/**
 * The hold-back of received messages (docs/account-log.md §9, §12; protocol/client/sync.py `_release_held`):
 * a received message is logged (its `message-received` record appended) only once messages 1 … pair_seq−1 of
 * its sender device are here and not held themselves — from this device's inbox or from another device's
 * `message-received` record — so every device of the account appends a sender's messages in `pair_seq` order
 * and the log's order agrees with the sender's. A held message is not acknowledged either: the relay keeps
 * custody of its envelope (the ack point stays below it). After {@link HOLDBACK_MS} it is logged with
 * `late: true` (a gap that never filled: a message its sender gave up on). Messages without a frame
 * (`pair_seq` 0) are never held.
 *
 * The record itself waits in the store's `logPending` (in the same commit as the message); this module keeps
 * which of them are held, each sender's `pair_seq`s seen and the inbox cursor acknowledged, as one setting of
 * the sealed store (JSON), changed only inside the caller's transaction.
 */
import { toHex } from "../protocol/bytes.js";
import type { ClientStore, LogPendingEntry } from "./store.js";

const SETTING = "holdback";
/** §9 `holdback_max_seconds`: longer than the federation retry horizon. */
export const HOLDBACK_MS = 6 * 3_600_000;

interface Held {
  /** The record id (hex) of its `message-received` record in `logPending`. */
  readonly record: string;
  readonly sender: string;
  readonly pairSeq: number;
  /** Its envelope's inbox cursor: nothing at or above it is acknowledged while it is held. */
  readonly cursor: number;
  readonly sinceMs: number;
}

interface State {
  held: Held[];
  /** Per sender device: every `pair_seq` up to `upto` seen, and those seen above it. */
  seen: Record<string, { upto: number; above: number[] }>;
  /** The inbox cursor acknowledged last. */
  acked: number;
  /**
   * Set when this state was first made on a device that had received messages already (a browser of the
   * version before the hold-back: their `pair_seq`s were not kept): a sender's first message from the inbox
   * then counts its predecessors as here, rather than waiting hours for numbers nobody will note again.
   */
  baseline?: boolean;
}

/** A store with the app's settings (MemoryStore and PersistentStore): where this state lives. */
type SettingsStore = ClientStore & {
  setting(name: string): string | null;
  setSetting(name: string, value: string): void;
};

function settings(store: ClientStore): SettingsStore {
  const s = store as Partial<SettingsStore>;
  if (typeof s.setting !== "function" || typeof s.setSetting !== "function") {
    throw new TypeError("the hold-back needs a store with settings (MemoryStore)");
  }
  return store as SettingsStore;
}

function load(store: ClientStore): State {
  const raw = settings(store).setting(SETTING);
  if (raw) return JSON.parse(raw) as State;
  return { held: [], seen: {}, acked: 0, baseline: store.inboxCursor() > 0 };
}

function save(store: ClientStore, state: State): void {
  settings(store).setSetting(SETTING, JSON.stringify(state));
}

function note(state: State, sender: string, pairSeq: number): void {
  if (pairSeq <= 0) return;
  const seen = (state.seen[sender] ??= { upto: 0, above: [] });
  if (pairSeq <= seen.upto || seen.above.includes(pairSeq)) return;
  seen.above.push(pairSeq);
  seen.above.sort((a, b) => a - b);
  while (seen.above[0] === seen.upto + 1) {
    seen.upto += 1;
    seen.above.shift();
  }
}

/** The sender device id of a message record's sender address (`device.account@relay`). */
function senderDevice(address: string): string {
  return address.split(".", 1)[0]!;
}

/**
 * A message this device took from its inbox: queue its `message-received` record (`entry`) and hold it while
 * a predecessor is missing; then release what became ready ({@link releaseHeld}). Call inside the receive
 * transaction. Idempotent per record id.
 */
export function receivedFromInbox(store: ClientStore, entry: LogPendingEntry, cursor: number, nowMs: number): void {
  const body = entry.plaintext.body;
  if (body.type !== "message-received") throw new RangeError("only a message-received record is held back");
  const state = load(store);
  const sender = senderDevice(body.sender);
  const record = toHex(entry.recordId);
  if (state.baseline && !state.seen[sender] && body.pair_seq > 0)
    state.seen[sender] = { upto: body.pair_seq - 1, above: [] };
  note(state, sender, body.pair_seq);
  if (!state.held.some((h) => h.record === record)) {
    store.putLogPending(entry);
    if (body.pair_seq > 0) state.held.push({ record, sender, pairSeq: body.pair_seq, cursor, sinceMs: nowMs });
  }
  release(store, state, nowMs);
  save(store, state);
}

/**
 * A `message-received` record read from the log (another device logged it, or this one did): its `pair_seq`
 * counts as seen, a held copy of it is logged already (no longer held nor pending), and what became ready is
 * released. Call inside the transaction that applies the record. Idempotent.
 */
export function receivedFromLog(
  store: ClientStore,
  recordId: Uint8Array,
  sender: string,
  pairSeq: number,
  nowMs: number,
): void {
  const state = load(store);
  note(state, senderDevice(sender), pairSeq);
  const record = toHex(recordId);
  if (state.held.some((h) => h.record === record)) {
    state.held = state.held.filter((h) => h.record !== record);
    store.deleteLogPending(recordId);
  }
  release(store, state, nowMs);
  save(store, state);
}

/** Release every held message whose predecessors are all here and not held, or that waited too long. */
export function releaseHeld(store: ClientStore, nowMs: number): void {
  const state = load(store);
  release(store, state, nowMs);
  save(store, state);
}

function release(store: ClientStore, state: State, nowMs: number): void {
  // In pair_seq order per sender: releasing one can make the next ready.
  const ordered = [...state.held].sort((a, b) =>
    a.sender < b.sender ? -1 : a.sender > b.sender ? 1 : a.pairSeq - b.pairSeq,
  );
  const still: Held[] = [];
  for (const held of ordered) {
    const seen = state.seen[held.sender] ?? { upto: 0, above: [] };
    const ready =
      seen.upto >= held.pairSeq - 1 && !still.some((h) => h.sender === held.sender && h.pairSeq < held.pairSeq);
    const late = !ready && nowMs - held.sinceMs >= HOLDBACK_MS;
    if (!ready && !late) {
      still.push(held);
      continue;
    }
    if (late) {
      const entry = store.logPending().find((e) => toHex(e.recordId) === held.record);
      const body = entry?.plaintext.body;
      if (entry && body?.type === "message-received") {
        store.putLogPending({ ...entry, plaintext: { ...entry.plaintext, body: { ...body, late: true } } });
      }
    }
  }
  state.held = still;
}

/** Whether the pending record `recordId` is held back (the appender skips it). */
export function isHeld(store: ClientStore, recordId: Uint8Array): boolean {
  const record = toHex(recordId);
  return load(store).held.some((h) => h.record === record);
}

/**
 * The inbox cursor to acknowledge up to (§10 custody: below every held message; else `inboxCursor`), or null
 * when it was acknowledged already. Record it with {@link setAcked} once the relay took the acknowledgement.
 */
export function ackPoint(store: ClientStore, inboxCursor: number): number | null {
  const state = load(store);
  const point = Math.min(inboxCursor, ...state.held.map((h) => h.cursor - 1));
  return point > state.acked ? point : null;
}

export function setAcked(store: ClientStore, cursor: number): void {
  const state = load(store);
  state.acked = Math.max(state.acked, cursor);
  save(store, state);
}
