// The app shell: names the app and its version. The real UI (account, linking, messages) comes later.
export {}; // a module: its names stay out of the global scope (window.status exists)
declare const __TETHERLESS_WEB_VERSION__: string;

const version = document.getElementById("version");
if (version) version.textContent = `Tetherless web ${__TETHERLESS_WEB_VERSION__}`;

const status = document.getElementById("status");
if (status) {
  // Keys are generated and kept in the browser: that needs a secure context (https, or http://127.0.0.1).
  status.textContent = globalThis.isSecureContext
    ? "This browser can run the Tetherless client."
    : "Open this page over https (or on 127.0.0.1): the browser only offers its cryptography to secure pages.";
}
