// The TypeScript client (src/client) against an in-memory relay (test/fakeRelay.ts): two devices exchange
// messages both ways, acknowledge only after the local commit, and refuse what a malicious relay changes.
// The same client against the real relay and the Python CLI: tests/web/test_node_client.py.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { describe, it } from "node:test";
import { fromUtf8, utf8 } from "../src/protocol/bytes.js";
import { genesisV3 } from "../src/protocol/deviceList.js";
import { TetherlessError } from "../src/protocol/errors.js";
import { mlkemPublic } from "../src/protocol/handshake.js";
import type { InboxEnvelope } from "../src/protocol/messages.js";
import * as session from "../src/protocol/session.js";
import {
  MemoryStore,
  RelayApi,
  RelayError,
  TetherlessClient,
  TransportError,
  UnknownRelayError,
  WIRE_CODES,
  errorFromProblem,
} from "../src/client/index.js";
import { FakeRelay, RELAY_NAME } from "./fakeRelay.js";

const isCode = (code: string) => (e: unknown) =>
  (e instanceof TetherlessError || e instanceof RelayError) && e.code === code;

async function device(relay: FakeRelay): Promise<TetherlessClient> {
  const client = new TetherlessClient(new RelayApi("http://relay.test", relay.fetch), new MemoryStore());
  await client.createAccount();
  await client.login();
  await client.publishPrekeys();
  return client;
}

const text = (c: { body: Uint8Array }) => fromUtf8(c.body);

describe("client against an honest relay", () => {
  it("creates format-3 accounts, exchanges messages both ways, acknowledges after the commit", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    assert.equal(relay.chains.get(alice.identity.accountId)![0]!.device_list.format, 3);
    assert.ok(alice.identity.address.endsWith(`@${RELAY_NAME}`));

    await alice.send(bob.identity.address, "text/plain", utf8("one"));
    await alice.send(bob.identity.address, "text/plain", utf8("two"));
    const got = await bob.receive();
    assert.deepEqual(
      got.received.map((m) => [m.sender, text(m), m.pairSeq]),
      [
        [alice.identity.address, "one", 1],
        [alice.identity.address, "two", 2],
      ],
    );
    assert.equal(relay.acknowledged, 2);
    assert.deepEqual((await bob.receive()).received, []);

    // Bob answers to Alice's account address (every device of it): on the session Alice started.
    const sent = await bob.send(`${alice.identity.accountId}@${RELAY_NAME}`, "text/plain", utf8("back"));
    assert.equal(sent.length, 1);
    const back = await alice.receive();
    assert.deepEqual(
      back.received.map((m) => [m.sender, text(m)]),
      [[bob.identity.address, "back"]],
    );
    // One-time prekeys were consumed and deleted: a replay of Alice's session start would not open again.
    assert.equal(bob.store.prekeyPrivate("x25519-one-time", 1), null);
  });

  it("a redelivered envelope (no ack reached the relay) is not shown twice", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    await alice.send(bob.identity.address, "text/plain", utf8("once"));
    const original = relay.fetch;
    let ackFailed = false;
    const api = bob.api as unknown as { fetchFn: typeof original };
    api.fetchFn = async (url, init) => {
      if (url.endsWith("/v1/inbox/ack") && !ackFailed) {
        ackFailed = true;
        throw new TypeError("connection reset");
      }
      return original(url, init);
    };
    await assert.rejects(bob.receive(), TransportError);
    // The page was committed locally before the ack: the cursor moved, so the next fetch starts after it; a
    // relay that serves it again anyway (at-least-once) does not make it appear twice.
    bob.store.setInboxCursor(0);
    const again = await bob.receive();
    assert.deepEqual(again.received, []);
    assert.deepEqual(again.refused, []);
  });
});

