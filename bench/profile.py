"""`--profile`: py-spy records each server and the client during a loop of 64k lookups.

After the lookup measurements, each memstore backend serves a few seconds of 64k-id lookups
(fp16, uniform) with `py-spy record` attached to its `memstore serve` process and to the benchmark
itself (the client side: gRPC's receive path, copies). The speedscope files (open them at
https://www.speedscope.app) land next to the results. Only samples of busy threads are kept
(py-spy's default), so a profile shows where CPU time goes, not waits.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def py_spy_executable() -> str | None:
    beside_python = Path(sys.executable).with_name("py-spy")
    return str(beside_python) if beside_python.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def py_spy(targets: dict[str, int], prefix: str, notes: list[str], rate: int = 200) -> Iterator[None]:
    """Record every pid in `targets` ({name: pid}) while the block runs; notes say where to look."""
    exe = py_spy_executable()
    if exe is None:
        notes.append("--profile: py-spy is not installed (pip install py-spy); no profiles written.")
        yield
        return
    recorders = {}
    for name, pid in targets.items():
        path = f"{prefix}{name}.speedscope.json"
        cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "speedscope",
               "--nonblocking", "--output", path]
        recorders[path] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attaching takes a moment; the measurement should not start without it
    try:
        yield
    finally:
        for path, proc in recorders.items():
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if Path(path).exists():
                notes.append(f"py-spy profile: {path}")
            else:
                notes.append(f"py-spy failed for {path}: {err.decode(errors='replace').strip()[-300:]}")
