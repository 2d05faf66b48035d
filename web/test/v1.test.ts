// protocol/vectors/v1.json: ids, layouts, the auth challenge, the genesis list, encodings and addresses.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { challengeLayout, signChallenge, verifyChallengeSignature } from "../src/protocol/auth.js";
import { fromHex, fromUtf8, toHex, utf8 } from "../src/protocol/bytes.js";
import { JSON_TYPE, StreamDecoder, decode, encode, encodeStreamItem } from "../src/protocol/codec.js";
import { genesis, listHash, listLayout, verifyGenesis } from "../src/protocol/deviceList.js";
import { TetherlessError } from "../src/protocol/errors.js";
import { accountIdFor, deviceIdFor, parseAddress } from "../src/protocol/ids.js";
import {
  HeartbeatDef,
  InboxEnvelopeDef,
  STREAM_ITEM_DEFS,
  SendRequestDef,
  SignedDeviceListDef,
} from "../src/protocol/messages.js";
import { type Field, layout, publicKeyOf } from "../src/protocol/signing.js";
import { loadVectors } from "./vectors.js";

const v = loadVectors("v1.json");

const isCode = (code: string) => (e: unknown) => e instanceof TetherlessError && e.code === code;

describe("v1 ids", () => {
  for (const c of v.ids) {
    it(c.seed.slice(0, 8), () => {
      const key = publicKeyOf(fromHex(c.seed));
      assert.equal(toHex(key), c.sign_key);
      assert.equal(deviceIdFor(key), c.device_id);
      assert.equal(accountIdFor(key), c.account_id);
    });
  }
});

describe("v1 layouts", () => {
  for (const c of v.layouts) {
    it(c.domain, () => {
      const fields: Field[] = c.fields.map((f: Record<string, string | number>) =>
        "i" in f ? Number(f.i) : "b" in f ? fromHex(String(f.b)) : String(f.s),
      );
      assert.equal(toHex(layout(c.domain, ...fields)), c.bytes);
    });
  }
  it("refuses booleans and out-of-range integers", () => {
    assert.throws(() => layout("x", true as unknown as number), TypeError);
    assert.throws(() => layout("x", -1), RangeError);
    assert.throws(() => layout("x", 1n << 64n), RangeError);
    assert.equal(toHex(layout("x", (1n << 64n) - 1n)).slice(-16), "ffffffffffffffff");
  });
});

describe("v1 challenge", () => {
  const c = v.challenge;
  const challenge = { relay: c.relay, device_id: c.device_id, nonce: fromHex(c.nonce), expires_at_ms: c.expires_at_ms };
  it("layout and signature", () => {
    const seed = fromHex(c.seed);
    assert.equal(deviceIdFor(publicKeyOf(seed)), c.device_id);
    assert.equal(toHex(challengeLayout(c.relay, c.device_id, challenge.nonce, c.expires_at_ms)), c.layout);
    assert.equal(toHex(signChallenge(seed, challenge)), c.signature);
    verifyChallengeSignature(publicKeyOf(seed), challenge, fromHex(c.signature));
  });
  it("a signature for another relay does not verify", () => {
    const other = { ...challenge, relay: "evil.example" };
    assert.throws(
      () => verifyChallengeSignature(publicKeyOf(fromHex(c.seed)), other, fromHex(c.signature)),
      isCode("bad_signature"),
    );
  });
});

describe("v1 genesis", () => {
  const c = v.genesis;
  it("builds the same list, layout, hash, signature and MessagePack", () => {
    const signed = genesis(fromHex(c.seed), fromHex(c.box_key), c.name, c.now_ms);
    assert.equal(toHex(listLayout(signed.device_list)), c.layout);
    assert.equal(toHex(listHash(signed.device_list)), c.hash);
    assert.equal(toHex(signed.signatures[0]!.signature), c.signature);
    assert.equal(toHex(encode(SignedDeviceListDef, signed)), c.msgpack);
  });
  it("decodes and verifies the vector's bytes", () => {
    const signed = decode(SignedDeviceListDef, fromHex(c.msgpack));
    assert.equal(verifyGenesis(signed).name, c.name);
    assert.equal(toHex(encode(SignedDeviceListDef, signed)), c.msgpack);
  });
  it("refuses a genesis whose signature covers other bytes", () => {
    const signed = decode(SignedDeviceListDef, fromHex(c.msgpack));
    const renamed = {
      ...signed,
      device_list: { ...signed.device_list, devices: [{ ...signed.device_list.devices[0]!, name: "evil" }] },
    };
    assert.throws(() => verifyGenesis(renamed), isCode("bad_signature"));
  });
});

