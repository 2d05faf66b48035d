// The account log written by a browser-created account (account-log.md §5.3–§5.6, §9; logsync.ts, holdback.ts)
// against the in-memory relay of fakeRelay.ts: epoch 1 before the first log write, every epoch key granted to an
// approved device, a rotation (a v3 record closing the removed writer) when a device is revoked, nothing written
// under the old epoch while the rotation is due, a device approved later reading everything; the pure decisions
// (nextKeyRecord, rotationReason) and the hold-back of received messages on their own; and a relay that drops or
// reorders a key record, or serves another account's, refused with the Python client's codes.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { fromUtf8, utf8 } from "../src/protocol/bytes.js";
import { encapsulateFor } from "../src/protocol/hybrid.js";
import {
  KEY_RECORD_V2,
  KEY_RECORD_V3,
  type LogPlaintext,
  ROTATE_AFTER_MS,
  ROTATE_AFTER_RECORDS,
  decodeKeyRecordV2,
  makeKeyRecordV2,
  nextKeyRecord,
  rotationReason,
  unwrapGrantV2,
} from "../src/protocol/log.js";
import type { DeviceEntry } from "../src/protocol/messages.js";
import { MemoryStore, platformDeps } from "../src/client/index.js";
import { HOLDBACK_MS, ackPoint, isHeld, receivedFromInbox, receivedFromLog, setAcked } from "../src/client/holdback.js";
import { DeviceRevokedError, LogSync } from "../src/client/logsync.js";
import { type Device as BaseDevice, joinApproved, open as openDevice, revoke } from "./accounts.js";
import { FakeRelay } from "./fakeRelay.js";

const random = platformDeps.random;

type Device = BaseDevice & { log: LogSync };

function open(relay: FakeRelay): Device {
  const d = openDevice(relay);
  return { ...d, log: new LogSync(d.api, d.store) };
}

async function newAccount(relay: FakeRelay): Promise<Device> {
  const d = open(relay);
  await d.client.createAccount();
  await d.client.login();
  await d.client.publishPrekeys();
  return d;
}

/** `device` joins `a`'s account with a link code approved by `a`; `a` then grants it (its sync). */
async function join(relay: FakeRelay, a: Device): Promise<Device> {
  const b = open(relay);
  const pending = await joinApproved(a, b);
  await b.client.publishPrekeys();
  assert.equal(await new LogSync(a.api, a.store).grantHistory(pending.deviceId), "granted");
  return b;
}

const texts = (store: MemoryStore) => store.messages().map((m) => fromUtf8(m.body));
const keyRecords = (relay: FakeRelay) => relay.log.filter((r) => r.kind === "key");
const accountOf = (address: string) => address.slice(address.indexOf(".") + 1);

/** A browser-created account `a` that wrote "one" to `bob`'s account, and device `b` it approved. */
async function accountWithDevice(): Promise<{ relay: FakeRelay; a: Device; bob: Device; b: Device }> {
  const relay = new FakeRelay();
  const a = await newAccount(relay);
  const bob = await newAccount(relay);
  await say(a, bob, "one");
  return { relay, a, bob, b: await join(relay, a) };
}

/** `from` sends `text` to `to`'s account and appends what it logged. */
async function say(from: Device, to: Device, text: string): Promise<void> {
  await from.client.send(accountOf(to.client.identity.address), "text/plain", utf8(text));
  await from.log.sync();
  await from.log.appendPending();
}

