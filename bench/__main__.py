"""Tetherless benchmarks: ``python -m bench [--runs N] [--only a,b] [--mixed-seconds S] [--smoke] [--out FILE]``.

Every scenario starts its own relay (fresh data dir, pinned to core 0 with
taskset) and its load generator in separate processes (core 1), warms up,
and is reported next to a baseline measured in the same invocation:

- P1 ``p1_send_single`` vs ``bare_post`` (bare trio+h2 POST) and ``synapse`` (to-device send);
  ``transport_post``: the same POSTs to the relay's transport alone, vs ``bare_post``;
- P2 ``p2_send_batch100`` vs ``raw_sqlite_batch100`` (plain executemany into the relay's schema);
- P3 ``p3_delivery`` vs ``raw_stream`` (a raw trio writer of the same framed bytes);
- P4 ``p4_latency`` (1,000 msg/s) and ``p4_latency_at_40pct`` (40 % of this run's P1 capacity)
  vs ``synapse`` (to-device end-to-end latency);
- P5/P9 ``p5_p9_backlog``: paged catch-up vs raw sqlite3 read-back of the same pages;
  restart-to-ready with the backlog vs start on an empty data directory;
- P6 ``p6_idle_streams`` (RSS, idle CPU), P7 ``p7_mixed`` (sustained mixed load; runs only with
  ``--mixed-seconds`` or ``--only p7_mixed``), P8 ``p8_storage`` (bytes per envelope).

Results: a table on stdout and JSON in bench/results/. Medians of ``--runs`` runs
(P7 and Synapse run once per invocation).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import scenarios
from .common import machine, summary, write_results
from .scenarios import ONCE, SCENARIOS, Sizes


@dataclass(frozen=True)
class Target:
    """One line of the verdict: a figure, its same-run baseline and the issue's target."""

    label: str
    scenario: str
    key: str
    baseline_scenario: str | None
    baseline_key: str | None
    minimum: float | None = None  # figure must be >= this
    maximum: float | None = None  # figure must be <= this
    min_ratio: float | None = None  # figure / baseline must be >= this
    max_ratio: float | None = None  # figure / baseline must be <= this (latency vs a peer)


TARGETS = [
    Target(
        "P1 single sends env/s",
        "p1_send_single",
        "envelopes_per_second",
        "bare_post",
        "requests_per_second",
        minimum=2500,
        min_ratio=0.5,
    ),
    Target("transport alone POST req/s", "transport_post", "requests_per_second", "bare_post", "requests_per_second"),
    Target(
        "P1 vs Synapse to-device",
        "p1_send_single",
        "envelopes_per_second",
        "synapse",
        "todevice_messages_per_second",
        min_ratio=15,
    ),
    Target(
        "P2 batched sends env/s",
        "p2_send_batch100",
        "envelopes_per_second",
        "raw_sqlite_batch100",
        "envelopes_per_second",
        minimum=50_000,
        min_ratio=0.7,
    ),
    Target(
        "P3 delivery env/s",
        "p3_delivery",
        "envelopes_per_second",
        "raw_stream",
        "envelopes_per_second",
        minimum=200_000,
    ),
    Target("P4 latency p50 ms", "p4_latency", "latency_p50_ms", "synapse", "todevice_e2e_p50_ms", maximum=2),
    Target("P4 latency p99 ms", "p4_latency", "latency_p99_ms", "synapse", "todevice_e2e_p99_ms", maximum=10),
    Target(
        "P4 p50 ms at 40 % of P1", "p4_latency_at_40pct", "latency_p50_ms", "synapse", "todevice_e2e_p50_ms", maximum=2
    ),
    Target(
        "P4 p99 ms at 40 % of P1", "p4_latency_at_40pct", "latency_p99_ms", "synapse", "todevice_e2e_p99_ms", maximum=10
    ),
    Target(
        "P5 catch-up env/s",
        "p5_p9_backlog",
        "envelopes_per_second",
        "p5_p9_backlog",
        "raw_sqlite_envelopes_per_second",
        minimum=100_000,
        min_ratio=0.5,
    ),
    Target("P6 RSS MiB (idle streams)", "p6_idle_streams", "rss_mib", "p6_idle_streams", "rss_before_mib", maximum=400),
    Target("P6 idle CPU (cores)", "p6_idle_streams", "idle_cpu_share", None, None, maximum=0.02),
    Target("P7 RSS end / 2nd quarter", "p7_mixed", "rss_growth_ratio", None, None, maximum=1.10),
    Target("P7 errors", "p7_mixed", "errors", None, None, maximum=0),
    Target("P8 overhead B/env", "p8_storage", "overhead_bytes_per_envelope", None, None, maximum=100),
    Target(
        "P9 restart to ready s", "p5_p9_backlog", "restart_seconds", "p5_p9_backlog", "empty_start_seconds", maximum=1.0
    ),
]


