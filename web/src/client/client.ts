/**
 * A Tetherless device in TypeScript over the relay API (the first vertical slice of issue 16): create a
 * format-3 account, log in (challenge → token), publish prekeys, send to an account or device address over
 * hybrid sessions with sealed sender v2 (docs/crypto.md §7–§9), fetch and open the inbox, acknowledge
 * after the local commit. DOM-free (Node runs it); the relay is the adversary: every chain is verified from
 * the genesis against the stored high-water mark, every prekey bundle against the verified list, every
 * answer decoded against its schema.
 *
 * Randomness and the clock are injected ({@link ClientDeps}); the protocol code under it stays pure.
 * Linking and approval: linking.ts; the account log (history, grants) and this device's revocation:
 * logsync.ts; security keys: webauthn.ts. Not yet: streams (the inbox is polled), federation (remote relays).
 */
import { equal } from "../protocol/bytes.js";
import { genesisV3, listHash, verifyChain } from "../protocol/deviceList.js";
import { InvalidPayloadError, TetherlessError } from "../protocol/errors.js";
import { mlkemPublic, encapsulate, type PeerPrekeys } from "../protocol/handshake.js";
import { canonicalAddress, formatAddress, parseAddress } from "../protocol/ids.js";
import {
  FRAME_CONTENT_TYPE,
  type LogPlaintext,
  envelopeKey,
  frameMessage,
  messageRecordId,
  unframeMessage,
} from "../protocol/log.js";
import type { DeviceEntry, InboxEnvelope, PrekeyKind, SealedV2, SignedPrekey } from "../protocol/messages.js";
import { signPrekey, verifyBundle } from "../protocol/prekeys.js";
import * as session from "../protocol/session.js";
import { signChallenge } from "../protocol/auth.js";
import { x25519Public } from "../protocol/x25519.js";
import { RelayError } from "./errors.js";
import { ackPoint, receivedFromInbox, setAcked } from "./holdback.js";
import type { RelayApi } from "./http.js";
import type { ClientStore, DeviceIdentity, LogPendingEntry, OutboxEntry } from "./store.js";

/** `n` fresh random bytes. */
export type Random = (n: number) => Uint8Array;

export interface ClientDeps {
  readonly random: Random;
  /** Milliseconds since the Unix epoch. */
  readonly now: () => number;
}

/** The platform's CSPRNG and clock (WebCrypto's `getRandomValues`: browsers and Node ≥ 20). */
export const platformDeps: ClientDeps = {
  random: (n) => globalThis.crypto.getRandomValues(new Uint8Array(n)),
  now: () => Date.now(),
};

/** How many one-time prekeys of each kind a device keeps published. */
export const ONE_TIME_PREKEYS = 10;
/** Skipped message keys are kept this long: the relay's longest envelope TTL (7 days) plus a day. */
export const SKIPPED_KEY_TTL_MS = 8 * 86_400_000;

/** One message taken from the inbox and opened. */
export interface ReceivedMessage {
  readonly envelopeId: Uint8Array;
  readonly cursor: number;
  readonly sender: string;
  readonly senderSignKey: Uint8Array;
  readonly sentAtMs: number;
  /** When the relay accepted the envelope (its `sent_at_ms`): the `relay_sent_at_ms` of the log record. */
  readonly relaySentAtMs: number;
  readonly messageId: Uint8Array;
  /** The per-pair sequence number of a framed message, 0 when the sender did not frame it. */
  readonly pairSeq: number;
  readonly contentType: string;
  readonly body: Uint8Array;
}

/** An envelope this device refused to open (acknowledged with its page: one bad message never blocks others). */
export interface RefusedMessage {
  readonly envelopeId: Uint8Array;
  readonly cursor: number;
  readonly code: string;
  readonly detail: string;
}

export interface InboxResult {
  readonly received: ReceivedMessage[];
  readonly refused: RefusedMessage[];
}

