"""Load generator processes (run pinned to their own core by bench/__main__.py).

    python -m bench.load send   --url U --token T --recipients a,b,... --batch B --concurrency C --seconds S
    python -m bench.load stream --url U --token T --expect N --seconds S

Each prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Any

import trio

from protocol import codec
from protocol.client.http import HTTP2Connection, open_connection
from protocol.messages import InboxEnvelope, StreamItem

PAYLOAD_BYTES = 200


async def send_load(args: argparse.Namespace) -> dict[str, Any]:
    recipients = args.recipients.split(",")
    headers = [
        ("content-type", codec.MSGPACK),
        ("accept", codec.MSGPACK),
        ("authorization", f"Bearer {args.token}"),
    ]
    latencies: list[float] = []
    sent = 0
    errors = 0
    rng = random.Random(1)
    deadline = trio.current_time() + args.seconds
    per_conn = max(1, args.concurrency // args.connections)

    async def worker(conn: HTTP2Connection, worker_no: int) -> None:
        nonlocal sent, errors
        n = 0
        while trio.current_time() < deadline:
            envelopes = [
                {
                    "recipient": rng.choice(recipients),
                    "idempotency_key": b"w%05dn%09di%03d" % (worker_no, n, i),
                    "ciphertext": os.urandom(PAYLOAD_BYTES),
                }
                for i in range(args.batch)
            ]
            n += 1
            body = codec.encode({"envelopes": envelopes})
            started = time.perf_counter()
            resp = await conn.request("POST", "/v1/messages", body, headers)
            latencies.append(time.perf_counter() - started)
            if resp.status == 201:
                sent += args.batch
            else:
                errors += 1

    async with trio.open_nursery() as connections:
        conns = [await connections.start(_connection, args.url) for _ in range(args.connections)]
        started = time.perf_counter()
        async with trio.open_nursery() as workers:
            for c, conn in enumerate(conns):
                for w in range(per_conn):
                    workers.start_soon(worker, conn, c * per_conn + w)
        elapsed = time.perf_counter() - started
        connections.cancel_scope.cancel()
    latencies.sort()
    return {
        "envelopes": sent,
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "latency_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "latency_p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
        "client_cpu_seconds": time.process_time(),
    }


async def _connection(url: str, task_status: trio.TaskStatus[HTTP2Connection] = trio.TASK_STATUS_IGNORED) -> None:
    async with open_connection(url) as conn:
        task_status.started(conn)
        await trio.sleep_forever()


async def stream_load(args: argparse.Namespace) -> dict[str, Any]:
    """Receive until ``expect`` envelopes arrived; time from the first to the last."""
    headers = [("accept", codec.MSGPACK), ("authorization", f"Bearer {args.token}")]
    decoder = codec.StreamDecoder(StreamItem)
    received = 0
    first = last = 0.0
    with trio.move_on_after(args.seconds):
        async with (
            open_connection(args.url) as conn,
            conn.stream("GET", "/v1/inbox/stream?after=0", headers, chunk_timeout=None) as response,
        ):
            print("READY", flush=True)
            async for chunk in response:
                for item in decoder.feed(chunk):
                    if isinstance(item, InboxEnvelope):
                        if received == 0:
                            first = time.perf_counter()
                        received += 1
                        last = time.perf_counter()
                if received >= args.expect:
                    break
    return {"received": received, "seconds": last - first, "client_cpu_seconds": time.process_time()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["send", "stream"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--recipients", default="")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--expect", type=int, default=0)
    args = parser.parse_args()
    result = trio.run(send_load if args.mode == "send" else stream_load, args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
