// The state at rest (src/client/persist.ts): a device reopened from its sealed record carries on (ratchets,
// cursor, history), the record opens only under its key, and the custody rule waits for the disk: nothing is
// acknowledged or posted before the commit that precedes it is written. The IndexedDB backend itself is
// exercised in Chromium (tests/web/test_browser_messages.py).
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { decode as msgpackDecode, encode as msgpackEncode } from "@msgpack/msgpack";
import { fromUtf8, utf8 } from "../src/protocol/bytes.js";
import { TetherlessError } from "../src/protocol/errors.js";
import {
  MemoryStore,
  PersistentStore,
  RelayApi,
  TetherlessClient,
  type StateBackend,
  decodeState,
  encodeState,
  openState,
} from "../src/client/index.js";
import { FakeRelay } from "./fakeRelay.js";

/** A backend in memory whose writes can be held back (`hold`) to watch what waits for them. */
class HeldBackend implements StateBackend {
  saved: Uint8Array | null = null;
  writes = 0;
  private gate: Promise<void> = Promise.resolve();
  private release: () => void = () => undefined;
  fail = false;

  hold(): void {
    this.gate = new Promise((resolve) => (this.release = resolve));
  }
  open(): void {
    this.release();
  }
  async load(): Promise<Uint8Array | null> {
    return this.saved;
  }
  async save(sealed: Uint8Array): Promise<void> {
    await this.gate;
    if (this.fail) throw new Error("disk full");
    this.saved = sealed;
    this.writes += 1;
  }
}

const newKey = () =>
  globalThis.crypto.subtle.generateKey({ name: "AES-GCM", length: 256 }, false, ["encrypt", "decrypt"]);

async function persistentDevice(relay: FakeRelay, backend: StateBackend, key: CryptoKey) {
  const client = new TetherlessClient(
    new RelayApi("http://relay.test", relay.fetch),
    await PersistentStore.open(backend, key),
  );
  await client.createAccount();
  await client.login();
  await client.publishPrekeys();
  return client;
}

async function memoryDevice(relay: FakeRelay) {
  const client = new TetherlessClient(new RelayApi("http://relay.test", relay.fetch), new MemoryStore());
  await client.createAccount();
  await client.login();
  await client.publishPrekeys();
  return client;
}

const flush = () => new Promise((resolve) => setTimeout(resolve, 0));

