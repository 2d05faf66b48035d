/**
 * The outbox of messages the user sent that are not sealed yet: offline first (issue 16 item 3). Queueing
 * needs no network: the message is written, sealed under the device's non-extractable key, to its own
 * IndexedDB record and shown as waiting; {@link Outbox.flush} later resolves the recipients (verified
 * chains, sessions), seals each message into the client's outbox of envelopes (store.ts; crypto.md §8.5)
 * and removes it here. The client posts those envelopes ({@link TetherlessClient.flushOutbox}).
 *
 * Two stages, two records, no cross-record transaction: sealing is idempotent per message id (the id
 * chosen here becomes the message's id, and {@link TetherlessClient.seal} seals an id in the history never
 * again), so a crash between sealing and removing the entry here is repaired by the next flush.
 *
 * One entry's permanent failure (the relay does not know the recipient, its device list does not verify)
 * marks that entry failed, with the reason, and the others go on; a transient one (no network, the relay
 * busy) stops the flush and everything waits for the next one, in order.
 *
 * Record format (browser-local, like persist.ts): `0x01 ‖ iv ‖ AES-GCM(key, iv, encode(QueuedMessageDef),
 * ad = "tetherless-web-outbox/1" ‖ id)`: a record cannot be moved to another id or passed off as the state.
 */
import { concat, fromHex, toHex, utf8 } from "../protocol/bytes.js";
import { type StructDef, bytes, decode, encode, int, optional, str } from "../protocol/codec.js";
import { TetherlessError } from "../protocol/errors.js";
import { canonicalAddress } from "../protocol/ids.js";
import type { Random, TetherlessClient } from "./client.js";
import { RETRYABLE_CODES, RelayError } from "./errors.js";
import { openState, sealState } from "./persist.js";

const ENTRY_AD = utf8("tetherless-web-outbox/1");
const ID_BYTES = 16;
const IV_BYTES = 12;

/** Why an entry was not sent: a relay problem's code or a protocol error's, and its one-line detail. */
export interface OutboxFailure {
  readonly code: string;
  readonly detail: string;
}

/** A message waiting to be sealed and sent. */
export interface QueuedMessage {
  /** 16 random bytes: the message's id once sealed (its envelopes' idempotency keys derive from it). */
  readonly id: Uint8Array;
  /** A device or account address, canonical. */
  readonly to: string;
  readonly contentType: string;
  readonly body: Uint8Array;
  /** When the user sent it (ms since the epoch): the message's time, whenever it is sealed. */
  readonly queuedAtMs: number;
  /** Set when sealing failed permanently: the entry waits for the user (retry or discard), not the network. */
  readonly failure: OutboxFailure | null;
}

interface StoredQueued {
  id: Uint8Array;
  to: string;
  content_type: string;
  body: Uint8Array;
  queued_at_ms: number;
  failure_code: string | null;
  failure_detail: string | null;
}
const StoredQueuedDef: StructDef<StoredQueued> = {
  name: "QueuedMessage",
  fields: [
    { name: "id", type: bytes(ID_BYTES, ID_BYTES) },
    { name: "to", type: str() },
    { name: "content_type", type: str() },
    { name: "body", type: bytes() },
    { name: "queued_at_ms", type: int(0) },
    { name: "failure_code", type: optional(str()) },
    { name: "failure_detail", type: optional(str()) },
  ],
};

/** Where the entries live: one record per entry, by the id's hex (IndexedDB: idb.ts; tests: memory). */
export interface OutboxBackend {
  /** Every saved record, with the id (hex) it was saved under. */
  loadOutbox(): Promise<(readonly [string, Uint8Array])[]>;
  /** Create or replace a record; resolves once the write is durable. */
  saveOutboxEntry(id: string, sealed: Uint8Array): Promise<void>;
  /** Remove a record (none: no error); resolves once durable. */
  deleteOutboxEntry(id: string): Promise<void>;
}

/** An {@link OutboxBackend} in memory (tests, Node). */
export class MemoryOutboxBackend implements OutboxBackend {
  readonly records = new Map<string, Uint8Array>();
  async loadOutbox(): Promise<(readonly [string, Uint8Array])[]> {
    return [...this.records];
  }
  async saveOutboxEntry(id: string, sealed: Uint8Array): Promise<void> {
    this.records.set(id, sealed);
  }
  async deleteOutboxEntry(id: string): Promise<void> {
    this.records.delete(id);
  }
}

/**
 * Whether `error`, met while sealing one entry, is that entry's own lasting problem (mark it failed, go on
 * with the others) rather than the network's or the relay's passing state (wait and try again). Permanent:
 * any protocol `TetherlessError` (a bad address, a chain or bundle that does not verify, no such device) and
 * a relay problem with a 4xx status that is not about the token (the app logs in again) or retryable.
 */
export function isPermanentFailure(error: unknown): boolean {
  if (error instanceof TetherlessError) return true;
  if (!(error instanceof RelayError)) return false; // TransportError, UnknownRelayError, bugs: not the entry's
  return error.status >= 400 && error.status < 500 && error.status !== 401 && !RETRYABLE_CODES.has(error.code);
}

