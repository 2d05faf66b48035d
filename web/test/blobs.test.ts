// Media blobs: protocol/vectors/blob-stream.json reproduced both ways (src/protocol/blobs.ts), the refusals of
// tampered blobs, the file reference's checks (protocol/blobs.py BlobRef.check, safe_name), and the client's
// tus upload and capability download (src/client/blobs.ts) against an in-memory relay that can lie.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { describe, it } from "node:test";
import { fromHex, toHex, utf8 } from "../src/protocol/bytes.js";
import {
  BlobError,
  BlobOpener,
  type BlobRef,
  CIPHER_CHUNK_BYTES,
  Encryptor,
  HEADER_BYTES,
  blobLength,
  checkBlobRef,
  decodeBlobRef,
  derive,
  encodeBlobRef,
  paddedSize,
  safeName,
} from "../src/protocol/blobs.js";
import { TetherlessError } from "../src/protocol/errors.js";
import { FileTransferError, blobRelayUrl, downloadFile, uploadFile } from "../src/client/blobs.js";
import { RelayApi } from "../src/client/http.js";
import { loadVectors } from "./vectors.js";

interface Case {
  size: number;
  file_key: string;
  nonce: string;
  plaintext_sha256: string;
  payload_key: string;
  commitment: string;
  header: string;
  padded_size: number;
  chunks: number;
  ciphertext_length: number;
  ciphertext_sha256: string;
  chunk_sha256: string[];
  first_chunk_head: string;
  last_chunk_tail: string;
  plaintext?: string;
  ciphertext?: string;
}
interface RefVector {
  fields: Record<string, string | number>;
  msgpack: string;
}
const vectors = loadVectors<{ cases: Case[]; padded_sizes: [number, number][]; blob_ref: RefVector }>(
  "blob-stream.json",
);

const sha = (data: Uint8Array): string => createHash("sha256").update(data).digest("hex");
/** The vectors' plaintext: byte i is i mod 251. */
const plaintextOf = (size: number): Uint8Array => Uint8Array.from({ length: size }, (_, i) => i % 251);

async function encryptAll(encryptor: Encryptor, file: Uint8Array): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  for await (const piece of encryptor.readRange(0, encryptor.length, (o, n) => file.subarray(o, o + n))) {
    parts.push(piece.slice());
  }
  return Uint8Array.from(Buffer.concat(parts));
}

/** Open `blob` fed in pieces of `step` bytes; the file's bytes (only returned once `finish` passed). */
function openAll(ref: Pick<BlobRef, "key" | "digest" | "length" | "size">, blob: Uint8Array, step = 7_919): Uint8Array {
  const opener = new BlobOpener(ref);
  const parts: Uint8Array[] = [];
  for (let i = 0; i < blob.length; i += step) parts.push(...opener.push(blob.subarray(i, i + step)));
  opener.finish();
  return Buffer.concat(parts);
}

const refuses = (code: string) => (e: unknown) => e instanceof BlobError && e.code === code;

describe("blob-stream.json", () => {
  it("padded sizes, exactly (BigInt at the 1 TiB edge)", () => {
    for (const [n, padded] of vectors.padded_sizes) assert.equal(paddedSize(n), padded, `size ${n}`);
    assert.throws(() => paddedSize(-1), RangeError);
    assert.throws(() => paddedSize(2 ** 40 + 1), RangeError);
  });

  for (const c of vectors.cases) {
    it(`size ${c.size}: keys, header, every chunk and the digest, then back to the file`, async () => {
      const file = plaintextOf(c.size);
      assert.equal(sha(file), c.plaintext_sha256);
      const [payloadKey, commitment] = derive(fromHex(c.file_key), fromHex(c.nonce));
      assert.equal(toHex(payloadKey), c.payload_key);
      assert.equal(toHex(commitment), c.commitment);
      const encryptor = new Encryptor(fromHex(c.file_key), fromHex(c.nonce), c.size);
      assert.deepEqual(
        [encryptor.padded, encryptor.chunks, encryptor.length, toHex(encryptor.header)],
        [c.padded_size, c.chunks, c.ciphertext_length, c.header],
      );
      const blob = await encryptAll(encryptor, file);
      assert.equal(blob.length, c.ciphertext_length);
      assert.equal(sha(blob), c.ciphertext_sha256);
      if (c.ciphertext !== undefined) assert.equal(toHex(blob), c.ciphertext);
      const chunks = [];
      for (let at = HEADER_BYTES; at < blob.length; at += CIPHER_CHUNK_BYTES) {
        chunks.push(blob.subarray(at, at + CIPHER_CHUNK_BYTES));
      }
      assert.deepEqual(chunks.map(sha), c.chunk_sha256);
      assert.equal(toHex(chunks[0]!.subarray(0, c.first_chunk_head.length / 2)), c.first_chunk_head);
      assert.equal(toHex(chunks.at(-1)!.subarray(-c.last_chunk_tail.length / 2)), c.last_chunk_tail);

      // Any ciphertext range re-encrypts to the same bytes (what a retried PATCH sends).
      const middle = Math.floor(blob.length / 3);
      const again = [];
      for await (const piece of encryptor.readRange(middle, blob.length, (o, n) => file.subarray(o, o + n))) {
        again.push(piece.slice());
      }
      assert.deepEqual(Buffer.concat(again), Buffer.from(blob.subarray(middle)));

      // The other direction: the vector's ciphertext opens to the vector's file.
      const ref = {
        key: fromHex(c.file_key),
        digest: fromHex(c.ciphertext_sha256),
        length: c.ciphertext_length,
        size: c.size,
      };
      const opened = openAll(ref, c.ciphertext === undefined ? blob : fromHex(c.ciphertext));
      assert.equal(sha(opened), c.plaintext_sha256);
      if (c.plaintext !== undefined) assert.equal(toHex(opened), c.plaintext);
    });
  }
});

