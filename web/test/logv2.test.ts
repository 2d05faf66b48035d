// protocol/vectors/log-v2.json: the hybrid wrap (crypto.md §12.1), a v2 key record (account-log.md §5.5) and
// a signed record (§4.6), checked as tests/protocol/test_log_v2.py checks them: every ciphertext rebuilt
// byte for byte from the recorded inputs, opened, and refused when a malicious relay changes it.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { chacha20poly1305, xchacha20poly1305 } from "@noble/ciphers/chacha.js";
import { hkdf as nobleHkdf } from "@noble/hashes/hkdf.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { ml_kem768 } from "@noble/post-quantum/ml-kem.js";
import { x25519 } from "@noble/curves/ed25519.js";
import { concat, fromHex, toHex, utf8 } from "../src/protocol/bytes.js";
import { mlkemDecapsulate, mlkemPublic } from "../src/protocol/handshake.js";
import { TetherlessError } from "../src/protocol/errors.js";
import { HybridWrapError, encapsulateFor, openWrap, seal } from "../src/protocol/hybrid.js";
import {
  InvalidRecordError,
  type KeyEpochRecordV2,
  LogPlaintextDef,
  SignedRecordPayloadDef,
  recordSignatureLayout,
  type LogPlaintext,
  decodeKeyRecordV2,
  makeKeyRecordV2,
  openSignedRecord,
  recordV2Ad,
  sealSignedRecord,
  unwrapGrantV2,
  verifyKeyRecordV2,
} from "../src/protocol/log.js";
import type { DeviceEntry } from "../src/protocol/messages.js";
import { encode } from "../src/protocol/codec.js";
import { pad } from "../src/protocol/padding.js";
import { publicKeyOf, sign } from "../src/protocol/signing.js";
import { x25519Public } from "../src/protocol/x25519.js";
import { loadVectors } from "./vectors.js";

const v = loadVectors("log-v2.json");
const ACCOUNT = "a".repeat(26);
const RECORD_ID = Uint8Array.from({ length: 16 }, (_, i) => i);
const NONCE = Uint8Array.from({ length: 24 }, (_, i) => 100 + i);
const KEYS = new Map([
  [1, new Uint8Array(32).fill(0x11)],
  [2, new Uint8Array(32).fill(0x22)],
]);
const CONTEXT = utf8("tetherless test context");
const fill = (n: number, length: number) => new Uint8Array(length).fill(n);
const kemSeed = (n: number) => fill(n, 64);
const boxPrivate = (n: number) => fill(n + 2, 32);
const signSeed = (n: number) => fill(n + 1, 32);

/** The devices of tests/protocol/test_log_v2.py `_device` (ids are plain names there, not derived ids). */
function device(n: number, kem = true, role: DeviceEntry["role"] = "device"): DeviceEntry {
  return {
    device_id: `dev${n}`,
    sign_key: publicKeyOf(signSeed(n)),
    box_key: x25519Public(boxPrivate(n)),
    added_at_ms: 1,
    name: `d${n}`,
    kem_key: kem ? mlkemPublic(kemSeed(n)) : new Uint8Array(0),
    role,
    scopes: [],
  };
}
const DEVICES = [device(0), device(1), device(2, false)];
const isCode = (code: string) => (e: unknown) => e instanceof InvalidRecordError && e.code === code;

function plaintext(writer = "dev0"): LogPlaintext {
  return {
    writer_device: writer,
    writer_seq: 1,
    created_at_ms: 1_764_000_000_000,
    body: { type: "device-state", registers: new Map([["theme", utf8("dark")]]) },
  };
}

