// protocol/vectors/v3.json: device-list format 3 (docs/crypto.md §3.6) — kem_key, role and scopes, the role
// rule, the 2 → 3 upgrade, refused versions and the `link-offer/2` MAC; checked as
// tests/protocol/test_device_list_v3.py checks them, plus a malicious relay's forged versions.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { sha256 } from "@noble/hashes/sha2.js";
import { fromHex, toHex } from "../src/protocol/bytes.js";
import { decode, encode } from "../src/protocol/codec.js";
import {
  FORMAT_2,
  FORMAT_3,
  approve,
  checkStructure,
  evaluateVersion,
  genesisV3,
  listHash,
  listLayout,
  receivesAccountKeyGrants,
  verifyChain,
  verifyGenesis,
} from "../src/protocol/deviceList.js";
import { TetherlessError } from "../src/protocol/errors.js";
import { mlkemCheckPublic, mlkemPublic } from "../src/protocol/handshake.js";
import {
  type DeviceEntry,
  type DeviceList,
  type SignedDeviceList,
  SignedDeviceListDef,
} from "../src/protocol/messages.js";
import * as enrolment from "../src/protocol/enrolment.js";
import { hkdf } from "../src/protocol/kdf.js";
import { layout, publicKeyOf } from "../src/protocol/signing.js";
import { hmac } from "@noble/hashes/hmac.js";
import { loadVectors } from "./vectors.js";

const v = loadVectors("v3.json");
const isCode = (code: string) => (e: unknown) => e instanceof TetherlessError && e.code === code;

type VersionCase = { layout: string; hash: string; msgpack: string };
function versionsOf(section: { versions: VersionCase[] }): SignedDeviceList[] {
  return section.versions.map((c) => {
    const signed = decode(SignedDeviceListDef, fromHex(c.msgpack));
    assert.equal(toHex(encode(SignedDeviceListDef, signed)), c.msgpack, "re-encodes byte for byte");
    assert.equal(toHex(listLayout(signed.device_list)), c.layout);
    assert.equal(toHex(sha256(fromHex(c.layout))), c.hash);
    assert.equal(toHex(listHash(signed.device_list)), c.hash);
    return signed;
  });
}

const roles = versionsOf(v.roles);
const seeds = (section: { inputs: { device_seeds: string[] } }) => section.inputs.device_seeds.map((s) => fromHex(s));
const chain = (vs: SignedDeviceList[]) => ({ account_id: v.roles.account_id as string, versions: vs });

/** Replace one device entry of `dl` (by position in the sorted list) and re-sign it with `signers`. */
function withDevice(dl: DeviceList, index: number, change: Partial<DeviceEntry>): DeviceList {
  const devices = dl.devices.map((d, i) => (i === index ? { ...d, ...change } : d));
  return { ...dl, devices };
}
function signedBy(dl: DeviceList, signerSeeds: Uint8Array[]): SignedDeviceList {
  return {
    device_list: dl,
    signatures: signerSeeds.map((s) => approve(dl, s)).sort((a, b) => (a.device_id < b.device_id ? -1 : 1)),
    recovery_signatures: [],
    webauthn_assertions: [],
  };
}

