"""One LMDB table: the environment, its sub-databases, and the read/write paths.

See `memstore.backends.lmdbstore` for the layout, the consistency and durability rules and the
map growth policy; `LmdbBackend` there opens, creates, restores and drops these tables.
"""
from __future__ import annotations

import logging
import operator
import os
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice, repeat
from pathlib import Path

import lmdb
import numpy as np

from memstore import dtypes, memory, optimizers
from memstore.backends.base import Table, TableUsage
from memstore.backends.common import MAX_CLIENTS, is_duplicate
from memstore.errors import FailedPrecondition, NotFound, ResourceExhausted
from memstore.init import initial_stored
from memstore.snapshot import (
    Snapshot,
    SnapshotWriter,
)
from memstore.spec import TableSpec

log = logging.getLogger("memstore.backends.lmdb")

SNAPSHOT_CHUNK_ROWS = 1 << 16  # rows per step when streaming a snapshot out or in
SPEC_KEY = b"spec"
LOADED_FROM_KEY = b"loaded_from"  # meta: the snapshot a table was built from, until its first update
GENERATION_KEY = b"generation"    # meta: random per table incarnation (same-host readers check it)
RETIRED_KEY = b"retired"          # meta: set before a drop or a restore takes the environment away
_DEDUP_VALUE = struct.Struct(">QQ")  # last seq, age
_AGE_KEY = struct.Struct(">Q")
_PER_ROW_OVERHEAD = 64  # bytes: key, node header, B-tree slack (used only to pre-grow the map)


def read_meta(table_dir: Path, key: bytes) -> bytes | None:
    """One value of a table's `meta` database, read from a table nobody has open (start-up
    recovery, offline tools); None when it is missing or the directory is no table."""
    try:
        env = lmdb.open(str(table_dir), readonly=True, lock=False, max_dbs=8, subdir=True)
    except lmdb.Error:
        return None
    try:
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            return txn.get(key)
    except lmdb.Error:
        return None
    finally:
        env.close()


def gather_rows(txn: lmdb.Transaction, spec: TableSpec, local_ids: np.ndarray) -> np.ndarray:
    """Rows [n, dim] (storage dtype) of `local_ids` in request order, from one read transaction
    whose default database is `rows` (the daemon's lookups and same-host readers alike)."""
    unique, inverse = np.unique(local_ids, return_inverse=True)  # sorted keys walk the B-tree in order
    values = list(map(txn.get, row_keys(unique)))  # the one per-row loop, in C via map
    rows, missing = decode_values(values, dtypes.storage_dtype(spec.dtype), spec.dim)  # (u, dim)
    if missing.any():
        rows[missing] = initial_stored(spec, unique[missing])
    return np.take(rows, inverse, axis=0)  # (n, dim)


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


class Gate:
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
        self._meta_db = env.open_db(b"meta")
        self._storage = dtypes.storage_dtype(spec.dtype)
        self._width = optimizers.state_width(spec.optimizer, spec.dim)
        self._gate = Gate()
        self._write_lock = threading.Lock()  # one writer at a time; also guards resizing
        self._pid = os.getpid()
        self._closed = False
        self._version = 0  # updates committed since this environment was opened
        self.generation = self._generation()

    def _generation(self) -> int:
        """This incarnation's id, made at first open (tables of older versions get one then)."""
        with self._env.begin(db=self._meta_db) as txn:
            raw = txn.get(GENERATION_KEY)
        if raw is not None:
            return int.from_bytes(raw, "big")
        generation = uuid.uuid4().int >> 65
        with self._env.begin(write=True, db=self._meta_db) as txn:
            txn.put(GENERATION_KEY, generation.to_bytes(8, "big"))
        return generation

    def shared_location(self) -> tuple[str, Path, int]:
        """Same-host clients open this environment read-only (memstore.client.LmdbView)."""
        return "lmdb", self.path, self.generation

    def retire(self) -> None:
        """Tell same-host readers, in their next read transaction, that this environment is going."""
        with self._write_lock:
            self._check_usable()
            self._write(0, lambda txn: txn.put(RETIRED_KEY, b"1", db=self._meta_db))

    # ---- data path ------------------------------------------------------------------------

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        with self._read_txn() as txn:
            return gather_rows(txn, self.spec, ids)

    def apply_update(self, ids: np.ndarray, grads: np.ndarray, client_id: str, seq: int,
                     lr: float | None = None) -> bool:
        keys = row_keys(ids)
        with self._write_lock:
            self._check_usable()
            applied = self._write(len(ids), lambda txn: self._update_body(txn, ids, keys, grads, client_id, seq, lr))
            self._version += applied
            return applied

    def last_seq(self, client_id: str) -> int | None:
        with self._read_txn() as txn:
            return self._last_seq(txn, client_id)

    @property
    def version(self) -> int:
        return self._version

    def _update_body(self, txn: lmdb.Transaction, ids: np.ndarray, keys: list[bytes], grads: np.ndarray,
                     client_id: str, seq: int, lr: float | None) -> bool:
        if client_id and is_duplicate(self._last_seq(txn, client_id), seq):
            return False
        rows, state = self._read_for_update(txn, ids, keys)  # float32 (n, dim), (n, width)
        optimizers.step(self.spec.optimizer, rows, state, grads, lr)
        stored = dtypes.from_float32(rows, self.spec.dtype)
        txn.cursor(db=self._rows_db).putmulti(zip(keys, row_values(stored)))
        if self._width:
            txn.cursor(db=self._state_db).putmulti(zip(keys, row_values(state)))
        if client_id:
            self._record_seq(txn, client_id, seq)
        txn.delete(LOADED_FROM_KEY, db=self._meta_db)  # no longer the snapshot it was built from
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
            self._write(0, lambda txn: txn.put(LOADED_FROM_KEY, snapshot.path.name.encode(), db=self._meta_db))
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
            stored[missing] = initial_stored(self.spec, ids[missing])
        rows = dtypes.to_float32(stored, self.spec.dtype)  # (n, dim)
        opt, n = self.spec.optimizer, len(ids)
        if not self._width:
            return rows, np.zeros((n, 0), np.float32)
        values = list(map(txn.get, keys, repeat(None), repeat(self._state_db)))
        state, missing = decode_values(values, np.dtype(np.float32), self._width)
        if missing.any():
            state[missing] = optimizers.initial_state(opt, int(missing.sum()), self.spec.dim)
        return rows, state

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
            used, reserved = self._used_bytes(), self._map_size()
        return TableUsage(rows_materialized=rows, bytes_used=used, bytes_reserved=reserved,
                          bytes_resident=memory.file_resident_bytes(self.path / "data.mdb"))

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
