"""Media throughput: tus upload and Range download through the relay against raw HTTP/2 (issue 15).

    python -m bench.media [--mib 256] [--runs 3] [--smoke] [--out PATH]

Each run moves the same file of ``--mib`` MiB four times with the same client (curl, HTTP/2 prior knowledge,
streaming from and to files, on LOAD_CPU) against servers pinned to RELAY_CPU:

- baseline upload: ``PATCH`` of the bytes to ``bench.raw_bytes_h2`` (h2 + trio, body discarded);
- relay upload: one tus ``PATCH`` of the whole file to ``/v1/blobs/uploads/{id}`` (created with ``POST``), which
  the relay streams to its storage (files under ``--data``, fsync'd) while hashing it;
- baseline download: ``GET /bytes/N`` from ``bench.raw_bytes_h2``;
- relay download: ``GET /v1/blobs/{id}`` with the owner's token.

Reported: MB/s (10^6 bytes per second of curl's own transfer time), the relay/baseline ratio per run (median of the
ratios), and the relay's CPU seconds per GiB moved (from /proc, so noise on the shared host moves it less than the
rates). The bytes are random (the relay only ever sees ciphertext, which is incompressible). Target (issue 15):
relay >= 0.5 of the baseline both ways.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from protocol.client.http import start_connection

from .common import LOAD_CPU, RELAY_CPU, Relay, cpu_seconds, machine, make_device, pinned, summary, write_results

GIB = 1024**3


def _curl(args: list[str]) -> dict[str, float]:
    """Run curl (pinned to LOAD_CPU) and return its timing figures; raises on an HTTP error status."""
    out = subprocess.run(
        pinned(
            [
                "curl",
                "-sS",
                "--http2-prior-knowledge",
                "-w",
                "%{http_code} %{time_total} %{size_upload} %{size_download} %{header_json}\\n",
                *args,
            ],
            LOAD_CPU,
        ),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    last = out.strip().splitlines()
    status, total, up, down = last[0].split(" ", 4)[:4]
    if not status.startswith("2"):
        raise RuntimeError(f"curl got HTTP {status}: {out[-500:]}")
    return {"status": int(status), "seconds": float(total), "up": float(up), "down": float(down)}


def _baseline_server() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        pinned([sys.executable, "-m", "bench.raw_bytes_h2"], RELAY_CPU),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.match(r"listening (\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"baseline server did not start: {line!r}")
    return proc, int(match.group(1))


async def _token(url: str) -> str:
    async with trio.open_nursery() as nursery:
        conn = await start_connection(nursery, url)
        try:
            device = await make_device(conn, "bench-media")
        finally:
            await conn.aclose()
    return device.token


def _create_upload(url: str, token: str, size: int) -> str:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "Tus-Resumable: 1.0.0",
            "-H",
            f"Upload-Length: {size}",
            "-H",
            f"Authorization: Bearer {token}",
            f"{url}/v1/blobs/uploads",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    location = re.search(r"(?im)^location:\s*(\S+)", out)
    if not location or " 201" not in out.splitlines()[0]:
        raise RuntimeError(f"tus creation failed: {out[:500]}")
    return location.group(1).rstrip("/").rsplit("/", 1)[1]


def one_run(path: Path, size: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    server, port = _baseline_server()
    try:
        cpu0 = cpu_seconds(server.pid)
        up = _curl(["-X", "PATCH", "-T", str(path), f"http://127.0.0.1:{port}/upload"])
        cpu1 = cpu_seconds(server.pid)
        down = _curl(["-o", "/dev/null", f"http://127.0.0.1:{port}/bytes/{size}"])
        cpu2 = cpu_seconds(server.pid)
    finally:
        server.kill()
        server.wait()
    result["baseline_upload_mbps"] = size / up["seconds"] / 1e6
    result["baseline_download_mbps"] = size / down["seconds"] / 1e6
    result["baseline_upload_cpu_s_per_gib"] = (cpu1 - cpu0) * GIB / size
    result["baseline_download_cpu_s_per_gib"] = (cpu2 - cpu1) * GIB / size

    relay = Relay()
    try:
        token = trio.run(_token, relay.url)
        upload_id = _create_upload(relay.url, token, size)
        auth = ["-H", f"Authorization: Bearer {token}"]
        cpu0 = relay.cpu()
        up = _curl(
            [
                "-X",
                "PATCH",
                "-T",
                str(path),
                "-H",
                "Tus-Resumable: 1.0.0",
                "-H",
                "Upload-Offset: 0",
                "-H",
                "Content-Type: application/offset+octet-stream",
                *auth,
                f"{relay.url}/v1/blobs/uploads/{upload_id}",
            ]
        )
        cpu1 = relay.cpu()
        blob_dir = Path(tempfile.mkdtemp(prefix="tetherless-media-"))
        try:
            down = _curl(["-o", str(blob_dir / "blob"), *auth, f"{relay.url}/v1/blobs/{upload_id}"])
            cpu2 = relay.cpu()
            if (blob_dir / "blob").stat().st_size != size:
                raise RuntimeError("the relay served a different number of bytes")
        finally:
            for leftover in blob_dir.iterdir():
                leftover.unlink()
            blob_dir.rmdir()
        result["relay_rss_kib"] = relay.rss_kib()
    finally:
        relay.close()
    result["relay_upload_mbps"] = size / up["seconds"] / 1e6
    result["relay_download_mbps"] = size / down["seconds"] / 1e6
    result["relay_upload_cpu_s_per_gib"] = (cpu1 - cpu0) * GIB / size
    result["relay_download_cpu_s_per_gib"] = (cpu2 - cpu1) * GIB / size
    result["upload_ratio"] = result["relay_upload_mbps"] / result["baseline_upload_mbps"]
    result["download_ratio"] = result["relay_download_mbps"] / result["baseline_download_mbps"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="4 MiB, 1 run (tests/bench)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.mib, args.runs = 4, 1
    size = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="tetherless-media-bench-") as tmp:
        path = Path(tmp) / "file.bin"
        with path.open("wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1024 * 1024))
        runs = [one_run(path, size) for _ in range(args.runs)]
    keys = runs[0].keys()
    results = {
        "scenario": "media",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "mib": args.mib,
        "runs": runs,
        "summary": {key: summary([run[key] for run in runs]) for key in keys},
    }
    out = write_results(results, args.out)
    s = results["summary"]
    print(
        f"upload   relay {s['relay_upload_mbps']['median']:.0f} MB/s vs raw {s['baseline_upload_mbps']['median']:.0f}"
        f" -> {s['upload_ratio']['median']:.2f}; relay CPU {s['relay_upload_cpu_s_per_gib']['median']:.2f} s/GiB"
    )
    print(
        f"download relay {s['relay_download_mbps']['median']:.0f} MB/s vs raw"
        f" {s['baseline_download_mbps']['median']:.0f} -> {s['download_ratio']['median']:.2f};"
        f" relay CPU {s['relay_download_cpu_s_per_gib']['median']:.2f} s/GiB"
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