describe("a browser-created account's log (account-log.md §5)", () => {
  it("writes epoch 1 before its first log write, then logs under it", async () => {
    const relay = new FakeRelay();
    const a = await newAccount(relay);
    const bob = await newAccount(relay);
    await a.client.send(accountOf(bob.client.identity.address), "text/plain", utf8("first"));
    assert.deepEqual(await new LogSync(a.api, a.store).appendPending(), { appended: 0, waitingForKey: true });
    const result = await a.log.sync();
    assert.deepEqual(
      result.written.map((w) => [w.epoch, w.rotation, w.granted]),
      [[1, true, [a.client.identity.deviceId]]],
    );
    const [record] = keyRecords(relay);
    assert.equal(record!.position, 1);
    const decoded = decodeKeyRecordV2(record!.ciphertext);
    assert.equal(decoded.v, KEY_RECORD_V2);
    assert.equal(decoded.body.rotation, true);
    assert.deepEqual(await a.log.appendPending(), { appended: 1, waitingForKey: false });
    const again = await a.log.sync();
    assert.deepEqual([again.warnings, again.written], [[], []]); // its own records verify; nothing more is due
    assert.equal(keyRecords(relay).length, 1);
  });

  it("an approved device is granted every epoch key and replays the history", async () => {
    const { relay, b } = await accountWithDevice();
    const grant = decodeKeyRecordV2(keyRecords(relay).at(-1)!.ciphertext);
    assert.equal(grant.body.rotation, false); // a grant-only record for the new device alone
    assert.deepEqual(
      grant.body.grants.map((g) => g.device_id),
      [b.client.identity.deviceId],
    );
    const read = await b.log.sync();
    assert.deepEqual(read.warnings, []);
    assert.deepEqual(texts(b.store), ["one"]);
  });

  it("revoking a device rotates: a v3 record closing it; nothing is written under the old epoch before", async () => {
    const { relay, a, bob, b } = await accountWithDevice();
    await b.log.sync();
    await say(b, bob, "from b"); // b writes record #1 under epoch 1
    await a.log.sync();
    await revoke(relay, a, b.client.identity.deviceId);
    // A record queued now waits for the rotation (a fresh LogSync: it reads the list itself).
    await a.client.send(accountOf(bob.client.identity.address), "text/plain", utf8("after"));
    const heads = relay.log.length;
    assert.deepEqual(await new LogSync(a.api, a.store).appendPending(), { appended: 0, waitingForKey: true });
    assert.equal(relay.log.length, heads);
    const result = await a.log.sync();
    const [rotation] = result.written;
    assert.equal(rotation!.epoch, 2);
    assert.equal(rotation!.rotation, true);
    assert.deepEqual([...rotation!.closed], [[b.client.identity.deviceId, 1]]);
    const record = decodeKeyRecordV2(keyRecords(relay).at(-1)!.ciphertext);
    assert.equal(record.v, KEY_RECORD_V3);
    assert.deepEqual(record.closed, [{ device_id: b.client.identity.deviceId, last_seq: 1 }]);
    assert.deepEqual(
      record.body.grants.map((g) => g.device_id),
      [a.client.identity.deviceId],
    );
    // The revoked device holds no grant of the new epoch and is stopped by its list.
    const bMe = b.client.identity;
    assert.equal(unwrapGrantV2(record, bMe.deviceId, bMe.boxPrivate, bMe.kemSeed), null);
    await assert.rejects(b.log.sync(), (e: unknown) => e instanceof DeviceRevokedError);
    assert.deepEqual(await a.log.appendPending(), { appended: 1, waitingForKey: false });
    assert.equal(relay.log.at(-1)!.epoch, 2);
    // A device approved later reads the history of both epochs.
    const c = await join(relay, a);
    assert.deepEqual((await c.log.sync()).warnings, []);
    assert.deepEqual(texts(c.store).sort(), ["after", "from b", "one"]);
  });
});