describe("client when answers are lost", () => {
  /** Let the relay process the request to `suffix` once, then lose its answer. */
  function loseAnswer(client: TetherlessClient, relay: FakeRelay, suffix: string): void {
    const original = relay.fetch;
    let lost = false;
    const api = client.api as unknown as { fetchFn: typeof original };
    api.fetchFn = async (url, init) => {
      const response = await original(url, init);
      if (url.endsWith(suffix) && !lost) {
        lost = true;
        throw new TypeError("connection reset after the request");
      }
      return response;
    };
  }

  it("account creation is retried with the stored genesis and accepted once the relay serves it", async () => {
    const relay = new FakeRelay();
    const client = new TetherlessClient(new RelayApi("http://relay.test", relay.fetch), new MemoryStore());
    loseAnswer(client, relay, "/v1/accounts");
    await assert.rejects(client.createAccount(), TransportError);
    const me = await client.createAccount(); // the relay answers account_exists: our own genesis is served
    assert.equal(relay.chains.get(me.accountId)!.length, 1);
    await client.login();
  });

  it("a message whose post got no answer stays in the outbox and is delivered once by flushOutbox", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    loseAnswer(alice, relay, "/v1/messages");
    await assert.rejects(alice.send(bob.identity.address, "text/plain", utf8("kept")), TransportError);
    assert.equal(alice.store.outbox().length, 1);
    const [retried] = await alice.flushOutbox();
    assert.equal(alice.store.outbox().length, 0);
    assert.equal(retried?.duplicate, true); // the same idempotency key: the relay's original receipt
    const got = await bob.receive();
    assert.deepEqual(
      got.received.map((m) => [text(m), m.pairSeq]),
      [["kept", 1]],
    );
    assert.deepEqual(got.refused, []);
  });
});

