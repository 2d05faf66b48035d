// The app's device screens (issue 16): "Link this device" (this browser joins an account: it shows the link
// code and its fingerprint, waits for the approval, checks it and replays the account's history from the
// log), "Approve device" / "Approve with security key" (a new device shows a code; this browser checks it and
// adds the device), the account's devices (with "Revoke") and security keys ("Add security key"), and the
// revoked state (this device was removed from its account: sending is disabled). DOM through textContent only.
import { RelayError } from "../client/errors.js";
import {
  type CheckedOffer,
  approveOffer,
  fetchOffer,
  fingerprint,
  finishLink,
  startLink,
  verifyProposal,
  waitForProposal,
} from "../client/linking.js";
import { DeviceRevokedError, LogSync, type SyncResult } from "../client/logsync.js";
import type { RelayApi } from "../client/http.js";
import type { PersistentStore } from "../client/persist.js";
import type { DeviceList } from "../protocol/messages.js";
import type { TetherlessClient } from "../client/client.js";
import {
  type Authenticator,
  addSecurityKey,
  browserAuthenticator,
  keyApprovals,
  revokeDevice,
  verifiedChain,
} from "../client/webauthn.js";
import { toHex } from "../protocol/bytes.js";
import { TetherlessError } from "../protocol/errors.js";
import type { VerifiedChain } from "../protocol/deviceList.js";
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
/** How often the poll redraws the account's devices and keys (each redraw fetches and verifies the chain). */
const DEVICES_REFRESH_MS = 10_000;
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
    approveKey: element<HTMLButtonElement>("approve-key"),
    deviceList: element("device-list"),
    keyPolicy: element("key-policy"),
    keyList: element("key-list"),
    requireKey: element<HTMLInputElement>("require-key"),
    addKey: element<HTMLButtonElement>("add-key"),
    keyState: element("key-state"),
    send: element<HTMLButtonElement>("send"),
    to: element<HTMLInputElement>("to"),
    message: element<HTMLTextAreaElement>("message"),
  };
  private checked: CheckedOffer | null = null;
  private revokedShown = false;
  private devicesShownAt = 0;
  private devicesDrawn = 0;
  private shownChain: VerifiedChain | null = null;
  /** A "Revoke" pressed and not yet confirmed. */
  private confirming: { readonly deviceId: string; readonly withKey: boolean } | null = null;
  private authenticatorInUse: Authenticator | null = null;

  constructor(private readonly app: AppHooks) {}

  start(): void {
    this.ui.checkCode.addEventListener("click", () => void this.checkCode());
    this.ui.approve.addEventListener("click", () => void this.approve(false));
    this.ui.approveKey.addEventListener("click", () => void this.approve(true));
    this.ui.addKey.addEventListener("click", () => void this.addKey());
  }

  /** The browser's security keys (navigator.credentials), for this page's origin. */
  private get authenticator(): Authenticator {
    this.authenticatorInUse ??= browserAuthenticator();
    return this.authenticatorInUse;
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
      // The devices and keys: redrawn every DEVICES_REFRESH_MS, at once for a new device (after a sign-out)
      // and on every poll while the list does not verify (then nothing of it is shown, and the log waits).
      const shownFor = this.shownChain?.head.account_id;
      const stale = shownFor !== this.app.store().identity()?.accountId;
      if (stale || Date.now() - this.devicesShownAt >= DEVICES_REFRESH_MS) await this.showDevices(client);
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
    for (const control of [
      this.ui.send,
      this.ui.to,
      this.ui.message,
      this.ui.checkCode,
      this.ui.approveCode,
      this.ui.addKey,
      this.ui.requireKey,
    ]) {
      control.disabled = true;
    }
    this.ui.deviceList.replaceChildren();
  }

  /**
   * Draw the account's devices (each other one with "Revoke", and "Revoke with security key" when the account
   * has keys), its security keys and its policy, from the chain verified from the genesis.
   */
  async showDevices(client: TetherlessClient): Promise<void> {
    const me = this.app.store().identity();
    if (!me || this.revokedShown) return;
    const drawing = ++this.devicesDrawn;
    let verified: VerifiedChain;
    try {
      verified = await verifiedChain(client.api, this.app.store(), me);
    } catch (error) {
      if (error instanceof TetherlessError && drawing === this.devicesDrawn) {
        // A list that does not verify shows nothing: the last good one would look current (the alert says why).
        this.shownChain = null;
        this.ui.deviceList.replaceChildren();
        this.ui.keyList.replaceChildren();
        this.ui.keyPolicy.textContent = "Your account's device list did not verify: nothing from it is shown.";
      }
      throw error;
    }
    if (drawing !== this.devicesDrawn) return; // a later redraw (after a change of this device's) wins
    this.devicesShownAt = Date.now();
    this.shownChain = verified;
    this.drawDevices();
    const head = verified.head;
    this.ui.keyList.replaceChildren(
      ...head.credentials.map((c) => {
        const item = document.createElement("li");
        const added = new Date(c.added_at_ms).toLocaleString();
        item.textContent = `Key ${toHex(c.credential_id).slice(0, 16)} · for ${c.rp_id} · added ${added}`;
        return item;
      }),
    );
    this.ui.keyPolicy.textContent = policyText(verified);
    // The box shows a policy in force (and cannot undo it here); otherwise it is the user's choice for the
    // next key, which a redraw must not reset.
    if (head.policy.require_webauthn || this.ui.requireKey.disabled) {
      this.ui.requireKey.checked = head.policy.require_webauthn;
      this.ui.requireKey.disabled = head.policy.require_webauthn;
    }
  }

  /**
   * The device list of the last verified chain: each other device with "Revoke" (and "Revoke with security
   * key" when the account has keys), which asks to confirm first — a revoked device cannot come back.
   */
  private drawDevices(): void {
    const me = this.app.store().identity();
    const verified = this.shownChain;
    if (!me || !verified || verified.head.account_id !== me.accountId) return;
    const hasKeys = verified.head.credentials.length > 0;
    const items = verified.head.devices.map((d) => {
      const item = document.createElement("li");
      const shown = fingerprint(d.sign_key);
      const text = document.createElement("span");
      const role = d.role === "device" ? "" : ` (${d.role})`;
      text.textContent = d.device_id === me.deviceId ? `${shown}${role} — this browser` : `${shown}${role}`;
      item.append(text);
      if (d.device_id === me.deviceId) return item;
      const confirming = this.confirming?.deviceId === d.device_id ? this.confirming : null;
      const ask = (withKey: boolean) => () => {
        this.confirming = { deviceId: d.device_id, withKey };
        this.drawDevices();
      };
      if (confirming) {
        const question = document.createElement("span");
        question.textContent = ` Revoke it${confirming.withKey ? " with your security key" : ""}? It can no longer send or receive.`;
        const yes = () => {
          this.confirming = null;
          void this.revoke(d.device_id, confirming.withKey);
        };
        const no = () => {
          this.confirming = null;
          this.drawDevices();
        };
        item.append(
          question,
          " ",
          this.button("Revoke it", `Confirm: revoke device ${shown}`, yes),
          " ",
          this.button("Cancel", `Keep device ${shown}`, no),
        );
        return item;
      }
      item.append(" ", this.button("Revoke", `Revoke device ${shown}`, ask(false)));
      if (hasKeys) {
        const label = `Revoke device ${shown} with security key`;
        item.append(" ", this.button("Revoke with security key", label, ask(true)));
      }
      return item;
    });
    this.ui.deviceList.replaceChildren(...items);
  }

  private button(text: string, label: string, act: () => void): HTMLButtonElement {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = text;
    button.setAttribute("aria-label", label);
    button.addEventListener("click", act);
    return button;
  }

  /** "Add security key": register one (navigator.credentials.create) and add it to the device list. */
  private async addKey(): Promise<void> {
    const me = this.app.store().identity();
    if (!me) return;
    this.ui.addKey.disabled = true;
    this.ui.keyState.textContent =
      "Touch your security key when it blinks (twice: to create the key, then to sign it in).";
    try {
      const requireKey = this.ui.requireKey.checked;
      const credential = await this.app.withLogin((client) =>
        addSecurityKey(client.api, this.app.store(), me, this.authenticator, { requireKey }),
      );
      this.ui.keyState.textContent = `Security key ${toHex(credential.credential_id).slice(0, 16)} added to your account${requireKey ? "; from now on every device change needs it" : ""}.`;
      await this.app.withLogin((client) => this.showDevices(client));
    } catch (error) {
      this.ui.keyState.textContent = "";
      this.app.showError(error);
    } finally {
      this.ui.addKey.disabled = this.revokedShown;
    }
  }

  /** "Revoke": the version without `deviceId`, approved by this device (and a key when asked or required). */
  private async revoke(deviceId: string, withKey: boolean): Promise<void> {
    const me = this.app.store().identity();
    if (!me) return;
    this.ui.keyState.textContent = withKey ? "Touch your security key to approve the revocation." : "";
    try {
      const authenticator = withKey ? this.authenticator : null;
      const dl = await this.app.withLogin((client) =>
        revokeDevice(client.api, this.app.store(), me, deviceId, authenticator),
      );
      this.ui.keyState.textContent = `Device ${deviceId} revoked (version ${dl.version} of your device list).`;
      // The account log's next epoch at once, without the revoked device (account-log.md §5.3; logsync.ts).
      await this.app.withLogin((client) => new LogSync(client.api, this.app.store()).sync());
      await this.app.withLogin((client) => this.showDevices(client));
    } catch (error) {
      this.ui.keyState.textContent = "";
      this.app.showError(error);
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
    this.ui.approveKey.hidden = true;
    this.ui.approveRequest.textContent = "";
    try {
      const me = this.app.store().identity();
      if (!me) return;
      const code = this.ui.approveCode.value;
      const checked = await this.app.withLogin((client) => fetchOffer(client.api, me, code));
      this.checked = checked;
      this.ui.approveRequest.textContent = `A new device asks to join: fingerprint ${checked.fingerprint}. Approve it only if the new device shows the same fingerprint.`;
      this.ui.approve.hidden = false;
      this.ui.approveKey.hidden = false;
    } catch (error) {
      this.app.showError(error);
    }
  }

  /** "Approve device" / "Approve with security key" (`withKey`: a key's assertion approves the version too). */
  private async approve(withKey: boolean): Promise<void> {
    const checked = this.checked;
    const me = this.app.store().identity();
    if (!checked || !me) return;
    this.ui.approve.disabled = true;
    this.ui.approveKey.disabled = true;
    const authenticator = withKey ? this.authenticator : null;
    const approvals = (verified: VerifiedChain, dl: DeviceList) => keyApprovals(verified, dl, authenticator);
    const request = this.ui.approveRequest.textContent;
    if (withKey) this.ui.approveRequest.textContent = "Touch your security key to approve the new device.";
    try {
      const dl = await this.app.withLogin((client) =>
        approveOffer(client.api, this.app.store(), me, checked, undefined, approvals),
      );
      this.ui.approve.hidden = true;
      this.ui.approveKey.hidden = true;
      this.ui.approveRequest.textContent = `Approved: device ${checked.fingerprint} joins as version ${dl.version} of your device list once it confirms.`;
      this.ui.approveCode.value = "";
      this.checked = null;
      // The new device reads the history only once a key-holding device grants it the epoch keys (§5.5).
      if (await this.grantWhenJoined(checked.deviceId)) {
        this.ui.approveRequest.textContent = `Device ${checked.fingerprint} joined; it was granted the account's history.`;
      }
    } catch (error) {
      if (this.checked) this.ui.approveRequest.textContent = request; // not approved: the request still stands
      this.app.showError(error);
    } finally {
      this.ui.approve.disabled = false;
      this.ui.approveKey.disabled = false;
    }
  }
}

/** The account's policy in words (the CLI's `device list` says the same). */
function policyText(verified: VerifiedChain): string {
  const policy = verified.head.policy;
  const count = verified.head.credentials.length;
  const keys = count ? `${count} security key${count === 1 ? "" : "s"}` : "no security key";
  const approvals =
    policy.threshold === 1 ? "any one device approves a change" : `${policy.threshold} approvals per change`;
  const key = policy.require_webauthn ? "; a security key must co-sign every change" : "";
  const uv = policy.require_user_verification ? " (with its PIN or biometrics)" : "";
  return `Your account has ${keys}. Policy: ${approvals}${key}${uv}.`;
}
