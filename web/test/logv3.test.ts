// protocol/vectors/log-v3.json: a v3 key record (account-log.md §5.1 v3: a rotation's close-out marks),
// checked as tests/protocol/test_log_writers.py checks it: rebuilt byte for byte from the recorded inputs, its
// signed layout re-derived field by field, and refused when the marks are stripped, changed or grafted. Also
// the signed snapshot manifest (§6.1), the recovery backup told apart from key records (§5.7) and the
// writer-order rules (§4.6) every reader applies.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { concat, fromHex, toHex, utf8 } from "../src/protocol/bytes.js";
import { encode } from "../src/protocol/codec.js";
import { TetherlessError } from "../src/protocol/errors.js";
import { mlkemDecapsulate, mlkemPublic } from "../src/protocol/handshake.js";
import {
  InvalidRecordError,
  KEY_RECORD_V2,
  KEY_RECORD_V3,
  type KeyEpochRecordV2,
  KeyEpochRecordV2Def,
  type SnapshotManifest,
  decodeKeyRecordV2,
  decodeRecoveryBackup,
  judgeWriterSeq,
  keyEpochV2Layout,
  makeKeyRecordV2,
  openSnapshotManifest,
  sealSnapshotManifest,
  snapshotId,
  unwrapGrantV2,
  verifyKeyRecordV2,
} from "../src/protocol/log.js";
import type { DeviceEntry } from "../src/protocol/messages.js";
import { pad } from "../src/protocol/padding.js";
import { type Field, layout, publicKeyOf, sign, verify } from "../src/protocol/signing.js";
import { x25519Public } from "../src/protocol/x25519.js";
import { loadVectors } from "./vectors.js";

const v = loadVectors("log-v3.json");
const v2 = loadVectors("log-v2.json");
const ACCOUNT = "a".repeat(26);
const K3 = new Uint8Array(32).fill(0x33);
const fill = (n: number, length: number) => new Uint8Array(length).fill(n);
const kemSeed = (n: number) => fill(n, 64);
const boxPrivate = (n: number) => fill(n + 2, 32);
const signSeed = (n: number) => fill(n + 1, 32);

/** tests/protocol/test_log_v2.py `_device`. */
function device(n: number): DeviceEntry {
  return {
    device_id: `dev${n}`,
    sign_key: publicKeyOf(signSeed(n)),
    box_key: x25519Public(boxPrivate(n)),
    added_at_ms: 1,
    name: `d${n}`,
    kem_key: mlkemPublic(kemSeed(n)),
    role: "device",
    scopes: [],
  };
}
const DEVICES = [device(0), device(1)];
const c = v.key_record_v3;
const record = (): KeyEpochRecordV2 => decodeKeyRecordV2(fromHex(c.ciphertext));
const refused = (r: KeyEpochRecordV2): string => {
  try {
    verifyKeyRecordV2(r, ACCOUNT, 3, DEVICES);
  } catch (error) {
    assert.ok(error instanceof InvalidRecordError);
    return error.code;
  }
  return "accepted";
};
/** `r` changed and signed again by its creator: what only a key-holding device could produce. */
const resigned = (r: KeyEpochRecordV2, changes: Partial<KeyEpochRecordV2>): KeyEpochRecordV2 => {
  const changed = { ...r, ...changes };
  const signed = keyEpochV2Layout(changed.body, changed.v === KEY_RECORD_V3 ? changed.closed : undefined);
  return { ...changed, signature: sign(signSeed(0), signed) };
};

