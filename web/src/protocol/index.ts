/**
 * The protocol in the browser's code: pure TypeScript (no DOM, no network, no clock, no randomness
 * drawn implicitly), mirroring protocol/*.py module by module. The app and later the client layer import
 * from here; `npm run build` also bundles this file for the browser platform to prove it stays free of
 * Node built-ins.
 */
export * as auth from "./auth.js";
export * as blobs from "./blobs.js";
export * as bytes from "./bytes.js";
export * as codec from "./codec.js";
export * as deviceList from "./deviceList.js";
export * as enrolment from "./enrolment.js";
export * from "./errors.js";
export * as handshake from "./handshake.js";
export * as hybrid from "./hybrid.js";
export * as ids from "./ids.js";
export * as log from "./log.js";
export * as messages from "./messages.js";
export * as padding from "./padding.js";
export * as payload from "./payload.js";
export * as prekeys from "./prekeys.js";
export * as ratchet from "./ratchet.js";
export * as recovery from "./recovery.js";
export * as sealedbox from "./sealedbox.js";
export * as session from "./session.js";
export * as signing from "./signing.js";
export * as webauthn from "./webauthn.js";
