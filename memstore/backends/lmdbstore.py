"""The LMDB backend: each table is one LMDB environment, durable on every acknowledged update.

Layout: `<data_dir>/tables/<name>/{data.mdb,lock.mdb}` with named sub-databases

    rows       8-byte big-endian local row id → row bytes (storage dtype)
    state      same keys                      → optimizer state bytes (float32, absent for sgd)
    dedup      client_id (utf-8)              → (last seq, age) as two big-endian uint64
    dedup_age  age (8-byte big-endian)        → client_id: oldest first, for bounded eviction
    meta       b"spec"                        → TableSpec as msgpack

Big-endian keys make LMDB's byte order the numeric order, so a batch of sorted ids walks the
B-tree left to right. A row that was never written has no key and reads as its deterministic
initial value, so untouched rows cost no disk.

Snapshots (`<data_dir>/snapshots/<name>/`, the portable format) are exports for backups and
resharding. At start, a table with snapshots but no `tables/<name>/` is rebuilt from its newest
snapshot that verifies, as the RAM backend restores every table: restoring a backup is the same
on both backends.

Consistency: a lookup reads in ONE read transaction (MVCC), so it sees each update entirely or
not at all, and never waits for a writer. An update reads the rows, applies the optimizer and
writes rows + state + the dedup record in ONE write transaction: a crash leaves it fully applied
or not at all. With `sync=True` (default) every commit is fsynced: an acknowledged update
survives kill -9 and power loss. With `sync=False` it still survives kill -9 (the OS page cache
holds the written pages) but not a power loss or kernel crash.

The map (LMDB's maximum file size) grows by doubling before a write that may not fit, and again
if a write hits MapFullError (the failed transaction is aborted, nothing half-written). Resizing
needs no transaction open in this process, so transactions hold a shared gate and a resize takes
it exclusively. At `max_map_size`, or when the disk is full, the update fails with
ResourceExhausted and the table is unchanged. An Environment must never cross a fork: a table
refuses to be used from a process other than the one that opened it.
"""
from __future__ import annotations

import logging
import operator
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice, repeat
from pathlib import Path

import lmdb
import msgpack
import numpy as np

from memstore import dtypes, optimizers
from memstore.backends.base import Backend, Table, TableUsage
from memstore.backends.common import MAX_CLIENTS, SNAPSHOTS_DIR, DataDirLock, is_duplicate
from memstore.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from memstore.init import init_rows
from memstore.snapshot import (
    CorruptSnapshot,
    Snapshot,
    SnapshotWriter,
    list_snapshots,
    new_snapshot_path,
    prune_snapshots,
    read_snapshot,
)
from memstore.spec import TableSpec

log = logging.getLogger("memstore.backends.lmdb")

TABLES_DIR = "tables"
SNAPSHOT_CHUNK_ROWS = 1 << 16  # rows per step when streaming a snapshot out or in
_RESTORE_PREFIX = ".restore-"  # tables/.restore-<name>-<id>: a restore in progress (names start alnum)
_SPEC_KEY = b"spec"
_DEDUP_VALUE = struct.Struct(">QQ")  # last seq, age
_AGE_KEY = struct.Struct(">Q")
_PER_ROW_OVERHEAD = 64  # bytes: key, node header, B-tree slack (used only to pre-grow the map)


def row_keys(ids: np.ndarray) -> list[bytes]:
    """int64 ids → 8-byte big-endian keys, without a per-row Python loop."""
    return np.ascontiguousarray(ids, dtype=">i8").view("V8").tolist()


def row_values(rows: np.ndarray) -> list[bytes]:
    """[n, w] array → n bytes objects, one per row."""
    rows = np.ascontiguousarray(rows)
    return rows.view(f"V{rows.shape[1] * rows.itemsize}").ravel().tolist()


