"""The scenarios P1-P9, their same-run baselines and the Synapse peer comparison.

Each function runs one measurement and returns a dict of figures; the key
named in :data:`SCENARIOS` is its headline. Sizes come from :class:`Sizes`
(``Sizes.smoke()`` for the test suite's tiny run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from protocol import codec
from protocol.client.http import open_connection

from .common import LOAD_CPU, RELAY_CPU, ROOT, BenchDevice, Relay, cpu_seconds, make_device, pinned

PAYLOAD_BYTES = 200
# Addresses name the relay; by default that is host:port, which changes on restart.
FIXED_NAME = {"TETHERLESS_NAME": "bench.invalid"}


@dataclass
class Sizes:
    """How big each scenario is. The defaults are the issue's sizes; ``smoke()`` shrinks all of them."""

    h2load_requests: int = 20_000
    send_seconds: float = 5.0
    raw_sqlite_seconds: float = 5.0
    delivery_devices: int = 100
    delivery_per_device: int = 2_000
    latency_rate: float = 1_000.0
    latency_seconds: float = 5.0
    backlog: int = 1_000_000
    idle_streams: int = 10_000
    idle_seconds: float = 5.0
    mixed_seconds: float = 600.0
    overhead_envelopes: int = 50_000
    synapse_td_n: int = 1_000
    synapse_lat_n: int = 100

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            h2load_requests=500,
            send_seconds=0.5,
            raw_sqlite_seconds=0.3,
            delivery_devices=3,
            delivery_per_device=200,
            latency_rate=200.0,
            latency_seconds=1.0,
            backlog=3_000,
            idle_streams=20,
            idle_seconds=0.5,
            mixed_seconds=2.0,
            overhead_envelopes=500,
        )


SIZES = Sizes()


# -- helpers ---------------------------------------------------------------------------------


def h2load(url: str, *, n: int, c: int, m: int, data: Path | None = None) -> float:
    import re

    if not shutil.which("h2load"):
        raise RuntimeError("h2load not found (Debian package nghttp2-client)")
    cmd = ["h2load", "-n", str(n), "-c", str(c), "-m", str(m)]
    if data:
        cmd += ["-d", str(data)]
    out = subprocess.run(pinned([*cmd, url], LOAD_CPU), capture_output=True, text=True, check=True).stdout
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", out)
    if not done or int(done.group(4)) != n:
        raise RuntimeError(f"h2load: not every request succeeded:\n{out}")
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    assert rate, out
    return float(rate.group(1))


