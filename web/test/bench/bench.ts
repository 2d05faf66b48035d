// The browser half of bench/browser.py: two in-page parties on one v2 session (the TypeScript session code
// the web client uses), timed with performance.now(). The same steps as the Python half (bench/crypto.py's
// helpers): one round trip first, so every timed message is a ratchet message of one chain (no DH step),
// a 200-byte body, fresh entropy from the platform's CSPRNG inside the timed loop on both sides.
import * as handshake from "../../src/protocol/handshake.js";
import { accountIdFor, deviceIdFor } from "../../src/protocol/ids.js";
import * as session from "../../src/protocol/session.js";
import { publicKeyOf } from "../../src/protocol/signing.js";
import { x25519Public } from "../../src/protocol/x25519.js";

const BODY = new Uint8Array(200).fill(0x78);
const RELAY = "relay.bench";
const TTL_MS = 10 ** 12;
const CONTENT_TYPE = "text/plain; charset=utf-8";

const rand = (n = 32) => crypto.getRandomValues(new Uint8Array(n));

class Device {
  readonly identity = rand();
  readonly identityKey = x25519Public(this.identity);
  readonly spk = rand();
  readonly opk = rand();
  readonly pqSeed = rand(handshake.MLKEM_SEED_BYTES);
  readonly address: string;
  constructor() {
    const signKey = publicKeyOf(rand());
    this.address = `${deviceIdFor(signKey)}.${accountIdFor(signKey)}@${RELAY}`;
  }
  prekeys(): handshake.PeerPrekeys {
    return {
      signedPrekeyId: 1,
      signedPrekey: x25519Public(this.spk),
      pqPrekeyId: 1,
      pqLastResort: false,
      pqPrekey: handshake.mlkemPublic(this.pqSeed),
      oneTimePrekeyId: 1,
      oneTimePrekey: x25519Public(this.opk),
    };
  }
}

function seal(state: session.SessionState, to: Device): [session.SessionState, Uint8Array] {
  return session.seal(state, {
    senderListVersion: 1,
    recipientBoxKey: to.identityKey,
    sentAtMs: 0,
    messageId: rand(16),
    contentType: CONTENT_TYPE,
    body: BODY,
    entropy: rand(session.ENTROPY_BYTES),
  });
}

function inner(ciphertext: Uint8Array, to: Device) {
  const sealed = session.parseInner(session.openOuter(ciphertext, to.identity));
  if (sealed === null) throw new Error("a v1 payload where a v2 one was sealed");
  return sealed;
}

const openOptions = () => ({ entropy: rand(), nowMs: 0, skippedTtlMs: TTL_MS });

/** A session after one round trip, so that both sides send ratchet (not prekey) messages. */
function established(a: Device, b: Device): [session.SessionState, session.SessionState] {
  const prekeys = b.prekeys();
  const kem = handshake.encapsulate(prekeys.pqPrekey, rand(handshake.MLKEM_ENCAPSULATION_RANDOM_BYTES));
  let stateA = session.start({
    ownAddress: a.address,
    identityPrivateKey: a.identity,
    peerAddress: b.address,
    peerIdentityKey: b.identityKey,
    prekeys,
    ephemeralPrivateKey: rand(),
    ratchetEntropy: rand(),
    kemCiphertext: kem.ciphertext,
    kemSharedSecret: kem.sharedSecret,
    nowMs: 0,
  });
  let first: Uint8Array;
  [stateA, first] = seal(stateA, b);
  let [stateB] = session.acceptPrekey({
    ownAddress: b.address,
    identityPrivateKey: b.identity,
    sealed: inner(first, b),
    senderIdentityKey: a.identityKey,
    keys: { signedPrekeyPrivate: b.spk, pqSeed: b.pqSeed, oneTimePrekeyPrivate: b.opk },
    ...openOptions(),
  });
  let reply: Uint8Array;
  [stateB, reply] = seal(stateB, a);
  [stateA] = session.decrypt(stateA, inner(reply, a), openOptions());
  return [stateA, stateB];
}

/** What one run answers to Python: seconds to seal `messages` messages, then to open them in order. */
export interface BenchRun {
  messages: number;
  seal_seconds: number;
  open_seconds: number;
}

/** Seal `messages` messages from Alice to Bob, then open them all on Bob's side (a fresh session per run). */
export function run(messages: number): BenchRun {
  const alice = new Device();
  const bob = new Device();
  let [stateA, stateB] = established(alice, bob);
  const ciphertexts: Uint8Array[] = [];
  const start = performance.now();
  for (let i = 0; i < messages; i++) {
    let ciphertext: Uint8Array;
    [stateA, ciphertext] = seal(stateA, bob);
    ciphertexts.push(ciphertext);
  }
  const sealed = performance.now();
  let body: Uint8Array | null = null;
  for (const ciphertext of ciphertexts) {
    let content;
    [stateB, content] = session.decrypt(stateB, inner(ciphertext, bob), openOptions());
    body = content.body;
  }
  const opened = performance.now();
  // Outside the timed part: the last message came back whole (a bench of a broken path measures nothing).
  if (body === null || body.length !== BODY.length || body.some((byte, i) => byte !== BODY[i])) {
    throw new Error("the last message did not open to what was sealed");
  }
  return { messages, seal_seconds: (sealed - start) / 1000, open_seconds: (opened - sealed) / 1000 };
}

(globalThis as unknown as { tetherlessBench: { run: typeof run } }).tetherlessBench = { run };
