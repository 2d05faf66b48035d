// The app: one device of one account in this browser. It creates an account on the relay that serves it (or
// the one named in "Relay URL"), shows the address, sends text messages and receives them by polling the
// inbox every POLL_MS while the tab is open. State lives in IndexedDB, sealed under a non-extractable
// WebCrypto key (src/client/persist.ts, idb.ts). The DOM is built with textContent only (the relay's CSP
// requires Trusted Types for HTML sinks; none is used). One tab owns the device (a Web Lock).
export {}; // a module: its names stay out of the global scope (window.status exists)
import { type BlobRef, FILE_CONTENT_TYPE, decodeBlobRef, encodeBlobRef, safeName } from "../protocol/blobs.js";
import { fromUtf8, toBase32, toHex, utf8 } from "../protocol/bytes.js";
import { TetherlessError } from "../protocol/errors.js";
import { parseAddress } from "../protocol/ids.js";
import {
  FileTransferError,
  IdbBackend,
  Outbox,
  PersistentStore,
  RelayApi,
  RelayError,
  TetherlessClient,
  TransportError,
  UnknownRelayError,
  downloadFile,
  formatSize,
  isPermanentFailure,
  platformDeps,
  requestPersistence,
  uploadFile,
  wipeBrowserDevice,
  type QueuedMessage,
  type RefusedMessage,
  type StoredMessage,
} from "../client/index.js";
import { SecurityKeyError } from "../client/webauthn.js";
import { DeviceScreens } from "./devices.js";
import { element } from "./dom.js";

declare const __TETHERLESS_WEB_VERSION__: string;

/** How often the inbox is fetched while the tab is open (no stream yet). */
const POLL_MS = 2000;
const SHOWN_MESSAGES = 200;
const TEXT = "text/plain; charset=utf-8";
const LOCK = "tetherless-device";
const SETTING_RELAY = "relay_url";
const SETTING_PREKEYS = "prekeys_published";
const TOKEN_CODES = new Set(["missing_token", "invalid_token", "token_expired"]);
/** How long a downloaded file's object URL lives: the browser starts the download from it asynchronously. */
const REVOKE_AFTER_MS = 60_000;

const ui = {
  version: element("version"),
  status: element("status"),
  alert: element("alert"),
  setup: element("setup"),
  relayUrl: element<HTMLInputElement>("relay-url"),
  create: element<HTMLButtonElement>("create"),
  link: element<HTMLButtonElement>("link"),
  setupNote: element("setup-note"),
  account: element("account"),
  address: element("address"),
  copy: element<HTMLButtonElement>("copy"),
  copyNote: element("copy-note"),
  compose: element<HTMLFormElement>("compose"),
  to: element<HTMLInputElement>("to"),
  message: element<HTMLTextAreaElement>("message"),
  send: element<HTMLButtonElement>("send"),
  attach: element<HTMLInputElement>("attach"),
  sendFile: element<HTMLButtonElement>("send-file"),
  transfer: element("transfer"),
  receiving: element("receiving"),
  log: element("log"),
  outboxSection: element("outbox-section"),
  outbox: element("outbox"),
  signOut: element<HTMLButtonElement>("signout"),
  signOutConfirm: element("signout-confirm"),
  signOutYes: element<HTMLButtonElement>("signout-yes"),
  signOutNo: element<HTMLButtonElement>("signout-no"),
};

/** One line a user can act on, for any error this app meets. */
function describe(error: unknown): string {
  if (error instanceof RelayError)
    return `The relay refused: ${error.code}${error.message ? ` (${error.message})` : ""}`;
  if (error instanceof UnknownRelayError)
    return `The relay answered with an error that is not a problem: ${error.message}`;
  if (error instanceof TransportError) return unreachable(error);
  if (error instanceof TetherlessError) return `Refused: ${error.code}: ${error.detail}`;
  if (error instanceof RefusedMessages || error instanceof NotSent) return error.message;
  if (error instanceof SecurityKeyError) return error.message; // already a sentence for the user
  if (error instanceof FileTransferError) return `${error.message} (${error.code})`;
  return `Unexpected error: ${error instanceof Error ? error.message : String(error)}`;
}