/** What {@link TetherlessClient.send} did per recipient device. */
export interface SentEnvelope {
  readonly recipient: string;
  readonly envelopeId: Uint8Array;
  readonly duplicate: boolean;
}

const PREKEY_PUBLIC: Readonly<Record<PrekeyKind, (priv: Uint8Array) => Uint8Array>> = {
  "x25519-signed": x25519Public,
  "x25519-one-time": x25519Public,
  "mlkem768-last-resort": mlkemPublic,
  "mlkem768-one-time": mlkemPublic,
};
const PRIVATE_BYTES: Readonly<Record<PrekeyKind, number>> = {
  "x25519-signed": 32,
  "x25519-one-time": 32,
  "mlkem768-last-resort": 64,
  "mlkem768-one-time": 64,
};

function refused(code: "bad_signature" | "malformed_body", detail: string): InvalidPayloadError {
  return new InvalidPayloadError(code, detail);
}

export class TetherlessClient {
  readonly api: RelayApi;
  readonly store: ClientStore;
  private readonly deps: ClientDeps;

  constructor(api: RelayApi, store: ClientStore, deps: ClientDeps = platformDeps) {
    this.api = api;
    this.store = store;
    this.deps = deps;
  }

  /** This device; throws when the store has none (call {@link createAccount} first). */
  get identity(): DeviceIdentity {
    const identity = this.store.identity();
    if (!identity) throw new Error("this store has no device yet: create an account first");
    return identity;
  }

  /**
   * Create a new account whose genesis device is this one (format 3: role `device`, an ML-KEM-768
   * `kem_key`; crypto.md §3.6), on the relay behind `api`. The keys are stored before the request, so a
   * lost answer is recovered by calling again (the relay then answers `account_exists`, taken as success
   * once the relay serves our own genesis, verified against the stored mark). Idempotent. Throws {@link RelayError}, `TransportError`, or
   * `TetherlessError` when the relay's answer names another account or device.
   */
  async createAccount(): Promise<DeviceIdentity> {
    let identity = this.store.identity();
    if (!identity) {
      const known = await this.api.wellKnown();
      const signSeed = this.deps.random(32);
      const boxPrivate = this.deps.random(32);
      const kemSeed = this.deps.random(64);
      const genesis = genesisV3(signSeed, x25519Public(boxPrivate), mlkemPublic(kemSeed), this.deps.now());
      const device = genesis.device_list.devices[0]!;
      identity = {
        signSeed,
        boxPrivate,
        kemSeed,
        accountId: genesis.device_list.account_id,
        deviceId: device.device_id,
        address: formatAddress({
          account: genesis.device_list.account_id,
          device: device.device_id,
          relay: known.relay.toLowerCase(),
        }),
        relayName: known.relay.toLowerCase(),
        genesis,
      };
      const fixed = identity;
      this.store.transaction(() => {
        this.store.setIdentity(fixed);
        this.store.setMark(fixed.accountId, [1, listHash(genesis.device_list)]);
      });
    }
    // The keys are on disk before the relay knows the account: an account whose keys were lost is unusable.
    await this.store.durable();
    try {
      const created = await this.api.createAccount(identity.genesis);
      if (created.account_id !== identity.accountId || created.device_id !== identity.deviceId) {
        throw new TetherlessError("invalid_device_list", "the relay created another account than the one we signed");
      }
    } catch (error) {
      if (!(error instanceof RelayError && error.code === "account_exists")) throw error;
      // A retry after a lost answer: the relay must serve our own genesis (verifyChain against the mark).
      await this.verifiedDevices(identity.accountId);
    }
    return identity;
  }

