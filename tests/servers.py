"""Real memstore servers for tests: in-process (`ServerThread`) or a `memstore serve` subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from memstore.config import ServerConfig
from memstore.server import ServerThread


def in_process(data_dir: Path, backend: str = "ram", **overrides) -> ServerThread:
    """A server on port 0 (unless `port=` overrides it) in this process; use it as a context manager (`with in_process(...) as srv`)."""
    config = ServerConfig(**{"port": 0, "backend": backend, "data_dir": str(data_dir), "grace_s": 1.0, **overrides})
    return ServerThread(config)


class ServeProcess:
    """`memstore serve` in a subprocess on a free port; `target` once it is listening."""

    def __init__(self, data_dir: Path, backend: str = "lmdb", *args: str, port: int = 0, env: dict | None = None):
        self.data_dir, self.backend, self.args, self.port = data_dir, backend, args, port
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(data_dir).parent / f"serve-{Path(data_dir).name}.log"

    def start(self, timeout_s: float = 30.0) -> ServeProcess:
        cmd = [sys.executable, "-m", "memstore.cli", "serve", "--port", str(self.port),
               "--backend", self.backend, "--data-dir", str(self.data_dir), *self.args]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes to it until it exits
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if line.startswith("memstore listening on"):
                self.port = int(line.rsplit(":", 1)[1])
                return self
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"memstore serve did not start: {self.log_path.read_text()[-3000:]}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no goodbye, no snapshot."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM: graceful stop; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout_s)
        return self.proc.returncode

    def restart(self) -> ServeProcess:
        """Start again on the same port and data dir (clients reconnect to the same target)."""
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()