describe("v3 key record (log-v3.json)", () => {
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
      keys: new Map([[3, K3]]),
      rotation: true,
      deviceListVersion: c.device_list_version,
      devices: DEVICES,
      createdAtMs: 1_764_000_000_000,
      wraps: [wrap(0, "grant0", 8), wrap(1, "grant1", 9)],
      closed: new Map(c.closed.map((m: { device_id: string; last_seq: number }) => [m.device_id, m.last_seq])),
    });
    assert.equal(toHex(built), c.ciphertext);
  });

  it("verifies, grants its epoch and carries its marks sorted by device id", () => {
    const r = record();
    assert.equal(r.v, KEY_RECORD_V3);
    assert.deepEqual(
      r.closed.map((m) => [m.device_id, m.last_seq]),
      [
        ["dev2", 5],
        ["dev9", 0],
      ],
    );
    verifyKeyRecordV2(r, ACCOUNT, 3, DEVICES);
    assert.deepEqual(unwrapGrantV2(r, "dev1", boxPrivate(1), kemSeed(1)), new Map([[3, K3]]));
  });

  it("signs the v2 layout plus the marks under its own domain (re-derived field by field)", () => {
    const r = record();
    const b = r.body;
    const fields: Field[] = [
      b.account_id,
      b.epoch,
      b.device_list_version,
      b.creator_device,
      b.created_at_ms,
      b.rotation ? 1 : 0,
      b.grants.length,
    ];
    for (const g of b.grants) fields.push(g.device_id, g.wrapped);
    fields.push(b.commitments.length);
    for (const cm of b.commitments) fields.push(cm.epoch, cm.commitment);
    const v3 = layout("log-key-epoch/3", ...fields, 2, "dev2", 5, "dev9", 0);
    assert.equal(toHex(keyEpochV2Layout(b)), toHex(layout("log-key-epoch/2", ...fields)));
    assert.equal(toHex(keyEpochV2Layout(b, r.closed)), toHex(v3));
    assert.equal(toHex(v3), c.signed_layout);
    verify(DEVICES[0]!.sign_key, v3, r.signature);
  });

  it("a v2 record still encodes without `closed` and verifies (log-v2.json unchanged)", () => {
    const raw = fromHex(v2.key_record_v2.ciphertext);
    const r = decodeKeyRecordV2(raw);
    assert.equal(r.v, KEY_RECORD_V2);
    assert.deepEqual(r.closed, []);
    assert.equal(toHex(pad(encode(KeyEpochRecordV2Def, r))), v2.key_record_v2.ciphertext);
    assert.ok(!toHex(encode(KeyEpochRecordV2Def, r)).includes(toHex(utf8("closed"))));
  });

  it("the marks cannot be stripped, changed or grafted by the relay", () => {
    const r = record();
    // Stripped (a v2 record again): the v3 signature does not verify under the v2 layout.
    assert.equal(refused({ ...r, v: KEY_RECORD_V2, closed: [] }), "bad_signature");
    // A mark raised or dropped.
    assert.equal(refused({ ...r, closed: [{ device_id: "dev2", last_seq: 9 }, r.closed[1]!] }), "bad_signature");
    assert.equal(refused({ ...r, closed: r.closed.slice(1) }), "bad_signature");
    // Marks grafted onto a v2 record (whose signature does not cover them).
    const v2Signed = resigned(r, { v: KEY_RECORD_V2, closed: [] });
    verifyKeyRecordV2(v2Signed, ACCOUNT, 3, DEVICES);
    assert.equal(refused({ ...v2Signed, closed: r.closed }), "bad_signature");
  });

  it("only a rotation closes, only writers it does not grant, each once", () => {
    const r = record();
    assert.equal(refused(resigned(r, { closed: [{ device_id: "dev1", last_seq: 1 }] })), "bad_signature");
    assert.equal(refused(resigned(r, { closed: [r.closed[0]!, r.closed[0]!] })), "bad_signature");
    assert.equal(refused(resigned(r, { body: { ...r.body, rotation: false } })), "bad_signature");
    assert.throws(
      () =>
        makeKeyRecordV2({
          creatorSeed: signSeed(0),
          accountId: ACCOUNT,
          creatorDevice: "dev0",
          epoch: 3,
          keys: new Map([[3, K3]]),
          rotation: false,
          deviceListVersion: 4,
          devices: [],
          createdAtMs: 1,
          wraps: [],
          closed: new Map([["dev2", 1]]),
        }),
      /only a rotation/,
    );
  });
});

