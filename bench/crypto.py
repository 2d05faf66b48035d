"""Per-operation cost of v2 session crypto, next to the v1 sealed box measured in the same run.

    python -m bench.crypto [--runs N] [--seconds S] [--smoke] [--out FILE]

Pure CPU, one process (pinned to one core with taskset when available): no
relay. Each operation runs repeatedly for ``--seconds`` per run; the figure is
the median over ``--runs`` of microseconds per operation (and its inverse,
operations per second). Operations (crypto.md §7-§10):

- ``v1_seal`` / ``v1_open``: the v1 sealed box of a 200-byte message (the baseline);
- ``handshake_initiator``: ML-KEM-768 encapsulation + PQXDH (4 DH) + ratchet init;
- ``handshake_responder``: decapsulation + PQXDH + ratchet init + first decrypt (a DH ratchet step);
- ``v2_encrypt`` / ``v2_decrypt``: one 200-byte message on an established session,
  sealed box included (decrypt without a DH ratchet step: consecutive messages of one chain);
- ``v2_fanout_10``: one message to 10 established sessions (what a send to an account of 10 devices costs);
- ``state_encode_decode``: a session state through ``protocol.codec`` (persistence cost).

Writes JSON to bench/results/crypto-<time>.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing

from bench.common import machine, summary, write_results
from protocol import codec, handshake, payload, session
from protocol.ids import account_id_for, device_id_for
from protocol.session import ResponderKeys, SessionState

BODY = b"x" * 200
RELAY = "relay.bench"
TTL_MS = 10**12


def _rand(n: int = 32) -> bytes:
    return os.urandom(n)


class _Device:
    def __init__(self) -> None:
        self.signing_key = nacl.signing.SigningKey(_rand())
        sign_key = bytes(self.signing_key.verify_key)
        self.address = f"{device_id_for(sign_key)}.{account_id_for(sign_key)}@{RELAY}"
        self.identity_private = _rand()
        self.identity_key = handshake.x25519_public(self.identity_private)
        self.spk = _rand()
        self.opk = _rand()
        self.pq_seed = _rand(64)

    def prekeys(self) -> handshake.PeerPrekeys:
        return handshake.PeerPrekeys(
            signed_prekey_id=1,
            signed_prekey=handshake.x25519_public(self.spk),
            pq_prekey_id=1,
            pq_last_resort=False,
            pq_prekey=handshake.mlkem_public(self.pq_seed),
            one_time_prekey_id=1,
            one_time_prekey=handshake.x25519_public(self.opk),
        )


def _start(a: _Device, b: _Device, prekeys: handshake.PeerPrekeys) -> SessionState:
    ct, ss = handshake.encapsulate(prekeys.pq_prekey)
    return session.start(
        own_address=a.address,
        identity_private_key=a.identity_private,
        peer_address=b.address,
        peer_identity_key=b.identity_key,
        prekeys=prekeys,
        ephemeral_private_key=_rand(),
        ratchet_entropy=_rand(),
        kem_ciphertext=ct,
        kem_shared_secret=ss,
        now_ms=0,
    )


def _seal(state: SessionState, to: _Device) -> tuple[SessionState, bytes]:
    return session.seal(
        state,
        sender_list_version=1,
        recipient_box_key=to.identity_key,
        sent_at_ms=0,
        message_id=_rand(16),
        content_type="text/plain; charset=utf-8",
        body=BODY,
        entropy=_rand(64),
    )


def _accept(b: _Device, a: _Device, ciphertext: bytes) -> SessionState:
    sealed = session.parse_inner(session.open_outer(ciphertext, b.identity_private))
    assert sealed is not None
    state, _ = session.accept_prekey(
        own_address=b.address,
        identity_private_key=b.identity_private,
        sealed=sealed,
        sender_identity_key=a.identity_key,
        keys=ResponderKeys(signed_prekey_private=b.spk, pq_seed=b.pq_seed, one_time_prekey_private=b.opk),
        entropy=_rand(),
        now_ms=0,
        skipped_ttl_ms=TTL_MS,
    )
    return state


def _established(a: _Device, b: _Device) -> tuple[SessionState, SessionState]:
    """A session after one round trip, so both sides send ratchet (not prekey) messages."""
    state_a = _start(a, b, b.prekeys())
    state_a, first = _seal(state_a, b)
    state_b = _accept(b, a, first)
    state_b, reply = _seal(state_b, a)
    sealed = session.parse_inner(session.open_outer(reply, a.identity_private))
    assert sealed is not None
    state_a, _ = session.decrypt(state_a, sealed, entropy=_rand(), now_ms=0, skipped_ttl_ms=TTL_MS)
    return state_a, state_b


def operations(count_hint: int) -> dict[str, tuple[Callable[[], Any], int]]:
    """name -> (callable doing ``ops`` operations, ops). Inputs are prepared outside the timed part."""
    alice, bob = _Device(), _Device()
    prekeys = bob.prekeys()
    v1_cipher = payload.SealedBoxCipher(
        signing_key=alice.signing_key, box_private_key=alice.identity_private, address=alice.address
    )
    v1_bob = payload.SealedBoxCipher(
        signing_key=bob.signing_key, box_private_key=bob.identity_private, address=bob.address
    )

    def v1_seal() -> bytes:
        return v1_cipher.seal(
            recipient=bob.address,
            recipient_box_key=bob.identity_key,
            sent_at_ms=0,
            message_id=b"m" * 16,
            content_type="text/plain; charset=utf-8",
            body=BODY,
            entropy=_rand(),
        )

    v1_ct = v1_seal()

    firsts = []
    for _ in range(count_hint):
        s = _start(alice, bob, prekeys)
        firsts.append(_seal(s, bob)[1])
    first_iter = itertools.cycle(firsts)

    state_a, state_b = _established(alice, bob)
    holder = {"a": state_a}
    # A chain of messages to decrypt consecutively (no DH step between them).
    chain = []
    sa = state_a
    for _ in range(count_hint):
        sa, ct = _seal(sa, bob)
        chain.append(ct)
    receiver = [state_b]
    position = [0]

    def v2_decrypt() -> None:
        if position[0] >= len(chain):
            receiver[0], position[0] = state_b, 0
        sealed = session.parse_inner(session.open_outer(chain[position[0]], bob.identity_private))
        position[0] += 1
        assert sealed is not None
        receiver[0], _ = session.decrypt(receiver[0], sealed, entropy=_rand(), now_ms=0, skipped_ttl_ms=TTL_MS)

    def v2_encrypt() -> None:
        holder["a"], _ = _seal(holder["a"], bob)

    peers = [_Device() for _ in range(10)]
    fan = [(_established(alice, p)[0], p) for p in peers]

    def v2_fanout_10() -> None:
        for index, (state, peer) in enumerate(fan):
            fan[index] = (_seal(state, peer)[0], peer)

    encoded = codec.encode(state_a)

    return {
        "v1_seal": (v1_seal, 1),
        "v1_open": (lambda: v1_bob.open(v1_ct), 1),
        "handshake_initiator": (lambda: _start(alice, bob, prekeys), 1),
        "handshake_responder": (lambda: _accept(bob, alice, next(first_iter)), 1),
        "v2_encrypt": (v2_encrypt, 1),
        "v2_decrypt": (v2_decrypt, 1),
        "v2_fanout_10": (v2_fanout_10, 1),
        "state_encode_decode": (
            lambda: codec.decode(codec.encode(codec.decode(encoded, SessionState)), SessionState),
            1,
        ),
    }


def measure(fn: Callable[[], Any], seconds: float) -> float:
    """Microseconds per call over at least ``seconds`` (after a short warm-up)."""
    for _ in range(3):
        fn()
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(10):
            fn()
        calls += 10
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / calls * 1e6


def run(runs: int, seconds: float) -> dict[str, Any]:
    ops = operations(count_hint=200)
    per_run: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(runs):
        for name, (fn, _n) in ops.items():
            per_run[name].append(measure(fn, seconds))
    results: dict[str, Any] = {}
    for name, values in per_run.items():
        stats = summary(values)
        results[name] = {"us_per_op": stats, "ops_per_second": round(1e6 / stats["median"], 1), "runs": values}
    base = results["v1_seal"]["us_per_op"]["median"]
    comparison = {
        "v2_encrypt_over_v1_seal": round(results["v2_encrypt"]["us_per_op"]["median"] / base, 3),
        "v2_decrypt_over_v1_open": round(
            results["v2_decrypt"]["us_per_op"]["median"] / results["v1_open"]["us_per_op"]["median"], 3
        ),
        "v2_encrypt_target_5000_per_s_met": results["v2_encrypt"]["ops_per_second"] >= 5000,
    }
    return {
        "kind": "crypto",
        "machine": machine(),
        "runs": runs,
        "seconds": seconds,
        "operations": results,
        "comparison": comparison,
    }


def bench_main(
    argv: list[str] | None, *, module: str, doc: str, run_fn: Callable[[int, float], dict[str, Any]], prefix: str
) -> int:
    """The command line both ``bench.crypto`` and ``bench.log_grants`` share: options, pinning, output."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per operation and run")
    parser.add_argument("--smoke", action="store_true", help="1 run of 0.02 s each (harness check only)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-pin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.no_pin and shutil.which("taskset") and (os.cpu_count() or 1) > 1 and not args.smoke:
        cmd = ["taskset", "-c", "1", sys.executable, "-m", module, "--no-pin", *(argv or sys.argv[1:])]
        return subprocess.run(cmd, check=False).returncode
    runs, seconds = (1, 0.02) if args.smoke else (args.runs, args.seconds)
    report = run_fn(runs, seconds)
    out = args.out or Path(__file__).resolve().parent / "results" / time.strftime(
        f"{prefix}-%Y%m%dT%H%M%SZ.json", time.gmtime()
    )
    path = write_results(report, out)
    print(f"{'operation':<28} {'median µs':>10} {'ops/s':>10}")
    for name, row in report["operations"].items():
        print(f"{name:<28} {row['us_per_op']['median']:>10.1f} {row['ops_per_second']:>10.0f}")
    if "sizes" in report:
        print(f"sizes: {report['sizes']}")
    print(f"comparison: {report['comparison']}")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.crypto", doc=__doc__ or "", run_fn=run, prefix="crypto")


if __name__ == "__main__":
    raise SystemExit(main())