describe("hybrid wrap", () => {
  const c = v.hybrid_wrap;
  const wrapped = fromHex(c.wrapped);
  it("rebuilds the vector byte for byte from its inputs", () => {
    const ct = fromHex(v.kem_ciphertexts.wrap);
    const ss = mlkemDecapsulate(fromHex(c.kem_seed), ct);
    assert.equal(toHex(ss), c.kem_shared_secret);
    const recipient = {
      x25519Public: x25519Public(fromHex(c.x25519_private)),
      kemPublic: mlkemPublic(fromHex(c.kem_seed)),
    };
    const input = { ephemeralPrivate: fromHex(c.ephemeral_private), kemCiphertext: ct, kemShared: ss };
    assert.equal(toHex(seal(recipient, fromHex(c.payload), fromHex(c.context), input)), c.wrapped);
  });
  it("matches an independent derivation of the combiner (written from crypto.md §12.1)", () => {
    const lay = (domain: string, ...fields: Uint8Array[]) =>
      concat(
        utf8(`tetherless/v1/${domain}\0`),
        ...fields.flatMap((f) => [Uint8Array.of(0x62, 0, 0, f.length >> 8, f.length & 0xff), f]),
      );
    const epk = wrapped.slice(0, 32);
    const ct = wrapped.slice(32, 1120);
    const skX = fromHex(c.x25519_private);
    const keys = ml_kem768.keygen(fromHex(c.kem_seed));
    const ssX = x25519.getSharedSecret(skX, epk);
    const ssM = ml_kem768.decapsulate(ct, keys.secretKey);
    const info = lay("hybrid-wrap", fromHex(c.context), epk, ct, x25519.getPublicKey(skX), sha256(keys.publicKey));
    const derive = (ss: Uint8Array) =>
      nobleHkdf(sha256, lay("hybrid-wrap-ikm", ss, ssX), lay("hybrid-wrap-salt"), info, 32);
    const open = (k: Uint8Array) =>
      chacha20poly1305(k, new Uint8Array(12), fromHex(c.context)).decrypt(wrapped.slice(1120));
    assert.equal(toHex(open(derive(ssM))), c.payload);
    // Without the ML-KEM secret (a classical-only derivation) the same wrap does not open.
    assert.throws(() => open(derive(new Uint8Array(32))));
  });
  it("opens only unchanged, with its context and its recipient's keys", () => {
    const open = (w: Uint8Array, context = CONTEXT, n = 1) => openWrap(boxPrivate(n), kemSeed(n), w, context);
    assert.deepEqual(open(wrapped), utf8("payload"));
    const swapped = ml_kem768.encapsulate(mlkemPublic(kemSeed(1)), fill(3, 32)).cipherText;
    for (const bad of [
      concat(wrapped.slice(0, 32), new Uint8Array(1088), wrapped.slice(1120)), // zeroed ML-KEM share
      concat(wrapped.slice(0, 32), swapped, wrapped.slice(1120)), // swapped ML-KEM share
      concat(x25519Public(fill(5, 32)), wrapped.slice(32)), // swapped ephemeral key
      concat(wrapped.slice(0, -1), Uint8Array.of(wrapped.at(-1)! ^ 1)),
      wrapped.slice(0, 100),
    ]) {
      assert.throws(
        () => open(bad),
        (e: unknown) => e instanceof HybridWrapError && e.code === "malformed_body",
      );
    }
    assert.throws(() => open(wrapped, utf8("another context")), HybridWrapError);
    assert.throws(() => open(wrapped, CONTEXT, 0), HybridWrapError);
  });
});

describe("writing with fresh randomness", () => {
  it("a key record built with encapsulateFor verifies and every grant opens", () => {
    const random = (n: number, b: number) => new Uint8Array(64).fill(b).subarray(0, n);
    const built = makeKeyRecordV2({
      creatorSeed: signSeed(0),
      accountId: ACCOUNT,
      creatorDevice: "dev0",
      epoch: 2,
      keys: KEYS,
      rotation: true,
      deviceListVersion: 3,
      devices: DEVICES,
      createdAtMs: 5,
      wraps: [encapsulateFor(DEVICES[0]!.kem_key, random(64, 40)), encapsulateFor(DEVICES[1]!.kem_key, random(64, 41))],
    });
    const r = decodeKeyRecordV2(built);
    verifyKeyRecordV2(r, ACCOUNT, 2, DEVICES);
    assert.deepEqual(unwrapGrantV2(r, "dev1", boxPrivate(1), kemSeed(1)), KEYS);
    assert.throws(
      () => encapsulateFor(new Uint8Array(1184).fill(0xff), random(64, 1)),
      (e: unknown) => e instanceof Error,
    );
  });
  it("a register name that JavaScript would reorder is refused, not written out of order", () => {
    const body = {
      type: "device-state" as const,
      registers: new Map([
        ["theme", utf8("x")],
        ["7", utf8("y")],
      ]),
    };
    assert.throws(
      () =>
        sealSignedRecord(
          KEYS.get(2)!,
          { ...plaintext(), body },
          signSeed(0),
          { accountId: ACCOUNT, recordId: RECORD_ID, epoch: 2 },
          NONCE,
        ),
      (e: unknown) => e instanceof TetherlessError && e.code === "invalid_field",
    );
  });
});

