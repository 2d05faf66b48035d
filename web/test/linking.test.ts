// Linking, approval, history replay and revocation (src/client/linking.ts, logsync.ts) against the in-memory
// relay of fakeRelay.ts — and a malicious one: a relay that forges a proposal, swaps an offer's keys, serves
// a tampered chain, or reorders, replays, changes or injects log records is refused with the Python client's
// error codes. The same flows against the real relay and the CLI: tests/web/test_browser_devices.py.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { fromUtf8, utf8 } from "../src/protocol/bytes.js";
import { approve, listHash } from "../src/protocol/deviceList.js";
import { approvalTag } from "../src/protocol/enrolment.js";
import { TetherlessError } from "../src/protocol/errors.js";
import { encapsulateFor } from "../src/protocol/hybrid.js";
import { type LogPlaintext, makeKeyRecordV2, messageRecordId, sealSignedRecord } from "../src/protocol/log.js";
import type { DeviceEntry } from "../src/protocol/messages.js";
import { AppendRequestDef, AppendResponseDef, type LogRecordIn } from "../src/protocol/wire.js";
import { MemoryStore, type RelayApi, RelayError, TransportError, platformDeps } from "../src/client/index.js";
import {
  type PendingLink,
  approveOffer,
  fetchOffer,
  finishLink,
  nextVersionAdding,
  pollProposal,
  startLink,
  verifyProposal,
} from "../src/client/linking.js";
import { DeviceRevokedError, LogSync } from "../src/client/logsync.js";
import { type Device, joinApproved, open, revoke } from "./accounts.js";
import { FakeRelay } from "./fakeRelay.js";

const isCode = (code: string) => (e: unknown) => e instanceof TetherlessError && e.code === code;
const random = platformDeps.random;
const K1 = new Uint8Array(32).fill(0x11);

async function append(api: RelayApi, record: Omit<LogRecordIn, "snapshot_id" | "covers" | "parts">): Promise<void> {
  const value = { records: [{ ...record, snapshot_id: null, covers: null, parts: null }], expected_head: null };
  await api.call("POST", "/v1/log", {
    request: { def: AppendRequestDef, value },
    response: AppendResponseDef,
    auth: true,
  });
}

function sent(
  a: Device,
  text: string,
  seq: number,
  uid = random(16),
): { plaintext: LogPlaintext; recordId: Uint8Array } {
  const me = a.client.identity;
  const plaintext: LogPlaintext = {
    writer_device: me.deviceId,
    writer_seq: seq,
    created_at_ms: 1,
    body: {
      type: "message-sent",
      message_uid: uid,
      sender: me.address,
      recipients: ["someone"],
      pair_seq: seq,
      sent_at_ms: 1_000 + seq,
      content_type: "text/plain",
      body: utf8(text),
      envelope_ids: [],
      relay_sent_at_ms: 0,
    },
  };
  return { plaintext, recordId: messageRecordId(me.accountId, me.address, uid) };
}

/** A writes a message record under epoch 1 (what the CLI's sync does for what it sends). */
async function logSent(a: Device, text: string, seq: number): Promise<Uint8Array> {
  const { plaintext, recordId } = sent(a, text, seq);
  const me = a.client.identity;
  const ciphertext = sealSignedRecord(
    K1,
    plaintext,
    me.signSeed,
    { accountId: me.accountId, recordId, epoch: 1 },
    random(24),
  );
  await append(a.api, { record_id: recordId, kind: "event", epoch: 1, ciphertext, device_list_version: null });
  return ciphertext;
}