  /**
   * Log in: `POST /v1/auth/challenge`, check the challenge is this relay's and this device's (a relay
   * must not get a signature it could replay elsewhere), sign it, exchange it for a bearer token.
   * Throws {@link RelayError} (`unknown_device`, `device_revoked`, `challenge_*`, `bad_signature`) and
   * `TetherlessError` `bad_signature` for a challenge bound to another relay or device.
   */
  async login(): Promise<void> {
    const me = this.identity;
    const challenge = await this.api.challenge(me.deviceId);
    if (challenge.relay.toLowerCase() !== me.relayName || challenge.device_id !== me.deviceId) {
      throw new TetherlessError(
        "bad_signature",
        `the relay sent a challenge for ${challenge.device_id}@${challenge.relay}, not this device on ${me.relayName}`,
      );
    }
    const signature = signChallenge(me.signSeed, challenge);
    const auth = await this.api.authSession({ device_id: me.deviceId, nonce: challenge.nonce, signature });
    if (auth.device_id !== me.deviceId || auth.account_id !== me.accountId) {
      throw new TetherlessError("bad_signature", "the relay issued a token for another device");
    }
    this.api.token = auth.token;
  }

  /**
   * Publish a new signed prekey, a new last-resort ML-KEM key and {@link ONE_TIME_PREKEYS} one-time keys
   * of each kind. The privates are stored first (a key on the relay always has its private here). Throws
   * {@link RelayError} (`prekey_invalid`, `invalid_field`). Not idempotent (new ids each call).
   */
  async publishPrekeys(): Promise<void> {
    const me = this.identity;
    const now = this.deps.now();
    const make = (kind: PrekeyKind): SignedPrekey => {
      const keyId = this.store.nextPrekeyId(kind);
      const privateKey = this.deps.random(PRIVATE_BYTES[kind]);
      this.store.putPrekeyPrivate(kind, keyId, privateKey);
      return signPrekey(me.signSeed, me.deviceId, kind, keyId, PREKEY_PUBLIC[kind](privateKey), now);
    };
    const upload = this.store.transaction(() => ({
      signed_prekey: make("x25519-signed"),
      last_resort: make("mlkem768-last-resort"),
      one_time: [
        ...Array.from({ length: ONE_TIME_PREKEYS }, () => make("x25519-one-time")),
        ...Array.from({ length: ONE_TIME_PREKEYS }, () => make("mlkem768-one-time")),
      ],
    }));
    await this.store.durable();
    const counts = await this.api.putPrekeys(upload);
    if (
      counts.signed_prekey_id !== upload.signed_prekey.key_id ||
      counts.last_resort_id !== upload.last_resort.key_id
    ) {
      throw new TetherlessError("prekey_invalid", "the relay did not store the prekeys it was sent");
    }
  }

  /**
   * The devices of `accountId` from its chain, verified from the genesis (format 1–3) against this
   * client's high-water mark, which then moves up. Throws `TetherlessError` (`invalid_device_list`,
   * `bad_signature`, `policy_not_met`, …; `DeviceListForkError`, `DeviceListRollbackError`) when the relay
   * serves a chain that does not verify, and {@link RelayError} `unknown_account`.
   */
  async verifiedDevices(accountId: string): Promise<{ version: number; devices: DeviceEntry[] }> {
    const chain = await this.api.deviceChain(accountId);
    const mark = this.store.mark(accountId) ?? undefined;
    const verified = verifyChain(chain, accountId, mark);
    this.store.transaction(() => this.store.setMark(accountId, verified.mark));
    return { version: verified.head.version, devices: verified.devices };
  }

  /**
   * Send `body` to `to`: a device address (that device) or an account address (every device of that
   * account except this one). Sessions are started from claimed bundles verified against the recipient's
   * verified list; the envelopes and each advanced session state are committed to the store's outbox before
   * they are posted (crypto.md §8.5). Only this relay's accounts (no federation yet). Throws
   * {@link RelayError} (`unknown_recipient`, `recipient_revoked`, …), `TransportError`, `TetherlessError`
   * (a chain or bundle that does not verify: `prekey_invalid`, `invalid_device_list`, …). After a failed
   * post the message stays queued: {@link flushOutbox} retries it (do not call `send` again for it).
   */
  async send(to: string, contentType: string, body: Uint8Array, ttlSeconds?: number): Promise<SentEnvelope[]> {
    const sealed = await this.seal(to, contentType, body, {
      messageId: this.deps.random(16),
      sentAtMs: this.deps.now(),
      ttlSeconds,
    });
    return sealed ? this.post(sealed) : [];
  }

