// Compile web/test/*.test.ts into web/build/test/ for `node --test` (one bundle per test file), and the
// interop peer (test/interop/peer.ts, the TypeScript client driven by tests/web/test_node_client.py) into
// web/build/interop/peer.mjs, outside build/test/ so that `node --test` does not run it; and the browser
// benchmark's page script (test/bench/bench.ts, driven by bench/browser.py) into web/build/bench/bench.mjs.
import { build } from "esbuild";
import { readdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { buildBench } from "../test/bench/build.mjs";
import { esbuildBase } from "./common.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = join(root, "build", "test");
const tests = (await readdir(join(root, "test"))).filter((name) => name.endsWith(".test.ts")).sort();

await rm(out, { recursive: true, force: true });
await build({
  ...esbuildBase,
  absWorkingDir: root,
  entryPoints: tests.map((name) => `test/${name}`),
  outdir: out,
  outExtension: { ".js": ".mjs" },
  platform: "node",
  packages: "external",
});

await rm(join(root, "build", "interop"), { recursive: true, force: true });
await build({
  ...esbuildBase,
  absWorkingDir: root,
  entryPoints: ["test/interop/peer.ts"],
  outfile: join(root, "build", "interop", "peer.mjs"),
  platform: "node",
  packages: "external",
});

await rm(join(root, "build", "bench"), { recursive: true, force: true });
await buildBench(join(root, "build", "bench"));