describe("format-3 roles chain", () => {
  it("verifies from the genesis; roles say who receives grants; kem keys are the seeds'", () => {
    const result = verifyChain(chain(roles), v.roles.account_id);
    assert.deepEqual(
      roles.map((s) => s.device_list.format),
      [FORMAT_3, FORMAT_3, FORMAT_3, FORMAT_3],
    );
    assert.deepEqual(
      Object.fromEntries(result.devices.map((d) => [d.device_id, receivesAccountKeyGrants(d)])),
      v.roles.receives_account_key_grants,
    );
    assert.deepEqual(
      result.devices.map((d) => toHex(d.kem_key)).sort(),
      v.roles.inputs.kem_seeds.map((s: string) => toHex(mlkemPublic(fromHex(s)))).sort(),
    );
  });
  it("the genesis layout spelled out from crypto.md §3.6", () => {
    const g = roles[0]!.device_list;
    const d = g.devices[0]!;
    const expected = layout(
      "device-list/3",
      v.roles.account_id,
      1,
      new Uint8Array(0),
      g.created_at_ms,
      1,
      0,
      0,
      0,
      new Uint8Array(0),
      new Uint8Array(0),
      1,
      d.device_id,
      d.sign_key,
      fromHex(v.roles.inputs.box_keys[0]),
      g.created_at_ms,
      mlkemPublic(fromHex(v.roles.inputs.kem_seeds[0])),
      "device",
      0,
      0,
    );
    assert.equal(toHex(expected), v.roles.versions[0].layout);
  });
  it("the same list under format 2 has another layout domain", () => {
    const head = roles[3]!.device_list;
    const plain = { ...head, format: FORMAT_2 };
    assert.notEqual(toHex(listLayout(plain)), toHex(listLayout(head)));
    assert.ok(toHex(listLayout(plain)).includes(toHex(new TextEncoder().encode("device-list/2"))));
  });
  it("a genesis built here verifies and is format 3", () => {
    const s = seeds(v.roles);
    const kem = mlkemPublic(fromHex(v.roles.inputs.kem_seeds[0]));
    const g = genesisV3(s[0]!, fromHex(v.roles.inputs.box_keys[0]), kem, roles[0]!.device_list.created_at_ms);
    assert.equal(toHex(encode(SignedDeviceListDef, g)), v.roles.versions[0].msgpack);
    assert.equal(verifyGenesis(g).role, "device");
  });
});