/** Device A of a new account that created epoch 1 (granted to itself) and logged two messages. */
async function accountWithHistory(relay: FakeRelay): Promise<Device> {
  const a = open(relay);
  await a.client.createAccount();
  await a.client.login();
  await a.client.publishPrekeys();
  const me = a.client.identity;
  const entry = (await a.client.verifiedDevices(me.accountId)).devices[0]!;
  const key = makeKeyRecordV2({
    creatorSeed: me.signSeed,
    accountId: me.accountId,
    creatorDevice: me.deviceId,
    epoch: 1,
    keys: new Map([[1, K1]]),
    rotation: true,
    deviceListVersion: 1,
    devices: [entry],
    createdAtMs: Date.now(), // a fresh epoch: the 7-day schedule does not rotate it (account-log.md §5.6)
    wraps: [encapsulateFor(entry.kem_key, random(64))],
  });
  await append(a.api, { record_id: random(16), kind: "key", epoch: 1, ciphertext: key, device_list_version: 1 });
  await logSent(a, "one", 1);
  await logSent(a, "two", 2);
  return a;
}

/** B links to A's account: offer, A approves, B verifies and joins, A grants the history. */
async function link(relay: FakeRelay, a: Device): Promise<{ b: Device; pending: PendingLink }> {
  const b = open(relay);
  const pending = await startLink(b.api, b.store);
  assert.equal(await pollProposal(b.api, pending), null); // 204 while nobody approved
  const checked = await fetchOffer(a.api, a.client.identity, pending.code);
  assert.equal(checked.fingerprint, pending.fingerprint); // both screens show the same fingerprint
  await approveOffer(a.api, a.store, a.client.identity, checked);
  const proposal = (await pollProposal(b.api, pending))!;
  const signed = await verifyProposal(b.api, pending, proposal);
  await finishLink(b.api, b.store, pending, signed);
  await b.client.login();
  assert.equal(await new LogSync(a.api, a.store).grantHistory(pending.deviceId), "granted");
  return { b, pending };
}

const texts = (store: MemoryStore) => store.messages().map((m) => fromUtf8(m.body));

describe("linking and history replay, honest relay", () => {
  it("a new device joins with the code, verifies the chain and replays the history", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const { b } = await link(relay, a);
    const result = await new LogSync(b.api, b.store).sync();
    assert.deepEqual(result.warnings, []);
    assert.deepEqual(texts(b.store), ["one", "two"]);
    assert.equal(result.waitingForKey, false);
    // Idempotent: a second read adds nothing; a new record arrives on the next.
    assert.deepEqual((await new LogSync(b.api, b.store).sync()).added, []);
    await logSent(a, "three", 3);
    assert.deepEqual(
      (await new LogSync(b.api, b.store).sync()).added.map((m) => fromUtf8(m.body)),
      ["three"],
    );
  });

  it("the new device logs what it sends; the other device reads it, a re-read changes nothing", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const { b } = await link(relay, a);
    const bLog = new LogSync(b.api, b.store);
    await bLog.sync();
    const { plaintext } = sent(b, "from b", 1);
    assert.equal(await bLog.appendMessage(plaintext.body), true);
    assert.deepEqual((await bLog.sync()).warnings, []);
    await new LogSync(a.api, a.store).sync();
    assert.ok(texts(a.store).includes("from b"));
  });

  it("without a grant the reader waits and says so; the records are read once the key comes", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const b = open(relay);
    const pending = await joinApproved(a, b);
    const waiting = await new LogSync(b.api, b.store).sync();
    assert.equal(waiting.waitingForKey, true);
    assert.deepEqual(texts(b.store), []);
    await new LogSync(a.api, a.store).grantHistory(pending.deviceId);
    await new LogSync(b.api, b.store).sync();
    assert.deepEqual(texts(b.store), ["one", "two"]);
  });
});

