"""docs/protocol.md keeps up with the code: every message and every error code is documented."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from protocol.errors import STATUS, ErrorCode
from protocol.messages import ALL_MESSAGES

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: m.__name__)
def test_every_message_and_field_is_documented(message: type) -> None:
    rows = [line for line in DOC.splitlines() if line.startswith(f"| `{message.__name__}`")]
    assert rows, f"{message.__name__} is missing from docs/protocol.md §8"
    for field in msgspec.inspect.type_info(message).fields:  # type: ignore[attr-defined]
        assert f"`{field.name}`" in rows[0], f"{message.__name__}.{field.name} is not documented"


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_every_error_code_is_documented_with_its_status(code: ErrorCode) -> None:
    assert f"| {code.value} | {STATUS[code]} |" in DOC
