// The app's device screens (issue 16): "Link this device" (this browser joins an account: it shows the link
// code and its fingerprint, waits for the approval, checks it and replays the account's history from the
// log), "Approve device" (a new device shows a code; this browser checks it and adds the device), and the
// revoked state (this device was removed from its account: sending is disabled). DOM through textContent only.
import { RelayError } from "../client/errors.js";
import {
  type CheckedOffer,
  approveOffer,
  fetchOffer,
  finishLink,
  startLink,
  verifyProposal,
  waitForProposal,
} from "../client/linking.js";
import { DeviceRevokedError, LogSync, type SyncResult } from "../client/logsync.js";
import type { RelayApi } from "../client/http.js";
import type { PersistentStore } from "../client/persist.js";
import type { TetherlessClient } from "../client/client.js";
import { element } from "./dom.js";

/** What the device screens need from the app. */
export interface AppHooks {
  /** The device's store, asked at each use: sign-out replaces it (a new database for the next account). */
  store(): PersistentStore;
  /** The relay API of the relay named in "Relay URL" (not logged in). */
  api(): RelayApi;
  /** Run `call` logged in (the app logs in first, and again when the token expired). */
  withLogin<T>(call: (client: TetherlessClient) => Promise<T>): Promise<T>;
  /** Show the account screen (after linking). */
  showAccount(): void;
  /** Redraw the conversation. */
  render(): void;
  showError(error: unknown): void;
}

const JOIN_WAIT_MS = 600_000;
const REVOKED_CODES = new Set(["device_revoked", "unknown_device", "token_revoked"]);

export class DeviceScreens {
  private readonly ui = {
    linking: element("linking"),
    linkCode: element("link-code"),
    linkFingerprint: element("link-fingerprint"),
    linkState: element("link-state"),
    deviceState: element("device-state"),
    approveCode: element<HTMLInputElement>("approve-code"),
    checkCode: element<HTMLButtonElement>("check-code"),
    approveRequest: element("approve-request"),
    approve: element<HTMLButtonElement>("approve"),
    send: element<HTMLButtonElement>("send"),
    to: element<HTMLInputElement>("to"),
    message: element<HTMLTextAreaElement>("message"),
  };
  private checked: CheckedOffer | null = null;
  private revokedShown = false;

  constructor(private readonly app: AppHooks) {}

  start(): void {
    this.ui.checkCode.addEventListener("click", () => void this.checkCode());
    this.ui.approve.addEventListener("click", () => void this.approve());
  }

  /** "Link this device": post an offer, show its code and fingerprint, wait, join, replay the history. */
  async link(): Promise<void> {
    const store = this.app.store();
    const api = this.app.api();
    const pending = await startLink(api, store);
    this.ui.linking.hidden = false;
    this.ui.linkCode.textContent = pending.code;
    this.ui.linkFingerprint.textContent = pending.fingerprint;
    this.ui.linkState.textContent =
      "On a device of your account, run: tetherless device approve followed by this code. Approve only if it shows this fingerprint.";
    const proposal = await waitForProposal(api, pending);
    const signed = await verifyProposal(api, pending, proposal);
    await finishLink(api, store, pending, signed);
    this.ui.linkState.textContent = "Approved. Reading the account's history…";
    this.app.showAccount();
  }

  /**
   * Read the account log and append this device's pending message records (every poll). Returns false once
   * this device is revoked (the poll stops).
   */
  async sync(client: TetherlessClient): Promise<boolean> {
    try {
      const log = new LogSync(client.api, this.app.store());
      const result: SyncResult = await log.sync();
      // What this device sent and received since goes into the account log (read first: the newest epoch).
      await log.appendPending();
      if (result.added.length) this.app.render();
      const warning = result.warnings.find((w) => w.code !== "log_key_missing");
      if (warning) this.app.showError(new Error(warning.detail));
      return true;
    } catch (error) {
      if (this.isRevoked(error)) {
        this.showRevoked();
        return false;
      }
      throw error;
    }
  }

  /** Whether `error` says this device is no longer in its account. */
  isRevoked(error: unknown): boolean {
    return error instanceof DeviceRevokedError || (error instanceof RelayError && REVOKED_CODES.has(error.code));
  }

  /** This device was removed from its account: say so, and disable sending (nothing it sends would be read). */
  showRevoked(): void {
    if (this.revokedShown) return;
    this.revokedShown = true;
    this.ui.deviceState.textContent =
      "This device is revoked: it was removed from your account's device list. It can no longer send or receive.";
    this.ui.deviceState.hidden = false;
    for (const control of [this.ui.send, this.ui.to, this.ui.message, this.ui.checkCode, this.ui.approveCode]) {
      control.disabled = true;
    }
  }

  /** Wait (up to the offer's 10 minutes) until `deviceId` joined the verified list, then grant it the history. */
  private async grantWhenJoined(deviceId: string): Promise<boolean> {
    const deadline = Date.now() + JOIN_WAIT_MS;
    while (Date.now() < deadline) {
      const done = await this.app.withLogin((client) =>
        new LogSync(client.api, this.app.store()).grantHistory(deviceId),
      );
      if (done !== "not-joined") return done === "granted";
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
    return false;
  }

  private async checkCode(): Promise<void> {
    this.checked = null;
    this.ui.approve.hidden = true;
    this.ui.approveRequest.textContent = "";
    try {
      const me = this.app.store().identity();
      if (!me) return;
      const code = this.ui.approveCode.value;
      const checked = await this.app.withLogin((client) => fetchOffer(client.api, me, code));
      this.checked = checked;
      this.ui.approveRequest.textContent = `A new device asks to join: fingerprint ${checked.fingerprint}. Approve it only if the new device shows the same fingerprint.`;
      this.ui.approve.hidden = false;
    } catch (error) {
      this.app.showError(error);
    }
  }

  private async approve(): Promise<void> {
    const checked = this.checked;
    const me = this.app.store().identity();
    if (!checked || !me) return;
    this.ui.approve.disabled = true;
    try {
      const dl = await this.app.withLogin((client) => approveOffer(client.api, this.app.store(), me, checked));
      this.ui.approve.hidden = true;
      this.ui.approveRequest.textContent = `Approved: device ${checked.fingerprint} joins as version ${dl.version} of your device list once it confirms.`;
      this.ui.approveCode.value = "";
      this.checked = null;
      // The new device reads the history only once a key-holding device grants it the epoch keys (§5.5).
      if (await this.grantWhenJoined(checked.deviceId)) {
        this.ui.approveRequest.textContent = `Device ${checked.fingerprint} joined; it was granted the account's history.`;
      }
    } catch (error) {
      this.app.showError(error);
    } finally {
      this.ui.approve.disabled = false;
    }
  }
}
