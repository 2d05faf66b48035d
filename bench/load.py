"""Load generator processes (run pinned to their own core by bench/__main__.py).

    python -m bench.load send    --url U --token T --recipients a,b,... --batch B --concurrency C --seconds S
    python -m bench.load stream  --url U --token T --expect N --seconds S
    python -m bench.load streams --url U --tokens-file F --expect N [--hold S] [--connections C]
    python -m bench.load latency --url U --token T --recipients R --receiver-token T2 --rate R --seconds S
    python -m bench.load pages   --url U --token T [--limit L]
    python -m bench.load mixed   --url U --token T --tokens-file F --rate R --seconds S

Each prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from bench.common import percentile
from protocol import codec
from protocol.client.http import HTTP2Connection, Response, TransportError, open_connection
from protocol.messages import AckResponse, InboxEnvelope, InboxPage, StreamItem

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
                    "idempotency_key": b"%s%05dn%09di%03d" % (args.prefix.encode(), worker_no, n, i),
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


def count_items(buf: bytearray) -> int:
    """Count the complete MessagePack stream items at the head of ``buf`` and drop them (no decoding)."""
    offset = count = 0
    size = len(buf)
    while offset + codec.FRAME_HEADER_BYTES <= size:
        end = offset + codec.FRAME_HEADER_BYTES + int.from_bytes(buf[offset + 1 : offset + 5], "big")
        if end > size:
            break
        offset = end
        count += 1
    del buf[:offset]
    return count


async def streams_load(args: argparse.Namespace) -> dict[str, Any]:
    """Open one stream per token (spread over ``connections``); count items until each has ``expect``.

    Prints READY once every stream has its response headers. With ``expect`` 0
    the streams are held open for ``hold`` seconds (idle devices).
    """
    tokens: list[str] = args.tokens
    opened = 0
    all_open = trio.Event()
    received = 0
    first = last = 0.0
    done = 0
    errors = 0

    async def one(conn: HTTP2Connection, token: str) -> None:
        nonlocal opened, received, first, last, done, errors
        headers = [("accept", codec.MSGPACK), ("authorization", f"Bearer {token}")]
        buf = bytearray()
        mine = 0
        async with conn.stream("GET", "/v1/inbox/stream?after=0", headers, chunk_timeout=None) as response:
            if response.status != 200:
                errors += 1
            opened += 1
            if opened == len(tokens):
                all_open.set()
            if args.expect == 0:
                await trio.sleep(args.hold)
                return
            async for chunk in response:
                if not first:
                    first = time.perf_counter()
                buf += chunk
                n = count_items(buf)
                mine += n
                received += n
                if mine >= args.expect:
                    last = time.perf_counter()
                    break
        done += 1

    async def printer() -> None:
        await all_open.wait()
        print("READY", flush=True)

    per = -(-len(tokens) // args.connections)
    with trio.move_on_after(args.seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(printer)
            for c in range(args.connections):
                chunk = tokens[c * per : (c + 1) * per]
                if chunk:
                    nursery.start_soon(_streams_on_connection, args.url, chunk, one)
    return {
        "streams": len(tokens),
        "opened": opened,
        "finished": done,
        "received": received,
        "errors": errors,
        "seconds": last - first if last else None,
        "client_cpu_seconds": time.process_time(),
    }


async def _streams_on_connection(url: str, tokens: list[str], one: Any) -> None:
    async with open_connection(url) as conn, trio.open_nursery() as nursery:
        for token in tokens:
            nursery.start_soon(one, conn, token)


async def latency_load(args: argparse.Namespace) -> dict[str, Any]:
    """Send single envelopes at ``rate``/s (open loop) to one streaming device; time send start → arrival."""
    send_headers = [("content-type", codec.MSGPACK), ("authorization", f"Bearer {args.token}")]
    read_headers = [("accept", codec.MSGPACK), ("authorization", f"Bearer {args.receiver_token}")]
    total = int(args.rate * args.seconds)
    warmup = int(args.rate * 0.5)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    errors = 0
    pad = os.urandom(PAYLOAD_BYTES - 8)
    receiving_ready = trio.Event()
    all_received = trio.Event()

    async def receive(conn: HTTP2Connection) -> None:
        decoder = codec.StreamDecoder(StreamItem)
        async with conn.stream("GET", "/v1/inbox/stream?after=0", read_headers, chunk_timeout=None) as response:
            receiving_ready.set()
            got = 0
            async for chunk in response:
                now = time.perf_counter()
                for item in decoder.feed(chunk):
                    if isinstance(item, InboxEnvelope):
                        index = int.from_bytes(item.ciphertext[:8], "big")
                        if index >= warmup:
                            latencies.append(now - sent_at[index])
                        got += 1
                if got >= total:
                    all_received.set()
                    return

    async def send_one(conn: HTTP2Connection, index: int) -> None:
        nonlocal errors
        body = codec.encode(
            {
                "envelopes": [
                    {
                        "recipient": args.recipients,
                        "idempotency_key": b"lat%09d" % index,
                        "ciphertext": index.to_bytes(8, "big") + pad,
                    }
                ]
            }
        )
        sent_at[index] = time.perf_counter()
        resp = await conn.request("POST", "/v1/messages", body, send_headers)
        if resp.status != 201:
            errors += 1

    async with (
        open_connection(args.url) as send_conn,
        open_connection(args.url) as read_conn,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(receive, read_conn)
        await receiving_ready.wait()
        start = trio.current_time()
        for index in range(total):
            await trio.sleep_until(start + index / args.rate)
            nursery.start_soon(send_one, send_conn, index)
        with trio.move_on_after(10):
            await all_received.wait()
        nursery.cancel_scope.cancel()
    latencies.sort()
    return {
        "sent": total,
        "measured": len(latencies),
        "errors": errors,
        "rate": args.rate,
        "latency_p50_ms": 1000 * percentile(latencies, 50) if latencies else None,
        "latency_p99_ms": 1000 * percentile(latencies, 99) if latencies else None,
        "latency_max_ms": 1000 * latencies[-1] if latencies else None,
        "client_cpu_seconds": time.process_time(),
    }


async def mixed_load(args: argparse.Namespace) -> dict[str, Any]:
    """Sustained mix: paced batched sends to streaming devices that acknowledge, plus paging and probes.

    ``tokens-file`` holds [[token, address], ...] of the receiving devices.
    Any non-2xx answer or transport error counts as an error.
    """
    devices: list[list[str]] = args.tokens
    addresses = [d[1] for d in devices]
    send_headers = [("content-type", codec.MSGPACK), ("authorization", f"Bearer {args.token}")]
    counts = {"sent": 0, "received": 0, "acked": 0, "pages": 0, "probes": 0, "errors": 0}
    rng = random.Random(2)
    batch = 10

    async def sender(conn: HTTP2Connection) -> None:
        start = trio.current_time()
        n = 0
        while True:
            await trio.sleep_until(start + n * batch / args.rate)
            envelopes = [
                {
                    "recipient": rng.choice(addresses),
                    "idempotency_key": b"m%09d%02d" % (n, i),
                    "ciphertext": os.urandom(PAYLOAD_BYTES),
                }
                for i in range(batch)
            ]
            n += 1
            resp = await conn.request("POST", "/v1/messages", codec.encode({"envelopes": envelopes}), send_headers)
            if resp.status == 201:
                counts["sent"] += batch
            else:
                counts["errors"] += 1

    async def receiver(conn: HTTP2Connection, token: str) -> None:
        headers = [("accept", codec.MSGPACK), ("authorization", f"Bearer {token}")]
        ack_headers = [("content-type", codec.MSGPACK), *headers]
        decoder = codec.StreamDecoder(StreamItem)
        async with conn.stream("GET", "/v1/inbox/stream?after=0", headers, chunk_timeout=None) as response:
            async for chunk in response:
                cursor = None
                for item in decoder.feed(chunk):
                    if isinstance(item, InboxEnvelope):
                        counts["received"] += 1
                        cursor = item.cursor
                if cursor is not None:
                    resp = await conn.request("POST", "/v1/inbox/ack", codec.encode({"up_to": cursor}), ack_headers)
                    if resp.status == 200:
                        counts["acked"] += codec.decode(resp.body, AckResponse).acknowledged
                    else:
                        counts["errors"] += 1

    async def pager(conn: HTTP2Connection, token: str) -> None:
        headers = [("accept", codec.MSGPACK), ("authorization", f"Bearer {token}")]
        while True:
            await trio.sleep(0.1)
            resp = await conn.request("GET", "/v1/inbox?after=0&limit=100", None, headers)
            counts["pages" if resp.status == 200 else "errors"] += 1
            resp = await conn.request("GET", "/readyz")
            counts["probes" if resp.status == 200 else "errors"] += 1

    deadline = trio.current_time() + args.seconds

    async def guarded(worker: Any, *worker_args: Any) -> None:
        # A transport error is an error, unless it is the connections closing at the deadline.
        try:
            await worker(*worker_args)
        except TransportError:
            if trio.current_time() < deadline:
                counts["errors"] += 1
                raise

    started = time.perf_counter()
    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            conns = [await nursery.start(_connection, args.url) for _ in range(3)]
            nursery.start_soon(guarded, sender, conns[0])
            for i, (token, _) in enumerate(devices):
                nursery.start_soon(guarded, receiver, conns[1 + i % 2], token)
            nursery.start_soon(guarded, pager, conns[0], devices[0][0])
    return {**counts, "seconds": time.perf_counter() - started, "client_cpu_seconds": time.process_time()}


class _PageHead(msgspec.Struct):
    """What a pager needs from an ``InboxPage`` to ask for the next one; the envelopes are skipped, not decoded."""

    envelopes: msgspec.Raw
    next_cursor: int
    more: bool


async def pages_load(args: argparse.Namespace) -> dict[str, Any]:
    """Page through the inbox of ``token`` from cursor 0, ``limit`` per page, until ``more`` is false.

    Pipelined unless ``--pipeline 0``: the request for page n+1 leaves as soon as page n's ``next_cursor`` is
    read (a skip over the body, no envelope decoded), so the relay reads and encodes page n+1 while this
    process decodes page n. Nothing is acknowledged, so custody is not at stake here.
    """
    headers = [("accept", codec.MSGPACK), ("authorization", f"Bearer {args.token}")]
    head_decoder = msgspec.msgpack.Decoder(_PageHead)
    async with open_connection(args.url) as conn, trio.open_nursery() as nursery:
        responses, arrived = trio.open_memory_channel[Response](1)

        async def fetch(after: int) -> None:
            await responses.send(
                await conn.request("GET", f"/v1/inbox?after={after}&limit={args.limit}", None, headers)
            )

        started = time.perf_counter()
        got = pages = 0
        nursery.start_soon(fetch, 0)
        while True:
            resp = await arrived.receive()
            if args.pipeline:
                head = head_decoder.decode(resp.body)
                if head.more:
                    nursery.start_soon(fetch, head.next_cursor)
            page = codec.decode(resp.body, InboxPage)
            got += len(page.envelopes)
            pages += 1
            if not page.more:
                break
            if not args.pipeline:
                nursery.start_soon(fetch, page.next_cursor)
        seconds = time.perf_counter() - started
    return {"received": got, "pages": pages, "seconds": seconds, "client_cpu_seconds": time.process_time()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["send", "stream", "streams", "latency", "mixed", "pages"])
    parser.add_argument("--tokens-file", default="")
    parser.add_argument("--receiver-token", default="")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument(
        "--pipeline", type=int, default=1, help="pages: 0 = ask for a page only after decoding the last"
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--prefix", default="w", help="idempotency key prefix (distinct per run)")
    parser.add_argument("--recipients", default="")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--expect", type=int, default=0)
    args = parser.parse_args()
    args.tokens = json.loads(Path(args.tokens_file).read_text()) if args.tokens_file else []
    modes = {
        "send": send_load,
        "stream": stream_load,
        "streams": streams_load,
        "latency": latency_load,
        "mixed": mixed_load,
        "pages": pages_load,
    }
    result = trio.run(modes[args.mode], args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
