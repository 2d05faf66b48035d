// Security keys: a registration read into the device-list format (protocol/webauthn.py `verify_registration`,
// against protocol/vectors/v2.json and a software key), python-fido2's canonical CBOR, the version builder,
// and the key approvals a list change carries (src/client/webauthn.ts).
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { p256 } from "@noble/curves/nist.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { concat, fromHex, toBase64Url, toHex, utf8 } from "../src/protocol/bytes.js";
import { type CborValue, decodeCbor } from "../src/protocol/cbor.js";
import { approve, evaluateVersion, genesisV3, listHash, verifyChain } from "../src/protocol/deviceList.js";
import { TetherlessError } from "../src/protocol/errors.js";
import { mlkemPublic } from "../src/protocol/handshake.js";
import type { DeviceList, SignedDeviceList, WebAuthnAssertion, WebAuthnCredential } from "../src/protocol/messages.js";
import {
  type WebAuthnRegistration,
  type WebAuthnRegistrationOptions,
  encodeCanonicalCbor,
  readRegistration,
} from "../src/protocol/webauthn.js";
import { x25519Public } from "../src/protocol/x25519.js";
import {
  type Authenticator,
  type UserVerification,
  keyApprovals,
  keyAssertion,
  nextVersion,
} from "../src/client/webauthn.js";
import { loadVectors } from "./vectors.js";

const v = loadVectors("v2.json");
const isCode = (code: string) => (e: unknown) => e instanceof TetherlessError && e.code === code;
const bytesOf = (label: string, n = 32) => sha256(utf8(label)).slice(0, n);

/** A CBOR map head and its entries in the order given (authenticators need not be canonical). */
function cborMapInOrder(entries: readonly [number | string, number | Uint8Array][]): Uint8Array {
  return concat(Uint8Array.of(0xa0 | entries.length), ...entries.flat().map((x) => encodeCanonicalCbor(x)));
}

/** A software ES256 security key for `origin`: what Chromium's virtual authenticator does, in Node. */
class SoftKey implements Authenticator {
  readonly secret: Uint8Array;
  readonly credentialId: Uint8Array;
  counter = 0;
  flags = 0x01 | 0x04; // UP, UV

  constructor(
    label: string,
    readonly origin = "https://relay.example",
  ) {
    this.secret = bytesOf(`soft key ${label}`);
    this.credentialId = bytesOf(`credential ${label}`, 16);
  }

  /** Its COSE key in the order x, y, kty, alg, crv (not canonical: readRegistration re-encodes it). */
  get coseKey(): Uint8Array {
    const point = p256.getPublicKey(this.secret, false);
    return cborMapInOrder([
      [-2, point.slice(1, 33)],
      [-3, point.slice(33, 65)],
      [1, 2],
      [3, -7],
      [-1, 1],
    ]);
  }

  clientData(type: string, challenge: Uint8Array): Uint8Array {
    return utf8(JSON.stringify({ type, challenge: toBase64Url(challenge), origin: this.origin, crossOrigin: false }));
  }

  authData(rpId: string, attested: boolean): Uint8Array {
    this.counter += 1;
    const counter = new Uint8Array(4);
    new DataView(counter.buffer).setUint32(0, this.counter, false);
    const head = concat(sha256(utf8(rpId)), Uint8Array.of(this.flags | (attested ? 0x40 : 0)), counter);
    if (!attested) return head;
    const idLength = Uint8Array.of(this.credentialId.length >> 8, this.credentialId.length & 0xff);
    return concat(head, new Uint8Array(16), idLength, this.credentialId, this.coseKey);
  }

  async create(options: WebAuthnRegistrationOptions): Promise<WebAuthnRegistration> {
    const authData = this.authData(options.rp_id, true);
    const attestation = new Map<string, CborValue>([
      ["fmt", "none"],
      ["attStmt", new Map()],
      ["authData", authData],
    ]);
    return {
      credential_id: this.credentialId,
      client_data_json: this.clientData("webauthn.create", options.challenge),
      attestation_object: encodeCanonicalCbor(attestation),
    };
  }

