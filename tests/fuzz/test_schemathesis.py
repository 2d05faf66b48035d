"""schemathesis against a real relay's /openapi.json: no 5xx, and every answer conforms to the document.

Checks: not_a_server_error, status_code_conformance,
response_schema_conformance, negative_data_rejection. Requests carry a
valid bearer token (a device registered first) so authenticated operations
get past authentication. ``TETHERLESS_FUZZ_EXAMPLES`` sets the examples per
operation (small in ``make test``; ``make fuzz`` raises it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.http11 import Http11, login, register
from tests.relay_process import RelayProcess

# tus PATCH bodies (docs/blobs.md) are raw bytes, like application/octet-stream.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")

EXAMPLES = int(os.environ.get("TETHERLESS_FUZZ_EXAMPLES", "8"))
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, negative_data_rejection]
# Fuzzing sends thousands of unauthenticated requests from one IP; the
# relay's abuse limits are tested elsewhere and would only answer 429 here.
NO_RATE_LIMITS = {
    "TETHERLESS_RATE_IP_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_REQUESTS_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_ENVELOPES_PER_SECOND": "0",
    "TETHERLESS_RATE_ACCOUNT_ENVELOPES_PER_SECOND": "0",
    "TETHERLESS_LOG_LEVEL": "warning",
}


@pytest.fixture(scope="module")
def fuzz_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayProcess, str]]:
    process = RelayProcess(Path(tmp_path_factory.mktemp("fuzz")) / "data", env=NO_RATE_LIMITS)
    process.start()
    try:
        http = Http11(process.url)
        device = register(http, "fuzzer")
        yield process, login(http, device)
    finally:
        logs = process.logs()
        assert process.stop() == 0, logs[-3000:]
        assert "Traceback" not in logs, logs[-3000:]


def _fuzz_operations(url: str, token: str, mode: GenerationMode) -> tuple[int, list[str]]:
    """Run every operation of the live document for EXAMPLES examples; (cases run, failure reports)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    headers = {"authorization": f"Bearer {token}"}
    failures: list[str] = []
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/stream"):
            continue  # long-lived responses never end; tests/e2e covers them

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            nonlocal ran
            ran += 1
            case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=10)

        try:
            run()
        except Unsatisfiable:
            continue  # negative mode has nothing to break in an operation without parameters or body
        except (Exception, BaseExceptionGroup) as exc:  # a check failed: collect all, report at the end
            failures.append(f"{operation.label} ({mode.value}): {str(exc)[:1500]}")
    return ran, failures


@pytest.mark.e2e
@pytest.mark.parametrize(
    "mode",
    [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    ids=lambda m: m.value,
)
def test_api_conforms_to_openapi(fuzz_relay: tuple[RelayProcess, str], mode: GenerationMode) -> None:
    process, token = fuzz_relay
    ran, failures = _fuzz_operations(process.url, token, mode)
    print(f"schemathesis {mode.value}: {ran} cases, {len(failures)} failing operations")
    assert ran > 0
    assert not failures, "\n\n".join(failures)