describe("linking against a malicious relay", () => {
  it("a proposal the relay forged or changed is refused: bad_signature", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const b = open(relay);
    const pending = await startLink(b.api, b.store);
    await approveOffer(a.api, a.store, a.client.identity, await fetchOffer(a.api, a.client.identity, pending.code));
    relay.tamper.proposal = (p) => ({ ...p, approval_tag: new Uint8Array(32) });
    await assert.rejects(
      verifyProposal(b.api, pending, (await pollProposal(b.api, pending))!),
      isCode("bad_signature"),
    );
    // The relay swaps the proposed list for one with another version (the tag covers its hash).
    relay.tamper.proposal = (p) => ({
      ...p,
      signed: { ...p.signed, device_list: { ...p.signed.device_list, created_at_ms: 7 } },
    });
    await assert.rejects(
      verifyProposal(b.api, pending, (await pollProposal(b.api, pending))!),
      isCode("bad_signature"),
    );
    assert.equal(b.store.identity(), null); // nothing joined
  });

  it("a proposal that adds more than this device is refused even with a valid tag: invalid_device_list", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const b = open(relay);
    const pending = await startLink(b.api, b.store);
    const checked = await fetchOffer(a.api, a.client.identity, pending.code);
    const me = a.client.identity;
    const head = relay.chains.get(me.accountId)!.at(-1)!.device_list;
    const other = open(relay);
    const extra = (await startLink(other.api, other.store)).deviceId;
    const entryOf = (id: string, o = checked.offer): DeviceEntry => ({
      device_id: id,
      sign_key: o.sign_key,
      box_key: o.box_key,
      added_at_ms: head.created_at_ms,
      name: "",
      kem_key: o.kem_key,
      role: "device",
      scopes: [],
    });
    const once = nextVersionAdding(head, entryOf(checked.deviceId), head.created_at_ms);
    const twice = nextVersionAdding(once, entryOf(extra), head.created_at_ms);
    const dl = { ...twice, version: once.version, prev_hash: once.prev_hash };
    const tag = approvalTag(pending.secret, pending.relay, dl.account_id, dl.version, listHash(dl));
    const proposal = {
      signed: {
        device_list: dl,
        signatures: [approve(dl, me.signSeed)],
        recovery_signatures: [],
        webauthn_assertions: [],
      },
      approval_tag: tag,
    };
    await assert.rejects(verifyProposal(b.api, pending, proposal), isCode("invalid_device_list"));
    // A change the policy alone would allow (the approver signs it): still not only "add this device".
    const bumped = { ...once, account_key_epoch: once.account_key_epoch + 5 };
    const signed = {
      device_list: bumped,
      signatures: [approve(bumped, me.signSeed)],
      recovery_signatures: [],
      webauthn_assertions: [],
    };
    const bumpedTag = approvalTag(pending.secret, pending.relay, bumped.account_id, bumped.version, listHash(bumped));
    await assert.rejects(
      verifyProposal(b.api, pending, { signed, approval_tag: bumpedTag }),
      isCode("invalid_device_list"),
    );
  });

  it("a version the relay refuses leaves no device behind; the proposal can be verified again", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const b = open(relay);
    const pending = await startLink(b.api, b.store);
    await approveOffer(a.api, a.store, a.client.identity, await fetchOffer(a.api, a.client.identity, pending.code));
    const signed = await verifyProposal(b.api, pending, (await pollProposal(b.api, pending))!);
    relay.tamper.raw = (method, path) =>
      method === "POST" && path.endsWith("/devices")
        ? {
            status: 409,
            body: JSON.stringify({ status: 409, code: "device_list_conflict" }),
            type: "application/problem+json",
          }
        : null;
    await assert.rejects(
      finishLink(b.api, b.store, pending, signed),
      (e: unknown) => e instanceof RelayError && e.code === "device_list_conflict",
    );
    assert.equal(b.store.identity(), null);
    relay.tamper.raw = undefined;
    await finishLink(b.api, b.store, pending, signed);
    assert.equal(b.store.identity()?.deviceId, pending.deviceId);
  });

  it("a chain the relay tampered with is refused before joining", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const b = open(relay);
    const pending = await startLink(b.api, b.store);
    await approveOffer(a.api, a.store, a.client.identity, await fetchOffer(a.api, a.client.identity, pending.code));
    const proposal = (await pollProposal(b.api, pending))!;
    relay.tamper.chain = (chain) => {
      const [genesis, ...rest] = chain.versions;
      const signatures = genesis!.signatures.map((s) => ({ ...s, signature: new Uint8Array(64).fill(1) }));
      return { ...chain, versions: [{ ...genesis!, signatures }, ...rest] };
    };
    await assert.rejects(verifyProposal(b.api, pending, proposal), isCode("bad_signature"));
  });

  it("an offer whose keys the relay swapped does not match the code: bad_signature", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const b = open(relay);
    const pending = await startLink(b.api, b.store);
    relay.tamper.offer = (o) => ({ ...o, box_key: random(32) });
    await assert.rejects(fetchOffer(a.api, a.client.identity, pending.code), isCode("bad_signature"));
    relay.tamper.offer = (o) => ({ ...o, kem_key: new Uint8Array(0) });
    await assert.rejects(fetchOffer(a.api, a.client.identity, pending.code), isCode("bad_signature"));
  });
});