describe("a relay that tampers with key records (account-log.md §5.5, L1)", () => {
  it("a dropped key record is reported (log_records_missing); its epoch's records are refused, not shown", async () => {
    const { relay, b } = await accountWithDevice();
    relay.tamper.log = (records) => records.filter((r) => r.position !== 1); // epoch 1's creating record
    const result = await b.log.sync();
    // Without it, the grant names b alone as the epoch's writer: a's record does not verify (sync.py alike).
    assert.deepEqual(
      result.warnings.map((w) => w.code),
      ["log_records_missing", "bad_signature"],
    );
    assert.deepEqual(texts(b.store), []);
  });

  it("a rotation moved before the old epoch's records: those are refused (log_epoch_stale)", async () => {
    const { relay, a, bob, b } = await accountWithDevice();
    await revoke(relay, a, b.client.identity.deviceId);
    await a.log.sync(); // the rotation: epoch 2
    await say(a, bob, "two");
    const c = await join(relay, a);
    const rotation = relay.log.find((r) => r.kind === "key" && r.epoch === 2)!;
    relay.tamper.log = (records) => {
      if (records[0]?.position !== 1) return records;
      const moved = [records[0], rotation, ...records.slice(1).filter((r) => r !== rotation)];
      return moved.map((r, i) => ({ ...r!, position: i + 1 }));
    };
    const result = await c.log.sync();
    assert.deepEqual(
      result.warnings.map((w) => w.code),
      ["log_epoch_stale"],
    );
    assert.deepEqual(texts(c.store), ["two"]); // "one" (epoch 1) now follows epoch 2's creation: refused
  });

  it("a key record of another account is refused (bad_signature) and grants nothing", async () => {
    const { relay, b } = await accountWithDevice();
    const other = await newAccount(relay);
    const me = other.client.identity;
    const entry = (await other.client.verifiedDevices(me.accountId)).devices[0]!;
    const forged = makeKeyRecordV2({
      creatorSeed: me.signSeed,
      accountId: me.accountId,
      creatorDevice: me.deviceId,
      epoch: 2,
      keys: new Map([[2, new Uint8Array(32).fill(7)]]),
      rotation: true,
      deviceListVersion: 1,
      devices: [entry],
      createdAtMs: Date.now(),
      wraps: [encapsulateFor(entry.kem_key, random(64))],
    });
    relay.log.push({
      position: relay.log.length + 1,
      record_id: random(16),
      kind: "key",
      epoch: 2,
      committed_at_ms: 1,
      ciphertext: forged,
      size: forged.length,
      snapshot_id: null,
      covers: null,
      parts: null,
      device_list_version: 1,
    });
    const result = await b.log.sync();
    assert.deepEqual(
      result.warnings.map((w) => w.code),
      ["bad_signature"],
    );
    assert.deepEqual(b.log.newestEpoch().epoch, 1);
  });
});

describe("which key record is due (nextKeyRecord, rotationReason: sync.py ensure_epoch)", () => {
  const entry = (id: string): DeviceEntry => ({ device_id: id, kem_key: new Uint8Array(1) }) as DeviceEntry;
  const facts = (granted: string[], over: { createdAtMs?: number; records?: number } = {}) => ({
    granted: new Set(granted),
    createdAtMs: over.createdAtMs ?? 1_000,
    records: over.records ?? 0,
  });
  const plan = (p: Partial<Parameters<typeof nextKeyRecord>[0]>) =>
    nextKeyRecord({
      facts: new Map(),
      held: new Set(),
      receiving: [entry("a")],
      unclosedWriters: new Map(),
      nowMs: 2_000,
      ...p,
    });

  it("epoch 1 when there is none; nothing when all hold the newest; a grant of every key when one lacks it", () => {
    assert.deepEqual(plan({})?.epoch, 1);
    const known = new Map([
      [1, facts(["a"])],
      [2, facts(["a"])],
    ]);
    assert.equal(plan({ facts: known, held: new Set([1, 2]) }), null);
    const grant = plan({ facts: known, held: new Set([1, 2]), receiving: [entry("a"), entry("b")] });
    assert.deepEqual(
      [grant?.epoch, grant?.rotation, grant?.carries, grant?.devices.map((d) => d.device_id)],
      [2, false, [1, 2], ["b"]],
    );
    assert.equal(plan({ facts: known, held: new Set([1]) }), null); // the newest key is not here: wait for it
  });

  it("a rotation when a granted device left, closing it; carrying older keys only to a device lacking them", () => {
    const known = new Map([[1, facts(["a", "b"])]]);
    const rotation = plan({
      facts: known,
      held: new Set([1]),
      unclosedWriters: new Map([
        ["b", 4],
        ["a", 9],
      ]),
    });
    assert.deepEqual(
      [rotation?.epoch, rotation?.rotation, rotation?.carries, [...rotation!.closed]],
      [2, true, [], [["b", 4]]],
    );
    const withNew = plan({ facts: known, held: new Set([1]), receiving: [entry("a"), entry("c")] });
    assert.deepEqual([withNew?.carries, withNew?.devices.map((d) => d.device_id)], [[1], ["a", "c"]]);
  });

  it("the schedule: records or age", () => {
    const now = 10 * ROTATE_AFTER_MS;
    assert.equal(rotationReason(1, facts(["a"], { createdAtMs: now }), [entry("a")], now), null);
    assert.match(
      rotationReason(1, facts(["a"], { createdAtMs: now, records: ROTATE_AFTER_RECORDS }), [entry("a")], now)!,
      /records/,
    );
    assert.match(rotationReason(1, facts(["a"], { createdAtMs: 0 }), [entry("a")], now)!, /older/);
    assert.match(rotationReason(1, facts(["a", "b"], { createdAtMs: now }), [entry("a")], now)!, /no longer/);
  });
});