  /**
   * The first half of {@link send}: resolve `to` (verified chains, sessions), seal the message and commit
   * its envelopes to the outbox and it to the history, durably — without posting it ({@link flushOutbox}
   * does). For a message queued earlier (outbox.ts), so its id and time are given. Idempotent per
   * `messageId`: a message already in the history is not sealed again (null); so a crash between this commit
   * and the caller's own bookkeeping never sends a message twice. Throws as {@link send}.
   */
  async seal(
    to: string,
    contentType: string,
    body: Uint8Array,
    message: { readonly messageId: Uint8Array; readonly sentAtMs: number; readonly ttlSeconds?: number | undefined },
  ): Promise<OutboxEntry | null> {
    const { messageId, sentAtMs, ttlSeconds } = message;
    const sealedBefore = (m: { direction: string; messageId: Uint8Array }) =>
      m.direction === "out" && equal(m.messageId, messageId);
    if (this.store.messages().some(sealedBefore)) return null;
    const me = this.identity;
    const target = parseAddress(to);
    if (target.relay !== me.relayName) {
      throw new TetherlessError("invalid_field", `${to} is on another relay; federation is not in this client yet`);
    }
    const own = await this.verifiedDevices(me.accountId);
    const list = target.account === me.accountId ? own : await this.verifiedDevices(target.account);
    const targets = list.devices.filter((d) =>
      target.device ? d.device_id === target.device : d.device_id !== me.deviceId,
    );
    if (!targets.length) {
      throw new TetherlessError(
        "invalid_field",
        target.device ? "that device is not in its account's verified list" : "that account has no other device",
      );
    }
    const addressOf = (d: DeviceEntry) =>
      formatAddress({ account: target.account, relay: target.relay, device: d.device_id });
    await this.ensureSessions(targets.map((d) => [addressOf(d), d] as const));
    const entry = this.store.transaction(() => {
      if (this.store.messages().some(sealedBefore)) return null; // sealed by a concurrent call meanwhile
      // One number per message and recipient account (account-log.md §9), taken when it is sealed: a message
      // that fails before (an unknown recipient, a list that does not verify) leaves no gap.
      const pairSeq = this.store.takePairSeq(`${target.account}@${target.relay}`);
      const envelopes = targets.map((d) => {
        const address = addressOf(d);
        const state = this.store.currentSession(address);
        if (!state) throw new Error(`no session with ${address}`);
        const framed = frameMessage(pairSeq, contentType, body);
        const [next, ciphertext] = session.seal(state, {
          senderListVersion: own.version,
          recipientBoxKey: state.peer_identity_key,
          sentAtMs,
          messageId,
          contentType: FRAME_CONTENT_TYPE,
          body: framed,
          entropy: this.deps.random(session.ENTROPY_BYTES),
        });
        this.store.putSession(next);
        return {
          recipient: address,
          idempotency_key: envelopeKey(messageId, address),
          ciphertext,
          ttl_seconds: ttlSeconds ?? null,
        };
      });
      const queued = { messageId, envelopes, pairSeq };
      this.store.putOutbox(queued);
      this.store.keepMessage({ direction: "out", peer: canonicalAddress(to), sentAtMs, messageId, contentType, body });
      return queued;
    });
    // Sealed envelopes advance ratchets: they reach the relay only once the outbox is on disk (crypto.md §8.5).
    await this.store.durable();
    return entry;
  }

  /**
   * Post every message still in the outbox (sealed by an earlier {@link send} whose request failed), oldest
   * first, with the same idempotency keys: the relay answers a repeat with the original receipt. Throws as
   * {@link send}; an entry stays queued until the relay accepts it. Idempotent.
   */
  async flushOutbox(): Promise<SentEnvelope[]> {
    const sent: SentEnvelope[] = [];
    for (const entry of this.store.outbox()) sent.push(...(await this.post(entry)));
    return sent;
  }

