// protocol/vectors/v2.json: the format-2 device-list chain, the WebAuthn assertion, recovery secrets,
// link codes and signed prekeys. (The sessions section is in sessions.test.ts.)
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { sha256 } from "@noble/hashes/sha2.js";
import { p256 } from "@noble/curves/nist.js";
import { concat, fromHex, toHex, utf8 } from "../src/protocol/bytes.js";
import { decode, encode } from "../src/protocol/codec.js";
import { approve, genesis, listHash, listLayout, verifyChain } from "../src/protocol/deviceList.js";
import * as enrolment from "../src/protocol/enrolment.js";
import { DeviceListForkError, DeviceListRollbackError, TetherlessError } from "../src/protocol/errors.js";
import { deviceIdFor } from "../src/protocol/ids.js";
import { type DeviceListChain, type SignedDeviceList, SignedDeviceListDef } from "../src/protocol/messages.js";
import { prekeyLayout, signPrekey, verifyPrekey } from "../src/protocol/prekeys.js";
import { newRecoverySecret, parseRecoverySecret, recoveryKeys } from "../src/protocol/recovery.js";
import { publicKeyOf, sign } from "../src/protocol/signing.js";
import { parsePublicKey, verifyAssertion } from "../src/protocol/webauthn.js";
import { mlkemPublic } from "../src/protocol/handshake.js";
import { loadVectors } from "./vectors.js";

const v = loadVectors("v2.json");
const isCode = (code: string) => (e: unknown) => e instanceof TetherlessError && e.code === code;

describe("format-2 device-list chain", () => {
  const dl = v.device_lists;
  const versions: SignedDeviceList[] = dl.versions.map((c: { msgpack: string }) =>
    decode(SignedDeviceListDef, fromHex(c.msgpack)),
  );
  const chain = (vs: SignedDeviceList[]): DeviceListChain => ({ account_id: dl.account_id, versions: vs });

  it("decodes and re-encodes every version byte for byte; layouts and hashes match", () => {
    dl.versions.forEach((c: { layout: string; hash: string; msgpack: string }, i: number) => {
      assert.equal(toHex(encode(SignedDeviceListDef, versions[i]!)), c.msgpack);
      assert.equal(toHex(listLayout(versions[i]!.device_list)), c.layout);
      assert.equal(toHex(listHash(versions[i]!.device_list)), c.hash);
    });
  });
  it("the inputs derive the devices and the recovery key", () => {
    const ids = dl.inputs.device_seeds.map((s: string) => deviceIdFor(publicKeyOf(fromHex(s))));
    const head = versions[4]!.device_list;
    assert.deepEqual(
      head.devices.map((d) => d.device_id),
      [...ids.slice(1)].sort(),
    );
    const recovery = recoveryKeys(fromHex(dl.inputs.recovery_entropy), dl.account_id);
    assert.equal(toHex(versions[0]!.device_list.recovery_key), toHex(recovery.publicKey));
  });
  it("verifies from the genesis to the head, with the WebAuthn counters", () => {
    const verified = verifyChain(chain(versions), dl.account_id);
    assert.equal(verified.head.version, 5);
    assert.equal(toHex(verified.mark[1]), dl.versions[4].hash);
    assert.deepEqual([...verified.counters.values()], [2]);
    assert.equal(verified.removedIds.size, 1);
    const again = verifyChain(chain(versions), dl.account_id, [3, fromHex(dl.versions[2].hash)]);
    assert.equal(again.head.version, 5);
  });
  it("refuses a fork and a rollback against the high-water mark", () => {
    assert.throws(() => verifyChain(chain(versions), dl.account_id, [3, new Uint8Array(32)]), DeviceListForkError);
    assert.throws(
      () => verifyChain(chain(versions.slice(0, 3)), dl.account_id, [5, fromHex(dl.versions[4].hash)]),
      DeviceListRollbackError,
    );
  });
  it("refuses a chain for another account, a missing version and a foreign genesis", () => {
    assert.throws(() => verifyChain(chain(versions), "a".repeat(32)), isCode("invalid_device_list"));
    assert.throws(() => verifyChain(chain([versions[0]!, versions[2]!]), dl.account_id), isCode("invalid_device_list"));
    assert.throws(() => verifyChain(chain(versions.slice(1)), dl.account_id), isCode("invalid_device_list"));
  });
  it("refuses a version whose approval was dropped (threshold 2)", () => {
    const v2 = versions[1]!;
    const dropped = {
      ...v2,
      signatures: v2.signatures.filter(
        (s) => s.device_id === v2.device_list.devices.find((d) => d.added_at_ms > 1_700_000_000_000)?.device_id,
      ),
    };
    assert.throws(() => verifyChain(chain([versions[0]!, dropped]), dl.account_id), isCode("policy_not_met"));
  });
  it("refuses a version approved by an assertion over another list", () => {
    const v5 = versions[4]!;
    const assertion = v5.webauthn_assertions[0]!;
    const tampered = {
      ...v5,
      webauthn_assertions: [{ ...assertion, signature: versions[1]!.webauthn_assertions[0]!.signature }],
    };
    assert.throws(
      () => verifyChain(chain([...versions.slice(0, 4), tampered]), dl.account_id),
      isCode("webauthn_invalid"),
    );
  });
  it("refuses a replayed WebAuthn counter along the chain", () => {
    // v2's assertion (counter 1) re-used as v5's approval: the signature is over v2's hash, so it fails as
    // webauthn_invalid before the counter; the counter rule itself is covered in unit tests below.
    const withoutUv = { ...versions[4]!, webauthn_assertions: [] };
    assert.throws(
      () => verifyChain(chain([...versions.slice(0, 4), withoutUv]), dl.account_id),
      isCode("policy_not_met"),
    );
  });
  it("refuses a format-1 version that does not chain to its predecessor, though validly signed", () => {
    const seed = fromHex("01".repeat(32));
    const first = genesis(seed, fromHex("22".repeat(32)), "laptop", 1_700_000_000_000);
    const next = (prevHash: Uint8Array): SignedDeviceList => {
      const list = { ...first.device_list, version: 2, prev_hash: prevHash, created_at_ms: 1_700_000_001_000 };
      return { ...first, device_list: list, signatures: [approve(list, seed)] };
    };
    const accountId = first.device_list.account_id;
    assert.equal(
      verifyChain({ account_id: accountId, versions: [first, next(listHash(first.device_list))] }, accountId).head
        .version,
      2,
    );
    assert.throws(
      () => verifyChain({ account_id: accountId, versions: [first, next(new Uint8Array(32))] }, accountId),
      isCode("invalid_device_list"),
    );
  });
  it("refuses a device list whose signature covers other bytes", () => {
    const v4 = versions[3]!;
    const moved = { ...v4, device_list: { ...v4.device_list, created_at_ms: v4.device_list.created_at_ms + 1 } };
    assert.throws(() => verifyChain(chain([...versions.slice(0, 3), moved]), dl.account_id));
  });
});