function failureOf(error: unknown): OutboxFailure {
  if (error instanceof TetherlessError) return { code: error.code, detail: error.detail };
  if (error instanceof RelayError) return { code: error.code, detail: error.detail };
  return { code: "internal", detail: error instanceof Error ? error.message : String(error) };
}

const adOf = (id: Uint8Array): Uint8Array => concat(ENTRY_AD, id);
const order = (a: QueuedMessage, b: QueuedMessage): number =>
  a.queuedAtMs - b.queuedAtMs || toHex(a.id).localeCompare(toHex(b.id));

/** The unsealed outbox of one device. Not safe for concurrent flushes: the app runs one at a time. */
export class Outbox {
  private readonly entries = new Map<string, QueuedMessage>();

  private constructor(
    private readonly backend: OutboxBackend,
    private readonly key: CryptoKey,
    private readonly random: Random,
  ) {}

  /**
   * The outbox saved in `backend`. Throws `TetherlessError` `malformed_body` / `invalid_field` when a record
   * does not open under `key` or does not decode (nothing is overwritten; the app shows it).
   */
  static async open(
    backend: OutboxBackend,
    key: CryptoKey,
    random: Random = (n) => globalThis.crypto.getRandomValues(new Uint8Array(n)),
  ): Promise<Outbox> {
    const outbox = new Outbox(backend, key, random);
    for (const [name, sealed] of await backend.loadOutbox()) {
      // The AD binds the record to the id it is saved under: one moved to another id does not open.
      const plain = decode(StoredQueuedDef, await openState(key, sealed, adOf(fromHex(name))));
      if (toHex(plain.id) !== name) throw new TetherlessError("malformed_body", "an outbox record names another id");
      outbox.entries.set(name, {
        id: plain.id,
        to: plain.to,
        contentType: plain.content_type,
        body: plain.body,
        queuedAtMs: plain.queued_at_ms,
        failure: plain.failure_code === null ? null : { code: plain.failure_code, detail: plain.failure_detail ?? "" },
      });
    }
    return outbox;
  }

  /** The waiting and failed entries, oldest first. */
  items(): QueuedMessage[] {
    return [...this.entries.values()].sort(order);
  }

  /**
   * Queue `body` for `to` (a device or account address); resolves once the entry is on disk. No network.
   * Throws `TetherlessError` `invalid_field` for an address that does not parse (nothing is queued), and the
   * backend's error when writing failed (nothing is queued either). Not idempotent: each call is a message.
   */
  async queue(to: string, contentType: string, body: Uint8Array, nowMs: number): Promise<QueuedMessage> {
    const entry: QueuedMessage = {
      id: this.random(ID_BYTES),
      to: canonicalAddress(to),
      contentType,
      body,
      queuedAtMs: nowMs,
      failure: null,
    };
    await this.write(entry);
    return entry;
  }

  /**
   * Seal `entry` through `client` ({@link TetherlessClient.seal}: network for chains and prekeys) and remove
   * it from here. Throws what sealing throws; the entry then stays as it was. Idempotent.
   */
  async seal(client: TetherlessClient, entry: QueuedMessage): Promise<void> {
    await client.seal(entry.to, entry.contentType, entry.body, { messageId: entry.id, sentAtMs: entry.queuedAtMs });
    await this.discard(entry.id);
  }

  /**
   * Seal every waiting entry, oldest first (failed ones wait for {@link retry}). An entry that fails
   * permanently ({@link isPermanentFailure}) is marked failed and the flush goes on; it resolves to those
   * newly failed. Any other error stops the flush and is thrown: the entries stay waiting, in order.
   * Idempotent; cancellation (the page closing) leaves each entry waiting or sealed, never both.
   */
  async flush(client: TetherlessClient): Promise<QueuedMessage[]> {
    const failed: QueuedMessage[] = [];
    for (const entry of this.items()) {
      if (entry.failure) continue;
      try {
        await this.seal(client, entry);
      } catch (error) {
        if (!isPermanentFailure(error)) throw error;
        const marked = { ...entry, failure: failureOf(error) };
        await this.write(marked);
        failed.push(marked);
      }
    }
    return failed;
  }

  /** Make a failed entry wait again (the next flush tries it). Unknown ids are ignored. */
  async retry(id: Uint8Array): Promise<void> {
    const entry = this.entries.get(toHex(id));
    if (entry?.failure) await this.write({ ...entry, failure: null });
  }

  /** Remove an entry, sealed or not wanted any more; resolves once durable. Idempotent. */
  async discard(id: Uint8Array): Promise<void> {
    await this.backend.deleteOutboxEntry(toHex(id));
    this.entries.delete(toHex(id));
  }

  private async write(entry: QueuedMessage): Promise<void> {
    const plain = encode(StoredQueuedDef, {
      id: entry.id,
      to: entry.to,
      content_type: entry.contentType,
      body: entry.body,
      queued_at_ms: entry.queuedAtMs,
      failure_code: entry.failure?.code ?? null,
      failure_detail: entry.failure?.detail ?? null,
    });
    const sealed = await sealState(this.key, plain, this.random(IV_BYTES), adOf(entry.id));
    await this.backend.saveOutboxEntry(toHex(entry.id), sealed);
    this.entries.set(toHex(entry.id), entry); // only once on disk: memory never shows what a reload would lose
  }
}