/** Envelopes the client refused to open: reported, never shown as messages. */
class RefusedMessages extends Error {
  constructor(refused: readonly RefusedMessage[]) {
    const first = refused[0]!;
    super(`${refused.length} message(s) could not be opened and were dropped: ${first.code}: ${first.detail}`);
  }
}

/** Queued messages that failed permanently while the outbox was flushed: they wait for Retry or Discard. */
class NotSent extends Error {
  constructor(failed: readonly QueuedMessage[]) {
    const first = failed[0]!;
    super(`${failed.length} message(s) to ${first.to} were not sent: ${first.failure?.code}: ${first.failure?.detail}`);
  }
}

/**
 * No answer from the relay, said plainly: whether this device is offline or the relay does not answer, and
 * that nothing is lost. The request and the browser's reason ("Failed to fetch") go to the console only.
 */
function unreachable(error: TransportError): string {
  return error.offline
    ? "Offline: this device has no network connection, so the relay cannot be reached. " +
        "Messages you send wait in the outbox and go out when the connection returns."
    : "Cannot reach the relay: it does not answer right now. " +
        "Messages you send wait in the outbox and go out when it answers again.";
}

/** Whether the alert shows {@link unreachable}'s text (cleared by the next poll that reaches the relay). */
let unreachableShown = false;

function showError(error: unknown): void {
  // The technical detail once per outage (every poll fails the same way while it lasts).
  if (error instanceof TransportError && !unreachableShown) console.info(`no answer from the relay: ${error.message}`);
  ui.alert.textContent = describe(error);
  ui.alert.hidden = false;
  unreachableShown = error instanceof TransportError;
}

function clearError(): void {
  ui.alert.hidden = true;
  ui.alert.textContent = "";
  unreachableShown = false;
}

/**
 * The conversation. Sent messages whose envelopes the relay has not accepted yet (`unposted`: message ids in
 * hex) are shown in the outbox instead ({@link outboxItem}), so the log holds only what left.
 */
function render(
  messages: readonly StoredMessage[],
  unposted: ReadonlySet<string>,
  download: (ref: BlobRef, message: StoredMessage) => void,
): void {
  const shown = messages.filter((m) => !(m.direction === "out" && unposted.has(toHex(m.messageId))));
  const items = shown.slice(-SHOWN_MESSAGES).map((m) => {
    const item = document.createElement("li");
    item.className = m.direction;
    const meta = document.createElement("span");
    meta.className = "meta";
    const when = new Date(m.sentAtMs).toLocaleString();
    meta.textContent = `${m.direction === "in" ? "From" : "To"} ${m.peer} · ${when}`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = bodyText(m.contentType, m.body);
    item.append(meta, text);
    const ref = fileRef(m.contentType, m.body);
    if (ref) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Download";
      button.setAttribute("aria-label", `Download ${ref.name}`);
      button.addEventListener("click", () => download(ref, m));
      item.append(" ", button);
    }
    return item;
  });
  ui.log.replaceChildren(...items);
}

/** One entry of the outbox list: where it goes, its state, its text, and the actions it offers. */
function outboxItem(
  to: string,
  state: string,
  contentType: string,
  body: Uint8Array,
  actions: readonly [string, () => void][] = [],
): HTMLLIElement {
  const item = document.createElement("li");
  if (actions.length) item.className = "failed"; // only a failed entry offers Retry / Discard
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `To ${to} · ${state}`;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = bodyText(contentType, body);
  item.append(meta, text);
  for (const [label, act] of actions) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.addEventListener("click", act);
    item.append(" ", button);
  }
  return item;
}

/** The file reference of a file message (null for any other message, or one that does not decode or check). */
function fileRef(contentType: string, body: Uint8Array): BlobRef | null {
  if (contentType !== FILE_CONTENT_TYPE) return null;
  try {
    return decodeBlobRef(body);
  } catch {
    return null;
  }
}