def load(mode: str, url: str, **options: Any) -> dict[str, Any]:
    """Run ``bench.load MODE`` pinned to the load core; its last stdout line is JSON."""
    cmd = [sys.executable, "-m", "bench.load", mode, "--url", url]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(pinned(cmd, LOAD_CPU), capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def devices(relay: Relay, count: int) -> list[BenchDevice]:
    async def make() -> list[BenchDevice]:
        async with open_connection(relay.url) as conn:
            return [await make_device(conn, f"d{i}") for i in range(count)]

    return trio.run(make)


def fill(
    relay: Relay, sender: BenchDevice, recipients: list[BenchDevice], per_recipient: int, batch: int = 1000
) -> None:
    """Store ``per_recipient`` envelopes for each recipient through the API (batches of ``batch``)."""

    async def run() -> None:
        headers = [("content-type", codec.MSGPACK), ("authorization", f"Bearer {sender.token}")]
        rows = [r.address for r in recipients for _ in range(per_recipient)]
        async with open_connection(relay.url) as conn:
            for start in range(0, len(rows), batch):
                envelopes = [
                    {"recipient": address, "idempotency_key": b"f%09d" % (start + i), "ciphertext": os.urandom(200)}
                    for i, address in enumerate(rows[start : start + batch])
                ]
                resp = await conn.request("POST", "/v1/messages", codec.encode({"envelopes": envelopes}), headers)
                assert resp.status == 201, resp.status

    trio.run(run)


def write_tokens(tokens: list[Any]) -> Path:
    fd, name = tempfile.mkstemp(prefix="tetherless-tokens-", suffix=".json")
    os.write(fd, json.dumps(tokens).encode())
    os.close(fd)
    return Path(name)


def fake_sessions(relay: Relay, count: int) -> list[str]:
    """Insert ``count`` devices with sessions straight into the relay's database; returns their tokens.

    Registering 10,000 devices through the API would measure signature
    checks for minutes; a stream only needs a valid session.
    """
    now = int(time.time() * 1000)
    conn = sqlite3.connect(relay.data / "relay.sqlite3", timeout=30)
    tokens = [f"tls1_bench{i:08d}" for i in range(count)]
    with conn:
        conn.execute("INSERT INTO accounts VALUES ('benchacct', ?, 1)", (now,))
        conn.executemany(
            "INSERT INTO devices (device_id, account_id, sign_key, box_key, created_at_ms)"
            " VALUES (?, 'benchacct', x'00', x'00', ?)",
            [(f"dev{i:08d}", now) for i in range(count)],
        )
        conn.executemany(
            "INSERT INTO sessions VALUES (?, ?, 'benchacct', ?, ?, NULL)",
            [(hashlib.sha256(t.encode()).digest(), f"dev{i:08d}", now, now + 3_600_000) for i, t in enumerate(tokens)],
        )
    conn.close()
    return tokens


# -- baselines -------------------------------------------------------------------------------


def _h2load_post(module: str) -> dict[str, Any]:
    """h2load POSTing 1 KiB to ``python -m MODULE`` (which prints "listening PORT"); rate and its CPU per request."""
    with tempfile.NamedTemporaryFile() as body:
        body.write(os.urandom(1024))
        body.flush()
        cmd = pinned([sys.executable, "-m", module], RELAY_CPU)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            assert line[:1] == ["listening"], line
            cpu_before = cpu_seconds(proc.pid)
            rate = h2load(f"http://127.0.0.1:{line[1]}/", n=SIZES.h2load_requests, c=4, m=16, data=Path(body.name))
            cpu = cpu_seconds(proc.pid) - cpu_before
        finally:
            proc.terminate()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
    return {"requests_per_second": rate, "server_cpu_us_per_request": 1e6 * cpu / SIZES.h2load_requests}


def bare_post() -> dict[str, Any]:
    """h2load POSTing 1 KiB to a bare trio+h2 responder (the request-path baseline)."""
    return _h2load_post("bench.bare_h2")


def transport_post() -> dict[str, Any]:
    """The same POSTs to the relay's transport with an application that answers at once (no routing, no store)."""
    return _h2load_post("bench.transport_only")


def relay_livez() -> dict[str, Any]:
    relay = Relay()
    try:
        return {"requests_per_second": h2load(relay.url + "/livez", n=SIZES.h2load_requests, c=4, m=16)}
    finally:
        relay.close()


def raw_sqlite_batch100() -> dict[str, Any]:
    """The rows of P2 through plain sqlite3 executemany into the relay's schema and PRAGMAs, 100 per commit."""
    from relay.store.inbox_rules import key_hash
    from relay.store.sqlite import _connect, migrate

    directory = Path(tempfile.mkdtemp(prefix="tetherless-raw-"))
    try:
        conn = _connect(directory / "raw.sqlite3", 64)
        migrate(conn)
        # The relay's rows (migration 0009): recipients by devices.device_no, explicit cursors, each key a
        # 12-byte hash pointing at its inbox row, one expiry-bucket upsert per batch.
        recipients = list(range(1, 101))
        rows = n = 0
        started = time.perf_counter()
        while time.perf_counter() - started < SIZES.raw_sqlite_seconds:
            conn.execute("BEGIN IMMEDIATE")
            batch = [
                (rows + i + 1, recipients[(n * 7 + i) % 100], os.urandom(16), 1, 2**40, os.urandom(200))
                for i in range(100)
            ]
            conn.executemany(
                "INSERT INTO inbox (seq, recipient_no, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                batch,
            )
            conn.executemany(
                "INSERT INTO idempotency_refs (key_hash, recipient_no, seq) VALUES (?, ?, ?)",
                [(key_hash("s" * 32, b"%09d%03d" % (n, i)), row[1], row[0]) for i, row in enumerate(batch)],
            )
            conn.execute(
                "INSERT INTO inbox_expiry_buckets (expiry_hour, first_seq, last_seq) VALUES (1, ?, ?)"
                " ON CONFLICT (expiry_hour) DO UPDATE SET last_seq = excluded.last_seq",
                (batch[0][0], batch[-1][0]),
            )
            conn.execute("COMMIT")
            rows += 100
            n += 1
        elapsed = time.perf_counter() - started
        conn.close()
        return {"envelopes_per_second": rows / elapsed}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def raw_stream() -> dict[str, Any]:
    """Baseline for P3: a raw trio writer of the same framed items to the same number of readers."""
    port = 19000 + os.getpid() % 1000
    proc = subprocess.Popen(pinned([sys.executable, "-m", "bench.raw_stream", "serve", str(port)], RELAY_CPU), cwd=ROOT)
    try:
        time.sleep(0.8)
        cmd = [sys.executable, "-m", "bench.raw_stream", "read", str(port)]
        cmd += ["--streams", str(SIZES.delivery_devices), "--expect", str(SIZES.delivery_per_device)]
        out = subprocess.run(pinned(cmd, LOAD_CPU), capture_output=True, text=True, check=True, cwd=ROOT).stdout
        result = dict(json.loads(out.strip().splitlines()[-1]))
    finally:
        proc.terminate()
        proc.wait()
    result["envelopes_per_second"] = result["received"] / result["seconds"]
    return result


# -- P1, P2: durable sends ---------------------------------------------------------------------


def _send(batch: int, recipients: int, concurrency: int, connections: int) -> dict[str, Any]:
    relay = Relay()
    try:
        devs = devices(relay, recipients + 1)
        sender, targets = devs[0], devs[1:]
        recipient_list = ",".join(d.address for d in targets)
        # Warm-up: a short run that fills caches and JITs nothing, but opens files and pages.
        load(
            "send",
            relay.url,
            token=sender.token,
            recipients=recipient_list,
            batch=batch,
            concurrency=concurrency,
            connections=connections,
            seconds=min(1.0, SIZES.send_seconds),
            prefix="warm",
        )
        cpu_before = relay.cpu()
        result = load(
            "send",
            relay.url,
            token=sender.token,
            recipients=recipient_list,
            batch=batch,
            concurrency=concurrency,
            connections=connections,
            seconds=SIZES.send_seconds,
        )
        relay_cpu = relay.cpu() - cpu_before
        assert result["errors"] == 0, result
        result["envelopes_per_second"] = result["envelopes"] / result["seconds"]
        result["relay_cpu_us_per_envelope"] = 1e6 * relay_cpu / max(1, result["envelopes"])
        result["relay_cpu_share"] = relay_cpu / result["seconds"]
        result["client_cpu_share"] = result["client_cpu_seconds"] / result["seconds"]
        return result
    finally:
        relay.close()


# P1 rates measured so far in this invocation: P4 at a fraction of capacity offers a share of their median.
P1_RATES: list[float] = []


def p1_send_single() -> dict[str, Any]:
    """P1: durable single-envelope sends, one request each, 64 concurrent streams on 4 connections."""
    result = _send(batch=1, recipients=10, concurrency=64, connections=4)
    P1_RATES.append(result["envelopes_per_second"])
    return result


def p2_send_batch100() -> dict[str, Any]:
    """P2: durable batches of 100 envelopes to 100 recipients, 8 requests in flight."""
    return _send(batch=100, recipients=100, concurrency=8, connections=4)


# -- P3, P4: delivery --------------------------------------------------------------------------


def p3_delivery() -> dict[str, Any]:
    """P3: 100 devices open streams at once onto stored inboxes; aggregate delivery rate."""
    relay = Relay()
    try:
        devs = devices(relay, SIZES.delivery_devices + 1)
        sender, receivers = devs[0], devs[1:]
        fill(relay, sender, receivers, SIZES.delivery_per_device)
        tokens = write_tokens([d.token for d in receivers])
        try:
            cpu_before = relay.cpu()
            result = load(
                "streams",
                relay.url,
                tokens_file=tokens,
                expect=SIZES.delivery_per_device,
                connections=min(10, len(receivers)),
                seconds=120,
            )
            relay_cpu = relay.cpu() - cpu_before
        finally:
            tokens.unlink()
        assert result["received"] >= SIZES.delivery_per_device * len(receivers), result
        result["envelopes_per_second"] = result["received"] / result["seconds"]
        result["relay_cpu_us_per_envelope"] = 1e6 * relay_cpu / result["received"]
        return result
    finally:
        relay.close()


def _latency(relay: Relay, sender: BenchDevice, receiver: BenchDevice, rate: float) -> dict[str, Any]:
    result = load(
        "latency",
        relay.url,
        token=sender.token,
        recipients=receiver.address,
        receiver_token=receiver.token,
        rate=rate,
        seconds=SIZES.latency_seconds,
    )
    assert result["errors"] == 0, result
    assert result["measured"] > 0, result
    return result


def p4_latency() -> dict[str, Any]:
    """P4: end-to-end latency, send start → arrival on the recipient's stream, at a fixed send rate."""
    relay = Relay()
    try:
        sender, receiver = devices(relay, 2)
        return _latency(relay, sender, receiver, SIZES.latency_rate)
    finally:
        relay.close()


P4_CAPACITY_SHARE = 0.4


def p4_latency_at_40pct() -> dict[str, Any]:
    """P4 at 40 % of this run's P1 capacity (open loop), so a slow host measures latency, not a full queue.

    The capacity is the median of the P1 runs of this invocation; without
    one (``--only p4_latency_at_40pct``) it is measured here first, with
    P1's load on this scenario's own relay.
    """
    relay = Relay()
    try:
        sender, receiver, *targets = devices(relay, 12)
        if P1_RATES:
            capacity, source = statistics.median(P1_RATES), "p1_send_single"
        else:
            measured = load(
                "send",
                relay.url,
                token=sender.token,
                recipients=",".join(d.address for d in targets),
                batch=1,
                concurrency=64,
                connections=4,
                seconds=SIZES.send_seconds,
                prefix="cap",
            )
            assert measured["errors"] == 0, measured
            capacity, source = measured["envelopes"] / measured["seconds"], "measured here"
        rate = P4_CAPACITY_SHARE * capacity
        cpu_before = relay.cpu()
        result = _latency(relay, sender, receiver, rate)
        # Sends and their delivery to the stream: what one envelope costs the relay at this load.
        result["relay_cpu_us_per_envelope"] = 1e6 * (relay.cpu() - cpu_before) / result["sent"]
        return {**result, "p1_capacity": capacity, "capacity_source": source, "capacity_share": P4_CAPACITY_SHARE}
    finally:
        relay.close()


# -- P5, P9: 1,000,000-envelope backlog --------------------------------------------------------


def _page_query(conn: sqlite3.Connection, device: str, after: int, limit: int) -> list[Any]:
    return conn.execute(
        "SELECT seq, envelope_id, sent_at_ms, expires_at_ms, ciphertext FROM inbox"
        " WHERE recipient_no = (SELECT device_no FROM devices WHERE device_id = ?) AND seq > ? AND expires_at_ms > ?"
        " ORDER BY seq LIMIT ?",
        (device, after, int(time.time() * 1000), limit),
    ).fetchall()


def p5_p9_backlog() -> dict[str, Any]:
    """P5 + P9: a backlog of ``SIZES.backlog`` envelopes for one device.

    The rows are inserted with plain sqlite3 into the relay's database while
    it is stopped (1,000,000 through the API would take a minute), then:
    the raw read-back of the same pages (baseline), the relay restart to
    ready (P9; baseline: start on an empty data directory, same run) and the
    paged catch-up through the API (P5, 1,000 per page).
    """
    empty = Relay()
    empty_start = empty.start_seconds
    empty.close()
    relay = Relay()
    try:
        (receiver,) = devices(relay, 1)
        relay.close(keep_data=True)
        conn = sqlite3.connect(relay.data / "relay.sqlite3")
        expires = int(time.time() * 1000) + 86_400_000
        payload = os.urandom(PAYLOAD_BYTES)
        with conn:
            for start in range(0, SIZES.backlog, 10_000):
                conn.executemany(
                    "INSERT INTO inbox (recipient_no, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
                    " VALUES ((SELECT device_no FROM devices WHERE device_id = ?), ?, 1, ?, ?)",
                    (
                        (receiver.device_id, os.urandom(16), expires, payload)
                        for _ in range(min(10_000, SIZES.backlog - start))
                    ),
                )
            conn.execute("UPDATE devices SET queued = ? WHERE device_id = ?", (SIZES.backlog, receiver.device_id))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # Baseline: the same pages with plain sqlite3.
        started, cpu_started = time.perf_counter(), time.process_time()
        after = got = 0
        while True:
            rows = _page_query(conn, receiver.device_id, after, 1001)
            page = rows[:1000]
            got += len(page)
            if len(rows) <= 1000:
                break
            after = page[-1][0]
        raw_seconds, raw_cpu = time.perf_counter() - started, time.process_time() - cpu_started
        conn.close()
        assert got == SIZES.backlog
        db_bytes = relay.db_bytes()
        relay = Relay(relay.env, relay.dir)

        # The client asking for a page only after decoding the last one (sequential), then pipelined (the
        # headline: bench/load.py pages_load); each pass through the whole backlog on the same relay.
        cpu_before = relay.cpu()
        sequential = load("pages", relay.url, token=receiver.token, limit=1000, pipeline=0)
        sequential_cpu = relay.cpu() - cpu_before
        cpu_before = relay.cpu()
        paged = load("pages", relay.url, token=receiver.token, limit=1000, pipeline=1)
        relay_cpu = relay.cpu() - cpu_before
        assert paged["received"] == sequential["received"] == SIZES.backlog, (paged, sequential)
        seconds = paged["seconds"]
        return {
            "backlog": SIZES.backlog,
            "envelopes_per_second": SIZES.backlog / seconds,
            "sequential_envelopes_per_second": SIZES.backlog / sequential["seconds"],
            "raw_sqlite_envelopes_per_second": SIZES.backlog / raw_seconds,
            "relay_cpu_share": relay_cpu / seconds,
            "relay_cpu_us_per_envelope": relay_cpu / SIZES.backlog * 1e6,
            "sequential_relay_cpu_us_per_envelope": sequential_cpu / SIZES.backlog * 1e6,
            "raw_sqlite_cpu_us_per_envelope": raw_cpu / SIZES.backlog * 1e6,
            "client_cpu_share": paged["client_cpu_seconds"] / seconds,
            "restart_seconds": relay.start_seconds,
            "empty_start_seconds": empty_start,
            "db_bytes": db_bytes,
        }
    finally:
        relay.close()


# -- P6: idle streams --------------------------------------------------------------------------


def p6_idle_streams() -> dict[str, Any]:
    """P6: RSS and CPU of the relay holding ``SIZES.idle_streams`` idle streams (baseline: same relay before)."""
    relay = Relay()
    try:
        tokens = write_tokens(fake_sessions(relay, SIZES.idle_streams))
        rss_before = relay.rss_kib()
        cmd = [sys.executable, "-m", "bench.load", "streams", "--url", relay.url, "--tokens-file", str(tokens)]
        cmd += [
            "--expect",
            "0",
            "--hold",
            "600",
            "--seconds",
            "900",
            "--connections",
            str(max(1, SIZES.idle_streams // 80)),
        ]
        proc = subprocess.Popen(pinned(cmd, LOAD_CPU), stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line == "READY", line
            time.sleep(1.0)  # let the open bursts settle
            cpu_before, wall_before = relay.cpu(), time.perf_counter()
            time.sleep(SIZES.idle_seconds)
            idle_cpu = (relay.cpu() - cpu_before) / (time.perf_counter() - wall_before)
            rss_after = relay.rss_kib()
        finally:
            proc.terminate()
            proc.wait()
            tokens.unlink()
        return {
            "streams": SIZES.idle_streams,
            "rss_mib": rss_after / 1024,
            "rss_before_mib": rss_before / 1024,
            "kib_per_stream": (rss_after - rss_before) / SIZES.idle_streams,
            "idle_cpu_share": idle_cpu,
        }
    finally:
        relay.close()


# -- P7: mixed sustained load ------------------------------------------------------------------


def p7_mixed() -> dict[str, Any]:
    """P7: paced sends (5,000 env/s) to 20 streaming, acknowledging devices plus paging and probes; RSS sampled."""
    relay = Relay()
    try:
        devs = devices(relay, 21)
        sender, receivers = devs[0], devs[1:]
        tokens = write_tokens([[d.token, d.address] for d in receivers])
        cmd = [sys.executable, "-m", "bench.load", "mixed", "--url", relay.url, "--token", sender.token]
        cmd += ["--tokens-file", str(tokens), "--rate", "5000", "--seconds", str(SIZES.mixed_seconds)]
        proc = subprocess.Popen(pinned(cmd, LOAD_CPU), stdout=subprocess.PIPE, text=True, cwd=ROOT)
        samples: list[tuple[float, int]] = []
        started = time.perf_counter()
        interval = max(0.2, SIZES.mixed_seconds / 60)
        while proc.poll() is None:
            samples.append((time.perf_counter() - started, relay.rss_kib()))
            time.sleep(interval)
        out, _ = proc.communicate()
        tokens.unlink()
        result = dict(json.loads(out.strip().splitlines()[-1]))
        # Flatness: RSS in the last quarter vs the second quarter (after warm-up).
        rss = [kib for _, kib in samples]
        quarter = max(1, len(rss) // 4)
        result["rss_mib_series"] = [round(kib / 1024, 1) for kib in rss]
        result["rss_mib_q2"] = max(rss[quarter : 2 * quarter] or rss) / 1024
        result["rss_mib_end"] = max(rss[-quarter:]) / 1024
        result["rss_growth_ratio"] = result["rss_mib_end"] / result["rss_mib_q2"]
        result["envelopes_per_second"] = result["sent"] / result["seconds"]
        return result
    finally:
        relay.close()


# -- P8: storage overhead ----------------------------------------------------------------------


def p8_storage() -> dict[str, Any]:
    """P8: bytes on disk per stored envelope beyond its 200-byte ciphertext (sent through the API)."""
    relay = Relay(FIXED_NAME)
    try:
        devs = devices(relay, 11)
        relay = relay.restart()
        size_before = relay.db_bytes()
        fill(relay, devs[0], devs[1:], SIZES.overhead_envelopes // 10, batch=100)
        relay.close(keep_data=True)  # the last connection checkpoints and removes the WAL
        size_after = relay.db_bytes()
        conn = sqlite3.connect(relay.data / "relay.sqlite3")
        by_table = dict(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall())
        conn.close()
        per = (size_after - size_before) / SIZES.overhead_envelopes
        envelope_objects = ("inbox", "inbox_recipient", "inbox_expiry", "inbox_expiry_buckets")
        idem_objects = ("idempotency_keys", "idempotency_keys_forget", "idempotency_refs")
        return {
            "envelopes": SIZES.overhead_envelopes,
            "bytes_per_envelope": per,
            "overhead_bytes_per_envelope": per - PAYLOAD_BYTES,
            "envelope_table_bytes_per_envelope": sum(by_table.get(k, 0) for k in envelope_objects)
            / SIZES.overhead_envelopes,
            "idempotency_bytes_per_envelope": sum(by_table.get(k, 0) for k in idem_objects) / SIZES.overhead_envelopes,
            "bytes_by_object": by_table,
        }
    finally:
        relay.close()


# -- the peer: Synapse ---------------------------------------------------------------------------


def synapse_dir() -> Path | None:
    """Where Synapse was installed by /work/shared/peers/synapse/setup.sh (outside the repository), if anywhere."""
    candidates = [os.environ.get("TETHERLESS_BENCH_SYNAPSE_DIR", ""), "/work/synapse-peer", "/tmp/synapse"]
    for candidate in candidates:
        if (
            candidate
            and (Path(candidate) / "venv/bin/python").exists()
            and (Path(candidate) / "homeserver.yaml").exists()
        ):
            return Path(candidate)
    return None


def synapse_bench_script(directory: Path) -> Path | None:
    for candidate in (
        os.environ.get("TETHERLESS_BENCH_SYNAPSE_SCRIPT", ""),
        str(directory / "bench.py"),
        "/work/shared/peers/synapse/bench.py",
    ):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


def synapse() -> dict[str, Any]:
    """Synapse to-device send rate (conc 8) and to-device end-to-end latency, Synapse pinned like the relay."""
    directory = synapse_dir()
    script = synapse_bench_script(directory) if directory else None
    if directory is None or script is None:
        return {
            "skipped": "Synapse not installed (run /work/shared/peers/synapse/setup.sh DIR, "
            "or set TETHERLESS_BENCH_SYNAPSE_DIR)"
        }
    python = str(directory / "venv/bin/python")
    proc = subprocess.Popen(
        pinned([python, "-m", "synapse.app.homeserver", "-c", "homeserver.yaml"], RELAY_CPU),
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen("http://127.0.0.1:8008/_matrix/client/versions", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("synapse did not start")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "synapse.txt"
            cmd = [
                python,
                str(script),
                "--n",
                "100",
                "--conc",
                "8",
                "--warmup",
                "20",
                "--td-n",
                str(SIZES.synapse_td_n),
                "--td-conc",
                "8",
                "--lat-n",
                str(SIZES.synapse_lat_n),
                "--config",
                str(directory / "homeserver.yaml"),
                "--pid",
                str(proc.pid),
                "--out",
                str(out),
            ]
            subprocess.run(pinned(cmd, LOAD_CPU), capture_output=True, text=True, check=True)
            raw = next(line for line in out.read_text().splitlines() if line.startswith("RAW "))
        res = json.loads(raw[4:])
        send = res["todevice_send"]
        e2e = res["e2e"]["todevice"]["e2e"]
        return {
            "todevice_messages_per_second": send["msgs_per_s"],
            "todevice_send_p50_ms": send["p50_ms"],
            "todevice_send_p99_ms": send["p99_ms"],
            "todevice_e2e_p50_ms": e2e["p50_ms"],
            "todevice_e2e_p99_ms": e2e["p99_ms"],
            "server_cpu_ms_per_message": 1000 * send["server_cpu_s"] / send["n"],
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# name -> (function, headline key, unit)
SCENARIOS: dict[str, tuple[Callable[[], dict[str, Any]], str, str]] = {
    "bare_post": (bare_post, "requests_per_second", "req/s"),
    "transport_post": (transport_post, "requests_per_second", "req/s"),
    "relay_livez": (relay_livez, "requests_per_second", "req/s"),
    "p1_send_single": (p1_send_single, "envelopes_per_second", "env/s"),
    "raw_sqlite_batch100": (raw_sqlite_batch100, "envelopes_per_second", "env/s"),
    "p2_send_batch100": (p2_send_batch100, "envelopes_per_second", "env/s"),
    "raw_stream": (raw_stream, "envelopes_per_second", "env/s"),
    "p3_delivery": (p3_delivery, "envelopes_per_second", "env/s"),
    "p4_latency": (p4_latency, "latency_p99_ms", "ms p99"),
    "p4_latency_at_40pct": (p4_latency_at_40pct, "latency_p99_ms", "ms p99"),
    "p5_p9_backlog": (p5_p9_backlog, "envelopes_per_second", "env/s"),
    "p6_idle_streams": (p6_idle_streams, "rss_mib", "MiB RSS"),
    "p7_mixed": (p7_mixed, "rss_growth_ratio", "RSS end/q2"),
    "p8_storage": (p8_storage, "overhead_bytes_per_envelope", "B/env"),
    "synapse": (synapse, "todevice_messages_per_second", "msg/s"),
}
# P7 runs once per invocation (it is long) and only when asked for or --mixed-seconds is given.
ONCE = {"p7_mixed", "synapse"}
