"""Shared pieces of the benchmarks: processes, devices, statistics, results."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing

from protocol import auth, codec, device_list
from protocol.client.http import HTTP2Connection
from protocol.messages import AccountCreated, Challenge, Session

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
READY = re.compile(r"ready at (https?://\S+) ")
RELAY_CPU = "0"
# The benchmarks measure capacity, not the abuse limits: one device sends far more than a person would.
NO_RATE_LIMITS = {
    "TETHERLESS_RATE_IP_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_REQUESTS_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_ENVELOPES_PER_SECOND": "0",
    "TETHERLESS_RATE_ACCOUNT_ENVELOPES_PER_SECOND": "0",
}
LOAD_CPU = "1"


def pinned(cmd: list[str], cpu: str) -> list[str]:
    """Prefix ``cmd`` with taskset when it exists and the machine has more than one core."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpu, *cmd]
    return cmd


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Relay:
    """A relay process on a fresh data directory, pinned to RELAY_CPU."""

    def __init__(self, env: dict[str, str] | None = None, directory: Path | None = None) -> None:
        self.dir = directory or Path(tempfile.mkdtemp(prefix="tetherless-bench-"))
        self.data = self.dir / "data"
        self.env = env
        started = time.perf_counter()
        cmd = pinned(
            [
                sys.executable,
                "-m",
                "tetherless_cli",
                "serve",
                "--data",
                str(self.dir / "data"),
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "warning",
            ],
            RELAY_CPU,
        )
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **NO_RATE_LIMITS, **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env)
        assert self.proc.stdout is not None
        seen: list[str] = []
        for line in self.proc.stdout:
            seen.append(line.decode(errors="replace"))
            match = READY.search(seen[-1])
            if match:
                self.url = match.group(1)
                break
        else:
            self.proc.wait()
            raise RuntimeError(f"relay did not start (exit {self.proc.returncode}):\n{''.join(seen[-20:])}")
        self.port = int(self.url.rsplit(":", 1)[1])
        self.start_seconds = time.perf_counter() - started  # spawn to "ready" (readyz is green by then)

    def restart(self) -> Relay:
        """Stop this relay (keeping its data) and start a new one on the same data directory."""
        self.close(keep_data=True)
        return Relay(self.env, self.dir)

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def db_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.data.glob("relay.sqlite3*"))

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close(self, *, keep_data: bool = False) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        if not keep_data:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class BenchDevice:
    address: str
    device_id: str
    token: str
    box_public: bytes


async def make_device(conn: HTTP2Connection, name: str) -> BenchDevice:
    """Register an account with one device and log it in (the benchmarks' own minimal client)."""
    signing_key = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    signed = device_list.genesis(signing_key, bytes(box.public_key), name=name, now_ms=int(time.time() * 1000))
    headers = [("content-type", codec.MSGPACK), ("accept", codec.MSGPACK)]
    resp = await conn.request("POST", "/v1/accounts", codec.encode({"signed": signed}), headers)
    created = codec.decode(resp.body, AccountCreated)
    resp = await conn.request("POST", "/v1/auth/challenge", codec.encode({"device_id": created.device_id}), headers)
    challenge = codec.decode(resp.body, Challenge)
    body = {
        "device_id": created.device_id,
        "nonce": challenge.nonce,
        "signature": auth.sign_challenge(signing_key, challenge),
    }
    resp = await conn.request("POST", "/v1/auth/session", codec.encode(body), headers)
    session = codec.decode(resp.body, Session)
    return BenchDevice(created.address, created.device_id, session.token, bytes(box.public_key))


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "runs": len(ordered),
    }


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "taskset": bool(shutil.which("taskset")),
    }


def write_results(results: dict[str, Any], out: Path | None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = out or RESULTS / time.strftime("bench-%Y%m%dT%H%M%SZ.json", time.gmtime())
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
