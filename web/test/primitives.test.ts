// protocol/vectors/primitives.json: X25519 (RFC 7748), Ed25519 (RFC 8032) and the strict rejections.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ED25519_TORSION_SUBGROUP, ed25519, x25519 } from "@noble/curves/ed25519.js";
import { sha512 } from "@noble/hashes/sha2.js";
import { concat, equal, fromHex, toHex, utf8 } from "../src/protocol/bytes.js";
import { TetherlessError } from "../src/protocol/errors.js";
import { publicKeyOf, sign, verify } from "../src/protocol/signing.js";
import { dh, x25519Public } from "../src/protocol/x25519.js";
import { loadVectors } from "./vectors.js";

const v = loadVectors("primitives.json");

describe("x25519 (RFC 7748)", () => {
  it("§5.2 scalar multiplications", () => {
    for (const c of v.x25519_rfc7748.section_5_2) {
      assert.equal(toHex(x25519.scalarMult(fromHex(c.scalar), fromHex(c.u))), c.output);
    }
  });
  it("§5.2 iterated 1 and 1000 times", () => {
    let k = new Uint8Array(32);
    k[0] = 9;
    let u = k.slice();
    for (let i = 1; i <= 1000; i++) {
      const next = x25519.scalarMult(k, u);
      u = k;
      k = next;
      if (i === 1) assert.equal(toHex(k), v.x25519_rfc7748.iterated["1"]);
    }
    assert.equal(toHex(k), v.x25519_rfc7748.iterated["1000"]);
  });
  it("§6.1 Diffie-Hellman", () => {
    const c = v.x25519_rfc7748.section_6_1;
    assert.equal(toHex(x25519Public(fromHex(c.alice_private))), c.alice_public);
    assert.equal(toHex(x25519Public(fromHex(c.bob_private))), c.bob_public);
    assert.equal(toHex(dh(fromHex(c.alice_private), fromHex(c.bob_public))), c.shared);
    assert.equal(toHex(dh(fromHex(c.bob_private), fromHex(c.alice_public))), c.shared);
  });
  it("refuses u-coordinates whose shared secret is all zero", () => {
    const c = v.x25519_rfc7748.section_6_1;
    assert.ok(v.x25519_rfc7748.zero_output_points.length > 0);
    for (const point of v.x25519_rfc7748.zero_output_points) {
      assert.throws(
        () => dh(fromHex(c.alice_private), fromHex(point)),
        (e: unknown) => e instanceof TetherlessError && e.code === "prekey_invalid",
      );
    }
  });
});

describe("ed25519 (RFC 8032 §7.1)", () => {
  for (const c of v.ed25519_rfc8032) {
    it(c.name, () => {
      assert.equal(toHex(publicKeyOf(fromHex(c.secret))), c.public);
      assert.equal(toHex(sign(fromHex(c.secret), fromHex(c.message))), c.signature);
      verify(fromHex(c.public), fromHex(c.message), fromHex(c.signature));
    });
  }
});

describe("ed25519 strict rejections", () => {
  for (const c of v.ed25519_strict_rejections) {
    it(c.why, () => {
      assert.throws(
        () => verify(fromHex(c.public), fromHex(c.message), fromHex(c.signature)),
        (e: unknown) => e instanceof TetherlessError && e.code === "bad_signature",
      );
    });
  }
});

// Keys with a torsion component ("mixed order", A = aB + T): libsodium (the Python client) checks the
// cofactorless equation and refuses small-order R; noble alone checks the cofactored one. These inputs
// verify under the cofactored equation but not under libsodium's rules, so the browser must refuse them
// too, or two clients could disagree about one signed device list.
describe("ed25519 mixed-order keys (libsodium parity)", () => {
  const { Point } = ed25519;
  const L = Point.Fn.ORDER;
  const scalar = (bytes: Uint8Array) => {
    let n = 0n;
    for (let i = bytes.length - 1; i >= 0; i--) n = (n << 8n) | BigInt(bytes[i]!);
    return n % L;
  };
  const le32 = (n: bigint) => {
    const out = new Uint8Array(32);
    for (let i = 0; i < 32; i++) out[i] = Number((n >> BigInt(8 * i)) & 255n);
    return out;
  };
  const T = Point.fromBytes(fromHex(ED25519_TORSION_SUBGROUP[1]!), false); // a point of order 8
  const a = 0x1234567890abcdefn;
  const A = Point.BASE.multiply(a).add(T).toBytes();
  const k = (R: Uint8Array, m: Uint8Array) => scalar(sha512(concat(R, A, m)));

  it("refuses a cofactored-only signature by a mixed-order key", () => {
    const r = 0xfeedn;
    const R = Point.BASE.multiply(r).toBytes();
    // k mod 8 ≠ 0 makes [S]B − [k]A = R − [k]T ≠ R: cofactorless fails, cofactored holds.
    let m = new Uint8Array([0]);
    while (k(R, m) % 8n === 0n) m = new Uint8Array([m[0]! + 1]);
    const S = (r + k(R, m) * a) % L;
    const signature = concat(R, le32(S));
    assert.ok(ed25519.verify(signature, m, A, { zip215: false }), "noble alone accepts it");
    assert.throws(
      () => verify(A, m, signature),
      (e: unknown) => e instanceof TetherlessError && e.code === "bad_signature",
    );
  });

  it("accepts a mixed-order key's signature when k ≡ 0 (mod 8), as libsodium does", () => {
    const r = 0xbeefn;
    const R = Point.BASE.multiply(r).toBytes();
    let m = new Uint8Array([0]);
    while (k(R, m) % 8n !== 0n) m = new Uint8Array([m[0]! + 1]);
    verify(A, m, concat(R, le32((r + k(R, m) * a) % L)));
  });

  it("refuses a small-order R that satisfies the cofactorless equation for a mixed-order key", () => {
    // R = −[k]T with S = k·a: then [S]B − [k]A = −[k]T = R. k depends on R: try the 8 torsion points.
    const m = utf8("tetherless/v1/test\0small-order R");
    let found = false;
    for (let i = 0; i < 64 && !found; i++) {
      for (const hex of ED25519_TORSION_SUBGROUP) {
        const R = fromHex(hex);
        const kk = k(R, concat(m, new Uint8Array([i])));
        if (!equal(T.multiplyUnsafe(kk).negate().toBytes(), R)) continue;
        const message = concat(m, new Uint8Array([i]));
        const signature = concat(R, le32((kk * a) % L));
        assert.ok(ed25519.verify(signature, message, A, { zip215: false }), "noble alone accepts it");
        assert.throws(
          () => verify(A, message, signature),
          (e: unknown) => e instanceof TetherlessError && e.code === "bad_signature",
        );
        found = true;
        break;
      }
    }
    assert.ok(found, "no message gave a matching torsion point");
  });
});