/** What a message shows: its text, a file's "name · size" (never its key or bytes), or its size and type. */
function bodyText(contentType: string, body: Uint8Array): string {
  if (contentType.startsWith("text/")) return fromUtf8Lenient(body);
  if (contentType === FILE_CONTENT_TYPE) {
    const ref = fileRef(contentType, body);
    return ref ? `${ref.name} · ${formatSize(ref.size)}` : "(a file message that cannot be read)";
  }
  return `(${body.length} bytes of ${contentType})`;
}

/** Offer `file` as a download named `name` (already a safe name); its object URL is revoked afterwards. */
function save(file: Blob, name: string): void {
  const url = URL.createObjectURL(file);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), REVOKE_AFTER_MS);
}

/** A revoked device sends no file either (devices.ts `showRevoked` disables the other controls). */
function disableFiles(): void {
  for (const control of [ui.attach, ui.sendFile]) control.disabled = true;
}

const percent = (done: number, total: number): string => `${Math.floor((100 * done) / Math.max(total, 1))} %`;

function fromUtf8Lenient(body: Uint8Array): string {
  try {
    return fromUtf8(body);
  } catch {
    return new TextDecoder().decode(body);
  }
}

class App {
  private client: TetherlessClient | null = null;
  private loggedIn = false;
  private polling = false;
  /** Bumped by sign-out: a poll loop of an earlier device ends. */
  private generation = 0;
  private signedOut = false;
  /** The network work (send, poll, sign-out) runs one at a time: a message is never sealed twice at once. */
  private running: Promise<unknown> = Promise.resolve();
  private wake: (() => void) | null = null;
  private shown = "";

  constructor(
    private store: PersistentStore,
    private outbox: Outbox,
    private backend: IdbBackend,
  ) {}

  private deviceScreens: DeviceScreens | null = null;

  /** Linking, approving and the revoked state (src/app/devices.ts). */
  private get devices(): DeviceScreens {
    this.deviceScreens ??= new DeviceScreens({
      store: () => this.store,
      api: () => this.api().api,
      withLogin: (call) => this.withLogin(call),
      showAccount: () => this.showAccount(),
      render: () => this.refresh(),
      showError,
    });
    return this.deviceScreens;
  }

  /** "Link this device": this browser joins an account a device of which approves it (devices.ts). */
  private async linkDevice(): Promise<void> {
    ui.link.disabled = true;
    clearError();
    try {
      await this.reopenAfterSignOut();
      let origin: string;
      try {
        origin = new URL(ui.relayUrl.value.trim()).origin;
      } catch {
        throw new TetherlessError("invalid_field", "the Relay URL is not a URL (e.g. https://relay.example)");
      }
      this.store.transaction(() => this.store.setSetting(SETTING_RELAY, origin));
      this.client = null;
      await this.devices.link();
    } catch (error) {
      showError(error);
    } finally {
      ui.link.disabled = false;
    }
  }

  start(): void {
    this.devices.start();
    ui.signOut.addEventListener("click", () => {
      ui.signOutConfirm.hidden = false;
      ui.signOutNo.focus();
    });
    ui.signOutNo.addEventListener("click", () => {
      ui.signOutConfirm.hidden = true;
    });
    ui.signOutYes.addEventListener("click", () => void this.signOut());
    // Back online: flush the outbox now rather than at the next poll.
    addEventListener("online", () => {
      this.showConnectivity();
      this.wake?.();
    });
    addEventListener("offline", () => this.showConnectivity());
    ui.relayUrl.value = this.store.setting(SETTING_RELAY) ?? location.origin;
    ui.create.addEventListener("click", () => void this.createAccount());
    ui.link.addEventListener("click", () => void this.linkDevice());
    ui.copy.addEventListener("click", () => void this.copyAddress());
    ui.compose.addEventListener("submit", (event) => {
      event.preventDefault(); // no navigation (the CSP's form-action 'none' would refuse one anyway)
      void this.send();
    });
    ui.sendFile.addEventListener("click", () => void this.sendFile());
    if (this.store.identity()) this.showAccount();
    else ui.setup.hidden = false;
  }

