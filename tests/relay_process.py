"""Start and stop real relay processes for end-to-end tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

READY = re.compile(r"ready at (https?://\S+) \(relay name (\S+),")
START_TIMEOUT_SECONDS = 30.0


class RelayProcess:
    """One ``tetherless serve`` child process; its stdout/stderr go to ``log_path``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        module: str = "tetherless_cli",
    ) -> None:
        """``module``: what ``python -m`` runs (an older tree's front door is ``relay.cli``)."""
        self.data_dir = data_dir
        self.module = module
        self.port = port
        self.extra_args = extra_args or []
        self.env = env or {}
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.name = ""
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        """Start the relay and wait for its ready line. Reuses the previous port on restarts."""
        cmd = [
            sys.executable,
            "-m",
            self.module,
            "serve",
            "--data",
            str(self.data_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            *self.extra_args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert self.proc.stdout is not None
        log = self.log_path.open("ab")
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            line = self.proc.stdout.readline()
            if not line:
                log.close()
                self.proc.stdout.close()
                raise RuntimeError(f"relay exited before ready (code {self.proc.wait()}); see {self.log_path}")
            log.write(line)
            log.flush()
            match = READY.search(line.decode(errors="replace"))
            if match:
                self.url, self.name = match.group(1), match.group(2)
                self.port = int(self.url.rsplit(":", 1)[1])
                break
            if time.monotonic() > deadline:
                raise RuntimeError("relay did not become ready in time")
        self._pump = threading.Thread(target=_pump, args=(self.proc.stdout, log), daemon=True)
        self._pump.start()

    def kill(self) -> None:
        """SIGKILL: no drain, no flush — what a power cut looks like to the process."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self._pump:
            self._pump.join(timeout=5)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code (kills after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self._pump:
            self._pump.join(timeout=5)
        return code

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def replica_processes(
    parent: Path, database_url: str, count: int, *, name: str, env: dict[str, str] | None = None
) -> Iterator[list[RelayProcess]]:
    """``count`` replicas of one relay (``name``) on one PostgreSQL database, started one after the other; the
    first creates the relay key, the others get a copy (every replica signs as the same relay). Stopped on exit."""
    processes: list[RelayProcess] = []
    try:
        for i in range(count):
            data = parent / f"replica{i}"
            if processes:
                data.mkdir(mode=0o700)
                shutil.copy2(processes[0].data_dir / "relay.key", data / "relay.key")
            process = RelayProcess(data, extra_args=["--database", database_url, "--name", name], env=env)
            process.start()
            processes.append(process)
        yield processes
    finally:
        for process in processes:
            process.stop()


def _pump(stream: IO[bytes], log: IO[bytes]) -> None:
    try:
        for line in stream:
            log.write(line)
            log.flush()
    finally:
        log.close()
        stream.close()
