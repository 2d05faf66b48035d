// Bundle the browser benchmark's page script (test/bench/bench.ts, @noble/* included) for the browser.
// scripts/build-tests.mjs builds it into build/bench/; bench/browser.py runs `node test/bench/build.mjs DIR`
// into a temporary directory of its own, so a benchmark never races a test build over build/.
import { build } from "esbuild";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { esbuildBase } from "../../scripts/common.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** Write `outdir`/bench.mjs. */
export async function buildBench(outdir) {
  await build({
    ...esbuildBase,
    absWorkingDir: root,
    entryPoints: ["test/bench/bench.ts"],
    outfile: join(outdir, "bench.mjs"),
    platform: "browser",
  });
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await buildBench(process.argv[2] ?? join(root, "build", "bench"));
}