  private api(): TetherlessClient {
    if (!this.client) {
      const url = this.store.setting(SETTING_RELAY) ?? location.origin;
      this.client = new TetherlessClient(new RelayApi(url), this.store);
    }
    return this.client;
  }

  /** Run `call`, logging in first when needed and once more when the relay says the token expired. */
  private async withLogin<T>(call: (client: TetherlessClient) => Promise<T>): Promise<T> {
    const client = this.api();
    if (!this.loggedIn) {
      await client.login();
      this.loggedIn = true;
    }
    try {
      return await call(client);
    } catch (error) {
      if (!(error instanceof RelayError && TOKEN_CODES.has(error.code))) throw error;
      await client.login();
      return call(client);
    }
  }

  private async createAccount(): Promise<void> {
    ui.create.disabled = true;
    clearError();
    try {
      await this.reopenAfterSignOut();
      let url: URL;
      try {
        url = new URL(ui.relayUrl.value.trim());
      } catch {
        throw new TetherlessError("invalid_field", "the Relay URL is not a URL (e.g. https://relay.example)");
      }
      if (url.protocol !== "https:" && url.protocol !== "http:") {
        throw new TetherlessError("invalid_field", "the Relay URL must start with https:// (or http:// locally)");
      }
      this.store.transaction(() => this.store.setSetting(SETTING_RELAY, url.origin));
      this.client = null;
      const client = this.api();
      await client.createAccount();
      await this.finishSetup();
      this.showAccount();
    } catch (error) {
      showError(error);
    } finally {
      ui.create.disabled = false;
    }
  }

  /** Log in and publish prekeys once (recorded, so a reload after a failure finishes it). */
  private async finishSetup(): Promise<void> {
    if (this.store.setting(SETTING_PREKEYS)) return;
    await this.withLogin((client) => client.publishPrekeys());
    this.store.transaction(() => this.store.setSetting(SETTING_PREKEYS, "yes"));
    await this.store.durable();
  }

  private showAccount(): void {
    const identity = this.store.identity();
    if (!identity) return;
    ui.setup.hidden = true;
    ui.account.hidden = false;
    ui.address.textContent = identity.address;
    this.refresh();
    if (!this.polling) {
      this.polling = true;
      this.showConnectivity();
      void this.poll(this.generation);
    }
  }

  private showConnectivity(): void {
    ui.receiving.textContent = navigator.onLine
      ? `Checking for new messages every ${POLL_MS / 1000} seconds while this tab is open.`
      : "Offline: messages you send wait in the outbox and go out when the connection returns.";
  }

  /** Show the conversation and the outbox again when either changed. */
  private refresh(): void {
    const sealed = this.store.outbox();
    const unposted = new Set(sealed.map((e) => toHex(e.messageId)));
    const queued = this.outbox.items();
    const key = [
      this.store.messages().length,
      ...unposted,
      ...queued.map((q) => toHex(q.id) + (q.failure?.code ?? "")),
    ];
    if (key.join() === this.shown) return;
    this.shown = key.join();
    render(this.store.messages(), unposted, (ref, message) => void this.download(ref, message));
    const waiting = this.store.messages().filter((m) => m.direction === "out" && unposted.has(toHex(m.messageId)));
    ui.outbox.replaceChildren(
      ...waiting.map((m) =>
        outboxItem(m.peer, "waiting: sealed, not yet accepted by the relay", m.contentType, m.body),
      ),
      ...queued.map((q) =>
        q.failure
          ? outboxItem(q.to, `not sent: ${q.failure.code}: ${q.failure.detail}`, q.contentType, q.body, [
              ["Retry", () => void this.exclusive(() => this.outbox.retry(q.id)).then(() => this.wake?.())],
              ["Discard", () => void this.exclusive(() => this.outbox.discard(q.id)).then(() => this.refresh())],
            ])
          : outboxItem(q.to, "waiting", q.contentType, q.body),
      ),
    );
    ui.outboxSection.hidden = ui.outbox.childElementCount === 0;
  }

