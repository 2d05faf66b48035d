// The unsealed outbox (src/client/outbox.ts) against the in-memory relay: queueing needs no network, a flush
// seals and the client posts, a permanent failure marks one entry and the others go on, a transient one stops
// the flush with everything still waiting, sealing twice never happens, and the records are bound to their ids.
// In Chromium against the real relay and CLI: tests/web/test_browser_offline.py, test_browser_tamper.py.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { fromUtf8, utf8 } from "../src/protocol/bytes.js";
import { TetherlessError } from "../src/protocol/errors.js";
import {
  MemoryOutboxBackend,
  MemoryStore,
  Outbox,
  RelayApi,
  RelayError,
  TetherlessClient,
  TransportError,
  UnknownRelayError,
  isPermanentFailure,
} from "../src/client/index.js";
import { FakeRelay, RELAY_NAME } from "./fakeRelay.js";

const TEXT = "text/plain; charset=utf-8";
const newKey = () =>
  globalThis.crypto.subtle.generateKey({ name: "AES-GCM", length: 256 }, false, ["encrypt", "decrypt"]);

/** A device whose network can be switched off (fetch then fails as a browser's does offline). */
async function device(relay: FakeRelay) {
  const network = { online: true };
  const fetchFn = (url: string, init: RequestInit) =>
    network.online ? relay.fetch(url, init) : Promise.reject(new TypeError("Failed to fetch"));
  const client = new TetherlessClient(new RelayApi("http://relay.test", fetchFn), new MemoryStore());
  await client.createAccount();
  await client.login();
  await client.publishPrekeys();
  return { client, network };
}

const texts = (client: TetherlessClient, direction: "in" | "out") =>
  client.store
    .messages()
    .filter((m) => m.direction === direction)
    .map((m) => fromUtf8(m.body));

