// Build the app shell into web/dist/ (committed; deterministic: same sources + lock file -> same bytes).
import { build } from "esbuild";
import { copyFile, mkdir, readFile, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { esbuildBase } from "./common.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = process.argv[2] ?? join(root, "dist");
const pkg = JSON.parse(await readFile(join(root, "package.json"), "utf8"));

await rm(out, { recursive: true, force: true });
await mkdir(out, { recursive: true });
await build({
  ...esbuildBase,
  absWorkingDir: root,
  entryPoints: ["src/app/main.ts"],
  outfile: join(out, "app.js"),
  platform: "browser",
  minify: true,
  define: { __TETHERLESS_WEB_VERSION__: JSON.stringify(pkg.version) },
});
for (const file of ["index.html", "styles.css"]) await copyFile(join(root, "src/app", file), join(out, file));

// The protocol and client code must stay browser-clean (no Node built-ins): bundle them for the browser,
// write nothing.
await build({
  ...esbuildBase,
  absWorkingDir: root,
  entryPoints: ["src/protocol/index.ts", "src/client/index.ts"],
  outdir: join(out, "unused"),
  platform: "browser",
  write: false,
});