describe("history replay against a malicious relay", () => {
  async function linked(): Promise<{ relay: FakeRelay; a: Device; b: Device }> {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const { b } = await link(relay, a);
    return { relay, a, b };
  }

  it("a changed record is refused (malformed_body) and the others are applied", async () => {
    const { relay, b } = await linked();
    relay.tamper.log = (records) =>
      records.map((r) =>
        r.position === 2 ? { ...r, ciphertext: Uint8Array.from(r.ciphertext, (x, i) => (i === 40 ? x ^ 1 : x)) } : r,
      );
    const result = await new LogSync(b.api, b.store).sync();
    assert.deepEqual(
      result.warnings.map((w) => w.code),
      ["malformed_body"],
    );
    assert.deepEqual(texts(b.store), ["two"]);
  });

  it("records served out of their writer's order: the earlier one is refused (log_epoch_stale)", async () => {
    const { relay, b } = await linked();
    relay.tamper.log = (records) => {
      const [key, one, two, ...rest] = records;
      return [key!, { ...two!, position: one!.position }, { ...one!, position: two!.position }, ...rest];
    };
    const result = await new LogSync(b.api, b.store).sync();
    assert.deepEqual(
      result.warnings.map((w) => w.code),
      ["log_epoch_stale"],
    );
    assert.deepEqual(texts(b.store), ["two"]);
  });

  it("a record from a device outside the epoch's writers is refused (bad_signature)", async () => {
    const { relay, a, b } = await linked();
    // A device of another account (the relay's own) seals a record under the key the relay cannot have; here
    // the test grants it the key: the signature still names a writer the epoch never granted.
    const stranger = open(relay);
    await stranger.client.createAccount();
    const s = stranger.client.identity;
    const uid = random(16);
    const recordId = messageRecordId(a.client.identity.accountId, s.address, uid);
    const plaintext = { ...sent(stranger, "injected", 1, uid).plaintext };
    const ciphertext = sealSignedRecord(
      K1,
      plaintext,
      s.signSeed,
      { accountId: a.client.identity.accountId, recordId, epoch: 1 },
      random(24),
    );
    relay.log.push({
      position: relay.log.length + 1,
      record_id: recordId,
      kind: "event",
      epoch: 1,
      committed_at_ms: 1,
      ciphertext,
      size: ciphertext.length,
      snapshot_id: null,
      covers: null,
      parts: null,
      device_list_version: null,
    });
    const result = await new LogSync(b.api, b.store).sync();
    assert.deepEqual(
      result.warnings.map((w) => w.code),
      ["bad_signature"],
    );
    assert.ok(!texts(b.store).includes("injected"));
  });

  it("a key record whose grant the relay changed is refused and grants nothing", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    relay.tamper.log = (records) =>
      records.map((r) =>
        r.kind === "key" ? { ...r, ciphertext: Uint8Array.from(r.ciphertext, (x, i) => (i === 200 ? x ^ 1 : x)) } : r,
      );
    const result = await new LogSync(a.api, a.store).sync();
    assert.ok(result.warnings.some((w) => w.code === "bad_signature" || w.code === "malformed_body"));
    assert.equal(result.waitingForKey, true);
    assert.deepEqual(texts(a.store), []);
  });
});

