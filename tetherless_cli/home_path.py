"""Where this device's home is. Standard library only: ``whoami`` uses it before any cryptography is imported."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_home(arg: str | None) -> Path:
    """The client's home directory: ``--home``, else ``$TETHERLESS_HOME``, else a per-user data directory."""
    if arg:
        return Path(arg).expanduser()
    env = os.environ.get("TETHERLESS_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "tetherless"


__all__ = ["resolve_home"]