describe("WebAuthn assertion", () => {
  const w = v.webauthn;
  const credential = {
    credential_id: fromHex(w.credential_id),
    public_key: fromHex(w.cose_public_key),
    rp_id: w.rp_id,
    added_at_ms: 0,
  };
  const assertion = {
    credential_id: fromHex(w.credential_id),
    authenticator_data: fromHex(w.assertion.authenticator_data),
    client_data_json: utf8(w.assertion.client_data_json),
    signature: fromHex(w.assertion.signature),
  };
  it("verifies over the vector's challenge and returns its counter and flags", () => {
    const result = verifyAssertion(credential, assertion, fromHex(w.assertion.challenge), true);
    assert.equal(result.signCount, w.assertion.sign_count);
    assert.equal(result.userVerified, w.assertion.user_verified);
  });
  it("refuses another challenge, another rp id, another credential and a flipped signature bit", () => {
    const challenge = fromHex(w.assertion.challenge);
    assert.throws(() => verifyAssertion(credential, assertion, new Uint8Array(32), true), isCode("webauthn_invalid"));
    assert.throws(
      () => verifyAssertion({ ...credential, rp_id: "evil.example" }, assertion, challenge, true),
      isCode("webauthn_invalid"),
    );
    assert.throws(
      () => verifyAssertion({ ...credential, credential_id: new Uint8Array([1]) }, assertion, challenge, true),
      isCode("webauthn_invalid"),
    );
    const signature = assertion.signature.slice();
    signature[signature.length - 1] = signature[signature.length - 1]! ^ 1;
    assert.throws(
      () => verifyAssertion(credential, { ...assertion, signature }, challenge, true),
      isCode("webauthn_invalid"),
    );
    const authenticatorData = assertion.authenticator_data.slice();
    authenticatorData[32] = authenticatorData[32]! & ~0x01; // clear UP
    assert.throws(
      () => verifyAssertion(credential, { ...assertion, authenticator_data: authenticatorData }, challenge, false),
      isCode("webauthn_invalid"),
    );
  });
});

