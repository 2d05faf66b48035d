"""``tetherless admin federation`` (tetherless_cli/admin.py): one clear line, never a traceback."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tetherless_cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_federation_on_a_fresh_database_lists_no_peers(tmp_path: Path) -> None:
    assert _cli("migrate", "--data", str(tmp_path)).returncode == 0
    done = _cli("admin", "federation", "--data", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no federation peers yet"


def test_federation_without_a_database_says_so(tmp_path: Path) -> None:
    done = _cli("admin", "federation", "--data", str(tmp_path / "missing"))
    assert done.returncode == 1
    assert "no relay database in" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_federation_on_a_schema_that_needs_newer_code_is_one_line(tmp_path: Path) -> None:
    assert _cli("migrate", "--data", str(tmp_path)).returncode == 0
    conn = sqlite3.connect(tmp_path / "relay.sqlite3")
    with conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (9999)")
        conn.execute("UPDATE schema_compat SET min_code_schema = 9999 WHERE id = 1")
    conn.close()
    done = _cli("admin", "federation", "--data", str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tetherless: error: the database schema is at migration 9999"), line
