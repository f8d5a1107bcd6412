"""The RAM backend: one dense numpy array per table, rows created lazily, snapshots for restarts.

Per table (L = spec.local_rows rows of this shard):

    rows          storage dtype [L, dim]   np.zeros: calloc'd, pages cost memory only once touched
    state         float32 [L, width]       optimizer state beside the rows
    materialized  bool [L]                 True once a row has been written by an update

Creating a table of 10^9 rows is instant, but not free for long: hashed ids touch every page
(numpy backs big arrays with 2 MiB huge pages), so a table becomes resident at its dense size on
its first lookups; `max_bytes` admits a table only when that size fits. A row that was never
written reads as its
deterministic initial value (rounded to the storage dtype), computed on the fly; the lookup then
stores it if the table's lock is free, and an update stores it before its optimizer step, so the
init is computed about once per row.

Concurrency: updates and snapshots of one table are serialised by the table's lock; lookups
never wait for it (they materialize rows only when they can take it without waiting). Each row is
published by writing its values before its `materialized` flag, and a lookup reads the flags
before the rows, so a lookup sees either a row's initial value or a written one, never the zeros
beneath. A lookup that races an update of
the same rows may see some rows (even some elements) before the update and some after, like
Hogwild-style embedding servers; rows the update does not touch are never affected.

Durability: RAM is volatile. `checkpoint()` (called by the server on SIGTERM and periodically)
and `snapshot(name)` write the portable format under `<data_dir>/snapshots/<name>/`; a restart
restores each table from its newest valid snapshot. Updates since the last checkpoint are lost
on a crash. `memmap=True` backs the arrays by sparse files under `<data_dir>/memmap/` so a table
may exceed RAM (the OS pages it out); those files are scratch, rebuilt from snapshots at start.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memstore import dtypes, memory, optimizers, shm
from memstore.backends.base import Backend, Table, TableUsage
from memstore.backends.common import SNAPSHOTS_DIR, DataDirLock, DedupMemory, Tombstones
from memstore.errors import AlreadyExists, NotFound, ResourceExhausted
from memstore.init import initial_stored
from memstore.snapshot import (
    Snapshot,
    SnapshotWriter,
    new_snapshot_path,
    newest_valid_snapshot,
    prune_snapshots,
)
from memstore.spec import TableSpec

log = logging.getLogger("memstore.backends.ram")

CHUNK_ROWS = 1 << 16  # rows per step when streaming a snapshot out or in
MEMMAP_DIR = "memmap"


@dataclass
class _Arrays:
    rows: np.ndarray          # storage dtype [L, dim]
    state: np.ndarray         # float32 [L, width]
    materialized: np.ndarray  # bool [L]


def dense_bytes(spec: TableSpec) -> int:
    """Bytes the dense arrays of a table reserve: rows + state + the materialized flag."""
    width = optimizers.state_width(spec.optimizer, spec.dim)
    return spec.local_rows * (spec.row_bytes + 4 * width + 1)


def _allocate(spec: TableSpec, memmap_dir: Path | None) -> _Arrays:
    """Zeroed arrays that touch no pages: calloc, or sparse files when memory-mapped."""
    width = optimizers.state_width(spec.optimizer, spec.dim)
    shapes = {"rows": ((spec.local_rows, spec.dim), dtypes.storage_dtype(spec.dtype)),
              "state": ((spec.local_rows, width), np.dtype(np.float32)),
              "materialized": ((spec.local_rows,), np.dtype(np.bool_))}
    if memmap_dir is not None:
        memmap_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    try:
        for name, (shape, dtype) in shapes.items():
            if memmap_dir is None or 0 in shape:  # an empty file cannot be mapped
                arrays[name] = np.zeros(shape, dtype)
            else:
                arrays[name] = np.memmap(memmap_dir / f"{name}.bin", dtype, "w+", shape=shape)
    except (MemoryError, OSError) as exc:
        raise ResourceExhausted(
            f"cannot allocate table {spec.name!r} ({dense_bytes(spec) / 2**30:.1f} GiB dense): {exc}; "
            "use fewer rows, more shards, memmap mode or the lmdb backend") from None
    return _Arrays(**arrays)


_APPLY_THREADS = min(4, os.cpu_count() or 1)
_APPLY_POOL = ThreadPoolExecutor(_APPLY_THREADS, thread_name_prefix="memstore-apply")
_ROWS_PER_THREAD = 16384  # smaller batches are not worth a thread hop


def _parts(rows: int) -> int:
    return max(1, min(_APPLY_THREADS, rows // _ROWS_PER_THREAD))


class RamTable(Table):
    def __init__(self, spec: TableSpec, arrays: _Arrays, dedup: DedupMemory,
                 memmap_dir: Path | None = None, shared: shm.TableFiles | None = None):
        self.spec = spec
        self._a: _Arrays | None = arrays
        self._dedup = dedup
        self._memmap_dir = memmap_dir
        self.shared = shared  # the arrays' shared-memory files, when co-located clients may map them
        self._storage = dtypes.storage_dtype(spec.dtype)
        self._width = optimizers.state_width(spec.optimizer, spec.dim)
        self._initial_state_nonzero = bool(optimizers.initial_state(spec.optimizer, 1, spec.dim).any())
        self._count = 0  # fresh arrays; restore() sets it
        self._lock = threading.Lock()  # serialises writers: updates, the copy phase of snapshots, drop
        self._snapshot_lock = threading.Lock()  # one snapshot of this table at a time
        self._version = 0              # applied updates; checkpoint skips unchanged tables
        self._saved_version = -1       # _version at the last snapshot
        self._dropped = False

    # ---- data path ------------------------------------------------------------------------

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        a = self._a
        self._check_alive()  # after reading _a: release() flags the table before dropping _a
        out, fresh = shm.gather(a.rows, a.materialized, self.spec, ids)  # what co-located clients run too
        if fresh.any():
            self._try_materialize(ids[fresh], out[fresh])
        return out

    def lookup_blocks(self, ids: np.ndarray, rows_per_block: int) -> Iterator[np.ndarray]:
        # RAM reads are per row anyway (see the module doc), so nothing is lost by gathering
        # block by block, and the first block leaves while the rest is gathered.
        for start in range(0, len(ids), rows_per_block):
            yield self.lookup(ids[start:start + rows_per_block])

    def _try_materialize(self, ids: np.ndarray, initial: np.ndarray) -> None:
        """Keep initial rows a lookup computed, so the update that usually follows (or the next
        lookup) need not compute them again. Skipped while a writer holds the lock: lookups
        never wait. Re-checks the flags under the lock, so a row written meanwhile is kept."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._dropped:
                return
            a = self._a
            ids, first = np.unique(ids, return_index=True)
            still_fresh = ~a.materialized[ids]
            ids, initial = ids[still_fresh], initial[first[still_fresh]]
            a.rows[ids] = initial
            if self._initial_state_nonzero:  # the calloc'd zeros are already right otherwise
                a.state[ids] = optimizers.initial_state(self.spec.optimizer, len(ids), self.spec.dim)
            a.materialized[ids] = True
            self._count += len(ids)
        finally:
            self._lock.release()

    def apply_update(self, ids: np.ndarray, grads: np.ndarray, client_id: str, seq: int,
                     lr: float | None = None) -> bool:
        with self._lock:
            self._check_alive()
            if self._dedup.is_duplicate(client_id, seq):
                return False
            # ids are unique, so slices of the batch touch disjoint rows: big batches are stepped
            # on several threads at once (numpy releases the GIL in gathers and arithmetic).
            # Every part is computed before any is written: a part that fails (MemoryError) leaves
            # the table as it was, so a refused update changes nothing and its retry applies once.
            bounds = np.linspace(0, len(ids), _parts(len(ids)) + 1).astype(int)
            parts = [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]
            stepped = list(_APPLY_POOL.map(lambda p: self._stepped_rows(ids[p], grads[p], lr), parts))
            list(_APPLY_POOL.map(lambda args: self._write_rows(ids[args[0]], *args[1][:2]), zip(parts, stepped)))
            # Rows and state first, flags last: a concurrent lookup trusts a set flag.
            new_ids = np.concatenate([ids[part][fresh] for part, (_, _, fresh) in zip(parts, stepped)])
            if len(new_ids):
                self._a.materialized[new_ids] = True
                self._count += len(new_ids)
            self._dedup.record(client_id, seq)
            self._version += 1
            return True

    def shared_location(self) -> tuple[str, Path, int] | None:
        """Where same-host clients map this table (None: in private memory)."""
        return None if self.shared is None else ("ram", self.shared.path, self.shared.generation)

    def last_seq(self, client_id: str) -> int | None:
        return self._dedup.last(client_id)

    @property
    def version(self) -> int:
        return self._version

    def _stepped_rows(self, ids: np.ndarray, grads: np.ndarray,
                      lr: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows (storage dtype) and state of `ids` after the step, and the mask of rows that were
        fresh; nothing is written."""
        a, opt = self._a, self.spec.optimizer
        fresh = ~a.materialized[ids]                                          # (n,)
        stored = np.take(a.rows, ids, axis=0)                                 # (n, dim)
        state = np.take(a.state, ids, axis=0)                                 # (n, width)
        new_ids = ids[fresh]
        if len(new_ids):
            stored[fresh] = initial_stored(self.spec, new_ids)
            state[fresh] = optimizers.initial_state(opt, len(new_ids), self.spec.dim)
        rows = dtypes.to_float32(stored, self.spec.dtype)                     # (n, dim)
        optimizers.step(opt, rows, state, grads, lr)
        return dtypes.from_float32(rows, self.spec.dtype), state, fresh

    def _write_rows(self, ids: np.ndarray, stored: np.ndarray, state: np.ndarray) -> None:
        self._a.rows[ids] = stored
        self._a.state[ids] = state


    # ---- persistence ----------------------------------------------------------------------

    def usage(self) -> TableUsage:
        a = self._a
        if a is None:  # dropped
            resident = 0
        elif self.shared is not None:  # files allocated in full on a tmpfs: all of it is memory
            resident = memory.allocated_bytes(self.shared.path)
        else:
            resident = sum(memory.resident_bytes(x) for x in (a.rows, a.state, a.materialized))
        return TableUsage(rows_materialized=self._count,
                          bytes_used=self._count * (self.spec.row_bytes + 4 * self._width),
                          bytes_reserved=dense_bytes(self.spec), bytes_resident=resident)

    def snapshot(self, dest: Path) -> Path:
        """Copy the materialized rows out under the writer lock (consistent; no second copy of
        the table in memory; updates wait, lookups go on), then fsync and publish without it.
        The table's restart point: `checkpoint()` skips it until the next update."""
        with self._snapshot_lock:
            self._saved_version = self._write_snapshot(dest)
            return dest

    def export(self, dest: Path) -> Path:
        with self._snapshot_lock:
            self._write_snapshot(dest)  # not a restart point: `dirty` is left as it is
            return dest

    def _write_snapshot(self, dest: Path) -> int:
        """Write the snapshot; returns the version it holds."""
        with self._lock:
            self._check_alive()
            writer, version = self._stream_rows(dest), self._version
        try:
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return version

    def _stream_rows(self, dest: Path) -> SnapshotWriter:
        a = self._a
        local_ids = np.flatnonzero(a.materialized)  # (m,) ascending
        writer = SnapshotWriter(dest, self.spec, len(local_ids), self._dedup.to_dict())
        try:
            for start in range(0, len(local_ids), CHUNK_ROWS):
                chunk = local_ids[start:start + CHUNK_ROWS]
                writer.append(self.spec.to_global(chunk), np.take(a.rows, chunk, axis=0),
                              np.take(a.state, chunk, axis=0))
        except BaseException:
            writer.abort()
            raise
        return writer

    def reset_to(self, snap: Snapshot) -> None:
        """Replace every row, all optimizer state and the dedup memory by the snapshot's (a
        checkpoint restore). Updates wait; a lookup racing it may see rows of either side."""
        with self._snapshot_lock, self._lock:
            self._check_alive()
            written = np.flatnonzero(self._a.materialized)                   # (m,) touched rows only
            self._a.materialized[written] = False  # unlisted rows read as their initial value again
            self._a.state[written] = 0  # the arrays' zeros: what materializing a row relies on
            self.restore(snap)
            self._version += 1  # a new state: the next `checkpoint()` persists it

    def restore(self, snap: Snapshot) -> None:
        """Load a snapshot's rows into the (fresh, empty) arrays, chunk by chunk."""
        a = self._a
        local_ids = snap.local_ids()
        for start in range(0, len(local_ids), CHUNK_ROWS):
            chunk = local_ids[start:start + CHUNK_ROWS]
            a.rows[chunk] = snap.rows[start:start + CHUNK_ROWS]
            a.state[chunk] = snap.state[start:start + CHUNK_ROWS]
            a.materialized[chunk] = True
        self._count = len(local_ids)
        self._dedup = DedupMemory(snap.dedup, self._dedup.max_clients)
        self._saved_version = self._version

    @property
    def dirty(self) -> bool:
        return self._version != self._saved_version

    def release(self) -> None:
        """Drop the arrays (and memmap files); the table is unusable afterwards."""
        self._dropped = True
        self._a = None  # a lookup already holding the arrays finishes with them
        if self._memmap_dir is not None:
            shutil.rmtree(self._memmap_dir, ignore_errors=True)
        if self.shared is not None:
            shm.retire(self.shared)  # clients holding the mapping see it dead before the files go

    def _check_alive(self) -> None:
        if self._dropped:
            raise NotFound(f"table {self.spec.name!r} was dropped")


def _size(n: int) -> str:
    """Bytes for people: 1.50 GiB, 12.0 MiB, 512 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} bytes"


class RamBackend(Backend):
    name = "ram"

    def __init__(self, data_dir: Path, keep_snapshots: int = 2, memmap: bool = False,
                 max_bytes: int | None = None, keep_checkpoints: int = 3, shm_dir: Path | None = None) -> None:
        """`max_bytes` caps the dense arrays of all tables together (None: no cap). `shm_dir`: keep
        the arrays in files there (a tmpfs) that co-located clients map read-only (`memstore.shm`);
        `memmap` (files under the data dir, a table may exceed RAM) takes precedence."""
        self.keep_checkpoints = keep_checkpoints
        if keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be >= 1, got {keep_snapshots}")
        self.data_dir = Path(data_dir)
        self._dir_lock = DataDirLock(self.data_dir)  # before touching shared memory: a refused second
        self.shm_dir = None if shm_dir is None else self._claim_shm(Path(shm_dir))  # daemon must not
        if memmap:
            self.shm_dir = None
        self.keep_snapshots, self.memmap, self.max_bytes = keep_snapshots, memmap, max_bytes
        self._tables: dict[str, RamTable] = {}
        self._admin = threading.Lock()  # create / drop / close
        self._snapshot_locks: dict[str, threading.Lock] = {}  # per table: one snapshot numbered and written at a time
        shutil.rmtree(self.data_dir / MEMMAP_DIR, ignore_errors=True)  # scratch from a previous run
        self._tombstones = Tombstones(self.data_dir)
        self._tombstones.finish()
        for table_dir in sorted((self.data_dir / SNAPSHOTS_DIR).glob("*")):
            self._restore(table_dir)

    def _snapshots_dir(self, name: str) -> Path:
        return self.data_dir / SNAPSHOTS_DIR / name

    def _memmap_dir(self, name: str) -> Path | None:
        return self.data_dir / MEMMAP_DIR / name if self.memmap else None

    def _restore(self, table_dir: Path) -> None:
        snap = newest_valid_snapshot(table_dir)
        if snap is not None:
            table = self._new_table(snap.spec)
            table.restore(snap)
            self._tables[snap.spec.name] = table
            log.info("restored table %r: %d rows from %s", snap.spec.name, len(snap.ids), snap.path)

    def _new_table(self, spec: TableSpec) -> RamTable:
        if self.max_bytes is not None:
            used = sum(dense_bytes(t.spec) for t in self._tables.values())
            if used + dense_bytes(spec) > self.max_bytes:
                raise ResourceExhausted(
                    f"table {spec.name!r} needs {_size(dense_bytes(spec))} of RAM (rows + optimizer state, "
                    f"dense: hashed rows touch all of it), but only {_size(self.max_bytes - used)} of "
                    f"max_bytes={self.max_bytes:,} ({_size(self.max_bytes)}) are left; use more shards, "
                    "the lmdb backend, ram_memmap, or raise ram_max_bytes")
        if self.shm_dir is not None:
            files = self._shared_files(spec)
            if files is not None:
                arrays = _Arrays(files.rows, files.state, files.materialized)
                return RamTable(spec, arrays, DedupMemory(), shared=files)
        memmap_dir = self._memmap_dir(spec.name)
        return RamTable(spec, _allocate(spec, memmap_dir), DedupMemory(), memmap_dir)

    @staticmethod
    def _claim_shm(shm_dir: Path) -> Path | None:
        """Check (and create) the shared-memory directories, retire what a previous run left there;
        None, with an error logged, when they are not this user's own (/dev/shm is everyone's)."""
        try:
            shm.secure_dir(shm_dir.parent)
            shm.secure_dir(shm_dir)
        except (shm.UnsafeDirectory, OSError) as exc:
            log.error("shared memory off: %s", exc)
            return None
        shm.retire_all(shm_dir)  # a previous run's files: dead to its clients, then gone
        shm.secure_dir(shm_dir / shm.STAGING_DIR)  # same-host clients stage Update payloads here
        return shm_dir

    def _shared_files(self, spec: TableSpec) -> shm.TableFiles | None:
        """The table's arrays in shared memory, or None (private memory; clients use gRPC) when
        the tmpfs cannot hold all of it."""
        try:
            if shm.room_for(self.shm_dir, spec):
                return shm.create(self.shm_dir, spec)
            reason = "not enough room on its tmpfs"
        except OSError as exc:
            reason = str(exc)
        log.warning("table %r (%.2f GiB) stays in private memory, not in shared memory under %s (%s): same-host "
                    "clients read it over gRPC; a bigger /dev/shm (docker --shm-size, a Memory emptyDir) fixes it",
                    spec.name, dense_bytes(spec) / 2**30, self.shm_dir, reason)
        return None

    def create_table(self, spec: TableSpec) -> Table:
        with self._admin:
            if spec.name in self._tables:
                raise AlreadyExists(f"table {spec.name!r} already exists")
            table = self._new_table(spec)
            # An empty snapshot right away: the table's existence survives a restart.
            table.snapshot(new_snapshot_path(self._snapshots_dir(spec.name)))
            self._tables[spec.name] = table
            return table

    def drop_table(self, name: str) -> None:
        self.get(name)  # NotFound before anything is deleted
        self._checkpoints().forget(name)  # not under the admin lock: a restore takes the two the other way round
        with self._admin:
            table = self.get(name)
            self._tombstones.mark(name)  # from here a crash finishes the drop at the next start
            with table._snapshot_lock, table._lock:  # wait for an update or snapshot in flight
                del self._tables[name]
                table.release()
            shutil.rmtree(self._snapshots_dir(name), ignore_errors=True)
            self._tombstones.clear(name)

    def _replace_from(self, snapshot: Snapshot) -> Table:
        """In place (no second copy of the table in memory), then a snapshot: a restart after
        this must come back to the restored state, not to the automatic snapshot before it."""
        table = self.get(snapshot.spec.name)
        table.reset_to(snapshot)
        self.snapshot(snapshot.spec.name)
        return table

    def snapshot(self, name: str) -> Path:
        table = self.get(name)
        table_dir = self._snapshots_dir(name)
        with self._snapshot_locks.setdefault(name, threading.Lock()):  # numbers are taken in write order
            path = table.snapshot(new_snapshot_path(table_dir))
            prune_snapshots(table_dir, self.keep_snapshots)
        return path

    def checkpoint(self) -> None:
        """Snapshot every changed table. One that fails does not stop the others: the error of
        the first failure is raised after every table was tried."""
        first_error = None
        for table in self.tables():
            if table.dirty:
                try:
                    self.snapshot(table.spec.name)
                except NotFound:  # dropped meanwhile: nothing left to keep
                    pass
                except Exception as exc:  # noqa: BLE001 - re-raised below, after the other tables
                    log.error("snapshot of table %r failed: %s", table.spec.name, exc)
                    first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def close(self) -> None:
        with self._admin:
            for table in self._tables.values():
                with table._snapshot_lock, table._lock:
                    table.release()
            self._tables.clear()
            if self.shm_dir is not None:
                with contextlib.suppress(OSError):  # this daemon's directories, gone with its tables
                    shutil.rmtree(self.shm_dir / shm.STAGING_DIR)
                    self.shm_dir.rmdir()
            self._dir_lock.release()
