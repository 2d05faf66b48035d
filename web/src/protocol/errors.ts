/**
 * The error codes of protocol/errors.py that the browser's protocol code raises (the same strings, so a
 * browser error and a Python error name the same failure), and the one error class carrying them.
 */

export type ErrorCode =
  | "malformed_body"
  | "invalid_field"
  | "bad_signature"
  | "invalid_device_list"
  | "policy_not_met"
  | "webauthn_invalid"
  | "webauthn_replayed"
  | "prekey_invalid"
  | "log_epoch_stale"
  | "device_list_conflict"
  | "enrolment_expired"
  | "device_revoked"
  | "blob_corrupt"
  | "blob_key_mismatch";

export class TetherlessError extends Error {
  readonly code: ErrorCode;
  readonly detail: string;

  constructor(code: ErrorCode, detail: string) {
    super(`${code}: ${detail}`);
    this.name = "TetherlessError";
    this.code = code;
    this.detail = detail;
  }
}

/** A ciphertext that must not be trusted (`malformed_body` or `bad_signature`); never carries plaintext. */
export class InvalidPayloadError extends TetherlessError {
  constructor(code: "malformed_body" | "bad_signature", detail: string) {
    super(code, detail);
    this.name = "InvalidPayloadError";
  }
}

/** A device-list chain that forks from (or rolls back below) the version verified before (crypto.md §3.5). */
export class DeviceListForkError extends TetherlessError {
  constructor(detail: string) {
    super("invalid_device_list", detail);
    this.name = "DeviceListForkError";
  }
}

export class DeviceListRollbackError extends TetherlessError {
  constructor(detail: string) {
    super("invalid_device_list", detail);
    this.name = "DeviceListRollbackError";
  }
}
