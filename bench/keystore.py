"""Unlock time of an encrypted client home (crypto.md §13), next to the test profile in the same run.

    python -m bench.keystore [--runs N] [--smoke] [--out FILE]

One process, no relay. Each run creates nothing: the keystore files are made
once per profile, then every run opens a fresh :class:`Keystore` and times
:meth:`Keystore.unlock` (Argon2id with the header's parameters, then the
XChaCha20-Poly1305 open) and, separately, the first :meth:`Keystore.local_db`
open (SQLite WAL). Profiles: ``default`` (RFC 9106 second option: t=3,
m=64 MiB, p=4 — what users get) and ``test`` (t=1, 8 KiB, p=1 — the baseline,
tests only). Figures are the median, min and max in milliseconds.

Writes JSON to bench/results/keystore-<time>.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, summary, write_results
from protocol.client import keystore as ks
from protocol.client.keystore import DeviceKeys, Keystore

PASSPHRASE = "correct horse battery staple"


def _keys() -> DeviceKeys:
    return DeviceKeys(
        signing_seed=os.urandom(32),
        box_private_key=os.urandom(32),
        relay_url="http://127.0.0.1:1",
        account_id="a" * 32,
        device_id="d" * 32,
        address=f"{'d' * 32}.{'a' * 32}@127.0.0.1:1",
        device_name="bench",
    )


def measure(profile: str, runs: int, base: Path) -> dict[str, Any]:
    home = base / profile
    # The "test" profile exists only behind TETHERLESS_INSECURE_KDF=1 (keystore.py): set it for this
    # measurement alone, both to create the keystore and to open it (weak parameters are refused otherwise).
    previous = os.environ.pop(ks.INSECURE_KDF_ENV, None)
    if profile == "test":
        os.environ[ks.INSECURE_KDF_ENV] = "1"
    try:
        Keystore(home, passphrase=PASSPHRASE).create(_keys())
        unlock_ms, db_ms = _unlock_times(home, runs)
    finally:
        os.environ.pop(ks.INSECURE_KDF_ENV, None)
        if previous is not None:
            os.environ[ks.INSECURE_KDF_ENV] = previous
    params = ks.KDF_PROFILES[profile]
    return {
        "params": {"iterations": params.iterations, "memory_kib": params.memory_kib, "lanes": params.lanes},
        "unlock_ms": summary(unlock_ms),
        "open_local_db_ms": summary(db_ms),
    }


def _unlock_times(home: Path, runs: int) -> tuple[list[float], list[float]]:
    unlock_ms: list[float] = []
    db_ms: list[float] = []
    for _ in range(runs):
        keystore = Keystore(home, passphrase=PASSPHRASE)
        started = time.perf_counter()
        keystore.unlock()
        unlocked = time.perf_counter()
        keystore.local_db()
        opened = time.perf_counter()
        keystore.close()
        unlock_ms.append((unlocked - started) * 1000)
        db_ms.append((opened - unlocked) * 1000)
    return unlock_ms, db_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.keystore", description=__doc__)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="2 runs: checks the benchmark itself")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = 2 if args.smoke else max(1, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        profiles = {name: measure(name, runs, Path(tmp)) for name in ("default", "test")}
    results: dict[str, Any] = {"benchmark": "keystore", "machine": machine(), "runs": runs, "profiles": profiles}
    out = args.out or Path("bench/results") / time.strftime("keystore-%Y%m%dT%H%M%SZ.json", time.gmtime())
    path = write_results(results, out)
    default, baseline = profiles["default"]["unlock_ms"], profiles["test"]["unlock_ms"]
    print(f"unlock (default profile): median {default['median']:.1f} ms; test profile {baseline['median']:.2f} ms")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
