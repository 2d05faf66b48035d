"""deploy/Dockerfile: hadolint-clean, multi-stage, non-root, read-only-root friendly, signals handled.

No Docker engine runs here, so the image is not built; these checks read the file.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable

from deploy import render

DOCKERFILE = render.ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = render.ROOT / "deploy" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def arguments(name: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == name]


def test_hadolint_is_clean(require: Callable[[str], str]) -> None:
    result = subprocess.run(
        [require("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_wheel_build_into_a_slim_runtime() -> None:
    stages = arguments("FROM")
    assert [stage.split()[-1] for stage in stages] == ["builder", "runtime"]
    assert all("slim" in stage or "${PYTHON_IMAGE}" in stage for stage in stages)
    assert any("pip wheel" in run for run in arguments("RUN"))
    assert any(copy.startswith("--from=builder ") for copy in arguments("COPY"))


def test_runs_as_uid_10001_with_data_volume_and_port_8080() -> None:
    assert arguments("USER") == ["10001:10001"]
    assert arguments("EXPOSE") == ["8080"]
    assert json.loads(arguments("VOLUME")[0]) == ["/data"]
    env = " ".join(arguments("ENV"))
    assert "TETHERLESS_DATA=/data" in env
    assert "TETHERLESS_LISTEN=0.0.0.0:8080" in env
    # With readOnlyRootFilesystem the relay must not try to write bytecode next to its modules.
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert any("install -d -o 10001 -g 10001 -m 0700 /data" in run for run in arguments("RUN"))


def test_exec_form_entrypoint_forwards_sigterm() -> None:
    (entrypoint,) = arguments("ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--", "tetherless"], "exec form, tini as PID 1"
    assert json.loads(arguments("CMD")[0]) == ["serve"]
    assert not arguments("HEALTHCHECK"), "Kubernetes probes /livez and /readyz instead"


def test_build_context_sends_only_what_the_wheel_needs() -> None:
    kept = {line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for copy in arguments("COPY")
        if not copy.startswith("--from=")
        for source in copy.split()[:-1]
    }
    assert copied <= kept
    for path in kept:
        assert (render.ROOT / path).exists(), path


def test_the_base_image_is_pinned_to_a_python_the_project_supports() -> None:
    (arg,) = [a for a in arguments("ARG") if a.startswith("PYTHON_IMAGE=")]
    match = re.fullmatch(r"PYTHON_IMAGE=python:3\.(\d+)-slim-(\w+)", arg)
    assert match, arg
    assert int(match[1]) >= 11