describe("WebAuthn assertion checks that a valid signature does not cover", () => {
  // The vector's authenticator key is fixed (p256_private_value): re-sign altered assertions with it, so
  // each check below is what refuses them, not the signature.
  const w = v.webauthn;
  const secretKey = fromHex(BigInt(w.p256_private_value).toString(16).padStart(64, "0"));
  const credential = {
    credential_id: fromHex(w.credential_id),
    public_key: fromHex(w.cose_public_key),
    rp_id: w.rp_id,
    added_at_ms: 0,
  };
  const challenge = fromHex(w.assertion.challenge);
  const assertionOf = (authenticatorData: Uint8Array, clientData: Record<string, unknown>) => {
    const clientDataJson = utf8(JSON.stringify(clientData));
    const signature = p256.sign(concat(authenticatorData, sha256(clientDataJson)), secretKey, { format: "der" });
    return {
      credential_id: credential.credential_id,
      authenticator_data: authenticatorData,
      client_data_json: clientDataJson,
      signature,
    };
  };
  const goodClientData = JSON.parse(w.assertion.client_data_json) as Record<string, unknown>;
  const goodAuthData = fromHex(w.assertion.authenticator_data);

  it("the re-signed original verifies (the key is the credential's)", () => {
    assert.equal(verifyAssertion(credential, assertionOf(goodAuthData, goodClientData), challenge, true).signCount, 42);
  });
  it("refuses a missing user-present flag, and a missing UV flag when UV is required", () => {
    const noUp = goodAuthData.slice();
    noUp[32] = noUp[32]! & ~0x01;
    assert.throws(
      () => verifyAssertion(credential, assertionOf(noUp, goodClientData), challenge, false),
      isCode("webauthn_invalid"),
    );
    const noUv = goodAuthData.slice();
    noUv[32] = noUv[32]! & ~0x04;
    assert.equal(verifyAssertion(credential, assertionOf(noUv, goodClientData), challenge, false).userVerified, false);
    assert.throws(
      () => verifyAssertion(credential, assertionOf(noUv, goodClientData), challenge, true),
      isCode("webauthn_invalid"),
    );
  });
  it("refuses an rpIdHash for another rp id", () => {
    const other = concat(sha256(utf8("evil.example")), goodAuthData.subarray(32));
    assert.throws(
      () => verifyAssertion(credential, assertionOf(other, goodClientData), challenge, true),
      isCode("webauthn_invalid"),
    );
  });
  it("refuses another origin, plain http and a create-type clientDataJSON", () => {
    for (const change of [
      { origin: "https://evil.example" },
      { origin: "http://relay.example" },
      { type: "webauthn.create" },
      { origin: "https://relay.example.evil.example" },
    ]) {
      assert.throws(
        () => verifyAssertion(credential, assertionOf(goodAuthData, { ...goodClientData, ...change }), challenge, true),
        isCode("webauthn_invalid"),
      );
    }
    const sub = verifyAssertion(
      credential,
      assertionOf(goodAuthData, { ...goodClientData, origin: "https://app.relay.example" }),
      challenge,
      true,
    );
    assert.equal(sub.signCount, 42);
  });
  it("refuses trailing bytes after the authenticator data", () => {
    assert.throws(
      () =>
        verifyAssertion(
          credential,
          assertionOf(concat(goodAuthData, new Uint8Array([0])), goodClientData),
          challenge,
          true,
        ),
      isCode("webauthn_invalid"),
    );
  });
});

describe("WebAuthn EdDSA credentials and the COSE checks", () => {
  const seed = fromHex("07".repeat(32));
  // {1: 1 (OKP), 3: alg, -1: 6 (Ed25519), -2: x}, canonical CBOR
  const coseEd25519 = (alg: number, crv = 6) =>
    concat(
      fromHex(`a4010103${alg === -8 ? "27" : "32"}20${crv.toString(16).padStart(2, "0")}215820`),
      publicKeyOf(seed),
    );
  const w = v.webauthn;
  const challenge = fromHex(w.assertion.challenge);
  const authenticatorData = fromHex(w.assertion.authenticator_data);
  const clientDataJson = utf8(w.assertion.client_data_json);
  const assertion = {
    credential_id: new Uint8Array([1]),
    authenticator_data: authenticatorData,
    client_data_json: clientDataJson,
    signature: sign(seed, concat(authenticatorData, sha256(clientDataJson))),
  };
  it("verifies EdDSA (-8) and Ed25519 (-19) credentials", () => {
    for (const alg of [-8, -19]) {
      const credential = {
        credential_id: new Uint8Array([1]),
        public_key: coseEd25519(alg),
        rp_id: w.rp_id,
        added_at_ms: 0,
      };
      assert.equal(parsePublicKey(credential.public_key).algorithm, alg);
      assert.equal(verifyAssertion(credential, assertion, challenge, true).signCount, 42);
    }
  });
  it("accepts a key with another curve in a list (as the Python client does) but no assertion by it", () => {
    const credential = {
      credential_id: new Uint8Array([1]),
      public_key: coseEd25519(-8, 7),
      rp_id: w.rp_id,
      added_at_ms: 0,
    };
    parsePublicKey(credential.public_key);
    assert.throws(() => verifyAssertion(credential, assertion, challenge, true), isCode("webauthn_invalid"));
  });
  it("refuses RS256, a non-map and trailing bytes", () => {
    assert.throws(() => parsePublicKey(fromHex("a2010303390100")), isCode("webauthn_invalid")); // {1: 3, 3: -257}
    assert.throws(() => parsePublicKey(fromHex("80")), isCode("webauthn_invalid"));
    assert.throws(() => parsePublicKey(concat(coseEd25519(-8), new Uint8Array([0]))), isCode("webauthn_invalid"));
  });
});