def decode_values(values: list[bytes | None], dtype: np.dtype, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Values from a get loop → (array [n, width] with garbage where missing, missing mask [n])."""
    n = len(values)
    missing = np.fromiter(map(operator.not_, values), dtype=bool, count=n)  # None → True
    present = bytearray().join(filter(None, values))  # bytearray: the array stays writable
    found = np.frombuffer(present, dtype).reshape(-1, width)
    if not missing.any():
        return found, missing
    out = np.empty((n, width), dtype)
    out[~missing] = found
    return out, missing


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Gate:
    """Many holders in shared mode (transactions) or one in exclusive mode (set_mapsize, close).
    A waiting exclusive holder blocks new shared ones, so a resize cannot be starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class LmdbTable(Table):
    def __init__(self, spec: TableSpec, path: Path, env: lmdb.Environment, max_map_size: int | None):
        self.spec, self.path, self._env, self._max_map_size = spec, path, env, max_map_size
        self._rows_db = env.open_db(b"rows")
        self._state_db = env.open_db(b"state")
        self._dedup_db = env.open_db(b"dedup")
        self._age_db = env.open_db(b"dedup_age")
        self._storage = dtypes.storage_dtype(spec.dtype)
        self._width = optimizers.state_width(spec.optimizer, spec.dim)
        self._gate = _Gate()
        self._write_lock = threading.Lock()  # one writer at a time; also guards resizing
        self._pid = os.getpid()
        self._closed = False

    # ---- data path ------------------------------------------------------------------------

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(ids, return_inverse=True)  # sorted keys walk the B-tree in order
        keys = row_keys(unique)
        with self._read_txn() as txn:
            values = list(map(txn.get, keys))  # the one per-row loop, in C via map
        rows, missing = decode_values(values, self._storage, self.spec.dim)  # (u, dim)
        if missing.any():
            rows[missing] = self._initial_stored(unique[missing])
        return np.take(rows, inverse, axis=0)  # (n, dim) in request order

    def apply_update(self, ids: np.ndarray, grads: np.ndarray, client_id: str, seq: int) -> bool:
        keys = row_keys(ids)
        with self._write_lock:
            self._check_usable()
            return self._write(len(ids), lambda txn: self._update_body(txn, ids, keys, grads, client_id, seq))

    def _update_body(self, txn: lmdb.Transaction, ids: np.ndarray, keys: list[bytes], grads: np.ndarray,
                     client_id: str, seq: int) -> bool:
        if client_id and is_duplicate(self._last_seq(txn, client_id), seq):
            return False
        rows, state = self._read_for_update(txn, ids, keys)  # float32 (n, dim), (n, width)
        optimizers.step(self.spec.optimizer, rows, state, grads)
        stored = dtypes.from_float32(rows, self.spec.dtype)
        txn.cursor(db=self._rows_db).putmulti(zip(keys, row_values(stored)))
        if self._width:
            txn.cursor(db=self._state_db).putmulti(zip(keys, row_values(state)))
        if client_id:
            self._record_seq(txn, client_id, seq)
        return True

    def _write(self, rows: int, body: Callable[[lmdb.Transaction], bool]) -> bool:
        """Run `body` in ONE write transaction: committed if it returns True, aborted if False.
        The map grows before (room for `rows` rows) and after a MapFullError, which aborts the
        transaction so that `body` simply runs again. Caller holds the write lock."""
        self._reserve(rows)
        while True:
            try:
                with self._gate.shared():
                    return self._write_txn(body)
            except lmdb.MapFullError:
                self._grow(self._map_size() * 2)  # the txn was aborted; retry in a bigger map

    def _write_txn(self, body: Callable[[lmdb.Transaction], bool]) -> bool:
        txn = self._env.begin(write=True)
        try:
            if not body(txn):
                txn.abort()
                return False
            try:
                txn.commit()
            except lmdb.MapFullError:
                raise
            except lmdb.Error as exc:  # a full disk shows up as a short write (EIO) or ENOSPC
                raise ResourceExhausted(
                    f"table {self.spec.name!r}: cannot write under {self.path}, is the disk full? ({exc}); "
                    "the write was not applied") from None
            return True
        except BaseException:
            txn.abort()
            raise

    # ---- bulk load (restore) ----------------------------------------------------------------

    def load(self, snapshot: Snapshot, chunk_rows: int = SNAPSHOT_CHUNK_ROWS) -> int:
        """Write a snapshot's rows, optimizer state and dedup memory into this EMPTY table;
        returns the rows loaded. Keys go in ascending order with MDB_APPEND (no B-tree search,
        densely filled pages), `chunk_rows` rows per write transaction: memory stays bounded
        and the map grows between chunks as for updates. Updates wait until the load is done;
        lookups meanwhile see a prefix of it. Not atomic across chunks: a crash leaves a part
        loaded, so `LmdbBackend.restore_table` loads into a temp dir renamed into place at the end."""
        if snapshot.spec != self.spec:
            raise FailedPrecondition(f"table {self.spec.name!r}: snapshot {snapshot.path} is of another "
                                     f"table spec ({snapshot.spec} vs {self.spec})")
        local_ids = snapshot.local_ids()  # (m,) ascending, as the snapshot's global ids are
        with self._write_lock:
            self._check_usable()
            self._check_empty()
            for start in range(0, len(local_ids), chunk_rows):
                part = slice(start, start + chunk_rows)
                chunk = (local_ids[part], snapshot.rows[part], snapshot.state[part])
                self._write(len(chunk[0]), lambda txn, chunk=chunk: self._append_chunk(txn, *chunk))
            self._write(0, lambda txn: self._load_dedup(txn, snapshot.dedup))
        return len(local_ids)

    def _check_empty(self) -> None:
        """MDB_APPEND needs every key above the existing ones, and a load must not mix tables."""
        with self._read_txn() as txn:
            rows, clients = txn.stat(self._rows_db)["entries"], txn.stat(self._dedup_db)["entries"]
            rows += txn.stat(self._state_db)["entries"]
        if rows or clients:
            raise FailedPrecondition(
                f"table {self.spec.name!r} is not empty ({rows:,} rows and state entries, {clients:,} "
                "clients): a snapshot loads only into a new table (drop it first)")

    def _append_chunk(self, txn: lmdb.Transaction, local_ids: np.ndarray, rows: np.ndarray,
                      state: np.ndarray) -> bool:
        """Rows [n, dim] and state [n, width] whose keys all sort after every key in the table."""
        keys = row_keys(local_ids)
        txn.cursor(db=self._rows_db).putmulti(zip(keys, row_values(rows)), append=True)
        if self._width:  # sgd keeps no state
            txn.cursor(db=self._state_db).putmulti(zip(keys, row_values(state)), append=True)
        return True

    def _load_dedup(self, txn: lmdb.Transaction, dedup: dict[str, int]) -> bool:
        for client_id, seq in dedup.items():  # oldest first: the ages come out in the same order
            self._record_seq(txn, client_id, seq)
        return True

    def _read_for_update(self, txn: lmdb.Transaction, ids: np.ndarray,
                         keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        values = list(map(txn.get, keys, repeat(None), repeat(self._rows_db)))
        stored, missing = decode_values(values, self._storage, self.spec.dim)
        if missing.any():
            stored[missing] = self._initial_stored(ids[missing])
        rows = dtypes.to_float32(stored, self.spec.dtype)  # (n, dim)
        opt, n = self.spec.optimizer, len(ids)
        if not self._width:
            return rows, np.zeros((n, 0), np.float32)
        values = list(map(txn.get, keys, repeat(None), repeat(self._state_db)))
        state, missing = decode_values(values, np.dtype(np.float32), self._width)
        if missing.any():
            state[missing] = optimizers.initial_state(opt, int(missing.sum()), self.spec.dim)
        return rows, state

    def _initial_stored(self, local_ids: np.ndarray) -> np.ndarray:
        """Initial rows in the storage dtype: what a lookup returns and an update starts from."""
        initial = init_rows(self.spec.init, self.spec.to_global(local_ids), self.spec.dim)
        return dtypes.from_float32(initial, self.spec.dtype)

    # ---- dedup memory (inside the update's write txn) --------------------------------------

    def _last_seq(self, txn: lmdb.Transaction, client_id: str) -> int | None:
        value = txn.get(client_id.encode(), db=self._dedup_db)
        return None if value is None else _DEDUP_VALUE.unpack(value)[0]

    def _record_seq(self, txn: lmdb.Transaction, client_id: str, seq: int) -> None:
        key = client_id.encode()
        old = txn.get(key, db=self._dedup_db)
        if old is not None:
            txn.delete(_AGE_KEY.pack(_DEDUP_VALUE.unpack(old)[1]), db=self._age_db)
        ages = txn.cursor(db=self._age_db)
        age = _AGE_KEY.unpack(ages.key())[0] + 1 if ages.last() else 0
        txn.put(key, _DEDUP_VALUE.pack(seq, age), db=self._dedup_db)
        txn.put(_AGE_KEY.pack(age), key, db=self._age_db)
        if txn.stat(self._dedup_db)["entries"] > MAX_CLIENTS:  # forget the least recently seen
            ages.first()
            txn.delete(ages.value(), db=self._dedup_db)
            ages.delete()

    def _dedup_memory(self, txn: lmdb.Transaction) -> dict[str, int]:
        """client_id → last seq, oldest first."""
        memory = {}
        for _, key in txn.cursor(db=self._age_db):
            memory[key.decode()] = _DEDUP_VALUE.unpack(txn.get(key, db=self._dedup_db))[0]
        return memory

    # ---- map size -------------------------------------------------------------------------

    def _map_size(self) -> int:
        return self._env.info()["map_size"]

    def _used_bytes(self) -> int:
        return (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]

    def _reserve(self, rows: int) -> None:
        """Grow the map before a write that might not fit (the free-page list is ignored, so
        this errs on the large side; MapFullError remains the backstop)."""
        need = 2 * rows * (self.spec.row_bytes + 4 * self._width + _PER_ROW_OVERHEAD) + (1 << 20)
        if self._map_size() - self._used_bytes() < need:
            limit = self._max_map_size
            if limit is None or self._map_size() < limit:
                self._grow(self._used_bytes() + need)

    def _grow(self, target: int) -> None:
        """Caller holds the write lock; waits for open transactions, then remaps."""
        current, limit = self._map_size(), self._max_map_size
        if limit is not None and current >= limit:
            raise ResourceExhausted(
                f"table {self.spec.name!r}: LMDB map full at max_map_size={limit:,} bytes; the update "
                "was not applied (raise the LMDB max map size or use more shards)")
        new_size = max(target, 2 * current)
        if limit is not None:
            new_size = min(new_size, limit)
        new_size = -(-new_size // (1 << 20)) * (1 << 20)  # whole MiB, a multiple of any page size
        with self._gate.exclusive():
            self._env.set_mapsize(new_size)
        log.info("table %r: LMDB map grown %d → %d MiB", self.spec.name, current >> 20, new_size >> 20)

    # ---- persistence ----------------------------------------------------------------------

    def usage(self) -> TableUsage:
        with self._read_txn() as txn:
            rows = txn.stat(self._rows_db)["entries"]
            used = self._used_bytes()
        return TableUsage(rows_materialized=rows, bytes_used=used)

    def snapshot(self, dest: Path) -> Path:
        """Export from one read transaction: a consistent view, and writers go on meanwhile.
        The transaction ends before the fsync, so it pins old pages no longer than needed."""
        with self._read_txn() as txn:
            count = txn.stat(self._rows_db)["entries"]
            writer = SnapshotWriter(dest, self.spec, count, self._dedup_memory(txn))
            try:
                for local_ids, rows, state in self._iter_chunks(txn):
                    writer.append(self.spec.to_global(local_ids), rows, state)
            except BaseException:
                writer.abort()
                raise
        try:
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    def _iter_chunks(self, txn: lmdb.Transaction) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        rows_it = txn.cursor(db=self._rows_db).iternext()
        state_it = txn.cursor(db=self._state_db).iternext() if self._width else None
        while chunk := list(islice(rows_it, SNAPSHOT_CHUNK_ROWS)):
            keys, values = zip(*chunk)
            key_bytes = b"".join(keys)
            rows = np.frombuffer(b"".join(values), self._storage).reshape(-1, self.spec.dim)
            state = np.zeros((len(keys), 0), np.float32)
            if state_it is not None:
                state_keys, state_values = zip(*islice(state_it, len(keys)))
                if b"".join(state_keys) != key_bytes:
                    raise FailedPrecondition(f"table {self.spec.name!r}: rows and optimizer state "
                                             "hold different row ids; the table is damaged")
                state = np.frombuffer(b"".join(state_values), np.float32).reshape(-1, self._width)
            yield np.frombuffer(key_bytes, ">i8").astype(np.int64), rows, state

    def sync(self) -> None:
        with self._gate.shared():
            self._check_usable()
            self._env.sync(True)

    def close(self) -> None:
        with self._write_lock, self._gate.exclusive():
            if not self._closed:
                self._closed = True
                if os.getpid() == self._pid:
                    self._env.close()

    @contextmanager
    def _read_txn(self) -> Iterator[lmdb.Transaction]:
        with self._gate.shared():
            self._check_usable()
            with self._env.begin(db=self._rows_db) as txn:
                yield txn

    def _check_usable(self) -> None:
        if self._closed:
            raise NotFound(f"table {self.spec.name!r} was dropped or its backend closed")
        if os.getpid() != self._pid:
            raise FailedPrecondition(
                f"table {self.spec.name!r}: LMDB environment opened in process {self._pid}, used in "
                f"{os.getpid()} after a fork; open the backend in the process that uses it")


class LmdbBackend(Backend):
    name = "lmdb"

    def __init__(self, data_dir: Path, keep_snapshots: int = 2, sync: bool = True,
                 map_size: int = 1 << 30, max_map_size: int | None = None) -> None:
        """`map_size`: initial map per table (virtual; the file grows with the data);
        `max_map_size`: the most a table's map may grow to (None: until the disk is full)."""
        if keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be >= 1, got {keep_snapshots}")
        if max_map_size is not None and max_map_size < map_size:
            raise ValueError(f"max_map_size {max_map_size} is below map_size {map_size}")
        self.data_dir = Path(data_dir)
        self._dir_lock = DataDirLock(self.data_dir)
        self.keep_snapshots, self.sync, self.map_size, self.max_map_size = (
            keep_snapshots, sync, map_size, max_map_size)
        self._tables: dict[str, LmdbTable] = {}
        self._admin = threading.Lock()
        self._snapshot_locks: dict[str, threading.Lock] = {}
        try:
            self._open_tables()
        except BaseException:
            self.close()  # the tables opened so far, and the data dir lock
            raise

    def _open_tables(self) -> None:
        (self.data_dir / TABLES_DIR).mkdir(parents=True, exist_ok=True)
        for path in sorted((self.data_dir / TABLES_DIR).iterdir()):
            if path.name.startswith(_RESTORE_PREFIX):
                log.warning("removing %s: a restore that never completed", path)
                shutil.rmtree(path)
            else:
                self._reopen(path)
        for snapshots_dir in sorted((self.data_dir / SNAPSHOTS_DIR).glob("*")):
            if snapshots_dir.name not in self._tables:  # a restored backup, or a RAM data dir
                self._restore(snapshots_dir)

    def _open_env(self, path: Path, sync: bool | None = None) -> lmdb.Environment:
        sync = self.sync if sync is None else sync
        return lmdb.open(str(path), map_size=self.map_size, max_dbs=8, subdir=True,
                         sync=sync, metasync=sync, readahead=False)  # readahead off: random reads

    def _reopen(self, path: Path) -> None:
        try:
            env = self._open_env(path)
            with env.begin(db=env.open_db(b"meta")) as txn:
                raw = txn.get(_SPEC_KEY)
        except lmdb.Error as exc:  # refuse to start rather than silently serve without a table
            raise FailedPrecondition(f"cannot open LMDB table at {path}: {exc}") from exc
        if raw is None:  # a create that crashed before its spec was committed
            env.close()
            log.warning("removing %s: table creation never completed", path)
            shutil.rmtree(path)
            return
        spec = TableSpec.from_dict(msgpack.unpackb(raw))
        self._tables[spec.name] = LmdbTable(spec, path, env, self.max_map_size)
        log.info("opened LMDB table %r at %s", spec.name, path)

    def _restore(self, snapshots_dir: Path) -> None:
        """The newest snapshot that verifies; older ones are the fallback for a damaged one."""
        for path in reversed(list_snapshots(snapshots_dir)):
            try:
                snap = read_snapshot(path)
            except CorruptSnapshot as exc:
                log.error("skipping damaged snapshot: %s", exc)
                continue
            if snap.spec.name != snapshots_dir.name:
                log.error("skipping snapshot %s: it holds table %r", path, snap.spec.name)
                continue
            log.info("restoring LMDB table %r: %d rows from %s", snap.spec.name, len(snap.ids), path)
            self.restore_table(snap)
            return
        if any(snapshots_dir.iterdir()):
            log.error("no valid snapshot in %s: table %r not restored", snapshots_dir, snapshots_dir.name)

    def restore_table(self, snapshot: Snapshot) -> LmdbTable:
        """Create the snapshot's table holding its rows, optimizer state and dedup memory.

        The load runs in `tables/.restore-<name>-<id>/` with unsynced commits, is fsynced once,
        and is renamed to `tables/<name>/` only when complete: a crash mid-load leaves a temp
        dir that the next start deletes (and restores again), never a half table."""
        name = snapshot.spec.name
        with self._admin:
            if name in self._tables:
                raise AlreadyExists(f"table {name!r} already exists")
            tables_dir = self.data_dir / TABLES_DIR
            temp = tables_dir / f"{_RESTORE_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            try:
                table = self._new_table(temp, snapshot.spec, sync=False)
                try:
                    table.load(snapshot)
                    table.sync()  # sync=False above: one flush instead of one per chunk
                finally:
                    table.close()
                os.rename(temp, tables_dir / name)  # atomic: the table appears whole or not at all
                _fsync_dir(tables_dir)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
            self._reopen(tables_dir / name)
            return self._tables[name]

    def create_table(self, spec: TableSpec) -> Table:
        with self._admin:
            if spec.name in self._tables:
                raise AlreadyExists(f"table {spec.name!r} already exists")
            path = self.data_dir / TABLES_DIR / spec.name
            shutil.rmtree(path, ignore_errors=True)  # leftovers of a crashed create
            table = self._new_table(path, spec)
            self._tables[spec.name] = table
            return table

    def _new_table(self, path: Path, spec: TableSpec, sync: bool | None = None) -> LmdbTable:
        env = self._open_env(path, sync)
        try:
            with env.begin(write=True, db=env.open_db(b"meta")) as txn:
                txn.put(_SPEC_KEY, msgpack.packb(spec.to_dict()))  # commit = the table exists
            return LmdbTable(spec, path, env, self.max_map_size)
        except BaseException:
            env.close()
            shutil.rmtree(path, ignore_errors=True)
            raise

    def drop_table(self, name: str) -> None:
        with self._admin:
            table = self.get(name)
            del self._tables[name]
            table.close()  # waits for the writer and open transactions
            # Snapshots first (after one in flight): snapshots left without their table would be
            # restored at the next start, a dropped table coming back.
            with self._snapshot_locks.setdefault(name, threading.Lock()):
                shutil.rmtree(self.data_dir / SNAPSHOTS_DIR / name, ignore_errors=True)
            shutil.rmtree(table.path, ignore_errors=True)

    def get(self, name: str) -> LmdbTable:
        try:
            return self._tables[name]
        except KeyError:
            raise NotFound(f"table {name!r} does not exist") from None

    def tables(self) -> list[Table]:
        return list(self._tables.values())

    def snapshot(self, name: str) -> Path:
        table = self.get(name)
        with self._snapshot_locks.setdefault(name, threading.Lock()):
            table_dir = self.data_dir / SNAPSHOTS_DIR / name
            path = table.snapshot(new_snapshot_path(table_dir))
            prune_snapshots(table_dir, self.keep_snapshots)
            return path

    def checkpoint(self) -> None:
        """Every commit is already durable with sync=True; with sync=False, flush now."""
        for table in self.tables():
            try:
                table.sync()
            except NotFound:  # dropped meanwhile
                pass

    def close(self) -> None:
        with self._admin:
            for table in self._tables.values():
                table.close()
            self._tables.clear()
            self._dir_lock.release()
