"""The servers a benchmark talks to, each in its own process.

A server in the benchmark's own process would share its GIL with the client and measure neither,
so `memstore serve` and `redis-server` run as subprocesses on free loopback ports and are stopped
(SIGTERM, then SIGKILL) when the section ends. Nothing is installed or started system-wide.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

REDIS_HINT = "install it with `apt-get install redis-server` (or put redis-server on PATH)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Process:
    """A subprocess that is stopped gracefully, then forcibly, when the `with` block ends."""

    proc: subprocess.Popen | None = None
    log_path: Path

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __exit__(self, *exc) -> None:
        self.stop()


class MemstoreServer(_Process):
    """`memstore serve` on a free loopback port, with this process's environment (so the malloc
    settings the benchmark runs with apply to the server too)."""

    def __init__(self, data_dir: Path, backend: str = "ram", *args: str):
        self.data_dir, self.backend, self.args = Path(data_dir), backend, args
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.serve.log"
        self.port = 0

    def start(self, timeout_s: float = 120.0) -> Self:
        # No periodic RAM snapshot: one landing inside a timed section would be measured as latency.
        cmd = [sys.executable, "-m", "memstore.cli", "serve", "--port", "0", "--backend", self.backend,
               "--data-dir", str(self.data_dir), "--log-level", "warning", "--snapshot-interval-s", "0", *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=dict(os.environ))
        deadline = time.monotonic() + timeout_s  # restoring a large RAM snapshot takes a while
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if line.startswith("memstore listening on"):
                self.port = int(line.rsplit(":", 1)[1])
                return self
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"memstore serve did not start ({' '.join(cmd)}):\n{self.log_tail()}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        return self.start()


def find_redis() -> tuple[str | None, str]:
    """(path of redis-server or None, why not); redis-py must be importable too."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return None, "the `redis` Python package is missing (pip install redis hiredis)"
    path = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")
         if os.access(p, os.X_OK)), None)
    return (path, "") if path else (None, f"redis-server is not installed: {REDIS_HINT}")


class RedisServer(_Process):
    """A throwaway redis-server: loopback only, no persistence, its files in `work_dir`."""

    def __init__(self, executable: str, work_dir: Path):
        self.executable, self.work_dir = executable, Path(work_dir)
        self.log_path = self.work_dir / "redis.log"
        self.port = free_port()

    def start(self, timeout_s: float = 20.0) -> Self:
        import redis
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.work_dir), "--logfile", str(self.log_path),
               "--daemonize", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port).ping():
                    return self
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_tail()}")

    def client(self, db: int = 0):
        import redis
        return redis.Redis(port=self.port, db=db)

    def version(self) -> str:
        return str(self.client().info("server").get("redis_version", "?"))

    def __enter__(self) -> Self:
        return self.start()
