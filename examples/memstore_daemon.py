"""Start a throwaway `memstore serve` daemon for an example (the examples' `--memstore` flag).

    with local_daemon() as target:          # "127.0.0.1:<port>", RAM backend, a temporary data dir
        client = MemStoreClient(target)

In real use the daemon runs on its own (`memstore serve`, docker-compose, Kubernetes) and the
examples take its address: `--memstore HOST:PORT`.
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def local_daemon(backend: str = "ram") -> Iterator[str]:
    """A daemon on a free loopback port for the duration of the block; stopped with SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="memstore-example-") as data_dir:
        command = [sys.executable, "-m", "memstore.cli", "serve", "--port", "0", "--backend", backend,
                   "--data-dir", data_dir]
        daemon = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            line = daemon.stdout.readline()  # the daemon prints this line once it listens
            if not line.startswith("memstore listening on"):
                raise RuntimeError(f"`{' '.join(command)}` did not start (exit code {daemon.wait()})")
            yield line.split()[-1]
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