describe("format-3 refusals", () => {
  v.refused.cases.forEach((c: VersionCase & { name: string; after_version: number; code: string }) => {
    it(`refuses: ${c.name} (${c.code})`, () => {
      const signed = decode(SignedDeviceListDef, fromHex(c.msgpack));
      assert.equal(toHex(listLayout(signed.device_list)), c.layout);
      const head = roles[c.after_version - 1]!.device_list;
      assert.throws(() => evaluateVersion(head, signed), isCode(c.code));
      // And the whole chain with that version appended is refused (what a client verifying a relay's chain does).
      assert.throws(
        () => verifyChain(chain([...roles.slice(0, c.after_version), signed]), v.roles.account_id),
        isCode(c.code),
      );
    });
  });

  const head = roles[3]!.device_list;
  const indexOfRole = (role: string) => head.devices.findIndex((d) => d.role === role);
  const structure: [string, () => DeviceList][] = [
    [
      "format 2 with kem keys",
      () => ({ ...head, format: FORMAT_2, devices: head.devices.map((d) => ({ ...d, role: "device", scopes: [] })) }),
    ],
    [
      "format 2 with roles",
      () => ({ ...head, format: FORMAT_2, devices: head.devices.map((d) => ({ ...d, kem_key: new Uint8Array(0) })) }),
    ],
    ["a short kem_key", () => withDevice(head, indexOfRole("integration"), { kem_key: new Uint8Array(1183) })],
    [
      "an invalid kem_key",
      () => withDevice(head, indexOfRole("integration"), { kem_key: new Uint8Array(1184).fill(0xff) }),
    ],
    [
      "a shared kem_key",
      () => withDevice(head, indexOfRole("integration"), { kem_key: head.devices[indexOfRole("device")]!.kem_key }),
    ],
    ["unsorted scopes", () => withDevice(head, indexOfRole("integration"), { scopes: ["send", "receive"] })],
    ["a repeated scope", () => withDevice(head, indexOfRole("integration"), { scopes: ["send", "send"] })],
    ["an integration without scopes", () => withDevice(head, indexOfRole("integration"), { scopes: [] })],
    ["a device with scopes", () => withDevice(head, indexOfRole("device"), { scopes: ["send"] })],
    ["an archiver with scopes", () => withDevice(head, indexOfRole("archiver"), { scopes: ["receive"] })],
    [
      "a threshold counting integrations",
      () => ({ ...head, policy: { threshold: 3, require_webauthn: false, require_user_verification: false } }),
    ],
  ];
  for (const [name, build] of structure) {
    it(`structure: ${name} is invalid_device_list`, () => {
      assert.throws(() => checkStructure(build()), isCode("invalid_device_list"));
    });
  }
  it("structure: the unchanged head is valid", () => checkStructure(head));

  // A device the roles chain does not have (seed 66), and the next version adding an entry to the head.
  const NEW_SEED = new Uint8Array(32).fill(66);
  const newEntry = (): DeviceEntry =>
    genesisV3(NEW_SEED, new Uint8Array(32).fill(9), mlkemPublic(new Uint8Array(64).fill(66)), head.created_at_ms + 1)
      .device_list.devices[0]!;
  const adding = (entry: DeviceEntry): DeviceList => ({
    ...head,
    version: head.version + 1,
    prev_hash: listHash(head),
    created_at_ms: head.created_at_ms + 1,
    devices: [...head.devices, entry].sort((a, b) => (a.device_id < b.device_id ? -1 : 1)),
  });

  it("a relay's version adding its own device, approved only by the integration, fails the whole chain", () => {
    const s = seeds(v.roles);
    const integrationSeed = s.find((x) =>
      head.devices.find((d) => d.role === "integration" && toHex(d.sign_key) === toHex(publicKeyOf(x))),
    )!;
    const forged = signedBy(adding(newEntry()), [integrationSeed, NEW_SEED]);
    assert.throws(
      () => verifyChain(chain([...roles, forged]), v.roles.account_id),
      (e: unknown) => isCode("policy_not_met")(e) && String(e).includes("role integration"),
    );
  });
  it("a kept entry cannot change its role, scopes or kem_key", () => {
    const s = seeds(v.roles);
    const i = indexOfRole("integration");
    const base = {
      ...head,
      version: head.version + 1,
      prev_hash: listHash(head),
      created_at_ms: head.created_at_ms + 1,
    };
    for (const change of [
      { role: "device" as const, scopes: [] },
      { scopes: ["receive" as const] },
      { kem_key: mlkemPublic(new Uint8Array(64).fill(7)) },
    ]) {
      assert.throws(
        () => evaluateVersion(head, signedBy(withDevice(base, i, change), [s[0]!])),
        isCode("invalid_device_list"),
      );
    }
  });
  it("a device alone cannot name a new recovery backup key (account-log.md §5.7)", () => {
    const next = {
      ...head,
      version: head.version + 1,
      prev_hash: listHash(head),
      created_at_ms: head.created_at_ms + 1,
      recovery_backup_key_hash: new Uint8Array(32).fill(7),
    };
    assert.throws(
      () => evaluateVersion(head, signedBy(next, [seeds(v.roles)[0]!])),
      (e: unknown) => isCode("policy_not_met")(e) && String(e).includes("recovery backup key"),
    );
  });
  it("an added device needs a kem_key in format 3", () => {
    const next = adding({ ...newEntry(), kem_key: new Uint8Array(0) });
    assert.throws(
      () => evaluateVersion(head, signedBy(next, [seeds(v.roles)[0]!, NEW_SEED])),
      isCode("invalid_device_list"),
    );
  });
  it("a format-3 genesis of an integration, or without a kem_key, is refused", () => {
    const g = roles[0]!;
    const s0 = seeds(v.roles)[0]!;
    for (const change of [
      { role: "integration" as const, scopes: ["send" as const] },
      { kem_key: new Uint8Array(0) },
    ]) {
      const dl = withDevice(g.device_list, 0, change);
      assert.throws(() => verifyGenesis(signedBy(dl, [s0])), isCode("invalid_device_list"));
    }
  });
  it("the decoder refuses unknown roles and scopes and long kem keys (invalid_field)", () => {
    for (const [field, value] of [
      ["role", "admin"],
      ["scopes", ["everything"]],
      ["kem_key", new Uint8Array(1185)],
    ] as const) {
      const bad = {
        ...roles[3]!,
        device_list: withDevice(roles[3]!.device_list, 0, { [field]: value } as Partial<DeviceEntry>),
      };
      assert.throws(() => decode(SignedDeviceListDef, encode(SignedDeviceListDef, bad)), isCode("invalid_field"));
    }
  });
  it("mlkemCheckPublic accepts the seeds' keys and refuses an out-of-range coefficient", () => {
    const key = mlkemPublic(fromHex(v.roles.inputs.kem_seeds[0]));
    mlkemCheckPublic(key);
    const broken = key.slice();
    broken[0] = 0xff;
    broken[1] = broken[1]! | 0x0f;
    assert.throws(() => mlkemCheckPublic(broken), isCode("prekey_invalid"));
  });
});

