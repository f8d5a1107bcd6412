"""The portable snapshot format: one table, any backend, any shard layout.

A snapshot is a directory:

    meta.msgpack   format + version, the TableSpec (to_dict), the dedup memory {client_id: last_seq}
                   (oldest first), the row count, creation time, a blake2b checksum per array
    ids.npy        int64 [m]                 GLOBAL row ids of the materialized rows, sorted, unique
    rows.npy       storage dtype [m, dim]    (bf16 as uint16 bit patterns)
    state.npy      float32 [m, width]        optimizer state (`memstore.optimizers` layout)

Rows not listed read as their deterministic initial value. Ids are global (not shard-local) so a
set of shard snapshots can be merged or re-split into another shard layout. Everything is msgpack
or .npy written with allow_pickle=False: loading a snapshot never executes code.

Writes go to a hidden temp directory next to the destination, are fsynced, then renamed into
place, so a reader (or a restart) sees either the whole snapshot or none of it. Rows are streamed
in chunks (`SnapshotWriter.append`) so a snapshot of a large table never needs a second copy of
it in memory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import msgpack
import numpy as np

from memstore import dtypes
from memstore.errors import FailedPrecondition
from memstore.optimizers import state_width
from memstore.spec import TableSpec

log = logging.getLogger("memstore.snapshot")

FORMAT = "memstore-snapshot"
VERSION = 1
META, IDS, ROWS, STATE = "meta.msgpack", "ids.npy", "rows.npy", "state.npy"
_ARRAYS = {"ids": IDS, "rows": ROWS, "state": STATE}
_TMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 24  # bytes hashed per step when verifying memory-mapped arrays


class CorruptSnapshot(FailedPrecondition):
    """A snapshot directory that is incomplete, inconsistent or fails its checksums."""


@dataclass(frozen=True)
class Snapshot:
    path: Path
    spec: TableSpec
    dedup: dict[str, int]       # client_id → last applied seq, oldest first
    ids: np.ndarray             # int64 [m], global row ids, sorted
    rows: np.ndarray            # storage dtype [m, dim]
    state: np.ndarray           # float32 [m, width]
    created: str                # ISO 8601, UTC
    checksums: dict[str, str]   # array name → "blake2b:<hex>"

    def local_ids(self) -> np.ndarray:
        """The ids as rows of the shard described by `spec`."""
        return self.spec.to_local(self.ids)

    def verify(self) -> None:
        """Recompute every array checksum; raise `CorruptSnapshot` on a mismatch."""
        for name in _ARRAYS:
            actual = _checksum(getattr(self, name))
            if actual != self.checksums.get(name):
                raise CorruptSnapshot(f"snapshot {self.path}: {name} checksum mismatch "
                                      f"(stored {self.checksums.get(name)}, computed {actual})")


def _new_hash() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=32)


def _hash_update(h: hashlib.blake2b, array: np.ndarray) -> None:
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _HASH_CHUNK):  # chunked: memmaps are paged in gradually
        h.update(flat[start:start + _HASH_CHUNK])


def _checksum(array: np.ndarray) -> str:
    h = _new_hash()
    _hash_update(h, array)
    return "blake2b:" + h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _NpyStream:
    """An .npy file whose rows are appended in chunks, hashed as they go."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        self.dtype, self.shape, self.written = np.dtype(dtype), shape, 0
        self.hash = _new_hash()
        self.file = open(path, "wb")  # noqa: SIM115 -- stays open across append() calls; close() ends it
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": shape}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.shape[1:]:
            raise ValueError(f"chunk shape {chunk.shape} does not fit array shape {self.shape}")
        self.file.write(chunk.reshape(-1).view(np.uint8).data)
        _hash_update(self.hash, chunk)
        self.written += chunk.shape[0]

    def close(self, sync: bool) -> str:
        if self.written != self.shape[0]:
            raise ValueError(f"wrote {self.written} rows, header promised {self.shape[0]}")
        self.file.flush()
        if sync:
            os.fsync(self.file.fileno())
        self.file.close()
        return "blake2b:" + self.hash.hexdigest()


