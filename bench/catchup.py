"""Account-log catch-up: ``python -m bench.catchup [--messages N] [--out FILE]`` (docs/account-log.md §14.1).

Builds an account A (devices A1, A2) and B (B1) on a fresh relay, exchanges
``N`` messages (half each way) with the real sync engines, then measures,
in the same run:

- ``bootstrap_cli_s``: a device A3 enrolled afterwards runs ``tetherless sync``
  (the real CLI, a fresh process: start-up, keystore unlock, the whole log read,
  decrypted and stored) while every other device is offline;
- ``engine_records_per_s``: the same catch-up by a further device with the
  engine in-process (records of A's log per second of ``SyncEngine.run``), once
  per run (``--runs``, a fresh device each), with the client's CPU time per record;
- baseline ``raw_records_per_s``: plain ``GET /v1/log`` paging of the same log
  over the same client HTTP/2 stack, without decryption or local storage, right
  after each engine run (interleaved: a noisy neighbour hurts both alike); the
  ratio is taken per run and reported as the median;
- ceiling ``checks_only``: the per-record checks alone (open, Ed25519 signature,
  decode: ``protocol.log.open_signed_record``) over the same records, in the same
  process: no engine can apply the log faster than it checks it;
- ``snapshot``: A1 writes a snapshot at the head (``tetherless log snapshot``), and
  devices A5 (CLI) and A6 (engine) enrolled afterwards bootstrap from it: the same
  history from the parts plus the few records after ``covers``, against the full
  replay of A3/A4 above.

The relay is pinned to core 0 and the client to core 1 when taskset exists.
Results go to bench/results/catchup-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import trio

from protocol import log
from protocol.client.sdk import RelayClient
from protocol.client.store import ClientStore
from protocol.messages import LogRecord

from .common import ROOT, machine, write_results


async def _raw_page_all(relay_url: str, home: Path, keep: list[LogRecord] | None = None) -> tuple[int, float, int]:
    from tests.e2e.offline_client import keystore

    keys = keystore(home).load()
    async with RelayClient.connect(relay_url, keys=keys) as client:
        await client.authenticate()
        started = time.perf_counter()
        after, records, size = 0, 0, 0
        while True:
            page = await client.api.log_page(after=after, limit=500)
            records += len(page.records)
            size += sum(len(r.ciphertext) for r in page.records)
            if keep is not None:
                keep += page.records
            after = page.next_after
            if not page.more:
                break
        return records, time.perf_counter() - started, size


def _checks_only(records: list[LogRecord], store: ClientStore, account_id: str) -> tuple[int, float]:
    """(records checked, seconds): what the engine must do per signed record whatever it stores, with the keys
    and writers a device that caught up accepted (the engine's ceiling; key records are left out)."""
    infos = {i.epoch: i for i in store.epoch_infos()}
    keys = {epoch: store.epoch_key(epoch) for epoch in infos}
    checked = 0
    started = time.perf_counter()
    for record in records:
        key, info = keys.get(record.epoch), infos.get(record.epoch)
        if record.kind == "key" or key is None or info is None or info.record_format < 2:
            continue
        log.open_signed_record(
            key,
            record.ciphertext,
            writers=info.writers,
            account_id=account_id,
            record_id=record.record_id,
            epoch=record.epoch,
            kind=record.kind,
        )
        checked += 1
    return checked, time.perf_counter() - started


def _spread(values: list[float], digits: int = 1) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def run(messages: int, work: Path, runs: int = 3) -> dict[str, Any]:
    os.environ.setdefault("TETHERLESS_PASSPHRASE", "correct horse battery staple")
    os.environ.setdefault("TETHERLESS_INSECURE_KDF", "1")
    from tests.e2e.offline_client import (
        NO_RATE_LIMITS,
        cli,
        enqueue_many,
        init_device,
        link_device,
        load,
        run_engine,
    )
    from tests.relay_process import RelayProcess

    relay = RelayProcess(work / "relay-data", env=NO_RATE_LIMITS)
    relay.start()
    try:
        if relay.proc is not None and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
            os.sched_setaffinity(relay.proc.pid, {0})
            os.sched_setaffinity(0, {1})
        engines = [f"a4-{i}" for i in range(runs)]  # one fresh device per engine run
        homes = {n: work / n for n in ("a1", "a2", "a3", "b1", *engines)}
        a1 = init_device(relay.url, homes["a1"], "a1")
        b1 = init_device(relay.url, homes["b1"], "b1")
        trio.run(link_device, relay.url, homes["a1"], homes["a2"], "a2")
        half = messages // 2
        enqueue_many(homes["b1"], a1.split(".", 1)[1], [f"b1 to a #{i}" for i in range(half)])
        enqueue_many(homes["a1"], b1.split(".", 1)[1], [f"a1 to b #{i}" for i in range(half)])

        async def exchange() -> None:
            for _ in range(6):
                async with trio.open_nursery() as nursery:
                    for name in ("a1", "a2", "b1"):
                        nursery.start_soon(run_engine, homes[name])
                _, _, store = load(homes["a1"])
                if store.message_count() == 2 * half and not store.outbox() and not store.pending_count():
                    return

        started = time.perf_counter()
        trio.run(exchange)
        exchange_s = time.perf_counter() - started
        for name in ("a3", *engines):
            trio.run(link_device, relay.url, homes["a1"], homes[name], name)
        trio.run(run_engine, homes["a1"])  # appends the grants for A3 and the engine devices

        started = time.perf_counter()
        result = cli(homes["a3"], "sync", timeout=600)
        bootstrap_cli_s = time.perf_counter() - started
        assert result.returncode == 0, result.stderr
        _, _, a3_store = load(homes["a3"])
        assert a3_store.message_count() == 2 * half, a3_store.message_count()

        records: list[LogRecord] = []
        raw_records, _, raw_bytes = trio.run(_raw_page_all, relay.url, homes["a1"], records)  # warms the relay
        per_run: list[dict[str, Any]] = []
        for name in engines:
            started, cpu = time.perf_counter(), time.process_time()
            trio.run(run_engine, homes[name])
            engine_s, engine_cpu_s = time.perf_counter() - started, time.process_time() - cpu
            keystore_, keys, store = load(homes[name])
            head = store.cursor("log")
            assert store.message_count() == 2 * half, (name, store.message_count())
            raw_records, raw_s, raw_bytes = trio.run(_raw_page_all, relay.url, homes["a1"])
            checked, checks_s = _checks_only(records, store, keys.account_id)
            store.db.close()
            keystore_.close()
            per_run.append(
                {
                    "engine_s": round(engine_s, 3),
                    "engine_records_per_s": round(head / engine_s, 1),
                    "engine_cpu_us_per_record": round(engine_cpu_s / head * 1e6, 1),
                    "raw_records_per_s": round(raw_records / raw_s, 1),
                    "checks_only_records_per_s": round(checked / checks_s, 1),
                    "ratio": round(head / engine_s / (raw_records / raw_s), 4),
                }
            )
        engine_s = statistics.median(r["engine_s"] for r in per_run)

        # The same history from a snapshot (docs/account-log.md §6.1): A1 writes one at the head, then A5 (CLI)
        # and A6 (engine in-process), enrolled afterwards, bootstrap from it alone.
        started = time.perf_counter()
        written = cli(homes["a1"], "log", "snapshot", "--json", timeout=600)
        snapshot_write_s = time.perf_counter() - started
        assert written.returncode == 0, written.stderr
        snapshot = json.loads(written.stdout)
        for name in ("a5", "a6"):
            homes[name] = work / name
            trio.run(link_device, relay.url, homes["a1"], homes[name], name)
        trio.run(run_engine, homes["a1"])  # the grants for A5 and A6
        started = time.perf_counter()
        result = cli(homes["a5"], "sync", timeout=600)
        snapshot_cli_s = time.perf_counter() - started
        assert result.returncode == 0, result.stderr
        started = time.perf_counter()
        trio.run(run_engine, homes["a6"])
        snapshot_engine_s = time.perf_counter() - started
        for name in ("a5", "a6"):
            _, _, store = load(homes[name])
            assert store.message_count() == 2 * half, (name, store.message_count())
        return {
            "scenario": "account_log_catchup",
            "messages": 2 * half,
            "log_records": head,
            "log_ciphertext_bytes": raw_bytes,
            "exchange_s": round(exchange_s, 3),
            "bootstrap_cli_s": round(bootstrap_cli_s, 3),
            "runs": len(per_run),
            "engine_catchup_s": round(engine_s, 3),
            "engine_records_per_s": _spread([r["engine_records_per_s"] for r in per_run]),
            "engine_cpu_us_per_record": _spread([r["engine_cpu_us_per_record"] for r in per_run]),
            "baseline": {
                "what": "raw GET /v1/log paging (limit 500) over the same HTTP/2 client, no decryption, no local store",
                "raw_records": raw_records,
                "raw_records_per_s": _spread([r["raw_records_per_s"] for r in per_run]),
            },
            "ratio": _spread([r["ratio"] for r in per_run], 4),
            "checks_only": {
                "what": "protocol.log.open_signed_record alone over the same records (AEAD open, Ed25519, decode)",
                "records_per_s": _spread([r["checks_only_records_per_s"] for r in per_run]),
                "ratio_to_raw": _spread([r["checks_only_records_per_s"] / r["raw_records_per_s"] for r in per_run], 4),
            },
            "per_run": per_run,
            "snapshot": {
                "what": "a device enrolled after a snapshot at the head bootstraps from its parts (same history)",
                "parts": snapshot["parts"],
                "covers": snapshot["covers"],
                "write_cli_s": round(snapshot_write_s, 3),
                "bootstrap_cli_s": round(snapshot_cli_s, 3),
                "engine_catchup_s": round(snapshot_engine_s, 3),
                "speedup_vs_replay_cli": round(bootstrap_cli_s / snapshot_cli_s, 2),
                "speedup_vs_replay_engine": round(engine_s / snapshot_engine_s, 2),
            },
            "machine": machine(),
            "command": f"python -m bench.catchup --messages {2 * half} --runs {runs}",
        }
    finally:
        relay.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3, help="engine catch-ups, each followed by the raw baseline")
    parser.add_argument("--smoke", action="store_true", help="20 messages, 1 run (tests/bench)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.runs = 20, 1
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tetherless-catchup-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o700)
        results = run(args.messages, work, max(1, args.runs))
    out = args.out or ROOT / "bench" / "results" / time.strftime("catchup-%Y%m%dT%H%M%SZ.json", time.gmtime())
    path = write_results(results, out)
    print(json.dumps(results, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
