"""Tagged checkpoints: named copies of a table that a training job pairs with its model checkpoint.

Layout, in the portable snapshot format (`memstore.snapshot`):

    <data_dir>/checkpoints/<table>/<number>-<tag>/

`number` (ten digits) is one more than the highest number in that table's directory, so names
order by creation without consulting the wall clock (a clock stepped back cannot make an old
checkpoint look new). The newest `keep` checkpoints of each table are kept; the automatic
snapshots under `snapshots/` are separate and never prune these.

State and invariants (per table name, changed only under that name's lock):
- at most one checkpoint directory holds a given tag;
- `_current[name] = (tag, table, version)` means checkpoint `tag` holds exactly `table` (the
  object serving `name`, held weakly) as it was at `table.version`. It is set after writing a
  checkpoint and after restoring one. While it matches, asking for the same tag again returns
  the existing checkpoint without writing, and restoring it is a no-op: every rank of a
  data-parallel job may call both, and the table is copied or rolled back once.
"""
from __future__ import annotations

import re
import shutil
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from memstore.errors import FailedPrecondition, InvalidArgument, NotFound
from memstore.snapshot import META, Snapshot, fsync_dir, read_snapshot

CHECKPOINTS_DIR = "checkpoints"
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_NAME_RE = re.compile(r"^(\d{10})-(.+)$")


def check_tag(tag: str) -> str:
    if not TAG_RE.match(tag) or ".." in tag:
        raise InvalidArgument(f"invalid checkpoint tag {tag!r}: use 1-128 characters from [A-Za-z0-9_.-], "
                              "starting with a letter or digit")
    return tag


def list_checkpoints(table_dir: Path) -> list[tuple[int, str, Path]]:
    """(number, tag, path) of the complete checkpoints in `table_dir`, oldest first."""
    if not table_dir.is_dir():
        return []
    found = []
    for path in table_dir.iterdir():
        match = _NAME_RE.match(path.name)
        if match and (path / META).is_file():
            found.append((int(match[1]), match[2], path))
    return sorted(found)


class Checkpoints:
    def __init__(self, data_dir: Path, keep: int):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.root = Path(data_dir) / CHECKPOINTS_DIR
        self.keep = keep
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._current: dict[str, tuple[str, weakref.ref, int]] = {}

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def _is_current(self, name: str, tag: str, table) -> bool:
        current = self._current.get(name)
        return current is not None and current[0] == tag and current[1]() is table and current[2] == table.version

    def tags(self, name: str) -> list[str]:
        """The tags of table `name`'s complete checkpoints, oldest first."""
        return [tag for _, tag, _ in list_checkpoints(self.root / name)]

    def find(self, name: str, tag: str) -> Path | None:
        matches = [path for _, t, path in list_checkpoints(self.root / name) if t == tag]
        return matches[-1] if matches else None

    def take(self, table, tag: str) -> Path:
        """Write checkpoint `tag` of `table` (replacing an older one of that tag), or return it
        when it already holds the table as it is now."""
        check_tag(tag)
        name = table.spec.name
        with self._lock(name):
            existing = self.find(name, tag)
            if existing is not None and self._is_current(name, tag, table):
                return existing
            version = table.version  # read first: an update racing the copy only forces a rewrite later
            table_dir = self.root / name
            numbers = [n for n, _, _ in list_checkpoints(table_dir)]
            path = table.export(table_dir / f"{max(numbers, default=0) + 1:010d}-{tag}")
            if existing is not None:
                shutil.rmtree(existing)
            for _, _, old in list_checkpoints(table_dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            fsync_dir(table_dir)
            self._current[name] = (tag, weakref.ref(table), version)
            return path

    def restore(self, table, tag: str, replace_from: Callable[[Snapshot], object]) -> tuple[Path, bool]:
        """Roll `table` back to checkpoint `tag` through the backend's `replace_from`; returns
        (path, whether anything changed)."""
        check_tag(tag)
        name = table.spec.name
        with self._lock(name):
            path = self.find(name, tag)
            if path is None:
                raise NotFound(f"table {name!r} has no checkpoint {tag!r} on this server "
                               f"(it has: {', '.join(self.tags(name)) or 'none'})")
            if self._is_current(name, tag, table):
                return path, False
            snap = read_snapshot(path)  # verifies the checksums: never roll back to a damaged copy
            if snap.spec != table.spec:
                raise FailedPrecondition(f"checkpoint {path} holds another table spec: {snap.spec}")
            restored = replace_from(snap)
            self._current[name] = (tag, weakref.ref(restored), restored.version)
            return path, True

    def forget(self, name: str) -> None:
        """The table was dropped: its checkpoints go with it."""
        with self._lock(name):
            self._current.pop(name, None)
            shutil.rmtree(self.root / name, ignore_errors=True)
