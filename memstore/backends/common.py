"""Pieces both backends share: the dedup memory policy and the data directory lock."""
from __future__ import annotations

import fcntl
import os
import shutil
from collections import OrderedDict
from pathlib import Path

from memstore.errors import FailedPrecondition
from memstore.snapshot import fsync_dir

MAX_CLIENTS = 100_000  # dedup memory per table; the least recently seen client is forgotten first
SNAPSHOTS_DIR = "snapshots"
DROPPING_DIR = "dropping"
TABLE_DIRS = ("snapshots", "checkpoints", "tables", "memmap")  # where a table's files may live, by backend


def is_duplicate(last_seq: int | None, seq: int) -> bool:
    """An update is a retry when its seq is not above the client's last applied one."""
    return last_seq is not None and seq <= last_seq


class DedupMemory:
    """client_id → last applied seq, bounded: at most `max_clients` entries, least recently
    updated evicted first (an evicted client that retries an old seq would be applied again,
    which needs 100k newer clients in between)."""

    def __init__(self, entries: dict[str, int] | None = None, max_clients: int = MAX_CLIENTS):
        self.max_clients = max_clients
        self._last: OrderedDict[str, int] = OrderedDict(entries or {})  # oldest first

    def is_duplicate(self, client_id: str, seq: int) -> bool:
        return bool(client_id) and is_duplicate(self._last.get(client_id), seq)

    def last(self, client_id: str) -> int | None:
        return self._last.get(client_id)

    def record(self, client_id: str, seq: int) -> None:
        if not client_id:
            return
        self._last[client_id] = seq
        self._last.move_to_end(client_id)
        while len(self._last) > self.max_clients:
            self._last.popitem(last=False)

    def to_dict(self) -> dict[str, int]:
        return dict(self._last)


class DataDirLock:
    """An exclusive flock on `<data_dir>/.lock`: two daemons on one data dir would corrupt it
    (the RAM backend's snapshots, the LMDB dedup memory), so the second one is refused."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / ".lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise FailedPrecondition(
                f"data dir {data_dir} is in use by another memstore (pid {holder}); "
                "each daemon needs its own --data-dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


class Tombstones:
    """Drops in progress, so that a crash in the middle of one never brings the table back.

    `<data_dir>/dropping/<name>` is written (and fsynced) before a drop deletes anything, and
    removed when everything is gone. At start, `finish(data_dir)` completes the drops a crash
    interrupted: whatever of the table's directories is left is deleted before any is opened.
    """

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.dir = data_dir / DROPPING_DIR

    def mark(self, name: str) -> None:
        self.dir.mkdir(exist_ok=True)
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.dir)

    def clear(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)
        fsync_dir(self.dir)

    def finish(self) -> list[str]:
        """Complete interrupted drops; returns the names."""
        names = sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []
        for name in names:
            for parent in TABLE_DIRS:
                shutil.rmtree(self.data_dir / parent / name, ignore_errors=True)
            self.clear(name)
        return names

