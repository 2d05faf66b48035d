"""The relay core's acceptance scenarios, end to end: real relay process, real client, real sockets."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import trio

from protocol.client.keystore import Keystore
from protocol.client.sdk import Outgoing, RelayClient
from tests.e2e.http11 import Http11
from tests.relay_process import RelayProcess

ROOT = Path(__file__).resolve().parents[2]
DRAIN_SECONDS = 120.0  # the SIGTERM test's drain timeout (the default is 10 s)


def cli(home: Path, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "--home", str(home), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def init_device(relay: RelayProcess, home: Path, name: str, *extra: str) -> str:
    result = cli(home, "device", "init", "--relay", relay.url, "--name", name, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def inbox_requests(relay: RelayProcess) -> float:
    """How many GET /v1/inbox (paging) requests the relay has answered, from its own metrics."""
    text = Http11(relay.url).get("/metrics", accept="*/*").body.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("relay_http_requests_total{") and 'route="/v1/inbox"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_thousand_messages_to_an_offline_device_arrive_once_in_order(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    # This test is about the relay's queue. The SDK's send_many speaks v1 payloads, which a device refuses
    # from format-2+ accounts (a downgrade, docs/crypto.md §14), so both accounts are format 1 here.
    init_device(relay, alice_home, "alice", "--list-format", "1")
    bob = init_device(relay, bob_home, "bob", "--list-format", "1")
    texts = [f"message {i:04d} {uuid.uuid4()}" for i in range(1000)]

    async def send_all() -> None:
        keys = Keystore(alice_home).load()
        async with RelayClient.connect(relay.url, keys=keys) as alice:
            for start in range(0, len(texts), 100):  # batches of 100, one request each
                await alice.send_many([Outgoing(bob, text) for text in texts[start : start + 100]])

    trio.run(send_all)
    # Bob was offline for all of it; now he syncs with the CLI.
    result = cli(bob_home, "sync", "--json")
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    assert [m["text"] for m in messages] == texts  # each once, in order
    assert all(m["from"].endswith("@" + relay.name) for m in messages)
    assert len({m["id"] for m in messages}) == 1000
    again = cli(bob_home, "sync", "--json")
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""


def test_streaming_device_receives_without_polling(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    alice = init_device(relay, alice_home, "alice")
    bob = init_device(relay, bob_home, "bob")
    follower = subprocess.Popen(
        [sys.executable, "-m", "tetherless_cli", "--home", str(bob_home), "sync", "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        wait_for_streams(relay, 1)  # bob's stream is open
        polls_before = inbox_requests(relay)
        for i in range(3):
            assert cli(alice_home, "send", bob, "--text", f"live {i}").returncode == 0
        assert follower.stdout is not None
        received = [json.loads(follower.stdout.readline()) for _ in range(3)]
        assert [m["text"] for m in received] == ["live 0", "live 1", "live 2"]
        assert {m["from"] for m in received} == {alice}
        assert inbox_requests(relay) == polls_before, "messages arrived by polling, not by the stream"
    finally:
        follower.send_signal(signal.SIGINT)
        follower.communicate(timeout=20)
    assert follower.returncode == 0


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def test_plaintext_never_at_rest(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data", extra_args=["--log-level", "debug"])
    relay.start()
    try:
        canary = f"canary-{uuid.uuid4().hex}"
        alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
        init_device(relay, alice_home, "alice")
        bob = init_device(relay, bob_home, "bob")
        for i in range(20):
            assert cli(alice_home, "send", bob, "--text", f"{canary} #{i}").returncode == 0
        # While the WAL still holds the writes, and without a clean shutdown:
        relay.kill()
        needles = [canary.encode(), canary.encode("utf-16-le"), canary.encode().hex().encode()]
        files = [*_files_under(relay.data_dir), relay.log_path]
        assert any(p.name.endswith("-wal") for p in files), "expected a WAL file to inspect"
        for path in files:
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"plaintext found in {path}"
        relay.start()
        result = cli(bob_home, "sync", "--json")
        texts = [json.loads(line)["text"] for line in result.stdout.splitlines()]
        assert texts == [f"{canary} #{i}" for i in range(20)]  # it really was sent and kept
    finally:
        assert relay.stop() == 0
    for path in [*_files_under(relay.data_dir), relay.log_path]:
        assert canary.encode() not in path.read_bytes(), f"plaintext found in {path}"


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed (CI installs it)")
@pytest.mark.parametrize("mode", ["--http2-prior-knowledge", "--http1.1"])
def test_curl_gets_probes_and_discovery(relay: RelayProcess, mode: str) -> None:
    for path in ("/livez", "/healthz", "/readyz", "/.well-known/tetherless"):
        out = subprocess.run(
            ["curl", "-sS", mode, "-w", "\\n%{http_code} %{http_version}", relay.url + path],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        body, status_line = out.rsplit("\n", 1)
        status, version = status_line.split()
        assert status == "200"
        assert version == ("2" if "http2" in mode else "1.1")
        doc = json.loads(body)
        if path == "/.well-known/tetherless":
            assert doc["relay"] == relay.name
            assert doc["api_versions"] == ["v1"]
            assert doc["limits"]["max_body_bytes"] > 0
            assert len(bytes.fromhex(doc["relay_key"].encode().hex())) > 0


@pytest.mark.skipif(not shutil.which("h2load"), reason="nghttp2-client not installed (CI installs it)")
def test_nghttp_and_h2load_drive_the_relay(relay: RelayProcess) -> None:
    out = subprocess.run(
        ["nghttp", "-v", relay.url + "/.well-known/tetherless"], capture_output=True, text=True, timeout=30
    ).stdout
    assert ":status: 200" in out
    out = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "10", relay.url + "/livez"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    match = re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored", out)
    assert match, out


def test_metrics_readiness_and_openapi(relay: RelayProcess) -> None:
    http = Http11(relay.url)
    assert http.get("/readyz").json() == {"status": "ready"}
    http.get("/v1/nothing")
    metrics = http.get("/metrics", accept="*/*")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.body.decode()
    assert "relay_ready 1.0" in text
    assert 'relay_problems_total{code="not_found"} 1.0' in text
    assert 'route="unmatched"' in text  # unknown paths never become label values
    served = http.get("/openapi.json")
    assert served.body == (ROOT / "docs" / "openapi.json").read_bytes()


def wait_for_streams(relay: RelayProcess, count: int) -> None:
    deadline = time.monotonic() + 20
    while f"relay_inbox_streams_open {count:.1f}" not in Http11(relay.url).get("/metrics", accept="*/*").body.decode():
        assert time.monotonic() < deadline, f"never saw {count} open streams"
        time.sleep(0.05)


def test_sigterm_drains_open_streams_and_exits_zero(tmp_path: Path) -> None:
    # A drain timeout far above any shutdown, loaded host or not: an open stream that held the relay until it
    # ran out is told apart from one the drain ended.
    relay = RelayProcess(tmp_path / "relay-data", env={"TETHERLESS_DRAIN_TIMEOUT_SECONDS": str(DRAIN_SECONDS)})
    relay.start()
    bob_home = tmp_path / "bob"
    follower: subprocess.Popen[str] | None = None
    try:
        init_device(relay, bob_home, "bob")
        follower = subprocess.Popen(
            [sys.executable, "-m", "tetherless_cli", "--home", str(bob_home), "sync", "--follow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        wait_for_streams(relay, 1)
        assert relay.proc is not None
        started = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait(timeout=DRAIN_SECONDS + 30) == 0
        # The open stream did not hold the relay until the drain timeout ran out.
        assert time.monotonic() - started < DRAIN_SECONDS / 2
        assert "draining" in relay.logs()
    finally:
        if follower is not None:
            follower.send_signal(signal.SIGINT)
            follower.communicate(timeout=20)
        relay.stop()


def test_json_logs_carry_no_secrets(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data", extra_args=["--log-format", "json", "--log-level", "debug"])
    relay.start()
    try:
        home = tmp_path / "alice"
        address = init_device(relay, home, "alice")
        assert cli(home, "send", address, "--text", "note to self").returncode == 0
        assert cli(home, "sync").returncode == 0
        Http11(relay.url).get("/v1/inbox", token="tls1_" + "x" * 43)
    finally:
        assert relay.stop() == 0
    lines = [line for line in relay.logs().splitlines() if line.startswith("{")]
    assert lines, "no JSON log lines"
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= entry.keys()
    logs = relay.logs()
    assert "tls1_" not in logs
    assert "note to self" not in logs
    assert "Bearer" not in logs


def test_config_show_reports_sources(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('listen = "127.0.0.1:9999"\nmax_batch_envelopes = 7\n')
    env = {**os.environ, "TETHERLESS_MAX_BATCH_ENVELOPES": "8", "TETHERLESS_LOG_FORMAT": "json"}
    result = subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "config", "show", "--config", str(config), "--log-format", "text"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "'127.0.0.1:9999'" in rows["listen"]
    assert f"(file {config})" in rows["listen"]
    assert "8" in rows["max_batch_envelopes"]
    assert "(env TETHERLESS_MAX_BATCH_ENVELOPES)" in rows["max_batch_envelopes"]
    assert "'text'" in rows["log_format"]
    assert "(flag)" in rows["log_format"]
    assert "(default)" in rows["max_body_bytes"]
    bad = subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "config", "show"],
        capture_output=True,
        text=True,
        env={**os.environ, "TETHERLESS_MAX_BODY_BYTES": "lots"},
        cwd=ROOT,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "tetherless: error: max_body_bytes from env TETHERLESS_MAX_BODY_BYTES: expected int, got 'lots'"
    )