describe("the hold-back of received messages (account-log.md §9)", () => {
  const SENDER = "dev1.bbbbbbbbbbbbbbbbbbbbbbbbbb@relay.test";
  const received = (pairSeq: number) => ({
    recordId: new Uint8Array(16).fill(pairSeq),
    plaintext: {
      writer_device: "me",
      writer_seq: 0,
      created_at_ms: 1,
      body: {
        type: "message-received",
        message_uid: new Uint8Array(16).fill(pairSeq),
        sender: SENDER,
        sender_sign_key: new Uint8Array(0),
        recipient: "me",
        pair_seq: pairSeq,
        sent_at_ms: 1,
        relay_sent_at_ms: 1,
        content_type: "text/plain",
        body: utf8(`#${pairSeq}`),
        late: false,
      },
    } as LogPlaintext,
  });
  const pending = (store: MemoryStore) =>
    store.logPending().map((e) => {
      const body = e.plaintext.body;
      return body.type === "message-received" ? [body.pair_seq, isHeld(store, e.recordId), body.late] : [];
    });

  it("a message after a gap is held (and not acknowledged) until its predecessor arrives", () => {
    const store = new MemoryStore();
    store.transaction(() => receivedFromInbox(store, received(1), 10, 0));
    store.transaction(() => receivedFromInbox(store, received(3), 11, 0));
    store.transaction(() => receivedFromInbox(store, received(4), 12, 0));
    assert.deepEqual(pending(store), [
      [1, false, false],
      [3, true, false],
      [4, true, false],
    ]);
    assert.equal(ackPoint(store, 12), 10); // below the first held envelope
    store.transaction(() => setAcked(store, 10));
    assert.equal(ackPoint(store, 12), null);
    // #2 arrives through another device's message-received record: all are released, in order.
    store.transaction(() => receivedFromLog(store, new Uint8Array(16).fill(2), SENDER, 2, 0));
    assert.deepEqual(pending(store), [
      [1, false, false],
      [3, false, false],
      [4, false, false],
    ]);
    assert.equal(ackPoint(store, 12), 12);
  });

  it("a device that received before the hold-back existed does not hold a known sender's next message", () => {
    const store = new MemoryStore();
    store.transaction(() => store.setInboxCursor(40)); // messages received by the earlier version: no pair_seqs kept
    store.transaction(() => receivedFromInbox(store, received(7), 41, 0));
    store.transaction(() => receivedFromInbox(store, received(9), 42, 0));
    assert.deepEqual(pending(store), [
      [7, false, false],
      [9, true, false], // the baseline is the first number seen; a gap after it is still held
    ]);
  });

  it("a held message another device logged is no longer pending; one that waits too long goes late", () => {
    const store = new MemoryStore();
    store.transaction(() => receivedFromInbox(store, received(2), 5, 0));
    store.transaction(() => receivedFromInbox(store, received(3), 6, 0));
    store.transaction(() => receivedFromLog(store, received(3).recordId, SENDER, 3, 0));
    assert.deepEqual(pending(store), [[2, true, false]]);
    store.transaction(() => receivedFromInbox(store, received(5), 7, HOLDBACK_MS));
    assert.deepEqual(pending(store), [
      [2, false, true],
      [5, true, false],
    ]);
  });
});
