// The app: one device of one account in this browser. It creates an account on the relay that serves it (or
// the one named in "Relay URL"), shows the address, sends text messages and receives them by polling the
// inbox every POLL_MS while the tab is open. State lives in IndexedDB, sealed under a non-extractable
// WebCrypto key (src/client/persist.ts, idb.ts). The DOM is built with textContent only (the relay's CSP
// requires Trusted Types for HTML sinks; none is used). One tab owns the device (a Web Lock).
export {}; // a module: its names stay out of the global scope (window.status exists)
import { fromUtf8, utf8 } from "../protocol/bytes.js";
import { TetherlessError } from "../protocol/errors.js";
import {
  IdbBackend,
  PersistentStore,
  RelayApi,
  RelayError,
  TetherlessClient,
  TransportError,
  UnknownRelayError,
  requestPersistence,
  type RefusedMessage,
  type StoredMessage,
} from "../client/index.js";

declare const __TETHERLESS_WEB_VERSION__: string;

/** How often the inbox is fetched while the tab is open (no stream yet). */
const POLL_MS = 2000;
const SHOWN_MESSAGES = 200;
const TEXT = "text/plain; charset=utf-8";
const LOCK = "tetherless-device";
const SETTING_RELAY = "relay_url";
const SETTING_PREKEYS = "prekeys_published";
const TOKEN_CODES = new Set(["missing_token", "invalid_token", "token_expired"]);

function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`the page has no #${id}`);
  return found as T;
}

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
  receiving: element("receiving"),
  log: element("log"),
};

/** One line a user can act on, for any error this app meets. */
function describe(error: unknown): string {
  if (error instanceof RelayError)
    return `The relay refused: ${error.code}${error.message ? ` (${error.message})` : ""}`;
  if (error instanceof UnknownRelayError)
    return `The relay answered with an error that is not a problem: ${error.message}`;
  if (error instanceof TransportError) return `Cannot reach the relay: ${error.message}`;
  if (error instanceof TetherlessError) return `Refused: ${error.code}: ${error.detail}`;
  if (error instanceof RefusedMessages) return error.message;
  return `Unexpected error: ${error instanceof Error ? error.message : String(error)}`;
}

/** Envelopes the client refused to open: reported, never shown as messages. */
class RefusedMessages extends Error {
  constructor(refused: readonly RefusedMessage[]) {
    const first = refused[0]!;
    super(`${refused.length} message(s) could not be opened and were dropped: ${first.code}: ${first.detail}`);
  }
}

function showError(error: unknown): void {
  ui.alert.textContent = describe(error);
  ui.alert.hidden = false;
}

function clearError(): void {
  ui.alert.hidden = true;
  ui.alert.textContent = "";
}

function render(messages: readonly StoredMessage[]): void {
  const items = messages.slice(-SHOWN_MESSAGES).map((m) => {
    const item = document.createElement("li");
    item.className = m.direction;
    const meta = document.createElement("span");
    meta.className = "meta";
    const when = new Date(m.sentAtMs).toLocaleString();
    meta.textContent = `${m.direction === "in" ? "From" : "To"} ${m.peer} · ${when}`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = m.contentType.startsWith("text/")
      ? fromUtf8Lenient(m.body)
      : `(${m.body.length} bytes of ${m.contentType})`;
    item.append(meta, text);
    return item;
  });
  ui.log.replaceChildren(...items);
}

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

  constructor(private readonly store: PersistentStore) {}

  start(): void {
    ui.relayUrl.value = this.store.setting(SETTING_RELAY) ?? location.origin;
    ui.create.addEventListener("click", () => void this.createAccount());
    ui.link.addEventListener("click", () => {
      ui.setupNote.textContent = "Linking this browser to an existing account is not yet available.";
    });
    ui.copy.addEventListener("click", () => void this.copyAddress());
    ui.compose.addEventListener("submit", (event) => {
      event.preventDefault(); // no navigation (the CSP's form-action 'none' would refuse one anyway)
      void this.send();
    });
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
    render(this.store.messages());
    if (!this.polling) {
      this.polling = true;
      ui.receiving.textContent = `Checking for new messages every ${POLL_MS / 1000} seconds while this tab is open.`;
      void this.poll();
    }
  }

  private async copyAddress(): Promise<void> {
    try {
      await navigator.clipboard.writeText(ui.address.textContent ?? "");
      ui.copyNote.textContent = "Copied.";
    } catch {
      ui.copyNote.textContent = "Copying was not allowed: select the address and copy it.";
    }
  }

  private async send(): Promise<void> {
    const to = ui.to.value.trim();
    const text = ui.message.value;
    if (!to || !text) return;
    ui.send.disabled = true;
    clearError();
    try {
      await this.withLogin((client) => client.send(to, TEXT, utf8(text)));
      ui.message.value = "";
    } catch (error) {
      showError(error);
    } finally {
      // A message sealed before the failure is kept in the log and in the outbox; the next poll posts it.
      render(this.store.messages());
      ui.send.disabled = false;
    }
  }

  /** Forever: finish setup if a reload interrupted it, post the outbox, fetch the inbox; then wait. */
  private async poll(): Promise<void> {
    for (;;) {
      try {
        await this.finishSetup();
        await this.withLogin(async (client) => {
          await client.flushOutbox();
          const { received, refused } = await client.receive();
          if (received.length) render(this.store.messages());
          // Refused envelopes are acknowledged with their page (one bad message never blocks the others).
          if (refused.length) throw new RefusedMessages(refused);
        });
        if (ui.alert.textContent?.startsWith("Cannot reach the relay")) clearError();
      } catch (error) {
        showError(error);
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }
}

async function main(): Promise<void> {
  ui.version.textContent = `Tetherless web ${__TETHERLESS_WEB_VERSION__}`;
  // Keys are generated and kept in the browser: that needs a secure context (https, or http://localhost).
  if (!globalThis.isSecureContext) {
    ui.status.textContent =
      "Open this page over https (or on localhost): the browser only offers its cryptography to secure pages.";
    return;
  }
  ui.status.textContent = "This browser can run the Tetherless client.";
  const run = async (lock: Lock | null): Promise<void> => {
    if (!lock) {
      ui.alert.textContent =
        "Tetherless is open in another tab of this browser. Use that tab: one device must not run twice.";
      ui.alert.hidden = false;
      return;
    }
    try {
      const backend = await IdbBackend.open();
      const store = await PersistentStore.open(backend, backend.key);
      void requestPersistence();
      new App(store).start();
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
