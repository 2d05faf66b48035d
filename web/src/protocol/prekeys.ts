/**
 * Signed prekeys (protocol/prekeys.py, docs/crypto.md §7.1): every public prekey is signed by its
 * device, `Sig(sign_key, layout("prekey", device_id, kind, key_id, public_key, created_at_ms))`, and a
 * sender checks a claimed bundle against the *verified* device-list entry, so a relay can neither
 * substitute a key nor pass one kind off as another. Every failure is `prekey_invalid`. Pure.
 */
import { equal } from "./bytes.js";
import { TetherlessError } from "./errors.js";
import { MLKEM_PUBLIC_KEY_BYTES, mlkemCheckPublic } from "./handshake.js";
import type { DeviceEntry, PrekeyBundle, PrekeyKind, SignedPrekey } from "./messages.js";
import { layout, sign, verify } from "./signing.js";
import { X25519_KEY_BYTES } from "./x25519.js";

export const KEY_BYTES: Readonly<Record<PrekeyKind, number>> = {
  "x25519-signed": X25519_KEY_BYTES,
  "x25519-one-time": X25519_KEY_BYTES,
  "mlkem768-last-resort": MLKEM_PUBLIC_KEY_BYTES,
  "mlkem768-one-time": MLKEM_PUBLIC_KEY_BYTES,
};

const invalid = (detail: string) => new TetherlessError("prekey_invalid", detail);

export function prekeyLayout(
  deviceId: string,
  kind: string,
  keyId: number,
  publicKey: Uint8Array,
  createdAtMs: number,
): Uint8Array {
  return layout("prekey", deviceId, kind, keyId, publicKey, createdAtMs);
}

/** Sign one public prekey of `deviceId` (the id of the key of `seed`). */
export function signPrekey(
  seed: Uint8Array,
  deviceId: string,
  kind: PrekeyKind,
  keyId: number,
  publicKey: Uint8Array,
  createdAtMs: number,
): SignedPrekey {
  return {
    kind,
    key_id: keyId,
    public_key: publicKey,
    created_at_ms: createdAtMs,
    signature: sign(seed, prekeyLayout(deviceId, kind, keyId, publicKey, createdAtMs)),
  };
}

/**
 * Check one prekey of `deviceId` whose Ed25519 key is `signKey`: the expected kind (when given), the key
 * length of its kind, an ML-KEM-768 key that passes FIPS 203's encapsulation-key check, the signature.
 * Throws `prekey_invalid`. Pure; idempotent.
 */
export function verifyPrekey(signKey: Uint8Array, deviceId: string, prekey: SignedPrekey, kind?: PrekeyKind): void {
  if (kind !== undefined && prekey.kind !== kind) throw invalid(`expected a ${kind} prekey, got ${prekey.kind}`);
  const expected = KEY_BYTES[prekey.kind];
  if (expected === undefined) throw invalid(`unknown prekey kind ${JSON.stringify(prekey.kind)}`);
  if (prekey.public_key.length !== expected) {
    throw invalid(`a ${prekey.kind} public key is ${expected} bytes, not ${prekey.public_key.length}`);
  }
  if (expected === MLKEM_PUBLIC_KEY_BYTES) {
    mlkemCheckPublic(prekey.public_key); // FIPS 203 §7.2 modulus check
  }
  try {
    verify(
      signKey,
      prekeyLayout(deviceId, prekey.kind, prekey.key_id, prekey.public_key, prekey.created_at_ms),
      prekey.signature,
    );
  } catch {
    throw invalid(`${prekey.kind} prekey ${prekey.key_id}: signature does not verify`);
  }
}

/**
 * Check a claimed bundle against `device`, an entry of the target's *verified* device list: the address
 * names the device, `identity_key` is its `box_key`, each prekey has the right kind and is signed by the
 * device. Throws `prekey_invalid`. Pure; idempotent.
 */
export function verifyBundle(bundle: PrekeyBundle, device: DeviceEntry): void {
  if (bundle.address.split(".", 1)[0] !== device.device_id) throw invalid("the bundle is for another device");
  if (!equal(bundle.identity_key, device.box_key)) throw invalid("identity_key is not the device's box_key");
  verifyPrekey(device.sign_key, device.device_id, bundle.signed_prekey, "x25519-signed");
  if (bundle.pq_prekey.kind !== "mlkem768-one-time" && bundle.pq_prekey.kind !== "mlkem768-last-resort") {
    throw invalid(`pq_prekey has kind ${bundle.pq_prekey.kind}`);
  }
  verifyPrekey(device.sign_key, device.device_id, bundle.pq_prekey);
  if (bundle.one_time_prekey !== null)
    verifyPrekey(device.sign_key, device.device_id, bundle.one_time_prekey, "x25519-one-time");
}