describe("signed snapshot manifest (§6.1)", () => {
  const key = fill(0x44, 32);
  const snapshot = snapshotId(ACCOUNT, "dev0", 7);
  const manifest: SnapshotManifest = {
    writer_device: "dev0",
    created_at_ms: 5,
    covers: 7,
    part_hashes: [fill(1, 32), fill(2, 32)],
  };
  const writers = new Map(DEVICES.map((d) => [d.device_id, d.sign_key]));
  const sealed = sealSnapshotManifest(key, manifest, signSeed(0), {
    accountId: ACCOUNT,
    snapshot,
    epoch: 3,
    nonce: fill(9, 24),
  });
  const header = { accountId: ACCOUNT, snapshot, epoch: 3, covers: 7, parts: 2 };
  const code = (f: () => unknown) => {
    try {
      f();
    } catch (error) {
      assert.ok(error instanceof InvalidRecordError);
      return error.code;
    }
    return "opened";
  };
  it("opens under its header, signed by an epoch writer", () => {
    assert.deepEqual(openSnapshotManifest(key, sealed, writers, header), manifest);
  });
  it("is refused with another header, another writer set, a forged signer or a flipped byte", () => {
    assert.equal(
      code(() => openSnapshotManifest(key, sealed, writers, { ...header, covers: 8 })),
      "malformed_body",
    );
    assert.equal(
      code(() => openSnapshotManifest(key, sealed, new Map([["dev1", DEVICES[1]!.sign_key]]), header)),
      "bad_signature",
    );
    const forged = new Map([["dev0", DEVICES[1]!.sign_key]]);
    assert.equal(
      code(() => openSnapshotManifest(key, sealed, forged, header)),
      "bad_signature",
    );
    const flipped = concat(sealed.slice(0, -1), Uint8Array.of(sealed.at(-1)! ^ 1));
    assert.equal(
      code(() => openSnapshotManifest(key, flipped, writers, header)),
      "malformed_body",
    );
  });
});

describe("recovery backups are told apart from key records (§5.7)", () => {
  it("a key record is not a backup, and garbage is neither", () => {
    assert.equal(decodeRecoveryBackup(fromHex(c.ciphertext)), null);
    assert.equal(decodeRecoveryBackup(fill(0, 64)), null);
  });
  it("the recovery-v2.json backup decodes as a backup and not as a key record", () => {
    const rv = loadVectors("recovery-v2.json");
    const backup = decodeRecoveryBackup(fromHex(rv.ciphertext));
    assert.ok(backup);
    assert.equal(backup.backup.writer_device, rv.writer_device);
    assert.equal(backup.backup.epoch, rv.epoch);
    assert.throws(() => decodeKeyRecordV2(fromHex(rv.ciphertext)), InvalidRecordError);
  });
});

describe("writer order (§4.6) and close-out marks (§5.1 v3)", () => {
  const stale = (e: unknown) => e instanceof TetherlessError && e.code === "log_epoch_stale";
  it("in order applies; a jump is a gap, flagged and applied; the first record seen sets the mark", () => {
    assert.equal(judgeWriterSeq("d", 1, undefined, false), "apply");
    assert.equal(judgeWriterSeq("d", 7, undefined, false), "apply");
    assert.equal(judgeWriterSeq("d", 4, { high: 3 }, false), "apply");
    assert.equal(judgeWriterSeq("d", 6, { high: 3 }, false), "gap");
  });
  it("a record at or below the mark is a harmless replay only when already applied", () => {
    assert.equal(judgeWriterSeq("d", 3, { high: 3 }, true), "replay");
    assert.throws(() => judgeWriterSeq("d", 2, { high: 3 }, false), stale);
  });
  it("a closed writer's record above its mark is refused wherever the relay places it", () => {
    assert.equal(judgeWriterSeq("d", 5, { high: 4, closedAt: 5 }, false), "apply");
    assert.throws(() => judgeWriterSeq("d", 6, { high: 4, closedAt: 5 }, false), stale);
    assert.throws(() => judgeWriterSeq("d", 1, { high: 0, closedAt: 0 }, false), stale);
  });
});