  /** Run `work` after the network work already started (one at a time); rejects as `work` does. */
  private exclusive<T>(work: () => Promise<T>): Promise<T> {
    const result = this.running.then(work, work);
    this.running = result.catch(() => undefined);
    return result;
  }

  /** Wait `ms`, or less when {@link wake} is called (back online, a retry, sign-out). */
  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  private async copyAddress(): Promise<void> {
    try {
      await navigator.clipboard.writeText(ui.address.textContent ?? "");
      ui.copyNote.textContent = "Copied.";
    } catch {
      ui.copyNote.textContent = "Copying was not allowed: select the address and copy it.";
    }
  }

  /**
   * Queue the message (on disk, no network: offline it waits in the outbox), then try to seal and post it
   * now. A lasting refusal of a message just written (the relay does not know the recipient, its device list
   * does not verify) takes it out of the outbox and gives the text back; a passing one (no network) leaves
   * it waiting for the next poll or the `online` event.
   */
  private async send(): Promise<void> {
    const to = ui.to.value.trim();
    const text = ui.message.value;
    if (!to || !text) return;
    ui.send.disabled = true;
    clearError();
    try {
      await this.queueAndSend(to, TEXT, utf8(text), {
        queued: () => (ui.message.value = ""),
        refused: () => {
          if (!ui.message.value) ui.message.value = text; // kept for another try
        },
      });
    } catch (error) {
      showError(error);
    } finally {
      this.refresh();
      ui.send.disabled = false;
    }
  }

  /**
   * The send path of every message: queue it (on disk), then seal and post it now. A lasting refusal takes it
   * out of the outbox again (`refused` runs, then the error is thrown); a passing one leaves it waiting.
   */
  private async queueAndSend(
    to: string,
    contentType: string,
    body: Uint8Array,
    on: { queued: () => void; refused: () => void },
  ): Promise<void> {
    const entry = await this.outbox.queue(to, contentType, body, Date.now());
    on.queued();
    this.refresh();
    await this.exclusive(async () => {
      try {
        await this.withLogin((client) => this.outbox.seal(client, entry));
      } catch (error) {
        if (!isPermanentFailure(error)) throw error; // it waits
        await this.outbox.discard(entry.id);
        on.refused();
        throw error;
      }
      await this.withLogin((client) => client.flushOutbox());
    });
  }

  /**
   * "Share file": check the recipient, encrypt and upload the chosen file (src/client/blobs.ts; progress in
   * #transfer), then send the file message through {@link queueAndSend}. The upload runs beside the polling
   * (it touches no session). Not resumed after a reload: the file is chosen and sent again (docs/web.md).
   */
  private async sendFile(): Promise<void> {
    const to = ui.to.value.trim();
    const file = ui.attach.files?.[0];
    const identity = this.store.identity();
    clearError();
    if (!to || !file || !identity) {
      showError(new TetherlessError("invalid_field", "choose a recipient (To) and a file (Attach file) first"));
      return;
    }
    ui.sendFile.disabled = true;
    const name = safeName(file.name);
    try {
      const target = parseAddress(to);
      if (target.relay !== identity.relayName) {
        throw new TetherlessError("invalid_field", `${to} is on another relay; federation is not in this client yet`);
      }
      const ref = await this.withLogin(async (client) => {
        await client.verifiedDevices(target.account); // an unknown recipient before the upload, not after
        return uploadFile(client.api, file, {
          relayName: identity.relayName,
          random: platformDeps.random,
          login: () => client.login(),
          progress: (phase, done, total) => {
            ui.transfer.textContent =
              phase === "encrypting"
                ? `Encrypting ${name}: ${percent(done, total)}`
                : `Uploading ${name}: ${formatSize(done)} of ${formatSize(total)} (${percent(done, total)})`;
          },
        });
      });
      ui.transfer.textContent = `Sending the message for ${name}…`;
      await this.queueAndSend(to, FILE_CONTENT_TYPE, encodeBlobRef(ref), {
        queued: () => (ui.attach.value = ""),
        refused: () => undefined,
      });
      ui.transfer.textContent = `Sent ${name} (${formatSize(ref.size)}).`;
    } catch (error) {
      ui.transfer.textContent = "";
      showError(error);
    } finally {
      this.refresh();
      ui.sendFile.disabled = false;
    }
  }