describe("epochs against a malicious relay", () => {
  it("an old epoch's record placed after a newer epoch was created is refused (log_epoch_stale)", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const { b } = await link(relay, a);
    const me = a.client.identity;
    const rotate = async (epoch: number, version: number) => {
      const devices = relay.chains.get(me.accountId)![version - 1]!.device_list.devices;
      const key = makeKeyRecordV2({
        creatorSeed: me.signSeed,
        accountId: me.accountId,
        creatorDevice: me.deviceId,
        epoch,
        keys: new Map([[epoch, new Uint8Array(32).fill(epoch)]]),
        rotation: true,
        deviceListVersion: version,
        devices,
        createdAtMs: Date.now(),
        wraps: devices.map((d) => encapsulateFor(d.kem_key, random(64))),
      });
      await append(a.api, { record_id: random(16), kind: "key", epoch, ciphertext: key, device_list_version: version });
    };
    await rotate(2, 2);
    await logSent(a, "late, under epoch 1", 3); // what a relay replaying an old-epoch record serves
    // A rotation naming an older device list than the epoch before it (a revoked device's view): refused.
    await rotate(3, 1);
    const result = await new LogSync(b.api, b.store).sync();
    assert.deepEqual(
      result.warnings.map((w) => w.code),
      ["bad_signature", "log_epoch_stale"],
    );
    assert.deepEqual(texts(b.store), ["one", "two"]);
  });
});

describe("revocation", () => {
  it("a removed device stops: DeviceRevokedError, and the relay refuses its token", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const { b, pending } = await link(relay, a);
    await revoke(relay, a, pending.deviceId);
    await assert.rejects(new LogSync(b.api, b.store).sync(), (e: unknown) => e instanceof DeviceRevokedError);
    await assert.rejects(b.client.login(), (e: unknown) => e instanceof RelayError && e.code === "unknown_device");
  });
});