def _stats(runs: dict[str, list[dict[str, Any]]], scenario: str, key: str) -> dict[str, float] | None:
    values = [r[key] for r in runs.get(scenario, []) if isinstance(r.get(key), int | float)]
    return summary(values) if values else None


def verdicts(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for t in TARGETS:
        figure = _stats(runs, t.scenario, t.key)
        if figure is None:
            continue
        base = _stats(runs, t.baseline_scenario, t.baseline_key) if t.baseline_scenario and t.baseline_key else None
        ratio = figure["median"] / base["median"] if base and base["median"] else None
        checks = []
        if t.minimum is not None:
            checks.append(figure["median"] >= t.minimum)
        if t.maximum is not None:
            checks.append(figure["median"] <= t.maximum)
        if t.min_ratio is not None:
            checks.append(ratio is not None and ratio >= t.min_ratio)
        if t.max_ratio is not None:
            checks.append(ratio is not None and ratio <= t.max_ratio)
        target = " and ".join(
            text
            for text in (
                f">= {t.minimum:,g}" if t.minimum is not None else "",
                f"<= {t.maximum:,g}" if t.maximum is not None else "",
                f"ratio >= {t.min_ratio:g}" if t.min_ratio is not None else "",
                f"ratio <= {t.max_ratio:g}" if t.max_ratio is not None else "",
            )
            if text
        )
        rows.append(
            {
                "label": t.label,
                "median": figure["median"],
                "min": figure["min"],
                "max": figure["max"],
                "runs": figure["runs"],
                "baseline": f"{t.baseline_scenario}.{t.baseline_key}" if base else None,
                "baseline_median": base["median"] if base else None,
                "ratio": ratio,
                "target": target,
                "met": all(checks) if checks else None,
            }
        )
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated scenario names: " + ", ".join(SCENARIOS))
    parser.add_argument("--mixed-seconds", type=float, default=None, help="run P7 for this long (default: skip P7)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's smoke run)")
    parser.add_argument("--no-synapse", action="store_true", help="skip the Synapse peer comparison")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        scenarios.SIZES = Sizes.smoke()
    if args.mixed_seconds is not None:
        scenarios.SIZES.mixed_seconds = args.mixed_seconds
    only = [n for n in args.only.split(",") if n]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    names = only or [
        n
        for n in SCENARIOS
        if not (n == "p7_mixed" and args.mixed_seconds is None) and not (n == "synapse" and args.no_synapse)
    ]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    failures: dict[str, str] = {}
    # Interleave scenarios run by run, so that a noisy neighbour hurts all of them alike.
    for run in range(args.runs):
        for name in names:
            if name in ONCE and run > 0:
                continue
            print(f"run {run + 1}/{args.runs}: {name} ...", file=sys.stderr, flush=True)
            try:
                result = SCENARIOS[name][0]()
            except Exception:
                failures[name] = traceback.format_exc()
                print(failures[name], file=sys.stderr)
                continue
            if "skipped" in result:
                print(f"  skipped: {result['skipped']}", file=sys.stderr)
                failures[name] = result["skipped"]
                continue
            runs[name].append(result)
    report: dict[str, Any] = {
        "machine": machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sizes": vars(scenarios.SIZES),
        "scenarios": {},
        "failures": failures,
    }
    print(f"\n{'scenario':<22} {'median':>12} {'min':>12} {'max':>12}  unit")
    for name in names:
        _, key, unit = SCENARIOS[name]
        stats = _stats(runs, name, key)
        report["scenarios"][name] = {"headline": key, **(stats or {}), "runs": runs[name]}
        if stats:
            print(f"{name:<22} {_fmt(stats['median']):>12} {_fmt(stats['min']):>12} {_fmt(stats['max']):>12}  {unit}")
        else:
            print(f"{name:<22} {'(no result)':>12}")
    report["targets"] = verdicts(runs)
    print(f"\n{'target':<28} {'median':>10} {'min-max':>22} {'baseline':>10} {'ratio':>7}  {'target':<28} met")
    for row in report["targets"]:
        spread = f"{_fmt(row['min'])}-{_fmt(row['max'])}"
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        print(
            f"{row['label']:<28} {_fmt(row['median']):>10} {spread:>22} {_fmt(row['baseline_median']):>10}"
            f" {ratio:>7}  {row['target']:<28} {met}"
        )
    path = write_results(report, args.out)
    print(f"\nresults: {path}")
    return 1 if any(n in failures for n in names if n != "synapse") else 0


if __name__ == "__main__":
    sys.exit(main())