describe("v1 encodings", () => {
  const e = v.encodings;
  it("inbox envelope: MessagePack and JSON, both ways", () => {
    const envelope = decode(InboxEnvelopeDef, fromHex(e.inbox_envelope.msgpack));
    assert.equal(envelope.cursor, 42);
    assert.equal(toHex(encode(InboxEnvelopeDef, envelope)), e.inbox_envelope.msgpack);
    assert.equal(fromUtf8(encode(InboxEnvelopeDef, envelope, JSON_TYPE)), e.inbox_envelope.json);
    const fromJson = decode(InboxEnvelopeDef, utf8(e.inbox_envelope.json), JSON_TYPE);
    assert.equal(toHex(encode(InboxEnvelopeDef, fromJson)), e.inbox_envelope.msgpack);
  });
  it("send request: MessagePack and JSON, both ways", () => {
    const send = decode(SendRequestDef, fromHex(e.send_request.msgpack));
    assert.equal(send.envelopes[0]!.ttl_seconds, 60);
    assert.equal(toHex(encode(SendRequestDef, send)), e.send_request.msgpack);
    assert.equal(fromUtf8(encode(SendRequestDef, send, JSON_TYPE)), e.send_request.json);
    assert.deepEqual(decode(SendRequestDef, utf8(e.send_request.json), JSON_TYPE), send);
  });
  it("streams: framed MessagePack and JSON Lines, fed byte by byte", () => {
    const raw = fromHex(e.stream_msgpack);
    const decoder = new StreamDecoder(STREAM_ITEM_DEFS);
    const items = [];
    for (let i = 0; i < raw.length; i++) items.push(...decoder.feed(raw.subarray(i, i + 1)));
    assert.deepEqual(
      items.map((x) => x.def.tag),
      ["envelope", "heartbeat"],
    );
    const envelope = decode(InboxEnvelopeDef, fromHex(e.inbox_envelope.msgpack));
    const heartbeat = { cursor: 42, at_ms: 1_700_000_000_500 };
    const again = new Uint8Array([
      ...encodeStreamItem(InboxEnvelopeDef, envelope),
      ...encodeStreamItem(HeartbeatDef, heartbeat),
    ]);
    assert.equal(toHex(again), e.stream_msgpack);
    const lines = new StreamDecoder(STREAM_ITEM_DEFS, JSON_TYPE).feed(utf8(e.stream_jsonl));
    assert.deepEqual(
      lines.map((x) => x.value),
      [envelope, heartbeat],
    );
    const jsonl = fromUtf8(
      new Uint8Array([
        ...encodeStreamItem(InboxEnvelopeDef, envelope, JSON_TYPE),
        ...encodeStreamItem(HeartbeatDef, heartbeat, JSON_TYPE),
      ]),
    );
    assert.equal(jsonl, e.stream_jsonl);
  });
  it("refuses a bad frame header, bad bytes and a schema violation with stable codes", () => {
    assert.throws(
      () => new StreamDecoder(STREAM_ITEM_DEFS).feed(new Uint8Array([0xcd, 0, 0, 0, 1])),
      isCode("malformed_body"),
    );
    assert.throws(() => decode(InboxEnvelopeDef, new Uint8Array([0xc1])), isCode("malformed_body"));
    const envelope = decode(InboxEnvelopeDef, fromHex(e.inbox_envelope.msgpack));
    const shortId = encode(InboxEnvelopeDef, { ...envelope, id: new Uint8Array(3) });
    assert.throws(() => decode(InboxEnvelopeDef, shortId), isCode("invalid_field"));
  });
});

describe("v1 addresses", () => {
  for (const c of v.addresses) {
    it(c.text, () => {
      if (c.parsed === null) {
        assert.throws(() => parseAddress(c.text), isCode("invalid_field"));
      } else {
        assert.deepEqual({ ...parseAddress(c.text) }, c.parsed);
      }
    });
  }
});