class SnapshotWriter:
    """Streams one table into `dest` (which must not exist yet).

        with SnapshotWriter(dest, spec, num_rows=m, dedup=memory) as writer:
            for ids, rows, state in chunks:   # global ids, ascending across chunks
                writer.append(ids, rows, state)
        # committed (renamed into place) on a clean exit; removed on an exception
    """

    def __init__(self, dest: Path, spec: TableSpec, num_rows: int, dedup: dict[str, int],
                 sync: bool = True):
        self.dest, self.spec, self.num_rows, self.sync = Path(dest), spec, num_rows, sync
        self.dedup = {str(k): int(v) for k, v in dedup.items()}
        if self.dest.exists():
            raise FileExistsError(f"snapshot destination {self.dest} already exists")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dest.parent / f"{_TMP_PREFIX}{self.dest.name}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        width = state_width(spec.optimizer, spec.dim)
        self.streams = {
            "ids": _NpyStream(self.tmp / IDS, np.dtype("<i8"), (num_rows,)),
            "rows": _NpyStream(self.tmp / ROWS, dtypes.storage_dtype(spec.dtype), (num_rows, spec.dim)),
            "state": _NpyStream(self.tmp / STATE, np.dtype("<f4"), (num_rows, width)),
        }
        self.last_id = -1

    def append(self, ids: np.ndarray, rows: np.ndarray, state: np.ndarray) -> None:
        """Add rows with GLOBAL ids (ascending, continuing after the previous chunk)."""
        if len(ids) == 0:
            return
        if ids[0] <= self.last_id or np.any(np.diff(ids) <= 0):
            raise ValueError("snapshot ids must be strictly ascending across all chunks")
        self.last_id = int(ids[-1])
        self.streams["ids"].append(ids)
        self.streams["rows"].append(rows)
        self.streams["state"].append(state)

    def commit(self) -> Path:
        checksums = {name: stream.close(self.sync) for name, stream in self.streams.items()}
        now = datetime.now(UTC)
        meta = {"format": FORMAT, "version": VERSION, "spec": self.spec.to_dict(),
                "dedup": self.dedup, "rows": self.num_rows, "id_space": "global",
                "created": now.isoformat(), "created_unix": now.timestamp(), "checksums": checksums}
        with open(self.tmp / META, "wb") as f:
            f.write(msgpack.packb(meta, use_bin_type=True))
            f.flush()
            if self.sync:
                os.fsync(f.fileno())
        if self.sync:
            fsync_dir(self.tmp)
        os.rename(self.tmp, self.dest)  # atomic: the snapshot appears whole or not at all
        if self.sync:
            fsync_dir(self.dest.parent)
        return self.dest

    def abort(self) -> None:
        for stream in self.streams.values():
            stream.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_snapshot(dest: Path, spec: TableSpec, ids: np.ndarray, rows: np.ndarray,
                   state: np.ndarray, dedup: dict[str, int], sync: bool = True) -> Path:
    """Write in-memory arrays (global ids, sorted) as a snapshot at `dest`; returns `dest`."""
    with SnapshotWriter(dest, spec, len(ids), dedup, sync=sync) as writer:
        writer.append(np.asarray(ids, np.int64), rows, state)
    return Path(dest)