  /**
   * "Download": fetch the blob, verify it (commitment, every chunk, the digest) and decrypt it
   * (src/client/blobs.ts); only then offer it, under its safe name. Files above the browser's limit are
   * refused with the CLI command that fetches them. Errors go to the alert; nothing is offered then.
   */
  private async download(ref: BlobRef, message: StoredMessage): Promise<void> {
    const identity = this.store.identity();
    if (!identity) return;
    clearError();
    ui.transfer.textContent = `Downloading ${ref.name}…`;
    try {
      const file = await downloadFile(ref, {
        homeRelay: identity.relayName,
        homeApi: this.api().api,
        cliRef: toBase32(message.messageId),
        progress: (_phase, done, total) => {
          ui.transfer.textContent = `Downloading ${ref.name}: ${formatSize(done)} of ${formatSize(total)}`;
        },
      });
      save(file, safeName(ref.name));
      ui.transfer.textContent = `Saved ${ref.name} (${formatSize(ref.size)}, verified).`;
    } catch (error) {
      ui.transfer.textContent = "";
      showError(error);
    }
  }

  /**
   * Sign-out on a shared computer: stop, delete this browser's copy of the device (database, key, outbox,
   * the service worker and its caches: {@link wipeBrowserDevice}) and show the start screen. The relay is
   * not told: the device stays in the account's list until another device revokes it (web/README.md).
   */
  private async signOut(): Promise<void> {
    ui.signOutYes.disabled = true;
    clearError();
    this.generation += 1;
    this.wake?.();
    try {
      await this.exclusive(async () => {
        this.signedOut = true;
        this.backend.close();
        await wipeBrowserDevice();
      });
      this.client = null;
      this.loggedIn = false;
      this.polling = false;
      this.shown = "";
      for (const list of [ui.log, ui.outbox]) list.replaceChildren();
      for (const field of [ui.to, ui.message, ui.attach]) field.value = "";
      ui.transfer.textContent = "";
      ui.address.textContent = "";
      ui.signOutConfirm.hidden = true;
      ui.account.hidden = true;
      ui.relayUrl.value = location.origin;
      ui.setup.hidden = false;
      ui.setupNote.textContent =
        "Signed out: this browser no longer holds the device's keys, messages or outbox. Close the tab when done.";
    } catch (error) {
      showError(error);
    } finally {
      ui.signOutYes.disabled = false;
    }
  }

  /** After a sign-out, a new account starts from a new, empty database (and a new key). */
  private async reopenAfterSignOut(): Promise<void> {
    if (!this.signedOut) return;
    const opened = await openDevice();
    [this.backend, this.store, this.outbox] = [opened.backend, opened.store, opened.outbox];
    this.signedOut = false;
    registerServiceWorker();
  }

  /**
   * Until sign-out: finish setup if a reload interrupted it, seal the queued messages, post the sealed ones,
   * fetch the inbox (acknowledged only after the local commit: client.receive); then wait.
   */
  private async poll(generation: number): Promise<void> {
    while (generation === this.generation) {
      try {
        await this.exclusive(async () => {
          if (generation !== this.generation) return;
          await this.finishSetup();
          await this.withLogin(async (client) => {
            // A queued message that fails for good is marked and reported; the others go on.
            const failed = await this.outbox.flush(client);
            await client.flushOutbox();
            const { refused } = await client.receive();
            // The account log: history from the other devices (a linked device replays it all), revocation.
            if (!(await this.devices.sync(client))) return disableFiles(); // revoked
            this.refresh();
            if (failed.length) throw new NotSent(failed);
            // Refused envelopes are acknowledged with their page (one bad message never blocks the others).
            if (refused.length) throw new RefusedMessages(refused);
          });
        });
        if (unreachableShown) clearError();
      } catch (error) {
        if (this.devices.isRevoked(error)) {
          this.devices.showRevoked();
          disableFiles();
        }
        if (generation === this.generation) showError(error);
      }
      if (generation === this.generation) this.refresh();
      await this.sleep(POLL_MS);
    }
  }
}