describe("the unsealed outbox", () => {
  it("queues offline, and a flush after reconnecting seals, posts and delivers", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    const backend = new MemoryOutboxBackend();
    const key = await newKey();
    const outbox = await Outbox.open(backend, key);

    alice.network.online = false;
    const queued = await outbox.queue(bob.client.identity.address, TEXT, utf8("written offline"), 1_000);
    assert.equal(backend.records.size, 1);
    assert.equal(queued.to, bob.client.identity.address);
    await assert.rejects(outbox.flush(alice.client), TransportError);
    assert.deepEqual(
      outbox.items().map((q) => [fromUtf8(q.body), q.failure]),
      [["written offline", null]],
    );
    assert.deepEqual(texts(alice.client, "out"), []); // nothing sealed: no ratchet moved

    // A reload (a new Outbox over the same records) still has it.
    const reopened = await Outbox.open(backend, key);
    assert.deepEqual(
      reopened.items().map((q) => fromUtf8(q.body)),
      ["written offline"],
    );

    alice.network.online = true;
    assert.deepEqual(await reopened.flush(alice.client), []);
    assert.equal(backend.records.size, 0);
    assert.equal(alice.client.store.outbox().length, 1); // sealed, in the client's outbox until posted
    await alice.client.flushOutbox();
    assert.equal(alice.client.store.outbox().length, 0);
    const got = await bob.client.receive();
    assert.deepEqual(
      got.received.map((m) => [fromUtf8(m.body), m.sentAtMs, m.messageId]),
      [["written offline", 1_000, queued.id]],
    );
  });

  it("marks a permanently refused entry failed and goes on with the others; retry and discard", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    const outbox = await Outbox.open(new MemoryOutboxBackend(), await newKey());
    const nobody = `${"a".repeat(32)}@${RELAY_NAME}`;
    const lost = await outbox.queue(nobody, TEXT, utf8("to nobody"), 1);
    await outbox.queue(bob.client.identity.address, TEXT, utf8("to bob"), 2);

    const failed = await outbox.flush(alice.client);
    assert.deepEqual(
      failed.map((q) => [fromUtf8(q.body), q.failure?.code]),
      [["to nobody", "unknown_account"]],
    );
    assert.deepEqual(
      outbox.items().map((q) => [fromUtf8(q.body), q.failure?.code ?? null]),
      [["to nobody", "unknown_account"]],
    );
    await alice.client.flushOutbox();
    assert.deepEqual(
      (await bob.client.receive()).received.map((m) => fromUtf8(m.body)),
      ["to bob"],
    );

    // A failed entry waits for the user: a flush leaves it; retry makes it wait again; discard removes it.
    assert.deepEqual(await outbox.flush(alice.client), []);
    await outbox.retry(lost.id);
    assert.equal(outbox.items()[0]!.failure, null);
    assert.equal((await outbox.flush(alice.client)).length, 1);
    await outbox.discard(lost.id);
    assert.deepEqual(outbox.items(), []);
  });

  it("a chain the relay changed fails that entry with the verification's code", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    const outbox = await Outbox.open(new MemoryOutboxBackend(), await newKey());
    await outbox.queue(bob.client.identity.address, TEXT, utf8("x"), 1);
    relay.tamper.chain = (chain) => {
      const [genesis] = chain.versions;
      const devices = genesis!.device_list.devices.map((d) => ({ ...d, box_key: new Uint8Array(32).fill(9) }));
      return { ...chain, versions: [{ ...genesis!, device_list: { ...genesis!.device_list, devices } }] };
    };
    const failed = await outbox.flush(alice.client);
    assert.deepEqual(
      failed.map((q) => q.failure?.code),
      ["bad_signature"],
    );
    assert.deepEqual(texts(alice.client, "out"), []);
  });

  it("never seals a message twice (a crash between sealing and removing the entry)", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    const backend = new MemoryOutboxBackend();
    const outbox = await Outbox.open(backend, await newKey());
    const entry = await outbox.queue(bob.client.identity.address, TEXT, utf8("once"), 5);
    // Sealed, then "crashed" before the entry was removed here.
    const sealed = await alice.client.seal(entry.to, entry.contentType, entry.body, {
      messageId: entry.id,
      sentAtMs: entry.queuedAtMs,
    });
    assert.ok(sealed);
    assert.equal(
      await alice.client.seal(entry.to, entry.contentType, entry.body, { messageId: entry.id, sentAtMs: 5 }),
      null,
    );
    assert.deepEqual(await outbox.flush(alice.client), []);
    assert.equal(backend.records.size, 0);
    assert.deepEqual(texts(alice.client, "out"), ["once"]);
    await alice.client.flushOutbox();
    assert.deepEqual(
      (await bob.client.receive()).received.map((m) => fromUtf8(m.body)),
      ["once"],
    );
  });

  it("refuses an address that does not parse before queueing anything", async () => {
    const backend = new MemoryOutboxBackend();
    const outbox = await Outbox.open(backend, await newKey());
    await assert.rejects(
      outbox.queue("not an address", TEXT, utf8("x"), 1),
      (e: unknown) => e instanceof TetherlessError && e.code === "invalid_field",
    );
    assert.equal(backend.records.size, 0);
  });

  it("records are sealed, bound to their id, and open only under their key", async () => {
    const backend = new MemoryOutboxBackend();
    const key = await newKey();
    const outbox = await Outbox.open(backend, key);
    const a = await outbox.queue(`${"b".repeat(32)}@${RELAY_NAME}`, TEXT, utf8("secret text"), 1);
    const b = await outbox.queue(`${"c".repeat(32)}@${RELAY_NAME}`, TEXT, utf8("other"), 2);
    const recordA = backend.records.get(Buffer.from(a.id).toString("hex"))!;
    assert.ok(!Buffer.from(recordA).toString("latin1").includes("secret text"));

    const malformed = (e: unknown) => e instanceof TetherlessError && e.code === "malformed_body";
    await assert.rejects(Outbox.open(backend, await newKey()), malformed);
    // A record moved to another entry's id does not open (the id is in the AD).
    backend.records.set(Buffer.from(b.id).toString("hex"), recordA);
    await assert.rejects(Outbox.open(backend, key), malformed);
    // A changed byte does not open either.
    const changed = Uint8Array.from(recordA);
    changed[changed.length - 1]! ^= 1;
    backend.records.set(Buffer.from(b.id).toString("hex"), backend.records.get(Buffer.from(a.id).toString("hex"))!);
    backend.records.set(Buffer.from(a.id).toString("hex"), changed);
    await assert.rejects(Outbox.open(backend, key), malformed);
  });

  it("classifies failures: the entry's own problems are permanent, the network's and the token's are not", () => {
    assert.ok(isPermanentFailure(new TetherlessError("bad_signature", "x")));
    assert.ok(isPermanentFailure(new RelayError("unknown_account", 404, "x")));
    assert.ok(isPermanentFailure(new RelayError("recipient_revoked", 410, "x")));
    assert.ok(!isPermanentFailure(new RelayError("rate_limited", 429, "x")));
    assert.ok(!isPermanentFailure(new RelayError("invalid_token", 401, "x")));
    assert.ok(!isPermanentFailure(new RelayError("internal", 500, "x")));
    assert.ok(!isPermanentFailure(new TransportError("POST /v1/messages", new TypeError("Failed to fetch"))));
    assert.ok(!isPermanentFailure(new UnknownRelayError(502, "bad gateway")));
    assert.ok(!isPermanentFailure(new Error("a bug")));
  });
});