describe("recovery secrets", () => {
  for (const c of v.recovery.cases) {
    it(c.text, () => {
      const entropy = fromHex(c.entropy);
      assert.equal(newRecoverySecret(entropy), c.text);
      assert.equal(toHex(parseRecoverySecret(c.text.toUpperCase().replace(/-/g, " "))), c.entropy);
      const keys = recoveryKeys(entropy, c.account_id);
      assert.equal(toHex(keys.publicKey), c.recovery_key);
      assert.equal(toHex(keys.signingSeed), c.recovery_sign_seed);
      assert.equal(toHex(keys.backupSeed), c.backup_seed);
    });
  }
  it("catches a typo", () => {
    const text: string = v.recovery.cases[0].text;
    const typo = text.slice(0, 5) + (text[5] === "b" ? "c" : "b") + text.slice(6);
    assert.throws(() => parseRecoverySecret(typo), RangeError);
  });
});

describe("link codes", () => {
  for (const c of v.enrolment.link_codes) {
    it(`${c.code} @ ${c.relay}`, () => {
      const secret = fromHex(c.secret);
      assert.equal(enrolment.linkCodeText(secret), c.code);
      assert.equal(toHex(enrolment.parseLinkCode(c.code.toUpperCase())), c.secret);
      assert.equal(enrolment.linkQr(c.relay, secret), c.qr);
      assert.equal(toHex(enrolment.lookupId(secret, c.relay)), c.lookup_id);
      assert.equal(enrolment.lookupIdText(fromHex(c.lookup_id)), c.lookup_id_text);
      assert.equal(toHex(enrolment.kOffer(secret, c.relay)), c.k_offer);
      assert.equal(toHex(enrolment.kApprove(secret, c.relay)), c.k_approve);
      const o = c.offer;
      assert.equal(
        toHex(enrolment.offerMac(secret, c.relay, fromHex(o.sign_key), fromHex(o.box_key), o.created_at_ms)),
        o.offer_mac,
      );
      const a = c.approval;
      assert.equal(
        toHex(enrolment.approvalTag(secret, c.relay, a.account_id, a.version, fromHex(a.list_hash))),
        a.approval_tag,
      );
      enrolment.verifyApprovalTag(
        secret,
        c.relay,
        a.account_id,
        a.version,
        fromHex(a.list_hash),
        fromHex(a.approval_tag),
      );
      assert.throws(
        () =>
          enrolment.verifyApprovalTag(
            secret,
            c.relay,
            a.account_id,
            a.version + 1,
            fromHex(a.list_hash),
            fromHex(a.approval_tag),
          ),
        enrolment.LinkCodeMismatchError,
      );
    });
  }
});

describe("signed prekeys", () => {
  for (const c of v.enrolment.prekeys) {
    it(`${c.kind} ${c.key_id}`, () => {
      const seed = fromHex(c.seed);
      assert.equal(deviceIdFor(publicKeyOf(seed)), c.device_id);
      const publicKey = fromHex(c.public_key);
      if (c.kind.startsWith("mlkem")) assert.equal(c.public_key, toHex(mlkemPublic(fromHex(v.enrolment.mlkem_seed))));
      assert.equal(
        toHex(sha256(prekeyLayout(c.device_id, c.kind, c.key_id, publicKey, c.created_at_ms))),
        c.layout_sha256,
      );
      const signed = signPrekey(seed, c.device_id, c.kind, c.key_id, publicKey, c.created_at_ms);
      assert.equal(toHex(signed.signature), c.signature);
      verifyPrekey(publicKeyOf(seed), c.device_id, signed, c.kind);
      assert.throws(
        () => verifyPrekey(publicKeyOf(seed), c.device_id, { ...signed, key_id: c.key_id + 1 }),
        isCode("prekey_invalid"),
      );
    });
  }
});
