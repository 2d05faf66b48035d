// The v1 sealed-sender payload (protocol/payload.py) and padding (protocol/padding.py). v1.json has no
// payload vector (web/README.md, gaps); the sealed box itself is pinned by the v2 conversation vectors.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { concat, fromHex, utf8 } from "../src/protocol/bytes.js";
import { decode, encode } from "../src/protocol/codec.js";
import { InvalidPayloadError, TetherlessError } from "../src/protocol/errors.js";
import { accountIdFor, deviceIdFor } from "../src/protocol/ids.js";
import { SealedContentDef } from "../src/protocol/messages.js";
import { bucketFor, pad, unpad } from "../src/protocol/padding.js";
import { contentLayout, open, seal } from "../src/protocol/payload.js";
import { openBox, sealBox } from "../src/protocol/sealedbox.js";
import { publicKeyOf, sign } from "../src/protocol/signing.js";
import { x25519Public } from "../src/protocol/x25519.js";

const seed = fromHex("01".repeat(32));
const signKey = publicKeyOf(seed);
const sender = `${deviceIdFor(signKey)}.${accountIdFor(signKey)}@relay.example`;
const boxPrivate = fromHex("22".repeat(32));
const otherSeed = fromHex("02".repeat(32));
const otherKey = publicKeyOf(otherSeed);
const recipient = `${deviceIdFor(otherKey)}.${accountIdFor(otherKey)}@Relay.Example`;

const sealed = (overrides: Partial<Parameters<typeof seal>[0]> = {}) =>
  seal({
    signingSeed: seed,
    sender,
    recipient,
    recipientBoxKey: x25519Public(boxPrivate),
    sentAtMs: 1_700_000_000_000,
    messageId: new Uint8Array(16).fill(9),
    contentType: "text/plain",
    body: utf8("hello"),
    ephemeralPrivateKey: new Uint8Array(32).fill(5),
    ...overrides,
  });

describe("padding", () => {
  it("buckets", () => {
    assert.deepEqual(
      [0, 256, 257, 1024, 1025, 65536, 65537, 200_000].map(bucketFor),
      [256, 256, 512, 1024, 2048, 65536, 131072, 262144],
    );
    for (const n of [0, 1, 255, 256, 511, 70_000]) assert.equal(unpad(pad(new Uint8Array(n).fill(1))).length, n);
  });
  it("refuses a non-bucket length and a missing marker", () => {
    assert.throws(
      () => unpad(new Uint8Array(300)),
      (e: unknown) => e instanceof TetherlessError && e.code === "malformed_body",
    );
    assert.throws(
      () => unpad(new Uint8Array(256)),
      (e: unknown) => e instanceof TetherlessError && e.code === "malformed_body",
    );
  });
});

describe("v1 sealed payload", () => {
  it("round-trips and names the sender; the recipient compares canonically", () => {
    const ciphertext = sealed();
    assert.equal(ciphertext.length, 512 + 48); // a 512-byte bucket plus the sealed box
    const opened = open(ciphertext, boxPrivate, recipient.toLowerCase());
    assert.equal(opened.sender, sender);
    assert.equal(new TextDecoder().decode(opened.body), "hello");
  });
  it("is deterministic given its inputs (libsodium's sealed box with the ephemeral key passed in)", () => {
    assert.deepEqual(sealed(), sealed());
    const plaintext = utf8("x");
    const box = sealBox(plaintext, x25519Public(boxPrivate), new Uint8Array(32).fill(3));
    assert.deepEqual(openBox(box, boxPrivate), plaintext);
  });
  it("refuses a message for another recipient, a wrong key and a tampered byte", () => {
    const ciphertext = sealed();
    const mine = `${deviceIdFor(signKey)}.${accountIdFor(signKey)}@relay.example`;
    assert.throws(
      () => open(ciphertext, boxPrivate, mine),
      (e: unknown) => e instanceof InvalidPayloadError && e.code === "bad_signature",
    );
    assert.throws(
      () => open(ciphertext, fromHex("33".repeat(32)), recipient),
      (e: unknown) => e instanceof InvalidPayloadError && e.code === "malformed_body",
    );
    const tampered = ciphertext.slice();
    tampered[100] = tampered[100]! ^ 1;
    assert.throws(() => open(tampered, boxPrivate, recipient), InvalidPayloadError);
  });
  it("refuses content whose sender address does not match the sender's key, or whose signature is wrong", () => {
    // A malicious sender re-seals valid content with a swapped address or body: the recipient refuses it.
    const plain = decode(SealedContentDef, unpad(openBox(sealed(), boxPrivate)));
    const reseal = (content: typeof plain) =>
      sealBox(pad(encode(SealedContentDef, content)), x25519Public(boxPrivate), new Uint8Array(32).fill(4));
    const otherSender = `${deviceIdFor(otherKey)}.${accountIdFor(otherKey)}@relay.example`;
    assert.throws(
      () => open(reseal({ ...plain, sender: otherSender }), boxPrivate, recipient),
      (e: unknown) => e instanceof InvalidPayloadError && e.code === "bad_signature",
    );
    assert.throws(
      () => open(reseal({ ...plain, body: utf8("evil") }), boxPrivate, recipient),
      (e: unknown) => e instanceof InvalidPayloadError && e.code === "bad_signature",
    );
    assert.throws(
      () =>
        open(
          sealBox(pad(concat(utf8("junk"))), x25519Public(boxPrivate), new Uint8Array(32).fill(4)),
          boxPrivate,
          recipient,
        ),
      (e: unknown) => e instanceof InvalidPayloadError && e.code === "malformed_body",
    );
  });
  it("refuses content signed by one device under another device's address", () => {
    // A malicious device signs correctly with its own key but claims the victim's address.
    const victim = `${deviceIdFor(otherKey)}.${accountIdFor(otherKey)}@relay.example`;
    const unsigned = {
      sender: victim,
      sender_sign_key: signKey,
      recipient,
      sent_at_ms: 1,
      message_id: new Uint8Array(16),
      content_type: "text/plain",
      body: utf8("hi"),
    };
    const forged = { ...unsigned, signature: sign(seed, contentLayout(unsigned)) };
    const ciphertext = sealBox(
      pad(encode(SealedContentDef, forged)),
      x25519Public(boxPrivate),
      new Uint8Array(32).fill(6),
    );
    assert.throws(
      () => open(ciphertext, boxPrivate, recipient),
      (e: unknown) => e instanceof InvalidPayloadError && /does not match the sender's key/.test(e.detail),
    );
  });
  it("the sender must own its address", () => {
    assert.throws(() => sealed({ sender: recipient }), RangeError);
  });
});
