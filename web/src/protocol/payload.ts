/**
 * Version-1 payloads (protocol/payload.py, docs/protocol.md §4 "sealed message"):
 *
 *     ciphertext = sealed_box(recipient_box_key, pad(msgpack(SealedContent)))
 *
 * `SealedContent` carries the sender's address and Ed25519 key and a signature over
 * `layout("message", sender, sender_sign_key, recipient, sent_at_ms, message_id, content_type, body)`,
 * so only the recipient learns who sent the message (sealed sender) and can check it. Pure.
 */
import { decode, encode } from "./codec.js";
import { InvalidPayloadError, TetherlessError } from "./errors.js";
import { canonicalAddress, deviceIdFor, formatAddress, parseAddress } from "./ids.js";
import { type SealedContent, SealedContentDef } from "./messages.js";
import { pad, unpad as unpadBytes } from "./padding.js";
import { openBox, sealBox } from "./sealedbox.js";
import { layout, publicKeyOf, sign, verify } from "./signing.js";

/** A decrypted and verified v1 message; `sender` is checked against `sender_sign_key`. */
export interface Opened {
  readonly sender: string;
  readonly sender_sign_key: Uint8Array;
  readonly recipient: string;
  readonly sent_at_ms: number;
  readonly message_id: Uint8Array;
  readonly content_type: string;
  readonly body: Uint8Array;
}

export function contentLayout(c: Omit<SealedContent, "signature">): Uint8Array {
  return layout(
    "message",
    c.sender,
    c.sender_sign_key,
    c.recipient,
    c.sent_at_ms,
    c.message_id,
    c.content_type,
    c.body,
  );
}

export interface SealInput {
  /** The sender's Ed25519 seed. */
  readonly signingSeed: Uint8Array;
  readonly sender: string;
  readonly recipient: string;
  readonly recipientBoxKey: Uint8Array;
  readonly sentAtMs: number;
  readonly messageId: Uint8Array;
  readonly contentType: string;
  readonly body: Uint8Array;
  /** 32 fresh random bytes, for this one message only. */
  readonly ephemeralPrivateKey: Uint8Array;
}

/**
 * Sign, pad and encrypt one message. Throws `RangeError` when `sender` is not a device address of the
 * signing key or a key has the wrong length, `invalid_field` for an address that does not parse,
 * `prekey_invalid` for a low-order recipient key. Pure and deterministic.
 */
export function seal(input: SealInput): Uint8Array {
  const senderSignKey = publicKeyOf(input.signingSeed);
  if (parseAddress(input.sender).device !== deviceIdFor(senderSignKey)) {
    throw new RangeError("sender address does not belong to this signing key");
  }
  parseAddress(input.recipient);
  const unsigned = {
    sender: input.sender,
    sender_sign_key: senderSignKey,
    recipient: input.recipient,
    sent_at_ms: input.sentAtMs,
    message_id: input.messageId,
    content_type: input.contentType,
    body: input.body,
  };
  const content: SealedContent = { ...unsigned, signature: sign(input.signingSeed, contentLayout(unsigned)) };
  return sealBox(pad(encode(SealedContentDef, content)), input.recipientBoxKey, input.ephemeralPrivateKey);
}

/** {@link unpadBytes} raising `InvalidPayloadError` `malformed_body`. */
export function unpad(padded: Uint8Array): Uint8Array {
  try {
    return unpadBytes(padded);
  } catch (error) {
    if (error instanceof TetherlessError)
      throw new InvalidPayloadError("malformed_body", `sealed content: ${error.detail}`);
    throw error;
  }
}

/**
 * Decrypt, unpad, decode and verify a v1 ciphertext: the box opens; padding and MessagePack are well
 * formed; the sender's address names the device id of its key; the signature verifies; the recipient is
 * `ownAddress`. Throws `InvalidPayloadError` (`malformed_body` or `bad_signature`). Does not check that
 * the sender's device belongs to its account (that needs the account's verified device list).
 */
export function open(ciphertext: Uint8Array, boxPrivateKey: Uint8Array, ownAddress: string): Opened {
  return openPlaintext(unpad(openBox(ciphertext, boxPrivateKey)), ownAddress);
}

/** The checks of {@link open} on an already decrypted and unpadded v1 plaintext (the v2 dispatch uses it). */
export function openPlaintext(plaintext: Uint8Array, ownAddress: string): Opened {
  let content: SealedContent;
  try {
    content = decode(SealedContentDef, plaintext);
  } catch (error) {
    if (error instanceof TetherlessError)
      throw new InvalidPayloadError("malformed_body", `sealed content: ${error.detail}`);
    throw error;
  }
  let sender: ReturnType<typeof parseAddress>;
  let recipient: string;
  try {
    sender = parseAddress(content.sender);
    recipient = canonicalAddress(content.recipient);
  } catch {
    throw new InvalidPayloadError("malformed_body", "sealed content has a bad address");
  }
  if (!sender.device || sender.device !== deviceIdFor(content.sender_sign_key)) {
    throw new InvalidPayloadError("bad_signature", "sender address does not match the sender's key");
  }
  try {
    verify(content.sender_sign_key, contentLayout(content), content.signature);
  } catch {
    throw new InvalidPayloadError("bad_signature", "message signature does not verify");
  }
  if (recipient !== canonicalAddress(ownAddress)) {
    throw new InvalidPayloadError("bad_signature", "message was signed for another recipient");
  }
  return {
    sender: formatAddress(sender),
    sender_sign_key: content.sender_sign_key,
    recipient: content.recipient,
    sent_at_ms: content.sent_at_ms,
    message_id: content.message_id,
    content_type: content.content_type,
    body: content.body,
  };
}
