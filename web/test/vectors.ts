// Reads protocol/vectors/*.json from the repository at test time (no copies: one file, two implementations).
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

// Compiled tests live in web/build/test/; the vectors in protocol/vectors/ at the repository root.
const VECTORS = new URL("../../../protocol/vectors/", import.meta.url);

export function loadVectors<T = any>(name: string): T {
  return JSON.parse(readFileSync(fileURLToPath(new URL(name, VECTORS)), "utf8")) as T;
}
