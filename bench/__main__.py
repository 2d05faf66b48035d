"""Tetherless benchmarks: ``python -m bench [--runs N] [--only NAME,...] [--out FILE]``.

Every scenario starts its own relay (fresh data dir, pinned to core 0 when
taskset exists) and its load generator in separate processes (core 1), and
every figure is reported with a baseline measured in the same run:

- ``bare_post``: h2load POSTing 1 KiB to a bare trio+h2 responder (bench/bare_h2.py);
- ``relay_livez``: h2load GET /livez against the relay (transport + routing only);
- ``send_single``: durable single-envelope sends, one request each, 64 concurrent streams;
- ``send_batch100``: durable batches of 100 envelopes to 100 recipients;
- ``raw_sqlite_batch100``: the same rows inserted with plain sqlite3 executemany into the relay's schema;
- ``stream_delivery``: one streaming device receiving 20,000 envelopes sent in batches of 100;
- ``catch_up``: paging through a backlog of 20,000 envelopes (1,000 per page).

Results: a table on stdout and JSON in bench/results/. Medians of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from protocol import codec
from protocol.client.http import open_connection
from protocol.messages import InboxPage

from .common import LOAD_CPU, RELAY_CPU, ROOT, BenchDevice, Relay, machine, make_device, pinned, summary, write_results

H2LOAD_RATE = re.compile(r"finished in [\d.]+m?s, ([\d.]+) req/s")
H2LOAD_DONE = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)


def h2load(url: str, *, n: int, c: int, m: int, data: Path | None = None, headers: list[str] | None = None) -> float:
    if not shutil.which("h2load"):
        raise RuntimeError("h2load not found (Debian package nghttp2-client)")
    cmd = ["h2load", "-n", str(n), "-c", str(c), "-m", str(m)]
    if data:
        cmd += ["-d", str(data)]
    for header in headers or []:
        cmd += ["-H", header]
    out = subprocess.run(pinned([*cmd, url], LOAD_CPU), capture_output=True, text=True, check=True).stdout
    done = H2LOAD_DONE.search(out)
    if not done or int(done.group(4)) != n:
        raise RuntimeError(f"h2load: not every request succeeded:\n{out}")
    rate = H2LOAD_RATE.search(out)
    assert rate, out
    return float(rate.group(1))


def load(mode: str, relay: Relay, token: str, **options: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.load", mode, "--url", relay.url, "--token", token]
    for key, value in options.items():
        cmd += [f"--{key}", str(value)]
    out = subprocess.run(pinned(cmd, LOAD_CPU), capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def devices(relay: Relay, count: int) -> list[BenchDevice]:
    async def make() -> list[BenchDevice]:
        async with open_connection(relay.url) as conn:
            return [await make_device(conn, f"d{i}") for i in range(count)]

    return trio.run(make)


# -- scenarios (each returns one run's figures) -----------------------------------------------


def bare_post() -> dict[str, Any]:
    with tempfile.NamedTemporaryFile() as body:
        body.write(os.urandom(1024))
        body.flush()
        port = 18000 + os.getpid() % 1000
        proc = subprocess.Popen(pinned([sys.executable, "-m", "bench.bare_h2", str(port)], RELAY_CPU), cwd=ROOT)
        try:
            time.sleep(0.8)
            rate = h2load(f"http://127.0.0.1:{port}/", n=20000, c=4, m=16, data=Path(body.name))
        finally:
            proc.terminate()
            proc.wait()
    return {"requests_per_second": rate}


def relay_livez() -> dict[str, Any]:
    relay = Relay()
    try:
        return {"requests_per_second": h2load(relay.url + "/livez", n=20000, c=4, m=16)}
    finally:
        relay.close()


def _send(batch: int, recipients: int, concurrency: int, seconds: float) -> dict[str, Any]:
    relay = Relay()
    try:
        devs = devices(relay, recipients + 1)
        sender, targets = devs[0], devs[1:]
        cpu_before = relay.cpu()
        result = load(
            "send",
            relay,
            sender.token,
            recipients=",".join(d.address for d in targets),
            batch=batch,
            concurrency=concurrency,
            connections=min(4, concurrency),
            seconds=seconds,
        )
        relay_cpu = relay.cpu() - cpu_before
        assert result["errors"] == 0, result
        result["envelopes_per_second"] = result["envelopes"] / result["seconds"]
        result["relay_cpu_us_per_envelope"] = 1e6 * relay_cpu / max(1, result["envelopes"])
        result["relay_cpu_share"] = relay_cpu / result["seconds"]
        return result
    finally:
        relay.close()


def send_single() -> dict[str, Any]:
    return _send(batch=1, recipients=10, concurrency=64, seconds=5)


def send_batch100() -> dict[str, Any]:
    return _send(batch=100, recipients=100, concurrency=8, seconds=5)


def raw_sqlite_batch100() -> dict[str, Any]:
    """Baseline for send_batch100: the same rows through plain sqlite3 into the relay's schema, FULL + WAL."""
    from relay.store.sqlite import _connect, migrate

    directory = Path(tempfile.mkdtemp(prefix="tetherless-raw-"))
    try:
        conn = _connect(directory / "raw.sqlite3", 64)
        migrate(conn)
        recipients = [f"{i:032d}" for i in range(100)]
        rows = 0
        started = time.perf_counter()
        n = 0
        while time.perf_counter() - started < 5:
            conn.execute("BEGIN IMMEDIATE")
            batch = [(recipients[(n * 7 + i) % 100], os.urandom(16), 1, 2**40, os.urandom(200)) for i in range(100)]
            conn.executemany(
                "INSERT INTO envelopes (recipient, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
                " VALUES (?, ?, ?, ?, ?)",
                batch,
            )
            conn.executemany(
                "INSERT INTO idempotency (sender, idem_key, envelope_id, digest, sent_at_ms, forget_at_ms)"
                " VALUES ('s', ?, ?, ?, 1, 2)",
                [(b"%09d%03d" % (n, i), row[1], row[1]) for i, row in enumerate(batch)],
            )
            conn.execute("COMMIT")
            rows += 100
            n += 1
        elapsed = time.perf_counter() - started
        conn.close()
        return {"envelopes_per_second": rows / elapsed}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def stream_delivery() -> dict[str, Any]:
    total = 20000
    relay = Relay()
    try:
        sender, receiver = devices(relay, 2)
        cmd = [
            sys.executable,
            "-m",
            "bench.load",
            "stream",
            "--url",
            relay.url,
            "--token",
            receiver.token,
            "--expect",
            str(total),
            "--seconds",
            "60",
        ]
        proc = subprocess.Popen(pinned(cmd, LOAD_CPU), stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"

        async def send_all() -> None:
            headers = [("content-type", codec.MSGPACK), ("authorization", f"Bearer {sender.token}")]
            async with open_connection(relay.url) as conn:
                for n in range(total // 100):
                    envelopes = [
                        {
                            "recipient": receiver.address,
                            "idempotency_key": b"s%06di%03d" % (n, i),
                            "ciphertext": os.urandom(200),
                        }
                        for i in range(100)
                    ]
                    resp = await conn.request("POST", "/v1/messages", codec.encode({"envelopes": envelopes}), headers)
                    assert resp.status == 201

        trio.run(send_all)
        out, _ = proc.communicate(timeout=120)
        result = dict(json.loads(out.strip().splitlines()[-1]))
        assert result["received"] == total, result
        result["envelopes_per_second"] = total / result["seconds"]
        return result
    finally:
        relay.close()


def catch_up() -> dict[str, Any]:
    total = 20000
    relay = Relay()
    try:
        sender, receiver = devices(relay, 2)

        async def run() -> float:
            send_headers = [("content-type", codec.MSGPACK), ("authorization", f"Bearer {sender.token}")]
            read_headers = [("accept", codec.MSGPACK), ("authorization", f"Bearer {receiver.token}")]
            async with open_connection(relay.url) as conn:
                for n in range(total // 1000):
                    envelopes = [
                        {
                            "recipient": receiver.address,
                            "idempotency_key": b"c%06di%04d" % (n, i),
                            "ciphertext": os.urandom(200),
                        }
                        for i in range(1000)
                    ]
                    resp = await conn.request(
                        "POST", "/v1/messages", codec.encode({"envelopes": envelopes}), send_headers
                    )
                    assert resp.status == 201
                started = time.perf_counter()
                after, got = 0, 0
                while True:
                    resp = await conn.request("GET", f"/v1/inbox?after={after}&limit=1000", None, read_headers)
                    page = codec.decode(resp.body, InboxPage)
                    got += len(page.envelopes)
                    after = page.next_cursor
                    if not page.more:
                        break
                assert got == total
                return time.perf_counter() - started

        seconds = trio.run(run)
        return {"envelopes_per_second": total / seconds, "seconds": seconds}
    finally:
        relay.close()


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "bare_post": bare_post,
    "relay_livez": relay_livez,
    "send_single": send_single,
    "raw_sqlite_batch100": raw_sqlite_batch100,
    "send_batch100": send_batch100,
    "stream_delivery": stream_delivery,
    "catch_up": catch_up,
}
HEADLINE = {
    "bare_post": "requests_per_second",
    "relay_livez": "requests_per_second",
    "send_single": "envelopes_per_second",
    "raw_sqlite_batch100": "envelopes_per_second",
    "send_batch100": "envelopes_per_second",
    "stream_delivery": "envelopes_per_second",
    "catch_up": "envelopes_per_second",
}
RATIOS = [
    ("relay_livez", "bare_post", "relay GET /livez vs bare trio+h2 POST"),
    ("send_single", "bare_post", "durable single sends vs bare trio+h2 POST"),
    ("send_batch100", "raw_sqlite_batch100", "durable batched sends vs raw sqlite3 executemany"),
]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = [n for n in SCENARIOS if not args.only or n in args.only.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    # Interleave scenarios run by run, so that a noisy neighbour hurts all of them alike.
    for run in range(args.runs):
        for name in names:
            print(f"run {run + 1}/{args.runs}: {name} ...", file=sys.stderr, flush=True)
            runs[name].append(SCENARIOS[name]())
    report: dict[str, Any] = {
        "machine": machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scenarios": {},
        "ratios": {},
    }
    print(f"\n{'scenario':<22} {'median':>12} {'min':>12} {'max':>12}  unit")
    for name in names:
        key = HEADLINE[name]
        stats = summary([r[key] for r in runs[name]])
        report["scenarios"][name] = {"headline": key, **stats, "runs": runs[name]}
        print(f"{name:<22} {stats['median']:>12,.0f} {stats['min']:>12,.0f} {stats['max']:>12,.0f}  {key}")
    for a, b, label in RATIOS:
        if a in report["scenarios"] and b in report["scenarios"]:
            ratio = report["scenarios"][a]["median"] / report["scenarios"][b]["median"]
            report["ratios"][f"{a}/{b}"] = ratio
            print(f"ratio {a}/{b}: {ratio:.2f}  ({label})")
    path = write_results(report, args.out)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
