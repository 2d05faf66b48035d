"""Summarise a mutmut run per module (``make mutation``; docs/security.md "Mutation testing").

Reads mutmut's per-file results (``mutants/**/*.py.meta``) and the survivors that
docs/security.md explains (each named in backticks, e.g. ``protocol.ratchet.x_kdf_ck__mutmut_3``),
writes ``build/mutation/summary.json`` and prints one line per module. Exits 1 when a
survivor is neither killed nor explained, so the target fails until every one is dealt with.

    python -m tests.mutation_summary [--modules protocol/ratchet.py ...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from mutmut.stats import status_by_exit_code

_MUTANT_NAME = re.compile(r"`([A-Za-z_][\w.]*__mutmut_\d+)`")
_COLUMNS = ("mutants", "killed", "survived", "explained", "timeout", "no tests", "not checked", "other")


def explained_names(doc: Path) -> set[str]:
    """Mutant names written in backticks in ``doc`` (the explained survivors)."""
    return set(_MUTANT_NAME.findall(doc.read_text(encoding="utf-8"))) if doc.exists() else set()


def summarise(mutants_dir: Path, explained: set[str], modules: list[str] | None = None) -> dict[str, Any]:
    """Counts per module (a path such as ``protocol/ratchet.py``) and the unexplained survivors by name."""
    result: dict[str, Any] = {}
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        module = meta.relative_to(mutants_dir).as_posix().removesuffix(".meta")
        if modules and module not in modules:
            continue
        exit_codes: dict[str, int | None] = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        counts: Counter[str] = Counter(mutants=len(exit_codes))
        unexplained: list[str] = []
        for name, code in sorted(exit_codes.items()):
            status = status_by_exit_code[code]
            if status == "survived":
                counts["survived"] += 1
                if name in explained:
                    counts["explained"] += 1
                else:
                    unexplained.append(name)
            elif status in ("killed", "caught by type check"):
                counts["killed"] += 1
            elif status in ("timeout", "no tests", "not checked"):
                counts[status] += 1
            else:  # suspicious, segfault, skipped, interrupted
                counts["other"] += 1
        result[module] = {**{c: counts[c] for c in _COLUMNS}, "unexplained_survivors": unexplained}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--explained", type=Path, default=Path("docs/security.md"))
    parser.add_argument("--output", type=Path, default=Path("build/mutation/summary.json"))
    parser.add_argument("--modules", nargs="*", help="only these files (default: every mutated file)")
    args = parser.parse_args(argv)
    modules = summarise(args.mutants, explained_names(args.explained), args.modules)
    if not modules:
        print(f"no mutmut results under {args.mutants}/ (run `make mutation` first)", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"modules": modules}, indent=2) + "\n", encoding="utf-8")
    print(f"{'module':32}" + "".join(f"{c:>12}" for c in _COLUMNS))
    for module, row in modules.items():
        print(f"{module:32}" + "".join(f"{row[c]:>12}" for c in _COLUMNS))
    unexplained = [name for row in modules.values() for name in row["unexplained_survivors"]]
    for name in unexplained:
        print(f"survived, not explained in {args.explained}: {name}")
    print(f"written: {args.output}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
