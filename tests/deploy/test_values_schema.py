"""values.schema.json: the scenarios pass, the bad values are refused, by check-jsonschema and by Helm itself."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy import render

SCHEMA = render.CHART / "values.schema.json"
BAD_VALUES = sorted((Path(__file__).parent / "bad-values").glob("*.yaml"))


def check_jsonschema(tool: str, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "--schemafile", str(SCHEMA), *map(str, files)], capture_output=True, text=True, timeout=60
    )


def test_schema_is_valid_draft_07(require: Callable[[str], str]) -> None:
    result = subprocess.run(
        [require("check-jsonschema"), "--check-metaschema", str(SCHEMA)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_defaults_and_scenarios_pass(require: Callable[[str], str]) -> None:
    result = check_jsonschema(require("check-jsonschema"), render.CHART / "values.yaml", *render.SCENARIOS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_are_bad_values_to_refuse() -> None:
    assert len(BAD_VALUES) >= 5


@pytest.mark.parametrize("bad", BAD_VALUES, ids=[path.stem for path in BAD_VALUES])
def test_check_jsonschema_refuses_bad_values(require: Callable[[str], str], bad: Path) -> None:
    result = check_jsonschema(require("check-jsonschema"), bad)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Schema validation errors were encountered" in result.stdout


@pytest.mark.parametrize("bad", BAD_VALUES, ids=[path.stem for path in BAD_VALUES])
def test_helm_refuses_bad_values_merged_with_defaults(require: Callable[[str], str], bad: Path) -> None:
    helm_python = pytest.importorskip(require("helm_python"))
    with pytest.raises(helm_python.HelmValuesError, match="meet the specifications of the schema"):
        render.render_chart(render.load_values(bad))


def test_postgresql_scenarios_pass_helm_schema_but_sqlite_with_three_replicas_does_not(
    require: Callable[[str], str],
) -> None:
    helm_python = pytest.importorskip(require("helm_python"))
    with helm_python.Chart.load(render.CHART) as chart:
        chart.validate_schema(render.load_values(render.CHART / "ci" / "postgres-ha-values.yaml"))
        with pytest.raises(helm_python.HelmValuesError, match="replicaCount"):
            chart.validate_schema({"relay": {"name": "relay.example.org"}, "replicaCount": 3})