describe("v2 key record", () => {
  const c = v.key_record_v2;
  const record = (): KeyEpochRecordV2 => decodeKeyRecordV2(fromHex(c.ciphertext));
  it("rebuilds the vector byte for byte from its inputs", () => {
    const wrap = (n: number, name: string, eph: number) => {
      const ct = fromHex(v.kem_ciphertexts[name]);
      return { ephemeralPrivate: fill(eph, 32), kemCiphertext: ct, kemShared: mlkemDecapsulate(kemSeed(n), ct) };
    };
    const built = makeKeyRecordV2({
      creatorSeed: fromHex(c.creator_seed),
      accountId: ACCOUNT,
      creatorDevice: "dev0",
      epoch: c.epoch,
      keys: KEYS,
      rotation: true,
      deviceListVersion: c.device_list_version,
      devices: DEVICES,
      createdAtMs: 1_764_000_000_000,
      wraps: [wrap(0, "grant0", 8), wrap(1, "grant1", 9)],
    });
    assert.equal(toHex(built), c.ciphertext);
  });
  it("verifies and grants every epoch; a device without a kem_key gets no wrap", () => {
    const r = record();
    verifyKeyRecordV2(r, ACCOUNT, 2, DEVICES);
    for (const n of [0, 1]) assert.deepEqual(unwrapGrantV2(r, `dev${n}`, boxPrivate(n), kemSeed(n)), KEYS);
    assert.equal(unwrapGrantV2(r, "dev2", boxPrivate(2), new Uint8Array(0)), null);
    assert.equal(r.body.grants.find((g) => g.device_id === "dev2")!.wrapped.length, 0);
  });
  it("is refused against another list, epoch or signature (bad_signature)", () => {
    const r = record();
    const refused = (devices: DeviceEntry[], rec = r, epoch = 2) =>
      assert.throws(() => verifyKeyRecordV2(rec, ACCOUNT, epoch, devices), isCode("bad_signature"));
    refused(DEVICES.slice(0, 2)); // a device removed from the list but granted: a revoked device gets no key
    refused([...DEVICES, device(3)]); // a device the rotation did not grant
    refused(DEVICES, r, 3);
    refused(DEVICES, { ...r, signature: new Uint8Array(64) });
    refused([DEVICES[0]!, DEVICES[1]!, device(2)]); // a device with a kem_key but no wrap
    refused([DEVICES[0]!, DEVICES[1]!, device(2, false, "integration")]); // an integration never receives grants
    assert.throws(() => verifyKeyRecordV2(r, "b".repeat(26), 2, DEVICES), isCode("bad_signature"));
  });
  it("a grant with a zeroed or swapped ML-KEM share does not open", () => {
    const r = record();
    const grant = r.body.grants.find((g) => g.device_id === "dev1")!;
    const other = r.body.grants.find((g) => g.device_id === "dev0")!;
    for (const wrapped of [
      concat(grant.wrapped.slice(0, 32), new Uint8Array(1088), grant.wrapped.slice(1120)),
      concat(grant.wrapped.slice(0, 32), other.wrapped.slice(32, 1120), grant.wrapped.slice(1120)),
    ]) {
      const grants = r.body.grants.map((g) => (g === grant ? { ...g, wrapped } : g));
      const tampered = { ...r, body: { ...r.body, grants } };
      assert.throws(() => unwrapGrantV2(tampered, "dev1", boxPrivate(1), kemSeed(1)), InvalidRecordError);
    }
  });
  it("a grant moved to another device's slot does not open (the context names the device)", () => {
    const r = record();
    const grant1 = r.body.grants.find((g) => g.device_id === "dev1")!;
    const grants = r.body.grants.map((g) => (g.device_id === "dev0" ? { ...g, wrapped: grant1.wrapped } : g));
    assert.throws(
      () => unwrapGrantV2({ ...r, body: { ...r.body, grants } }, "dev0", boxPrivate(1), kemSeed(1)),
      isCode("malformed_body"),
    );
  });
  it("a v1 key record is not read here (malformed_body)", () => {
    const v1 = loadVectors("log-record.json").key_epoch.ciphertext as string;
    assert.throws(() => decodeKeyRecordV2(fromHex(v1)), isCode("malformed_body"));
  });
});

