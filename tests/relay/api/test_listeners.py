"""Real relay processes: /metrics on its own listener, and what the application checks before parsing a body."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol import codec
from relay import config as config_mod
from tests.e2e.http11 import Http11
from tests.relay_process import RelayProcess

METRICS_AT = re.compile(r"metrics listener at (http://\S+)/metrics")


def _start(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[RelayProcess, Http11]:
    """A relay started with ``args``; (process, client of its metrics listener)."""
    process = RelayProcess(data_dir, extra_args=["--metrics-listen", "127.0.0.1:0", *args], env=env)
    process.start()
    found = METRICS_AT.search(process.logs())
    assert found, process.logs()[-2000:]
    return process, Http11(found.group(1))


@pytest.fixture
def metrics_only_relay(tmp_path: Path) -> Iterator[tuple[RelayProcess, Http11]]:
    """The chart's setting: metrics on their own listener and not on the client port."""
    process, metrics = _start(tmp_path / "data", env={"TETHERLESS_METRICS_ON_MAIN_PORT": "false"})
    try:
        yield process, metrics
    finally:
        assert process.stop() == 0
        assert "Traceback" not in process.logs()


def test_metrics_listener_serves_metrics_and_nothing_else(metrics_only_relay: tuple[RelayProcess, Http11]) -> None:
    process, metrics = metrics_only_relay
    client = Http11(process.url)
    assert client.get("/livez").status == 200  # counted in the metrics below
    scraped = metrics.get("/metrics", accept="*/*")
    assert scraped.status == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    assert 'relay_http_requests_total{method="GET",route="/livez",status="200"}' in scraped.body.decode()
    for path in ("/livez", "/v1/inbox", "/openapi.json"):
        assert metrics.get(path).code == "not_found", path
    refused = metrics.request("POST", "/metrics", b"x")
    assert (refused.status, refused.code, refused.headers["allow"]) == (405, "method_not_allowed", "GET")


def test_client_port_stops_serving_metrics_when_told(metrics_only_relay: tuple[RelayProcess, Http11]) -> None:
    process, _ = metrics_only_relay
    client = Http11(process.url)
    answer = client.get("/metrics", accept="*/*")
    assert (answer.status, answer.code) == (404, "not_found")
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]  # the served document says so too


def test_by_default_both_ports_serve_metrics(tmp_path: Path) -> None:
    process, metrics = _start(tmp_path / "data")
    try:
        assert metrics.get("/metrics", accept="*/*").status == 200
        assert Http11(process.url).get("/metrics", accept="*/*").status == 200
    finally:
        assert process.stop() == 0


def test_metrics_settings_are_checked() -> None:
    with pytest.raises(config_mod.ConfigError, match="metrics_listen: expected HOST:PORT"):
        config_mod.load(env={"TETHERLESS_METRICS_LISTEN": "9090"})
    with pytest.raises(config_mod.ConfigError, match=r"metrics_on_main_port .* expected true or false"):
        config_mod.load(env={"TETHERLESS_METRICS_ON_MAIN_PORT": "maybe"})
    with pytest.raises(config_mod.ConfigError, match="must differ from listen"):
        config_mod.load(env={"TETHERLESS_LISTEN": "127.0.0.1:8080", "TETHERLESS_METRICS_LISTEN": "127.0.0.1:8080"})
    config, sources = config_mod.load(env={"TETHERLESS_METRICS_ON_MAIN_PORT": "false"})
    assert config.metrics_on_main_port is False
    assert sources["metrics_on_main_port"] == "env TETHERLESS_METRICS_ON_MAIN_PORT"


def test_bodies_are_parsed_only_after_the_token_and_the_ip_limit(tmp_path: Path) -> None:
    """An unauthenticated or rate-limited client gets its 401/429 before the relay looks at its body."""
    process = RelayProcess(
        tmp_path / "data", env={"TETHERLESS_RATE_IP_PER_SECOND": "0.001", "TETHERLESS_RATE_IP_BURST": "1"}
    )
    process.start()
    try:
        client = Http11(process.url)
        garbage = {"content-type": codec.MSGPACK}
        assert client.request("POST", "/v1/messages", b"\xc1" * 1000, garbage).code == "missing_token"
        assert client.request("POST", "/v1/log", b"\xc1", {**garbage, "authorization": "Bearer x"}).code == (
            "invalid_token"
        )
        assert client.request("POST", "/v1/accounts", b"\xc1", garbage).code == "malformed_body"  # the burst of 1
        limited = client.request("POST", "/v1/accounts", b"\xc1", garbage)
        assert (limited.status, limited.code) == (429, "rate_limited")
    finally:
        assert process.stop() == 0