describe("state at rest", () => {
  it("a device reopened from its sealed record keeps its account, sessions, cursor and history", async () => {
    const relay = new FakeRelay();
    const backend = new HeldBackend();
    const key = await newKey();
    const browser = await persistentDevice(relay, backend, key);
    const peer = await memoryDevice(relay);
    await browser.send(peer.identity.address, "text/plain", utf8("before reload"));
    assert.deepEqual(
      (await peer.receive()).received.map((m) => fromUtf8(m.body)),
      ["before reload"],
    );
    await peer.send(browser.identity.address, "text/plain", utf8("one"));
    assert.equal((await browser.receive()).received.length, 1);
    await browser.store.durable();
    // A commit that changes nothing (an empty poll) writes nothing.
    const writes = backend.writes;
    assert.deepEqual((await browser.receive()).received, []);
    await browser.store.durable();
    assert.equal(backend.writes, writes);

    // "Reload": a new store from the same record; the ratchets continue in both directions.
    const reopened = new TetherlessClient(
      new RelayApi("http://relay.test", relay.fetch),
      await PersistentStore.open(backend, key),
    );
    assert.equal(reopened.identity.address, browser.identity.address);
    assert.deepEqual(
      reopened.store.messages().map((m) => [m.direction, fromUtf8(m.body)]),
      [
        ["out", "before reload"],
        ["in", "one"],
      ],
    );
    await reopened.login();
    await peer.send(browser.identity.address, "text/plain", utf8("two"));
    const got = await reopened.receive();
    assert.deepEqual(
      got.received.map((m) => [fromUtf8(m.body), m.pairSeq]),
      [["two", 2]],
    );
    await reopened.send(peer.identity.address, "text/plain", utf8("after reload"));
    assert.deepEqual(
      (await peer.receive()).received.map((m) => [fromUtf8(m.body), m.pairSeq]),
      [["after reload", 2]],
    );
  });

  it("the encoding round-trips every part of the state", async () => {
    const relay = new FakeRelay();
    const a = await memoryDevice(relay);
    const b = await memoryDevice(relay);
    await a.send(b.identity.address, "text/plain", utf8("x"));
    await b.receive();
    const state = (b.store as unknown as { state: Parameters<typeof encodeState>[0] }).state;
    const bytes = encodeState(state);
    assert.deepEqual(encodeState(decodeState(bytes)), bytes);
    assert.deepEqual(decodeState(bytes), state);
  });

  it("a state saved before the log's pending records and the outbox's pair_seq decodes with neither", async () => {
    const relay = new FakeRelay();
    const a = await memoryDevice(relay);
    const b = await memoryDevice(relay);
    await a.send(b.identity.address, "text/plain", utf8("x")); // posted: its message-sent record is queued
    const api = a.api as unknown as { fetchFn: typeof relay.fetch };
    api.fetchFn = async (url, init) => {
      if (url.endsWith("/v1/messages")) throw new TypeError("offline");
      return relay.fetch(url, init);
    };
    await assert.rejects(a.send(b.identity.address, "text/plain", utf8("y"))); // sealed, waits in the outbox
    const state = (a.store as unknown as { state: Parameters<typeof encodeState>[0] }).state;
    assert.deepEqual(
      [...state.outbox.values()].map((e) => e.pairSeq),
      [2],
    );
    const older = msgpackDecode(encodeState(state)) as Record<string, unknown>;
    assert.equal((older["log_pending"] as unknown[]).length, 1);
    delete older["log_pending"];
    for (const entry of older["outbox"] as Record<string, unknown>[]) delete entry["pair_seq"];
    const decoded = decodeState(msgpackEncode(older));
    assert.deepEqual(decoded.logPending, new Map());
    assert.deepEqual(
      [...decoded.outbox.values()].map((e) => e.pairSeq),
      [0],
    );
    assert.deepEqual(decoded.messages, state.messages);
  });

  it("the record opens only under its own key and unchanged", async () => {
    const relay = new FakeRelay();
    const backend = new HeldBackend();
    const key = await newKey();
    await persistentDevice(relay, backend, key);
    const sealed = backend.saved!;
    // No secret is readable on disk: the device's address (plaintext in the state) is not in the record.
    assert.equal(Buffer.from(sealed).includes(Buffer.from("relay.test")), false);
    await assert.rejects(PersistentStore.open(backend, await newKey()), (e) => e instanceof TetherlessError);
    const changed = sealed.slice();
    changed[changed.length - 1]! ^= 1;
    await assert.rejects(openState(key, changed), (e) => e instanceof TetherlessError && e.code === "malformed_body");
  });

  it("acknowledges the inbox only after the page is written (custody rule)", async () => {
    const relay = new FakeRelay();
    const backend = new HeldBackend();
    const browser = await persistentDevice(relay, backend, await newKey());
    const peer = await memoryDevice(relay);
    await peer.send(browser.identity.address, "text/plain", utf8("held"));
    backend.hold();
    const receiving = browser.receive();
    for (let i = 0; i < 20; i++) await flush();
    assert.equal(relay.acknowledged, 0, "acknowledged before the local commit was written");
    backend.open();
    assert.equal((await receiving).received.length, 1);
    assert.equal(relay.acknowledged, 1);
  });

  it("posts a message only after its outbox entry is written, and not at all when writing fails", async () => {
    const relay = new FakeRelay();
    const backend = new HeldBackend();
    const browser = await persistentDevice(relay, backend, await newKey());
    const peer = await memoryDevice(relay);
    backend.fail = true;
    await assert.rejects(browser.send(peer.identity.address, "text/plain", utf8("lost?")), /disk full/);
    assert.deepEqual((await peer.receive()).received, []);
    // The disk works again: the queued message goes out with the next write and flush.
    backend.fail = false;
    browser.store.transaction(() => undefined);
    await browser.store.durable();
    await browser.flushOutbox();
    assert.deepEqual(
      (await peer.receive()).received.map((m) => fromUtf8(m.body)),
      ["lost?"],
    );
  });
});
