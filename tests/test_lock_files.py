"""The environment the tests run in is exactly the one requirements/dev.txt locks.

`make test` installs requirements/dev.txt with hash checking and no dependency
resolution (docs/decisions/0007-lock-files.md); this test fails when a package
is missing, at another version, or when pyproject.toml names a dependency the
lock files do not pin (a lock that was not refreshed after an edit).
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.\-\[\]]+)==(?P<version>[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]+?))?\s*\\?$")


def locked(path: Path) -> dict[str, str]:
    """Pins of a uv/pip-tools lock file that apply to this interpreter and platform."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match is None:
            continue
        marker = match["marker"]
        if marker and not Marker(marker).evaluate():
            continue
        pins[canonicalize_name(match["name"].split("[")[0])] = match["version"]
    return pins


def test_every_locked_package_is_installed_at_its_locked_version() -> None:
    pins = locked(ROOT / "requirements" / "dev.txt")
    assert len(pins) > 50, "the dev lock file pins the whole tree"
    wrong = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from requirements/dev.txt (run `make test` to resync): {wrong}"


@pytest.mark.parametrize(("lock", "extras"), [("runtime.txt", ()), ("dev.txt", ("dev",))])
def test_every_declared_dependency_is_pinned(lock: str, extras: tuple[str, ...]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        declared += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = locked(ROOT / "requirements" / lock)
    for requirement in declared:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements/{lock}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={pins[name]}, outside {requirement}: run `make lock`"
        )


def test_the_runtime_lock_is_a_subset_of_the_dev_lock() -> None:
    runtime, dev = locked(ROOT / "requirements" / "runtime.txt"), locked(ROOT / "requirements" / "dev.txt")
    assert {name: dev.get(name) for name in runtime} == runtime