  async get(
    challenge: Uint8Array,
    credentials: readonly WebAuthnCredential[],
    _uv: UserVerification,
  ): Promise<WebAuthnAssertion> {
    const rpId = credentials[0]?.rp_id ?? "relay.example";
    const authenticatorData = this.authData(rpId, false);
    const clientDataJson = this.clientData("webauthn.get", challenge);
    const signed = concat(authenticatorData, sha256(clientDataJson));
    return {
      credential_id: this.credentialId,
      authenticator_data: authenticatorData,
      client_data_json: clientDataJson,
      signature: p256.sign(signed, this.secret, { format: "der" }),
    };
  }
}

function options(challenge = bytesOf("register challenge")): WebAuthnRegistrationOptions {
  return {
    challenge,
    rp_id: "relay.example",
    rp_name: "relay.example",
    user_id: utf8("account"),
    user_name: "account@relay.example",
    algorithms: [-19, -8, -7],
    attestation: "none",
    user_verification: "preferred",
    timeout_ms: 120_000,
    expires_at_ms: 0,
    exclude_credentials: [],
  };
}

describe("canonical CBOR (python-fido2's cbor.encode)", () => {
  it("sorts map keys by first byte, length, then bytes, as python-fido2 does", () => {
    const value = new Map<number | string, number | Uint8Array>([
      [10, 1],
      [-1, 2],
      ["a", 3],
      [100, 4],
      [1, 5],
      [-25, 6],
      ["bb", utf8("x")],
    ]);
    // cbor.encode({10: 1, -1: 2, "a": 3, 100: 4, 1: 5, -25: 6, "bb": b"x"}).hex() with fido2 2.2.1
    assert.equal(toHex(encodeCanonicalCbor(value)), "a701050a0118640420023818066161036262624178");
  });
  it("re-encodes the vector's COSE key to the same bytes, whatever order it was read in", () => {
    const cose = fromHex(v.webauthn.cose_public_key);
    assert.deepEqual(encodeCanonicalCbor(decodeCbor(cose)), cose);
    assert.deepEqual(encodeCanonicalCbor(decodeCbor(new SoftKey("a").coseKey)).length, new SoftKey("a").coseKey.length);
  });
});