/** This browser's device: the database, the sealed state and the outbox, all under one non-extractable key. */
async function openDevice(): Promise<{ backend: IdbBackend; store: PersistentStore; outbox: Outbox }> {
  const backend = await IdbBackend.open();
  const store = await PersistentStore.open(backend, backend.key);
  const outbox = await Outbox.open(backend, backend.key);
  return { backend, store, outbox };
}

/**
 * The app shell offline (src/sw.ts, built to sw.js next to app.js). Without it (no service worker support,
 * or the browser refused) the app works online only, and says so.
 */
function registerServiceWorker(): void {
  const workers = navigator.serviceWorker;
  if (!workers) return;
  workers.register(workerUrl() as unknown as string, { scope: "./" }).catch(() => {
    ui.version.textContent += " · no offline copy in this browser";
  });
}

/**
 * The worker's script URL. The relay's CSP requires Trusted Types for script URLs, so `register` takes a
 * `TrustedScriptURL`; the policy admits exactly the one script, nothing a string could smuggle in.
 */
function workerUrl(): unknown {
  const types = (globalThis as { trustedTypes?: TrustedTypes }).trustedTypes;
  if (!types) return SERVICE_WORKER;
  workerPolicy ??= types.createPolicy("tetherless-service-worker", {
    createScriptURL: (url: string) => {
      if (url !== SERVICE_WORKER) throw new TypeError(`not the service worker: ${url}`);
      return url;
    },
  });
  return workerPolicy.createScriptURL(SERVICE_WORKER);
}
const SERVICE_WORKER = "./sw.js";
interface TrustedTypes {
  createPolicy(
    name: string,
    rules: { createScriptURL(url: string): string },
  ): { createScriptURL(url: string): unknown };
}
let workerPolicy: ReturnType<TrustedTypes["createPolicy"]> | undefined;

async function main(): Promise<void> {
  ui.version.textContent = `Tetherless web ${__TETHERLESS_WEB_VERSION__}`;
  // Keys are generated and kept in the browser: that needs a secure context (https, or http://localhost).
  if (!globalThis.isSecureContext) {
    ui.status.textContent =
      "Open this page over https (or on localhost): the browser only offers its cryptography to secure pages.";
    return;
  }
  ui.status.textContent = "This browser can run the Tetherless client.";
  registerServiceWorker();
  const run = async (lock: Lock | null): Promise<void> => {
    if (!lock) {
      ui.alert.textContent =
        "Tetherless is open in another tab of this browser. Use that tab: one device must not run twice. " +
        "This tab is inactive and takes over when that one closes.";
      ui.alert.hidden = false;
      ui.status.textContent = "Inactive: another tab runs this device.";
      // Queue for the lock: granted when the other tab closes (or signs out and closes), never before.
      await navigator.locks.request(LOCK, run);
      return;
    }
    clearError();
    ui.status.textContent = "This browser can run the Tetherless client.";
    try {
      const { backend, store, outbox } = await openDevice();
      void requestPersistence();
      new App(store, outbox, backend).start();
    } catch (error) {
      showError(error);
      return;
    }
    // Hold the lock for the life of the page: two tabs would run two ratchets on one state.
    await new Promise<never>(() => undefined);
  };
  if (navigator.locks) await navigator.locks.request(LOCK, { ifAvailable: true }, run);
  else await run({ name: LOCK, mode: "exclusive" } as Lock);
}

void main();
