"""Where the command line finds this device's home (tetherless_cli/home_path.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tetherless_cli.home_path import resolve_home


def test_resolve_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TETHERLESS_HOME", str(tmp_path / "env"))
    assert resolve_home(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_home(None) == tmp_path / "env"
    monkeypatch.delenv("TETHERLESS_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_home(None) == tmp_path / "xdg" / "tetherless"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert resolve_home(None) == Path.home() / ".local" / "share" / "tetherless"