describe("readRegistration", () => {
  const w = v.webauthn;
  const registration: WebAuthnRegistration = {
    credential_id: fromHex(w.credential_id),
    client_data_json: utf8(w.registration.client_data_json),
    attestation_object: fromHex(w.registration.attestation_object),
  };
  const challenge = fromHex(w.registration.challenge);

  it("reads the vector's packed self-attested registration into the credential Python stores", () => {
    const read = readRegistration(registration, challenge, w.rp_id, 1234);
    assert.deepEqual(read.credential, {
      credential_id: fromHex(w.credential_id),
      public_key: fromHex(w.cose_public_key),
      rp_id: w.rp_id,
      added_at_ms: 1234,
    });
    assert.equal(read.attestationFormat, "packed");
    assert.equal(read.attestationType, "self");
  });

  it("refuses the vector with another challenge, rp id, credential id or a flipped attestation signature", () => {
    assert.throws(() => readRegistration(registration, new Uint8Array(32), w.rp_id, 0), isCode("webauthn_invalid"));
    assert.throws(() => readRegistration(registration, challenge, "evil.example", 0), isCode("webauthn_invalid"));
    const otherId = { ...registration, credential_id: new Uint8Array(16) };
    assert.throws(() => readRegistration(otherId, challenge, w.rp_id, 0), isCode("webauthn_invalid"));
    const attestation = decodeCbor(registration.attestation_object) as Map<string, CborValue>;
    const statement = attestation.get("attStmt") as Map<string, CborValue>;
    const sig = (statement.get("sig") as Uint8Array).slice();
    sig[sig.length - 1] = sig[sig.length - 1]! ^ 1;
    const reencode = (changes: [string, CborValue][]) => ({
      ...registration,
      attestation_object: encodeCanonicalCbor(new Map([...attestation, ...changes])),
    });
    const flipped = reencode([["attStmt", new Map<string, CborValue>([...statement, ["sig", sig]])]]);
    assert.throws(() => readRegistration(flipped, challenge, w.rp_id, 0), isCode("webauthn_invalid"));
    const withCertificate = reencode([
      ["attStmt", new Map<string, CborValue>([...statement, ["x5c", [new Uint8Array(8)]]])],
    ]);
    assert.throws(() => readRegistration(withCertificate, challenge, w.rp_id, 0), isCode("webauthn_invalid"));
    const otherFormat = reencode([["fmt", "fido-u2f"]]);
    assert.throws(() => readRegistration(otherFormat, challenge, w.rp_id, 0), isCode("webauthn_invalid"));
    assert.throws(
      () => readRegistration({ ...registration, attestation_object: utf8("not cbor") }, challenge, w.rp_id, 0),
      isCode("webauthn_invalid"),
    );
  });

  it("reads a none registration and stores its COSE key canonically", async () => {
    const key = new SoftKey("none");
    const made = await key.create(options());
    const read = readRegistration(made, options().challenge, "relay.example", 5);
    assert.deepEqual(read.credential.public_key, encodeCanonicalCbor(decodeCbor(key.coseKey)));
    assert.notDeepEqual(read.credential.public_key, key.coseKey); // the key's own order was not canonical
    assert.equal(toHex(read.credential.public_key).slice(0, 10), "a501020326"); // kty, alg first: Python's order
    assert.equal(read.attestationType, "none");
    assert.equal(read.signCount, 1);
  });

  it("refuses a none statement that is not empty, a get-type clientDataJSON, no UP, and an IP-address origin", async () => {
    const key = new SoftKey("bad");
    const made = await key.create(options());
    const attestation = decodeCbor(made.attestation_object) as Map<string, CborValue>;
    const notEmpty = encodeCanonicalCbor(new Map([...attestation, ["attStmt", new Map([["sig", 1]])]]));
    assert.throws(
      () => readRegistration({ ...made, attestation_object: notEmpty }, options().challenge, "relay.example", 0),
      isCode("webauthn_invalid"),
    );
    const getType = { ...made, client_data_json: key.clientData("webauthn.get", options().challenge) };
    assert.throws(() => readRegistration(getType, options().challenge, "relay.example", 0), isCode("webauthn_invalid"));
    key.flags = 0x04;
    const noPresence = await key.create(options());
    assert.throws(
      () => readRegistration(noPresence, options().challenge, "relay.example", 0),
      isCode("webauthn_invalid"),
    );
    const ip = new SoftKey("ip", "http://127.0.0.1:8080");
    const fromIp = await ip.create({ ...options(), rp_id: "127.0.0.1" });
    assert.throws(() => readRegistration(fromIp, options().challenge, "127.0.0.1", 0), isCode("webauthn_invalid"));
  });
});

// -- the version builder and key approvals -------------------------------------------------------------------

const NOW = 1_700_000_000_000;
const seedA = bytesOf("device a");

function genesisList(): SignedDeviceList {
  return genesisV3(seedA, x25519Public(bytesOf("box a")), mlkemPublic(concat(bytesOf("kem a"), bytesOf("kem b"))), NOW);
}

