// protocol/vectors/log-snapshot.json (account-log.md §6.1), checked as tests/protocol/test_log_snapshot_vectors.py
// checks it: the parts rebuilt byte for byte from the recorded plaintexts and nonces, opened and joined into the
// recorded state, the signed manifest opened and its part hashes matched; a part moved to another record id, a
// missing part, or a manifest opened by a writer the epoch does not have are refused; and the browser's
// manifest check (snapshots.ts `checkManifest`) refuses a snapshot whose writer left the list.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { sha256 } from "@noble/hashes/sha2.js";
import { fromHex, toHex } from "../src/protocol/bytes.js";
import { decode, encode } from "../src/protocol/codec.js";
import { TetherlessError } from "../src/protocol/errors.js";
import {
  SnapshotPartDef,
  SnapshotStateDef,
  joinSnapshot,
  openSnapshotManifest,
  openSnapshotPart,
  sealSnapshotManifest,
  sealSnapshotPart,
  snapshotId,
  snapshotManifestId,
  snapshotPartId,
} from "../src/protocol/log.js";
import type { DeviceEntry } from "../src/protocol/messages.js";
import { publicKeyOf } from "../src/protocol/signing.js";
import type { LogRecord } from "../src/protocol/wire.js";
import { checkManifest } from "../src/client/snapshots.js";
import { loadVectors } from "./vectors.js";

const v = loadVectors("log-snapshot.json");
const key = fromHex(v.key);
const snapshot = fromHex(v.snapshot_id);
const writers = new Map([[v.writer_device as string, publicKeyOf(fromHex(v.writer_seed))]]);
const header = (recordId: string) => ({
  accountId: v.account_id,
  recordId: fromHex(recordId),
  snapshot,
  epoch: v.epoch,
});
const parts = () =>
  (v.parts as { record_id: string; ciphertext: string }[]).map((p) =>
    openSnapshotPart(key, fromHex(p.ciphertext), header(p.record_id)),
  );
const isCode = (code: string) => (e: unknown) => e instanceof TetherlessError && e.code === code;

describe("snapshot vectors (account-log.md §6.1)", () => {
  it("ids derive from the writer and covers", () => {
    assert.equal(toHex(snapshotId(v.account_id, v.writer_device, v.covers)), v.snapshot_id);
    assert.equal(toHex(snapshotManifestId(snapshot)), v.manifest.record_id);
    v.parts.forEach((p: { record_id: string }, i: number) =>
      assert.equal(toHex(snapshotPartId(snapshot, i)), p.record_id),
    );
  });

  it("parts are sealed byte for byte, open and join into the recorded state", () => {
    for (const p of v.parts as { nonce: string; plaintext: string; ciphertext: string }[]) {
      const part = decode(SnapshotPartDef, fromHex(p.plaintext));
      const sealed = sealSnapshotPart(key, part, {
        accountId: v.account_id,
        snapshot,
        epoch: v.epoch,
        nonce: fromHex(p.nonce),
      });
      assert.equal(toHex(sealed), p.ciphertext);
    }
    const state = joinSnapshot(parts().reverse(), v.covers);
    assert.equal(toHex(encode(SnapshotStateDef, state)), v.state);
    assert.deepEqual(
      state.messages.map((m) => [m.position, m.direction, new TextDecoder().decode(m.body)]),
      [
        [3, "received", "hello from a snapshot"],
        [5, "sent", "an answer"],
      ],
    );
    assert.equal(state.key_records[0]!.position, 2);
  });

  it("the signed manifest is sealed byte for byte and names the parts' hashes", () => {
    const p = { accountId: v.account_id, snapshot, epoch: v.epoch, covers: v.covers, parts: v.parts.length };
    const manifest = openSnapshotManifest(key, fromHex(v.manifest.ciphertext), writers, p);
    assert.deepEqual(
      manifest.part_hashes.map(toHex),
      parts().map((part) => toHex(sha256(part.data))),
    );
    const again = sealSnapshotManifest(key, manifest, fromHex(v.writer_seed), {
      ...p,
      nonce: fromHex(v.manifest.nonce),
    });
    assert.equal(toHex(again), v.manifest.ciphertext);
    assert.throws(
      () => openSnapshotManifest(key, fromHex(v.manifest.ciphertext), new Map([["dev9", writers.get("dev0")!]]), p),
      isCode("bad_signature"),
    );
  });

  it("a part under another record id, or parts missing, are refused (malformed_body)", () => {
    const [first, second] = v.parts as { record_id: string; ciphertext: string }[];
    assert.throws(
      () => openSnapshotPart(key, fromHex(first!.ciphertext), header(second!.record_id)),
      isCode("malformed_body"),
    );
    assert.throws(() => joinSnapshot(parts().slice(1), v.covers), isCode("malformed_body"));
    assert.throws(() => joinSnapshot(parts(), v.covers + 1), isCode("malformed_body"));
  });

  it("checkManifest loads only a snapshot signed by a current writer, naming exactly its parts", () => {
    const manifestRecord: LogRecord = {
      position: 9,
      record_id: fromHex(v.manifest.record_id),
      kind: "snapshot",
      epoch: v.epoch,
      committed_at_ms: 1,
      ciphertext: fromHex(v.manifest.ciphertext),
      size: 0,
      snapshot_id: snapshot,
      covers: v.covers,
      parts: v.parts.length,
      device_list_version: null,
    };
    const ref = {
      snapshot_id: snapshot,
      position: 9,
      covers: v.covers,
      parts: v.parts.length,
      epoch: v.epoch,
      committed_at_ms: 1,
    };
    const writer = { device_id: "dev0" } as DeviceEntry;
    const check = (over: Partial<Parameters<typeof checkManifest>[0]>) =>
      checkManifest({
        ref,
        records: [manifestRecord],
        partHashes: parts().map((p) => sha256(p.data)),
        key,
        accountId: v.account_id,
        info: { writers },
        laterEpochBefore: false,
        current: [writer],
        ...over,
      });
    check({});
    assert.throws(() => check({ current: [] }), isCode("bad_signature")); // its writer was removed since
    assert.throws(
      () =>
        check({
          partHashes: parts()
            .map((p) => sha256(p.data))
            .reverse(),
        }),
      isCode("malformed_body"),
    );
    assert.throws(() => check({ records: [] }), isCode("malformed_body")); // the relay hid the manifest
    assert.throws(() => check({ laterEpochBefore: true }), isCode("log_epoch_stale"));
  });
});