  private async post(entry: OutboxEntry): Promise<SentEnvelope[]> {
    const response = await this.api.send([...entry.envelopes]);
    if (response.accepted.length !== entry.envelopes.length) {
      throw new TetherlessError("malformed_body", "the relay accepted another number of envelopes than were sent");
    }
    // The message-sent record is queued in the commit that ends the entry (account-log.md §10 send step 4):
    // appended by LogSync.appendPending, again after a crash, never lost in between.
    this.store.transaction(() => {
      this.store.deleteOutbox(entry.messageId);
      const sent = this.sentRecord(entry, response.accepted);
      if (sent) this.store.putLogPending(sent);
    });
    return entry.envelopes.map((e, i) => ({
      recipient: e.recipient,
      envelopeId: response.accepted[i]!.id,
      duplicate: response.accepted[i]!.duplicate,
    }));
  }

  /** The `message-sent` record of a posted entry (null when its message is not in the history: nothing to log). */
  private sentRecord(
    entry: OutboxEntry,
    accepted: readonly { id: Uint8Array; sent_at_ms: number }[],
  ): LogPendingEntry | null {
    const me = this.identity;
    const message = this.store.messages().find((m) => m.direction === "out" && equal(m.messageId, entry.messageId));
    if (!message) return null;
    return this.pending({
      type: "message-sent",
      message_uid: entry.messageId,
      sender: me.address,
      recipients: entry.envelopes.map((e) => e.recipient),
      pair_seq: entry.pairSeq,
      sent_at_ms: message.sentAtMs,
      content_type: message.contentType,
      body: message.body,
      envelope_ids: accepted.map((a) => a.id),
      relay_sent_at_ms: Math.max(0, ...accepted.map((a) => a.sent_at_ms)),
    });
  }

  /** `body` as a record to append, under its deterministic id (§4.4); `writer_seq` is given when first sealed. */
  private pending(body: LogPlaintext["body"] & { sender: string; message_uid: Uint8Array }): LogPendingEntry {
    const me = this.identity;
    return {
      recordId: messageRecordId(me.accountId, body.sender, body.message_uid),
      plaintext: { writer_device: me.deviceId, writer_seq: 0, created_at_ms: this.deps.now(), body },
    };
  }

  /** Start a session with each `(address, verified entry)` that has none, from one claim. */
  private async ensureSessions(targets: readonly (readonly [string, DeviceEntry])[]): Promise<void> {
    const missing = targets.filter(([address]) => !this.store.currentSession(address));
    if (!missing.length) return;
    const claimed = await this.api.claimPrekeys(missing.map(([address]) => address));
    for (const [address, device] of missing) {
      const bundle = claimed.bundles.find((b) => canonicalAddress(b.address) === address);
      if (!bundle) throw new TetherlessError("prekey_invalid", `the relay has no prekeys for ${address}`);
      verifyBundle(bundle, device);
      const { ciphertext, sharedSecret } = encapsulate(bundle.pq_prekey.public_key, this.deps.random(32));
      const otk = bundle.one_time_prekey;
      const prekeys: PeerPrekeys = {
        signedPrekeyId: bundle.signed_prekey.key_id,
        signedPrekey: bundle.signed_prekey.public_key,
        pqPrekeyId: bundle.pq_prekey.key_id,
        pqLastResort: bundle.pq_prekey.kind === "mlkem768-last-resort",
        pqPrekey: bundle.pq_prekey.public_key,
        oneTimePrekeyId: otk ? otk.key_id : null,
        oneTimePrekey: otk ? otk.public_key : null,
      };
      const state = session.start({
        ownAddress: this.identity.address,
        identityPrivateKey: this.identity.boxPrivate,
        peerAddress: address,
        peerIdentityKey: device.box_key,
        prekeys,
        ephemeralPrivateKey: this.deps.random(32),
        ratchetEntropy: this.deps.random(32),
        kemCiphertext: ciphertext,
        kemSharedSecret: sharedSecret,
        nowMs: this.deps.now(),
      });
      this.store.transaction(() => this.store.putSession(state));
    }
  }