def read_snapshot(path: Path, *, mmap: bool = True, verify: bool = True) -> Snapshot:
    """Open a snapshot; arrays are read-only memory maps unless `mmap=False`.

    Raises `CorruptSnapshot` when files are missing, shapes disagree with the spec, ids are not
    sorted valid ids of the shard, or (with `verify`) a checksum does not match."""
    path = Path(path)
    try:
        meta = msgpack.unpackb((path / META).read_bytes(), raw=False)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CorruptSnapshot(f"{path}: not a {FORMAT} v{VERSION} snapshot "
                                  f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
        spec = TableSpec.from_dict(meta["spec"])
        arrays = {name: np.load(path / file, mmap_mode="r" if mmap else None, allow_pickle=False)
                  for name, file in _ARRAYS.items()}
    except CorruptSnapshot:
        raise
    except Exception as exc:  # missing file, truncated .npy, bad msgpack, invalid spec
        raise CorruptSnapshot(f"cannot read snapshot {path}: {exc}") from exc
    snap = Snapshot(path=path, spec=spec, dedup={str(k): int(v) for k, v in meta["dedup"].items()},
                    created=meta["created"], checksums=dict(meta["checksums"]), **arrays)
    _check_shapes(snap, int(meta["rows"]))
    if verify:
        snap.verify()
    return snap


def _check_shapes(snap: Snapshot, num_rows: int) -> None:
    spec = snap.spec
    width = state_width(spec.optimizer, spec.dim)
    expected = {"ids": ((num_rows,), np.dtype("<i8")),
                "rows": ((num_rows, spec.dim), dtypes.storage_dtype(spec.dtype)),
                "state": ((num_rows, width), np.dtype("<f4"))}
    for name, (shape, dtype) in expected.items():
        array = getattr(snap, name)
        if array.shape != shape or array.dtype != dtype:
            raise CorruptSnapshot(f"snapshot {snap.path}: {name} is {array.dtype}{list(array.shape)}, "
                                  f"expected {dtype}{list(shape)}")
    ids = snap.ids
    if num_rows and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= spec.num_rows
                     or np.any(ids % spec.shard_count != spec.shard_index)):
        raise CorruptSnapshot(f"snapshot {snap.path}: ids are not sorted unique rows of this shard")


def new_snapshot_path(table_dir: Path) -> Path:
    """`<table_dir>/<number>-<UTC timestamp>`: `number` (ten digits) is one more than the highest
    in `table_dir`, so snapshots order by creation whatever the wall clock does (a clock stepped
    back must not make pruning delete the newest, or a restart restore an older one); the
    timestamp is for people."""
    table_dir = Path(table_dir)
    existing = [_order(p)[0] for p in table_dir.iterdir()] if table_dir.is_dir() else []
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return table_dir / f"{max(existing, default=0) + 1:010d}-{stamp}"


def _order(path: Path) -> tuple[int, str]:
    """Sort key: the creation number; names from before numbering (a bare timestamp) come first."""
    head, _, _ = path.name.partition("-")
    return (int(head), path.name) if len(head) == 10 and head.isdigit() else (0, path.name)


def list_snapshots(table_dir: Path) -> list[Path]:
    """Complete snapshots under `table_dir`, oldest first (temp dirs are never listed)."""
    table_dir = Path(table_dir)
    if not table_dir.is_dir():
        return []
    return sorted((p for p in table_dir.iterdir() if not p.name.startswith(".") and (p / META).is_file()),
                  key=_order)


def latest_snapshot(table_dir: Path) -> Path | None:
    snapshots = list_snapshots(table_dir)
    return snapshots[-1] if snapshots else None


def newest_valid_snapshot(table_dir: Path) -> Snapshot | None:
    """The newest snapshot of the table in `table_dir` that verifies: what a backend restores at
    start. Damaged ones, and ones holding another table, are logged and skipped, so an older
    good snapshot is the fallback."""
    table_dir = Path(table_dir)
    for path in reversed(list_snapshots(table_dir)):
        try:
            snap = read_snapshot(path)
        except CorruptSnapshot as exc:
            log.error("skipping damaged snapshot: %s", exc)
            continue
        if snap.spec.name != table_dir.name:
            log.error("skipping snapshot %s: it holds table %r", path, snap.spec.name)
            continue
        return snap
    if table_dir.is_dir() and any(table_dir.iterdir()):
        log.error("no valid snapshot in %s: table %r not restored", table_dir, table_dir.name)
    return None


def prune_snapshots(table_dir: Path, keep: int, stale_tmp_s: float = 3600.0) -> list[Path]:
    """Delete all but the newest `keep` snapshots, and temp dirs left by a crash more than
    `stale_tmp_s` ago; returns what was removed."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    removed = list_snapshots(table_dir)[:-keep]
    table_dir = Path(table_dir)
    if table_dir.is_dir():
        removed += [p for p in table_dir.iterdir() if p.name.startswith(_TMP_PREFIX)
                    and time.time() - p.stat().st_mtime > stale_tmp_s]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
