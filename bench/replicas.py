"""Durable send throughput: SQLite vs PostgreSQL with one and three replicas, same run.

    python -m bench.replicas [--seconds S] [--database URL]

``--database`` (default ``TETHERLESS_BENCH_DATABASE`` or the test server) must
allow CREATE DATABASE: each PostgreSQL scenario gets a fresh database. One
load process per replica (``bench.load send``), started together; the figure
is the sum of envelopes answered 201 per second. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import trio

from bench.common import NO_RATE_LIMITS, READY, RESULTS, machine, make_device
from protocol.client.http import open_connection

DEFAULT_DB = "postgresql://tetherless:tetherless@127.0.0.1:5432/tetherless"
RECIPIENTS = 10
SHAPES = {"batched (100/request, conc 8)": (100, 8), "single (1/request, conc 32)": (1, 32)}


def start(data: Path, database: str, relay_key: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    data.mkdir(parents=True, mode=0o700)
    if relay_key is not None:
        shutil.copy2(relay_key, data / "relay.key")
    cmd = [sys.executable, "-m", "tetherless_cli", "serve", "--data", str(data), "--listen", "127.0.0.1:0"]
    cmd += ["--name", "bench.test", "--log-level", "warning"] + (["--database", database] if database else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **NO_RATE_LIMITS}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = READY.search(line.decode())
        if match:
            return proc, match.group(1)
    raise RuntimeError("relay did not start")


async def devices(url: str) -> tuple[str, list[str]]:
    async with open_connection(url) as conn:
        sender = await make_device(conn, "sender")
        recipients = [await make_device(conn, f"r{i}") for i in range(RECIPIENTS)]
    return sender.token, [r.address for r in recipients]


def scenario(name: str, database: str, replicas: int, seconds: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tetherless-bench-replicas-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        urls = []
        for i in range(replicas):
            proc, url = start(tmp / f"r{i}", database, tmp / "r0" / "relay.key" if i else None)
            procs.append(proc)
            urls.append(url)
        token, recipients = trio.run(devices, urls[0])
        results: dict[str, Any] = {}
        for shape, (batch, concurrency) in SHAPES.items():
            loads = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.load",
                        "send",
                        "--url",
                        url,
                        "--token",
                        token,
                        "--recipients",
                        ",".join(recipients),
                        "--batch",
                        str(batch),
                        "--concurrency",
                        str(max(1, concurrency // replicas)),
                        "--connections",
                        "2",
                        "--seconds",
                        str(seconds),
                        "--prefix",
                        f"{uuid.uuid4().hex[:6]}{i}",
                    ],
                    stdout=subprocess.PIPE,
                )
                for i, url in enumerate(urls)
            ]
            outs = [json.loads(load.communicate()[0]) for load in loads]
            sent = sum(o["envelopes"] for o in outs)
            elapsed = max(o["seconds"] for o in outs)
            results[shape] = {
                "envelopes_per_second": round(sent / elapsed),
                "errors": sum(o["errors"] for o in outs),
                "latency_p50_ms": max(o["latency_p50_ms"] or 0 for o in outs),
                "latency_p99_ms": max(o["latency_p99_ms"] or 0 for o in outs),
            }
        return {"name": name, "replicas": replicas, **results}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def fresh_database(admin: str) -> str:
    name = f"tl_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(admin)._replace(path="/" + name))


def drop_database(admin: str, url: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--database", default=os.environ.get("TETHERLESS_BENCH_DATABASE", DEFAULT_DB))
    args = parser.parse_args()
    rows = [scenario("sqlite", "", 1, args.seconds)]
    for replicas in (1, 3):
        url = fresh_database(args.database)
        try:
            rows.append(scenario(f"postgres x{replicas}", url, replicas, args.seconds))
        finally:
            drop_database(args.database, url)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / time.strftime("replicas-%Y%m%dT%H%M%SZ.json", time.gmtime())
    path.write_text(json.dumps({"machine": machine(), "seconds": args.seconds, "rows": rows}, indent=2) + "\n")
    print(f"{'store':<14}" + "".join(f"{shape:>34}" for shape in SHAPES))
    for row in rows:
        cells = "".join(
            f"{row[s]['envelopes_per_second']:>14} env/s p99 {row[s]['latency_p99_ms']:>7.1f} ms" for s in SHAPES
        )
        print(f"{row['name']:<14}{cells}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