  /**
   * Fetch the inbox from the stored cursor, open every envelope, commit what was opened (sessions,
   * used one-time keys, processed ids, the cursor) locally, and only then acknowledge up to the page's
   * cursor — below the first message held back for a missing predecessor (account-log.md §9: holdback.ts),
   * which the relay keeps until it is released. An envelope that does not open is reported in `refused` and
   * acknowledged with its page (never silently). Redeliveries of processed envelopes are skipped. Throws {@link RelayError} /
   * `TransportError` for the requests; nothing is acknowledged that was not committed first.
   */
  async receive(): Promise<InboxResult> {
    const received: ReceivedMessage[] = [];
    const refusedList: RefusedMessage[] = [];
    for (;;) {
      const after = this.store.inboxCursor();
      const page = await this.api.inbox(after);
      for (const envelope of page.envelopes) {
        if (envelope.cursor <= after) {
          throw new TetherlessError("malformed_body", "the relay served an envelope at or below the requested cursor");
        }
      }
      // Senders' chains are fetched before the local transaction (no network inside it).
      const senders = new Map<string, { version: number; devices: DeviceEntry[] } | TetherlessError>();
      for (const envelope of page.envelopes) {
        const sealed = this.peekSealed(envelope);
        if (!(sealed instanceof TetherlessError)) {
          const account = parseAddress(sealed.sender).account;
          if (!senders.has(account)) {
            try {
              senders.set(account, await this.verifiedDevices(account));
            } catch (error) {
              if (!(error instanceof TetherlessError || error instanceof RelayError)) throw error;
              senders.set(account, new TetherlessError("bad_signature", `sender's device list: ${error.message}`));
            }
          }
        }
      }
      this.store.transaction(() => {
        for (const envelope of page.envelopes) {
          if (this.store.isProcessed(envelope.id)) continue;
          try {
            const message = this.openEnvelope(envelope, senders);
            received.push(message);
            this.store.keepMessage({
              direction: "in",
              peer: message.sender,
              sentAtMs: message.sentAtMs,
              messageId: message.messageId,
              contentType: message.contentType,
              body: message.body,
            });
            // Its message-received record, in the same commit (account-log.md §10 receive step 2), held back
            // while an earlier message of its sender is missing (§9: holdback.ts).
            receivedFromInbox(
              this.store,
              this.pending({
                type: "message-received",
                message_uid: message.messageId,
                sender: message.sender,
                sender_sign_key: message.senderSignKey,
                recipient: this.identity.address,
                pair_seq: message.pairSeq,
                sent_at_ms: message.sentAtMs,
                relay_sent_at_ms: message.relaySentAtMs,
                content_type: message.contentType,
                body: message.body,
                late: false,
              }),
              envelope.cursor,
              this.deps.now(),
            );
          } catch (error) {
            if (!(error instanceof TetherlessError)) throw error;
            refusedList.push({
              envelopeId: envelope.id,
              cursor: envelope.cursor,
              code: error.code,
              detail: error.detail,
            });
          }
          this.store.putProcessed(envelope.id);
        }
        this.store.setInboxCursor(Math.max(after, page.next_cursor));
      });
      // The custody rule: the relay may delete what it hands over only once the local commit is on disk.
      await this.store.durable();
      // Below every held-back message (§9: the relay keeps custody of it until it is logged).
      const ackAt = ackPoint(this.store, this.store.inboxCursor());
      if (ackAt !== null) {
        await this.api.ack({ up_to: ackAt, ids: [] });
        this.store.transaction(() => setAcked(this.store, ackAt));
      }
      if (!page.more) return { received, refused: refusedList };
    }
  }