describe("a tampered blob never opens", () => {
  const c = vectors.cases.find((v) => v.size === 200_000)!;
  const key = fromHex(c.file_key);
  const good = { key, digest: fromHex(c.ciphertext_sha256), length: c.ciphertext_length, size: c.size };
  const blobOf = async () => encryptAll(new Encryptor(key, fromHex(c.nonce), c.size), plaintextOf(c.size));

  it("a changed byte in a chunk: blob_corrupt at that chunk, before the digest", async () => {
    const blob = await blobOf();
    blob[HEADER_BYTES + CIPHER_CHUNK_BYTES + 100]! ^= 1;
    const opener = new BlobOpener(good);
    assert.equal(opener.push(blob.subarray(0, HEADER_BYTES + CIPHER_CHUNK_BYTES)).length, 1); // chunk 0 is fine
    assert.throws(() => opener.push(blob.subarray(HEADER_BYTES + CIPHER_CHUNK_BYTES)), /chunk 1 does not authenticate/);
  });

  it("another file key: blob_key_mismatch from the header, before any chunk", async () => {
    const blob = await blobOf();
    const opener = new BlobOpener({ ...good, key: new Uint8Array(32).fill(7) });
    assert.throws(() => opener.push(blob.subarray(0, HEADER_BYTES)), refuses("blob_key_mismatch"));
  });

  it("a header of another format, swapped chunks, a cut, an extra byte, another digest: blob_corrupt", async () => {
    const blob = await blobOf();
    const badMagic = blob.slice();
    badMagic[0] = 0;
    assert.throws(() => openAll(good, badMagic), refuses("blob_corrupt"));
    const swapped = blob.slice();
    swapped.set(blob.subarray(HEADER_BYTES + CIPHER_CHUNK_BYTES, HEADER_BYTES + 2 * CIPHER_CHUNK_BYTES), HEADER_BYTES);
    swapped.set(blob.subarray(HEADER_BYTES, HEADER_BYTES + CIPHER_CHUNK_BYTES), HEADER_BYTES + CIPHER_CHUNK_BYTES);
    assert.throws(() => openAll(good, swapped), refuses("blob_corrupt"));
    assert.throws(() => openAll(good, blob.subarray(0, blob.length - 1)), /sent 208334 of/);
    const cutAtChunk = blob.subarray(0, HEADER_BYTES + 3 * CIPHER_CHUNK_BYTES);
    assert.throws(() => openAll(good, cutAtChunk), refuses("blob_corrupt"));
    assert.throws(() => openAll(good, Buffer.concat([blob, Buffer.from([0])])), /more than the blob's/);
    assert.throws(() => openAll({ ...good, digest: new Uint8Array(32) }, blob), /SHA-256 is not the one/);
  });

  it("a last chunk sealed as not last (a truncation attack) does not open", async () => {
    const small = vectors.cases.find((v) => v.size === 1)!;
    const enc = new Encryptor(fromHex(small.file_key), fromHex(small.nonce), 1);
    const [payloadKey] = derive(fromHex(small.file_key), fromHex(small.nonce));
    const { PayloadStream } = await import("../src/protocol/blobs.js");
    const padded = new Uint8Array(enc.padded);
    padded[1] = 0x80;
    const forged = Buffer.concat([enc.header, new PayloadStream(payloadKey).seal(0, padded, false)]);
    const ref = {
      key: fromHex(small.file_key),
      digest: createHash("sha256").update(forged).digest(),
      length: 613,
      size: 1,
    };
    assert.throws(() => openAll(ref, forged), /chunk 0 does not authenticate/);
  });
});

const REF: BlobRef = {
  relay: "relay.example.org",
  blob_id: "0123456789abcdef0123456789abcdef",
  digest: new Uint8Array(32).fill(1),
  key: new Uint8Array(32).fill(2),
  length: blobLength(1_000_000),
  capability: new Uint8Array(32).fill(3),
  name: "scan 2026-12-07.pdf",
  content_type: "application/pdf",
  size: 1_000_000,
};

describe("the file reference (protocol/blobs.py BlobRef)", () => {
  it("encodes and decodes the vector's file message body byte for byte", () => {
    const wire = fromHex(vectors.blob_ref.msgpack);
    const ref = checkBlobRef(decodeBlobRef(wire));
    const fields = Object.fromEntries(Object.entries(ref).map(([k, v]) => [k, v instanceof Uint8Array ? toHex(v) : v]));
    assert.deepEqual(fields, vectors.blob_ref.fields);
    assert.deepEqual(toHex(encodeBlobRef(ref)), vectors.blob_ref.msgpack);
  });

  it("round-trips as MessagePack, fields in msgspec's order", () => {
    const body = encodeBlobRef(REF);
    assert.deepEqual(decodeBlobRef(body), REF);
    // A map of 9 fields whose first key is "relay" (fixmap 0x89, fixstr 0xa5 "relay").
    assert.deepEqual([...body.subarray(0, 7)], [0x89, 0xa5, ...utf8("relay")]);
  });

  const bad: [string, Partial<BlobRef>][] = [
    ["length", { length: REF.length + 1 }],
    ["size", { size: REF.size + 70_000 }],
    ["blob_id uppercase", { blob_id: "0123456789ABCDEF0123456789ABCDEF" }],
    ["blob_id short", { blob_id: "00" }],
    ["key", { key: new Uint8Array(16) }],
    ["digest", { digest: new Uint8Array(33) }],
    ["capability", { capability: new Uint8Array(0) }],
    ["relay with a path", { relay: "relay.example.org/evil" }],
    ["a path", { name: "../../.ssh/authorized_keys" }],
    ["slash", { name: "a/b" }],
    ["backslash", { name: "a\\b" }],
    ["..", { name: ".." }],
    [".", { name: "." }],
    ["NUL", { name: "report\x00.pdf" }],
    ["line break", { name: "line\nbreak" }],
    ["bidi override", { name: "\u202etxt.exe" }],
    ["empty name", { name: "" }],
    ["header injection", { content_type: "text/plain\r\nX-Injected: 1" }],
    ["negative size", { size: -1 }],
  ];
  for (const [what, change] of bad) {
    it(`refuses ${what}`, () => {
      assert.throws(
        () => checkBlobRef({ ...REF, ...change }),
        (e: unknown) => e instanceof TetherlessError && e.code === "invalid_field",
      );
    });
  }

  it("safe_name's examples, and it is idempotent", () => {
    const examples: [string, string][] = [
      ["../../etc/passwd", "_.._etc_passwd"],
      ["C:\\Windows\\win.ini", "C__Windows_win.ini"],
      ["CON.txt", "_CON.txt"],
      [".bashrc", "bashrc"],
      ["photo.jpg ", "photo.jpg"],
      ["\u202egpj.exe", "gpj.exe"],
      ["\x00\x01", "file"],
      ["x".repeat(300) + ".tar.gz", "x".repeat(252) + ".gz"],
      ["tab\there\u00a0nbsp", "tabhere nbsp"],
      ["é".repeat(200), "é".repeat(127)],
    ];
    for (const [name, safe] of examples) {
      assert.equal(safeName(name), safe, JSON.stringify(name));
      assert.equal(safeName(safe), safe);
    }
  });
});

// -- the client against an in-memory tus relay -----------------------------------------------------------------

interface Upload {
  length: number;
  data: Uint8Array;
  offset: number;
  digest: Uint8Array;
  capabilityHash: Uint8Array;
  blobId: string | null;
}

const problem = (status: number, code: string) =>
  new Response(JSON.stringify({ code, detail: code }), {
    status,
    headers: { "content-type": "application/problem+json" },
  });

/** tus 1.0 as docs/blobs.md says, in memory; its fields make it fail or lie on purpose. */
class FakeBlobRelay {
  readonly uploads = new Map<string, Upload>();
  patches = 0;
  received = 0;
  /** PATCH numbers (1-based) that store their bytes and then lose the answer (a network error). */
  loseAnswerOf = new Set<number>();
  /** PATCH numbers refused with 460 (a damaged piece), nothing stored. */
  damage = new Set<number>();
  /** Every PATCH answers this offset instead of the true one. */
  lieOffset: number | null = null;
  /** The first PATCH claims the whole upload stored, with a blob id. */
  claimComplete = false;
  /** Each PATCH finds the upload back at offset 0 (a relay that loses what it acknowledged). */
  forgetful = false;
  /** Bytes served by GET replace the stored ones (a tampering relay). */
  serve: ((stored: Uint8Array) => Uint8Array) | null = null;
  private next = 0;

  readonly fetch = async (url: string, init: RequestInit): Promise<Response> => {
    const { pathname } = new URL(url);
    const headers = new Headers(init.headers);
    const method = init.method ?? "GET";
    if (method === "POST" && pathname === "/v1/blobs/uploads") {
      const meta = new Map(
        (headers.get("upload-metadata") ?? "").split(",").map((kv) => kv.split(" ") as [string, string]),
      );
      const id = (this.next++).toString(16).padStart(32, "0");
      const length = Number(headers.get("upload-length"));
      const upload: Upload = {
        length,
        data: new Uint8Array(length),
        offset: 0,
        digest: Buffer.from(meta.get("sha256")!, "base64"),
        capabilityHash: Buffer.from(meta.get("capability")!, "base64"),
        blobId: null,
      };
      this.uploads.set(id, upload);
      return new Response(null, {
        status: 201,
        headers: { location: `/v1/blobs/uploads/${id}`, "upload-offset": "0" },
      });
    }
    const uploadMatch = /^\/v1\/blobs\/uploads\/([0-9a-f]{32})$/.exec(pathname);
    if (uploadMatch) {
      const upload = this.uploads.get(uploadMatch[1]!);
      if (!upload) return problem(404, "blob_not_found");
      const answer = () => {
        const h: Record<string, string> = { "upload-offset": String(this.lieOffset ?? upload.offset) };
        if (upload.blobId) h["tetherless-blob-id"] = upload.blobId;
        return new Response(null, { status: 204, headers: h });
      };
      if (method === "HEAD") return answer();
      assert.equal(method, "PATCH");
      assert.equal(headers.get("content-type"), "application/offset+octet-stream");
      assert.equal(headers.get("tus-resumable"), "1.0.0");
      this.patches += 1;
      const body = init.body as Uint8Array;
      this.received += body.length;
      if (this.forgetful) upload.offset = 0;
      if (this.patches > 50) return problem(400, "bad_request"); // a client that never gives up: stop it
      if (this.claimComplete) {
        const h = { "upload-offset": String(upload.length), "tetherless-blob-id": uploadMatch[1]! };
        return new Response(null, { status: 204, headers: h });
      }
      if (Number(headers.get("upload-offset")) !== upload.offset) return problem(409, "blob_offset_mismatch");
      const [algorithm, sum] = headers.get("upload-checksum")!.split(" ");
      assert.equal(algorithm, "sha256");
      if (this.damage.has(this.patches) || sum !== createHash("sha256").update(body).digest("base64")) {
        return problem(460, "blob_checksum_mismatch");
      }
      upload.data.set(body, upload.offset);
      upload.offset += body.length;
      if (upload.offset === upload.length) {
        if (sha(upload.data) !== toHex(upload.digest)) return problem(409, "blob_digest_mismatch");
        upload.blobId = uploadMatch[1]!;
      }
      if (this.loseAnswerOf.has(this.patches)) throw new TypeError("fetch failed");
      return answer();
    }
    const blobMatch = /^\/v1\/blobs\/([0-9a-f]{32})$/.exec(pathname);
    if (method === "GET" && blobMatch) {
      const upload = this.uploads.get(blobMatch[1]!);
      const capability = headers.get("tetherless-capability") ?? "";
      const hash = createHash("sha256").update(Buffer.from(capability, "base64url")).digest();
      if (!upload?.blobId || !hash.equals(upload.capabilityHash) || headers.has("authorization")) {
        return problem(404, "blob_not_found");
      }
      const bytes = this.serve ? this.serve(upload.data) : upload.data;
      let at = 0;
      const stream = new ReadableStream<Uint8Array>({
        pull(controller) {
          if (at >= bytes.length) return controller.close();
          controller.enqueue(bytes.slice(at, at + 100_003)); // pieces across chunk boundaries
          at += 100_003;
        },
      });
      return new Response(stream, { status: 200, headers: { "content-length": String(bytes.length) } });
    }
    return problem(404, "not_found");
  };
}

let counter = 0;
const random = (n: number) => Uint8Array.from({ length: n }, () => (counter = (counter * 31 + 17) % 256));
const noWait = async () => undefined;
const MiB = 1024 * 1024;
const fileOf = (size: number, name = "scan.pdf") =>
  new File([Uint8Array.from({ length: size }, (_, i) => (i * 7 + (i >> 12)) % 256)], name, { type: "application/pdf" });

async function setUp(relay = new FakeBlobRelay()) {
  const api = new RelayApi("http://relay.test", relay.fetch);
  api.token = "token";
  return { relay, api };
}

async function bytesOf(blob: Blob): Promise<Uint8Array> {
  return new Uint8Array(await blob.arrayBuffer());
}

describe("upload and download (src/client/blobs.ts)", () => {
  it("uploads in pieces with checksums, and the download verifies and decrypts it", async () => {
    const { relay, api } = await setUp();
    const file = fileOf(3 * MiB + 12_345);
    const phases = new Set<string>();
    const ref = await uploadFile(api, file, {
      relayName: "relay.test",
      random,
      sleep: noWait,
      pieceBytes: MiB,
      progress: (phase) => phases.add(phase),
    });
    assert.deepEqual([...phases], ["encrypting", "uploading"]);
    assert.equal(relay.patches, 4);
    assert.equal(relay.received, ref.length);
    assert.deepEqual(
      [ref.name, ref.content_type, ref.size, ref.relay],
      ["scan.pdf", "application/pdf", file.size, "relay.test"],
    );
    assert.equal(decodeBlobRef(encodeBlobRef(ref)).blob_id, ref.blob_id);
    const stored = relay.uploads.get(ref.blob_id)!.data;
    assert.equal(Buffer.from(stored).includes(Buffer.from(await file.slice(0, 64).arrayBuffer())), false);
    const got = await downloadFile(ref, { homeRelay: "relay.test", homeApi: api });
    assert.equal(sha(await bytesOf(got)), sha(await bytesOf(file)));
  });

  it("a PATCH whose answer is lost, or refused as damaged, continues from the relay's offset (HEAD)", async () => {
    const { relay, api } = await setUp();
    relay.loseAnswerOf = new Set([2]);
    relay.damage = new Set([3]);
    const file = fileOf(3 * MiB);
    const ref = await uploadFile(api, file, { relayName: "relay.test", random, sleep: noWait, pieceBytes: MiB });
    // Piece 2 was stored (its answer lost): not sent again; piece 3 (damaged) was, once.
    assert.equal(relay.received, ref.length + MiB);
    const got = await downloadFile(ref, { homeRelay: "relay.test", homeApi: api });
    assert.equal(sha(await bytesOf(got)), sha(await bytesOf(file)));
  });

  it("a relay that lies about the offset is refused (relay_misbehaved), not looped on", async () => {
    const { relay, api } = await setUp();
    relay.lieOffset = 5;
    await assert.rejects(
      uploadFile(api, fileOf(2 * MiB), { relayName: "relay.test", random, sleep: noWait, pieceBytes: MiB }),
      (e: unknown) => e instanceof FileTransferError && e.code === "relay_misbehaved",
    );
  });

  it("a PATCH answered with the whole upload stored is refused: the offset must be the piece's end", async () => {
    const { relay, api } = await setUp();
    relay.claimComplete = true;
    await assert.rejects(
      uploadFile(api, fileOf(2 * MiB), { relayName: "relay.test", random, sleep: noWait, pieceBytes: MiB }),
      (e: unknown) =>
        e instanceof FileTransferError && e.code === "relay_misbehaved" && /answered a PATCH up to/.test(e.message),
    );
  });

  it(
    "a relay that keeps losing what it acknowledged is given up on (relay_misbehaved)",
    { timeout: 60_000 },
    async () => {
      const { relay, api } = await setUp();
      relay.forgetful = true;
      await assert.rejects(
        uploadFile(api, fileOf(2 * MiB), { relayName: "relay.test", random, sleep: noWait, pieceBytes: MiB }),
        (e: unknown) =>
          e instanceof FileTransferError && e.code === "relay_misbehaved" && /keeps losing/.test(e.message),
      );
      assert.ok(relay.received <= 3 * 2 * MiB + 2 * MiB + MiB);
    },
  );

  it("a relay that keeps failing: upload_stalled after the retries", async () => {
    const { relay, api } = await setUp();
    relay.damage = new Set(Array.from({ length: 50 }, (_, i) => i + 1));
    await assert.rejects(
      uploadFile(api, fileOf(MiB), { relayName: "relay.test", random, sleep: noWait }),
      (e: unknown) => e instanceof FileTransferError && e.code === "upload_stalled",
    );
  });

  it("a tampering relay: blob_corrupt / blob_key_mismatch, and no plaintext", async () => {
    const { relay, api } = await setUp();
    const ref = await uploadFile(api, fileOf(MiB), { relayName: "relay.test", random, sleep: noWait });
    const options = { homeRelay: "relay.test", homeApi: api };
    const cases: [string, (b: Uint8Array) => Uint8Array][] = [
      [
        "blob_corrupt",
        (b) =>
          Object.assign(b.slice(), {
            [HEADER_BYTES + 5 * CIPHER_CHUNK_BYTES]: b[HEADER_BYTES + 5 * CIPHER_CHUNK_BYTES]! ^ 1,
          }),
      ],
      ["blob_corrupt", (b) => b.subarray(0, b.length - 10)],
      ["blob_corrupt", (b) => Buffer.concat([b, Buffer.from([1])])],
      ["blob_key_mismatch", (b) => Object.assign(b.slice(), { [30]: b[30]! ^ 1 })],
    ];
    for (const [code, serve] of cases) {
      relay.serve = serve;
      await assert.rejects(
        downloadFile(ref, options),
        (e: unknown) => e instanceof FileTransferError && e.code === code,
      );
    }
    relay.serve = null;
    await assert.rejects(
      downloadFile({ ...ref, capability: new Uint8Array(32) }, options),
      (e: unknown) => e instanceof FileTransferError && e.code === "blob_not_found",
    );
    await assert.rejects(
      downloadFile(ref, { ...options, limitBytes: MiB - 1, cliRef: "abc" }),
      (e: unknown) =>
        e instanceof FileTransferError &&
        e.code === "file_too_large_for_browser" &&
        /tetherless blob get abc/.test(e.message),
    );
  });

  it("another relay is fetched at https://NAME with the capability only; addresses are refused", async () => {
    const { relay, api } = await setUp();
    const ref = await uploadFile(api, fileOf(100_000), { relayName: "other.example:8443", random, sleep: noWait });
    const asked: string[] = [];
    const got = await downloadFile(ref, {
      homeRelay: "relay.test",
      homeApi: api,
      fetch: (url, init) => {
        asked.push(url);
        return relay.fetch(url, init);
      },
    });
    assert.equal(got.size, 100_000);
    assert.deepEqual(asked, [`https://other.example:8443/v1/blobs/${ref.blob_id}`]);
    for (const name of [
      "127.0.0.1",
      "127.1",
      "2130706433",
      "0x7f.1",
      "[::1]:8443",
      "10.0.0.1:443",
      "localhost:8443",
      "a.localhost",
    ]) {
      assert.throws(
        () => blobRelayUrl(name),
        (e: unknown) => e instanceof FileTransferError && e.code === "blob_relay_refused",
        name,
      );
      await assert.rejects(
        downloadFile(
          { ...ref, relay: name },
          { homeRelay: "relay.test", homeApi: api, fetch: () => assert.fail("no request") },
        ),
        (e: unknown) => e instanceof FileTransferError && e.code === "blob_relay_refused",
      );
    }
    assert.equal(blobRelayUrl("Relay.Example.org"), "https://relay.example.org");
    // A relay the browser cannot reach (down, or CSP/CORS refuse it): said in words, with the CLI as the way out.
    await assert.rejects(
      downloadFile(ref, {
        homeRelay: "relay.test",
        homeApi: api,
        fetch: () => Promise.reject(new TypeError("Failed to fetch")),
      }),
      (e: unknown) =>
        e instanceof FileTransferError && e.code === "relay_unreachable" && /tetherless blob get/.test(e.message),
    );
  });
});