describe("client against a malicious relay", () => {
  it("refuses a device list the relay changed (the chain does not verify)", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    relay.tamper.chain = (chain) => {
      const [genesis] = chain.versions;
      const devices = genesis!.device_list.devices.map((d) => ({ ...d, box_key: new Uint8Array(32).fill(9) }));
      return { ...chain, versions: [{ ...genesis!, device_list: { ...genesis!.device_list, devices } }] };
    };
    await assert.rejects(alice.send(bob.identity.address, "text/plain", utf8("x")), isCode("bad_signature"));
  });

  it("refuses a chain swapped for another account's, and a rollback below the verified mark", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    const mallory = genesisV3(
      new Uint8Array(32).fill(1),
      new Uint8Array(32).fill(2),
      mlkemPublic(new Uint8Array(64).fill(3)),
      1,
    );
    relay.tamper.chain = (chain) => ({ ...chain, versions: [mallory] });
    await assert.rejects(alice.verifiedDevices(bob.identity.accountId), isCode("invalid_device_list"));
    relay.tamper.chain = (chain) => ({ ...chain, versions: [] });
    await assert.rejects(alice.verifiedDevices(bob.identity.accountId), isCode("invalid_device_list"));
  });

  it("refuses a challenge bound to another relay or device", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    // Refused by the client before it signs: no signature reaches the relay (not the relay's bad_signature).
    const signed: string[] = [];
    const original = relay.fetch;
    const api = alice.api as unknown as { fetchFn: typeof original };
    api.fetchFn = (url, init) => {
      if (url.endsWith("/v1/auth/session")) signed.push(url);
      return original(url, init);
    };
    const clientSide = (e: unknown) => e instanceof TetherlessError && e.code === "bad_signature";
    relay.tamper.challenge = (c) => ({ ...c, relay: "other.example" });
    await assert.rejects(alice.login(), clientSide);
    relay.tamper.challenge = (c) => ({ ...c, device_id: "a".repeat(32) });
    await assert.rejects(alice.login(), clientSide);
    assert.deepEqual(signed, []);
  });

  it("refuses a prekey bundle with a substituted key", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    relay.tamper.bundle = (b) => ({
      ...b,
      signed_prekey: { ...b.signed_prekey, public_key: new Uint8Array(32).fill(7) },
    });
    await assert.rejects(alice.send(bob.identity.address, "text/plain", utf8("x")), isCode("prekey_invalid"));
    relay.tamper.bundle = (b) => ({ ...b, identity_key: new Uint8Array(32).fill(7) });
    await assert.rejects(alice.send(bob.identity.address, "text/plain", utf8("x")), isCode("prekey_invalid"));
  });

  it("refuses a tampered or replayed envelope without blocking the others", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    await alice.send(bob.identity.address, "text/plain", utf8("first"));
    await alice.send(bob.identity.address, "text/plain", utf8("second"));
    relay.tamper.inbox = (envelopes) => {
      const [first, second] = envelopes;
      const flipped = second!.ciphertext.slice();
      flipped[flipped.length - 1]! ^= 1;
      return [first!, { ...second!, ciphertext: flipped }, { ...first!, id: new Uint8Array(16).fill(1), cursor: 99 }];
    };
    const got = await bob.receive();
    assert.deepEqual(got.received.map(text), ["first"]);
    assert.deepEqual(
      got.refused.map((r) => r.code),
      ["malformed_body", "malformed_body"],
    );
  });

  it("refuses a message naming a sender list version above the verified chain the relay serves", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    await alice.send(bob.identity.address, "text/plain", utf8("hello"));
    // Alice's next message says her list is at version 2; the relay serves Bob only version 1 (withheld).
    const state = alice.store.currentSession(bob.identity.address)!;
    const [, ciphertext] = session.seal(state, {
      senderListVersion: 2,
      recipientBoxKey: state.peer_identity_key,
      sentAtMs: 1,
      messageId: new Uint8Array(16),
      contentType: "text/plain",
      body: utf8("from a newer list"),
      entropy: new Uint8Array(session.ENTROPY_BYTES).fill(5),
    });
    await alice.api.send([
      { recipient: bob.identity.address, idempotency_key: new Uint8Array(16).fill(1), ciphertext, ttl_seconds: null },
    ]);
    const got = await bob.receive();
    assert.deepEqual(got.received.map(text), ["hello"]);
    assert.deepEqual(
      got.refused.map((r) => r.code),
      ["bad_signature"],
    );
  });

  it("refuses a replayed session start after the session state is gone (transcript cache)", async () => {
    const relay = new FakeRelay();
    relay.oneTimePrekeys = false; // signed + last-resort keys only: they stay usable for a replay
    const alice = await device(relay);
    const bob = await device(relay);
    await alice.send(bob.identity.address, "text/plain", utf8("start"));
    let first: InboxEnvelope | undefined;
    relay.tamper.inbox = (envelopes) => {
      first ??= envelopes[0];
      return envelopes;
    };
    assert.deepEqual((await bob.receive()).received.map(text), ["start"]);
    // Bob's sessions are lost (a restored backup, say); the relay replays the session start as a new envelope.
    (bob.store as unknown as { state: { sessions: Map<string, unknown> } }).state.sessions.clear();
    relay.tamper.inbox = () => [{ ...first!, id: new Uint8Array(16).fill(2), cursor: 1000 }];
    const replay = await bob.receive();
    assert.deepEqual(replay.received, []);
    assert.deepEqual(
      replay.refused.map((r) => [r.code, r.detail]),
      [["malformed_body", "a replayed session start"]],
    );
  });

  it("refuses an envelope at or below the requested cursor", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    const bob = await device(relay);
    await alice.send(bob.identity.address, "text/plain", utf8("x"));
    await bob.receive();
    relay.tamper.inbox = () => [
      { cursor: 0, id: new Uint8Array(16), sent_at_ms: 0, expires_at_ms: 0, ciphertext: utf8("x") },
    ];
    await assert.rejects(bob.receive(), isCode("malformed_body"));
  });

  it("maps RFC 9457 problems to their code, and anything else to UnknownRelayError", async () => {
    const relay = new FakeRelay();
    const alice = await device(relay);
    relay.tamper.raw = () => ({
      status: 429,
      type: "application/problem+json",
      body: JSON.stringify({ code: "rate_limited", detail: "slow down", retry_after_seconds: 3 }),
    });
    await assert.rejects(
      alice.login(),
      (e: unknown) => e instanceof RelayError && e.code === "rate_limited" && e.retryAfterSeconds === 3,
    );
    relay.tamper.raw = () => ({ status: 502, type: "text/html", body: "<h1>Bad gateway</h1>" });
    await assert.rejects(alice.login(), UnknownRelayError);
    relay.tamper.raw = () => ({ status: 200, type: "application/vnd.msgpack", body: "not msgpack" });
    await assert.rejects(alice.login(), (e: unknown) => e instanceof TetherlessError);
    assert.ok(errorFromProblem(400, utf8(JSON.stringify({ code: "no_such_code" }))) instanceof UnknownRelayError);
  });
});

describe("wire codes", () => {
  it("are exactly protocol/errors.py's ErrorCode", () => {
    const source = readFileSync(fileURLToPath(new URL("../../../protocol/errors.py", import.meta.url)), "utf8");
    const body = source.slice(source.indexOf("class ErrorCode"), source.indexOf("\nSTATUS"));
    const codes = [...body.matchAll(/^\s+[A-Z_]+ = "([a-z_]+)"/gm)].map((m) => m[1]);
    assert.deepEqual([...WIRE_CODES].sort(), codes.sort());
  });
});