  private peekSealed(envelope: InboxEnvelope): SealedV2 | TetherlessError {
    try {
      const sealed = session.parseInner(session.openOuter(envelope.ciphertext, this.identity.boxPrivate));
      if (sealed === null) return refused("malformed_body", "a v1 payload: this client reads only sealed sender v2");
      return sealed;
    } catch (error) {
      if (error instanceof TetherlessError) return error;
      throw error;
    }
  }

  /** Open one envelope inside the receive transaction (state changes are kept only when the page commits). */
  private openEnvelope(
    envelope: InboxEnvelope,
    senders: ReadonlyMap<string, { version: number; devices: DeviceEntry[] } | TetherlessError>,
  ): ReceivedMessage {
    const me = this.identity;
    const sealed = this.peekSealed(envelope);
    if (sealed instanceof TetherlessError) throw sealed;
    const senderAddress = canonicalAddress(sealed.sender);
    const from = parseAddress(senderAddress);
    const list = senders.get(from.account);
    if (!list) throw refused("bad_signature", "no device list for the sender");
    if (list instanceof TetherlessError) throw list;
    if (sealed.sender_list_version > list.version) {
      throw refused(
        "bad_signature",
        `the sender names list version ${sealed.sender_list_version}, above the verified ${list.version}`,
      );
    }
    const device = list.devices.find((d) => d.device_id === from.device);
    if (!device) throw refused("bad_signature", "the sender is not a device of its account's verified list");
    const options = { entropy: this.deps.random(32), nowMs: this.deps.now(), skippedTtlMs: SKIPPED_KEY_TTL_MS };
    const existing = this.store.sessionById(sealed.session_id);
    let state: session.SessionState;
    let content: ReturnType<typeof session.decrypt>[1];
    if (existing && existing.peer_address === senderAddress) {
      [state, content] = session.decrypt(existing, sealed, options);
    } else if (sealed.kind === session.KIND_PREKEY) {
      const message = session.prekeyMessage(sealed);
      const spk = this.store.prekeyPrivate("x25519-signed", message.signed_prekey_id);
      const pqKind = message.pq_last_resort ? "mlkem768-last-resort" : "mlkem768-one-time";
      const pq = this.store.prekeyPrivate(pqKind, message.pq_prekey_id);
      const otk =
        message.one_time_prekey_id === null
          ? null
          : this.store.prekeyPrivate("x25519-one-time", message.one_time_prekey_id);
      if (!spk || !pq || (message.one_time_prekey_id !== null && !otk)) {
        throw refused("malformed_body", "the message names a prekey this device does not have (used or unknown)");
      }
      [state, content] = session.acceptPrekey({
        ownAddress: me.address,
        identityPrivateKey: me.boxPrivate,
        sealed,
        senderIdentityKey: device.box_key,
        keys: { signedPrekeyPrivate: spk, pqSeed: pq, oneTimePrekeyPrivate: otk },
        ...options,
      });
      if (this.store.hasTranscript(state.transcript_hash)) throw refused("malformed_body", "a replayed session start");
      this.store.putTranscript(state.transcript_hash);
      if (!message.pq_last_resort) this.store.deletePrekeyPrivate("mlkem768-one-time", message.pq_prekey_id);
      if (message.one_time_prekey_id !== null)
        this.store.deletePrekeyPrivate("x25519-one-time", message.one_time_prekey_id);
    } else {
      throw refused("malformed_body", "no such session (lost state?)");
    }
    this.store.putSession(state);
    let pairSeq = 0;
    let contentType = content.content_type;
    let body = content.body;
    if (contentType === FRAME_CONTENT_TYPE) {
      const frame = unframeMessage(body);
      [pairSeq, contentType, body] = [frame.pair_seq, frame.content_type, frame.body];
    }
    return {
      envelopeId: envelope.id,
      cursor: envelope.cursor,
      sender: senderAddress,
      senderSignKey: device.sign_key,
      sentAtMs: content.sent_at_ms,
      relaySentAtMs: envelope.sent_at_ms,
      messageId: content.message_id,
      pairSeq,
      contentType,
      body,
    };
  }
}
