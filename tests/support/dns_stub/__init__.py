"""Resolver failures for names, in a child process (see ``sitecustomize.py`` beside this file)."""

from __future__ import annotations

import os
from pathlib import Path

STUB_DIR = Path(__file__).resolve().parent


def env(errors: dict[str, str]) -> dict[str, str]:
    """Environment for a child process whose ``socket.getaddrinfo`` fails for each name of ``errors`` (and its
    subdomains) with the ``socket`` constant named there (``"EAI_NONAME"``, ``"EAI_AGAIN"``, …)."""
    path = [str(STUB_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        "PYTHONPATH": os.pathsep.join(path),
        "DNS_STUB_ERRORS": ",".join(f"{name}={error}" for name, error in errors.items()),
    }
