"""A real `memstore serve` daemon for the demo: a subprocess on loopback, stopped on every exit path.

The daemon runs in its own session (process group), so a Ctrl-C in the terminal reaches only the
demo, which then stops the daemon with SIGTERM (graceful: in-flight RPCs finish, LMDB closes)
and waits for it; a daemon that ignores SIGTERM is killed after `stop_timeout_s`.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

# glibc otherwise returns every multi-MiB gRPC buffer to the OS after each call (LIMITS.md: an
# 8 MiB reply took ~39 ms instead of ~13 ms); the Docker images set the same.
FAST_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


class MemstoreDaemon:
    """`memstore serve --port 0 --backend B --data-dir D [extra flags]`; `target` once listening.

    Use as a context manager; the server's stderr goes to `log_path`.
    """

    def __init__(self, data_dir: Path, backend: str = "lmdb", extra_args: tuple[str, ...] = (),
                 start_timeout_s: float = 60.0, stop_timeout_s: float = 30.0) -> None:
        self.data_dir, self.backend, self.extra_args = Path(data_dir), backend, tuple(extra_args)
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.log_path = self.data_dir.parent / "memstore.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "memstore.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                "--backend", self.backend, "--data-dir", str(self.data_dir), *self.extra_args]

    @property
    def target(self) -> str:
        if self.port is None:
            raise RuntimeError("the memstore daemon is not running")
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=log,
                                         env={**os.environ, **FAST_MALLOC_ENV}, start_new_session=True)
        self.port = self._wait_for_port()
        return self

    def _wait_for_port(self) -> int:
        """Read stdout until `memstore listening on HOST:PORT`; fail with the log if it never comes."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline().decode()
                if line.startswith("memstore listening on"):
                    return int(line.rsplit(":", 1)[1])
            if self.proc.poll() is not None:
                break
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        raise RuntimeError(f"`{' '.join(self.command)}` did not start within {self.start_timeout_s:.0f} s. "
                           f"Server log ({self.log_path}):\n{tail}")

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.port = None
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