describe("the 2 → 3 upgrade chain", () => {
  const versions = versionsOf(v.upgrade);
  it("verifies; device 1 upgrades with its own key, device 2 sets its own later", () => {
    assert.deepEqual(
      versions.map((s) => s.device_list.format),
      [FORMAT_2, FORMAT_2, FORMAT_3, FORMAT_3],
    );
    const first = toHex(publicKeyOf(seeds(v.upgrade)[0]!));
    for (const d of versions[2]!.device_list.devices) assert.equal(d.kem_key.length > 0, toHex(d.sign_key) === first);
    const result = verifyChain({ account_id: v.upgrade.account_id, versions }, v.upgrade.account_id);
    assert.ok(result.devices.every((d) => d.kem_key.length));
  });
  it("device 2's key set by device 1 only is policy_not_met; 3 → 2 is refused", () => {
    const s = seeds(v.upgrade);
    const v3 = versions[2]!.device_list;
    const v4 = versions[3]!;
    assert.throws(() => evaluateVersion(v3, signedBy(v4.device_list, [s[0]!])), isCode("policy_not_met"));
    const back: DeviceList = {
      ...v4.device_list,
      format: FORMAT_2,
      devices: v3.devices.map((d) => ({ ...d, kem_key: new Uint8Array(0) })),
    };
    assert.throws(() => evaluateVersion(v3, signedBy(back, [s[0]!])), isCode("invalid_device_list"));
  });
});

describe("link-offer/2 MAC", () => {
  it("matches the vector, computed from crypto.md §3.6 and §5.1", () => {
    const c = v.enrolment_offer;
    const secret = fromHex(c.secret);
    const kOffer = hkdf(new Uint8Array(32), secret, layout("link-offer", c.relay), 32);
    const lookup = hkdf(new Uint8Array(32), secret, layout("link-lookup", c.relay), 10);
    const raw = layout(
      "link-offer/2",
      c.relay,
      lookup,
      fromHex(c.sign_key),
      fromHex(c.box_key),
      fromHex(c.kem_key),
      c.created_at_ms,
    );
    assert.equal(toHex(raw), c.layout);
    assert.equal(toHex(hmac(sha256, kOffer, raw)), c.offer_mac);
    const args = [secret, c.relay, fromHex(c.sign_key), fromHex(c.box_key), c.created_at_ms] as const;
    assert.equal(toHex(enrolment.offerMac(...args, fromHex(c.kem_key))), c.offer_mac);
    // Stripping or swapping the kem_key changes the MAC (the approver then refuses the offer).
    assert.notEqual(toHex(enrolment.offerMac(...args)), c.offer_mac);
    assert.notEqual(toHex(enrolment.offerMac(...args, mlkemPublic(new Uint8Array(64).fill(1)))), c.offer_mac);
  });
});