describe("signed record", () => {
  const c = v.signed_record;
  const key = fromHex(c.key);
  const writers = new Map([["dev0", DEVICES[0]!.sign_key]]);
  const header = { accountId: ACCOUNT, recordId: RECORD_ID, epoch: 2, kind: "state" as const };
  const ct = fromHex(c.ciphertext);
  it("the AD and the ciphertext rebuild byte for byte", () => {
    assert.equal(toHex(recordV2Ad(ACCOUNT, RECORD_ID, 2, "state")), c.ad);
    assert.equal(toHex(NONCE), c.nonce);
    assert.equal(toHex(sealSignedRecord(key, plaintext(), signSeed(0), header, NONCE)), c.ciphertext);
  });
  it("opens with its writer", () => {
    assert.deepEqual(openSignedRecord(key, ct, writers, header), plaintext());
  });
  it("is refused under another header, writer set or key", () => {
    for (const h of [
      { ...header, kind: "event" as const },
      { ...header, epoch: 3 },
      { ...header, recordId: new Uint8Array(16) },
      { ...header, accountId: "b".repeat(26) },
    ]) {
      assert.throws(() => openSignedRecord(key, ct, writers, h), isCode("malformed_body"));
    }
    assert.throws(() => openSignedRecord(key, ct, new Map(), header), isCode("bad_signature"));
    assert.throws(
      () => openSignedRecord(key, ct, new Map([["dev0", DEVICES[1]!.sign_key]]), header),
      isCode("bad_signature"),
    );
    assert.throws(() => openSignedRecord(KEYS.get(1)!, ct, writers, header), isCode("malformed_body"));
    assert.throws(() => openSignedRecord(key, ct.slice(0, 30), writers, header), isCode("malformed_body"));
  });
  it("a record signed by another device than the writer it names is refused", () => {
    const forged = sealSignedRecord(key, plaintext("dev1"), signSeed(0), header, NONCE);
    assert.throws(
      () => openSignedRecord(key, forged, new Map([["dev1", DEVICES[1]!.sign_key]]), header),
      isCode("bad_signature"),
    );
  });
  it("a record whose signed writer differs from the writer inside its plaintext is refused", () => {
    // dev0 signs a payload whose LogPlaintext names dev1: the signature verifies, the inner writer does not match.
    const ad = recordV2Ad(ACCOUNT, RECORD_ID, 2, "state");
    const payload = encode(LogPlaintextDef, plaintext("dev1"));
    const signature = sign(signSeed(0), recordSignatureLayout(ad, "dev0", payload));
    const inner = encode(SignedRecordPayloadDef, { writer_device: "dev0", signature, payload });
    const forged = concat(NONCE, xchacha20poly1305(key, NONCE, ad).encrypt(pad(inner)));
    assert.throws(
      () => openSignedRecord(key, forged, writers, header),
      (e: unknown) => isCode("bad_signature")(e) && String(e).includes("another writer"),
    );
  });
  it("epoch keys are independent: K[2] does not open an epoch-1 record", () => {
    const one = sealSignedRecord(KEYS.get(1)!, plaintext(), signSeed(0), { ...header, epoch: 1 }, NONCE);
    assert.throws(() => openSignedRecord(key, one, writers, { ...header, epoch: 1 }), isCode("malformed_body"));
  });
});