describe("this device's messages in the account log (account-log.md §4.5, §10)", () => {
  /** A third party on the same relay: an account of its own, one device. */
  async function thirdParty(relay: FakeRelay): Promise<Device> {
    const c = open(relay);
    await c.client.createAccount();
    await c.client.login();
    await c.client.publishPrekeys();
    return c;
  }
  const accountOf = (address: string) => address.slice(address.indexOf(".") + 1);
  const kinds = (d: Device) => d.store.logPending().map((e) => e.plaintext.body.type);

  it("what the device sends and receives is queued in the same commit, appended, and read by the other device", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const { b } = await link(relay, a);
    const c = await thirdParty(relay);
    await b.client.send(accountOf(c.client.identity.address), "text/plain", utf8("b to c"));
    assert.deepEqual(kinds(b), ["message-sent"]); // committed with the post's receipt
    await c.client.receive();
    await c.client.send(b.client.identity.address, "text/plain", utf8("c to b"));
    await b.client.receive();
    assert.deepEqual(kinds(b), ["message-sent", "message-received"]);
    const [sentRecord, receivedRecord] = b.store.logPending().map((e) => e.plaintext.body);
    assert.ok(sentRecord?.type === "message-sent" && receivedRecord?.type === "message-received");
    assert.equal(sentRecord.pair_seq, 1);
    assert.equal(sentRecord.envelope_ids.length, 1);
    assert.ok(sentRecord.relay_sent_at_ms > 0);
    assert.equal(receivedRecord.pair_seq, 1);
    assert.equal(receivedRecord.sender, c.client.identity.address);
    assert.ok(receivedRecord.relay_sent_at_ms > 0); // the relay's sent_at_ms of the envelope

    const bLog = new LogSync(b.api, b.store);
    await bLog.sync();
    assert.deepEqual(await bLog.appendPending(), { appended: 2, waitingForKey: false });
    assert.deepEqual(b.store.logPending(), []);
    assert.deepEqual((await bLog.sync()).warnings, []); // its own records verify and change nothing
    assert.deepEqual(texts(b.store).sort(), ["b to c", "c to b", "one", "two"]); // none twice
    const aRead = await new LogSync(a.api, a.store).sync();
    assert.deepEqual(aRead.warnings, []);
    assert.deepEqual(
      aRead.added.map((m) => [m.direction, fromUtf8(m.body), m.peer]),
      [
        ["out", "b to c", c.client.identity.address], // the record names the devices it reached
        ["in", "c to b", c.client.identity.address],
      ],
    );
  });

  it("a record whose append got no answer stays queued with its writer_seq and is appended once", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const { b } = await link(relay, a);
    const c = await thirdParty(relay);
    const bLog = new LogSync(b.api, b.store);
    await bLog.sync();
    await b.client.send(c.client.identity.address, "text/plain", utf8("kept"));
    const original = relay.fetch;
    const api = b.api as unknown as { fetchFn: typeof original };
    api.fetchFn = async (url, init) => {
      const response = await original(url, init);
      if (url.endsWith("/v1/log") && init?.method === "POST") throw new TypeError("connection reset after the request");
      return response;
    };
    await assert.rejects(bLog.appendPending(), (e: unknown) => e instanceof TransportError);
    const [queued] = b.store.logPending();
    const seq = queued!.plaintext.writer_seq;
    assert.ok(seq > 0); // numbered (and committed) before the request
    const stored = relay.log.length;
    api.fetchFn = original;
    assert.deepEqual(await bLog.appendPending(), { appended: 1, waitingForKey: false });
    assert.equal(relay.log.length, stored); // the relay kept the first copy (same record id)
    const writerSeq = () => (JSON.parse(b.store.setting("account-log")!) as { writerSeq: number }).writerSeq;
    assert.equal(writerSeq(), seq); // the retry sealed under its own number, not a new one
    assert.deepEqual((await bLog.sync()).warnings, []);
    // The next record takes the next number: the retry reused its own, no gap for readers to flag.
    await b.client.send(c.client.identity.address, "text/plain", utf8("next"));
    await bLog.appendPending();
    const aRead = await new LogSync(a.api, a.store).sync();
    assert.deepEqual(aRead.warnings, []);
    assert.deepEqual(
      aRead.added.map((m) => fromUtf8(m.body)),
      ["kept", "next"],
    );
  });

  it("a device without an epoch key keeps its records queued until it is granted one", async () => {
    const relay = new FakeRelay();
    const b = await thirdParty(relay); // an account whose log has no epoch yet
    const c = await thirdParty(relay);
    await b.client.send(c.client.identity.address, "text/plain", utf8("waits"));
    assert.deepEqual(await new LogSync(b.api, b.store).appendPending(), { appended: 0, waitingForKey: true });
    assert.deepEqual(kinds(b), ["message-sent"]);
  });

  it("pair_seq counts per recipient account: every envelope of a message carries the same number", async () => {
    const relay = new FakeRelay();
    const a = await accountWithHistory(relay);
    const { b } = await link(relay, a);
    await b.client.publishPrekeys();
    const c = await thirdParty(relay);
    await c.client.send(a.client.identity.address, "text/plain", utf8("to device a")); // 1, to A only
    await c.client.send(accountOf(a.client.identity.address), "text/plain", utf8("to the account")); // 2, to A and B
    const seqs = (d: Device) =>
      d.store.logPending().map((e) => e.plaintext.body.type === "message-received" && e.plaintext.body.pair_seq);
    await a.client.receive();
    await b.client.receive();
    assert.deepEqual(seqs(a), [1, 2]);
    assert.deepEqual(seqs(b), [2]); // not 1: the number is the account's, not B's own count
  });

  it("a counter stored per recipient device (before) is continued by its account's counter", () => {
    const store = new MemoryStore();
    store.takePairSeq("d1.acct@relay.test");
    store.takePairSeq("d1.acct@relay.test");
    store.takePairSeq("d2.acct@relay.test");
    assert.equal(store.takePairSeq("acct@relay.test"), 3);
    assert.equal(store.takePairSeq("acct@relay.test"), 4);
    assert.equal(store.takePairSeq("other@relay.test"), 1);
  });
});