/** The genesis, then a version adding `key`'s credential (approved by A, with the key's proof). */
async function chainWithKey(key: SoftKey, requireKey: boolean) {
  const genesis = genesisList();
  const made = await key.create(options());
  const credential = readRegistration(made, options().challenge, "relay.example", NOW).credential;
  const head = genesis.device_list;
  const policy = requireKey ? { ...head.policy, require_webauthn: true } : undefined;
  const dl = nextVersion(head, { addCredentials: [credential], ...(policy ? { policy } : {}) }, NOW + 1);
  const proof = await key.get(listHash(dl), [credential], "preferred");
  const v2: SignedDeviceList = {
    device_list: dl,
    signatures: [approve(dl, seedA)],
    recovery_signatures: [],
    webauthn_assertions: [proof],
  };
  const chain = { account_id: head.account_id, versions: [genesis, v2] };
  return { verified: verifyChain(chain, head.account_id), credential };
}

describe("nextVersion (device_list.py next_version)", () => {
  it("adds credentials sorted by id, keeps the policy object, and advances the epoch only on a removal", () => {
    const head = genesisList().device_list;
    const c = (b: number): WebAuthnCredential => ({
      credential_id: Uint8Array.of(b),
      public_key: fromHex(v.webauthn.cose_public_key),
      rp_id: "relay.example",
      added_at_ms: NOW,
    });
    const two = nextVersion(head, { addCredentials: [c(9), c(2)] }, NOW - 5);
    assert.deepEqual(
      two.credentials.map((x) => x.credential_id[0]),
      [2, 9],
    );
    assert.equal(two.policy, head.policy); // the default policy stays the shared object (codec.ts omit_defaults)
    assert.equal(two.created_at_ms, NOW); // never before the previous version
    assert.equal(two.account_key_epoch, head.account_key_epoch);
    assert.deepEqual(two.prev_hash, listHash(head));
    const three = nextVersion(two, { removeCredentialIds: [Uint8Array.of(9)] }, NOW);
    assert.equal(three.account_key_epoch, head.account_key_epoch + 1);
    assert.throws(() => nextVersion(two, { removeDeviceIds: ["nosuchdevice"] }, NOW), isCode("invalid_field"));
  });
});

describe("key approvals (devices.py key_assertion)", () => {
  it("an assertion by the account's key approves the next version; none is asked when not given", async () => {
    const key = new SoftKey("approver");
    const { verified } = await chainWithKey(key, false);
    const dl: DeviceList = nextVersion(verified.head, {}, NOW + 2);
    assert.deepEqual(await keyApprovals(verified, dl, null), []);
    const [assertion] = await keyApprovals(verified, dl, key);
    const signed = {
      device_list: dl,
      signatures: [approve(dl, seedA)],
      recovery_signatures: [],
      webauthn_assertions: [assertion!],
    };
    const change = evaluateVersion(verified.head, signed, verified.removedIds);
    assert.deepEqual(change.approvingCredentials, [toHex(key.credentialId)]);
  });

  it("refuses without a key when the policy requires one, before asking or sending anything", async () => {
    const key = new SoftKey("required");
    const { verified } = await chainWithKey(key, true);
    const dl = nextVersion(verified.head, {}, NOW + 2);
    await assert.rejects(keyApprovals(verified, dl, null), isCode("policy_not_met"));
    assert.equal((await keyApprovals(verified, dl, key)).length, 1);
  });

  it("refuses a key that is not the account's, and a sign counter that did not advance", async () => {
    const key = new SoftKey("listed");
    const { verified } = await chainWithKey(key, false);
    const dl = nextVersion(verified.head, {}, NOW + 2);
    await assert.rejects(keyAssertion(verified, dl, new SoftKey("stranger")), isCode("webauthn_invalid"));
    key.counter = 0; // a cloned key, or a replay: the chain already carries count 2
    await assert.rejects(keyAssertion(verified, dl, key), isCode("webauthn_replayed"));
  });

  it("refuses an account without keys", async () => {
    const genesis = genesisList();
    const verified = verifyChain(
      { account_id: genesis.device_list.account_id, versions: [genesis] },
      genesis.device_list.account_id,
    );
    const dl = nextVersion(verified.head, {}, NOW);
    await assert.rejects(keyApprovals(verified, dl, new SoftKey("none")), isCode("policy_not_met"));
  });
});
