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
import os
import shutil
import threading
import uuid
from pathlib import Path

import lmdb
import msgpack

from memstore.backends.base import Backend, Table
from memstore.backends.common import SNAPSHOTS_DIR, DataDirLock, Tombstones
from memstore.backends.lmdb_table import SPEC_KEY, LmdbTable, read_meta
from memstore.errors import AlreadyExists, FailedPrecondition, NotFound
from memstore.snapshot import (
    Snapshot,
    fsync_dir,
    new_snapshot_path,
    newest_valid_snapshot,
    prune_snapshots,
)
from memstore.spec import TableSpec

log = logging.getLogger("memstore.backends.lmdb")

TABLES_DIR = "tables"
# tables/.restore-<kind>-<name>-<id>: a restore in progress. The kind comes first, so no table
# name (they start alphanumeric) can make one kind's directory look like another's.
_RESTORE_PREFIX = ".restore-"
_LOADING = f"{_RESTORE_PREFIX}loading-"  # being loaded: removed at the next start
_READY = f"{_RESTORE_PREFIX}ready-"      # loaded and synced: to be installed by a checkpoint restore
_OLD = f"{_RESTORE_PREFIX}old-"          # the table a checkpoint restore is replacing



class LmdbBackend(Backend):
    name = "lmdb"

    def __init__(self, data_dir: Path, keep_snapshots: int = 2, sync: bool = True,
                 map_size: int = 1 << 30, max_map_size: int | None = None, keep_checkpoints: int = 3) -> None:
        """`map_size`: initial map per table (virtual; the file grows with the data);
        `max_map_size`: the most a table's map may grow to (None: until the disk is full)."""
        self.keep_checkpoints = keep_checkpoints
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
        tables_dir = self.data_dir / TABLES_DIR
        tables_dir.mkdir(parents=True, exist_ok=True)
        self._tombstones = Tombstones(self.data_dir)
        self._tombstones.finish()  # before anything is opened: a half-dropped table stays dropped
        self._recover_restores(tables_dir)
        for path in sorted(tables_dir.iterdir()):
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
                raw = txn.get(SPEC_KEY)
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
        snap = newest_valid_snapshot(snapshots_dir)
        if snap is not None:
            log.info("restoring LMDB table %r: %d rows from %s", snap.spec.name, len(snap.ids), snap.path)
            self.restore_table(snap)

    def restore_table(self, snapshot: Snapshot) -> LmdbTable:
        """Create the snapshot's table holding its rows, optimizer state and dedup memory."""
        name = snapshot.spec.name
        with self._admin:
            if name in self._tables:
                raise AlreadyExists(f"table {name!r} already exists")
            self._install(self._load_temp(snapshot), name)
            return self._tables[name]

    def _replace_from(self, snapshot: Snapshot) -> Table:
        """Load the snapshot beside the live table, mark it ready, then swap directories and the
        open table in one step: lookups never find the table missing (one already running
        finishes on the old environment). A crash at any point leaves a state the next start
        completes (`_recover_restores`): the ready copy goes in, or the old table comes back."""
        name = snapshot.spec.name
        tables_dir = self.data_dir / TABLES_DIR
        ready = tables_dir / f"{_READY}{name}-{uuid.uuid4().hex[:8]}"
        os.rename(self._load_temp(snapshot), ready)  # the slow part, outside the admin lock
        fsync_dir(tables_dir)
        with self._admin:
            old = self.get(name)
            old.retire()  # same-host readers map the restored table instead
            trash = tables_dir / f"{_OLD}{name}-{uuid.uuid4().hex[:8]}"
            os.rename(old.path, trash)  # still open: an environment's files move with their directory
            os.rename(ready, tables_dir / name)
            fsync_dir(tables_dir)
            self._reopen(tables_dir / name)  # replaces the entry of `name`: one dict assignment
        old.close()  # waits for the transactions still running on it
        shutil.rmtree(trash, ignore_errors=True)
        return self._tables[name]

    def _recover_restores(self, tables_dir: Path) -> None:
        """Finish what a crash interrupted: a ready restore whose table directory is missing is
        installed; otherwise the table it was replacing is put back; other temp dirs go."""
        for prefix in (_READY, _OLD):  # a ready copy is the newer state: it wins
            for path in sorted(tables_dir.glob(f"{prefix}*")):
                name = path.name[len(prefix):].rsplit("-", 1)[0]
                if not (tables_dir / name).exists() and self._holds_table(path, name):
                    log.warning("completing an interrupted restore of table %r from %s", name, path)
                    os.rename(path, tables_dir / name)
        for path in sorted(tables_dir.glob(f"{_RESTORE_PREFIX}*")):
            log.warning("removing %s: a restore that never completed", path)
            shutil.rmtree(path)
        fsync_dir(tables_dir)

    @staticmethod
    def _holds_table(path: Path, name: str) -> bool:
        """Whether `path` is a complete LMDB table named `name` (its committed spec says so)."""
        raw = read_meta(path, SPEC_KEY)
        try:
            return raw is not None and TableSpec.from_dict(msgpack.unpackb(raw)).name == name
        except (ValueError, KeyError, TypeError):
            return False

    def _load_temp(self, snapshot: Snapshot) -> Path:
        """Load `snapshot` into `tables/.restore-<name>-<id>/` with unsynced commits, fsynced
        once at the end. A crash mid-load leaves a temp dir that the next start deletes."""
        temp = self.data_dir / TABLES_DIR / f"{_LOADING}{snapshot.spec.name}-{uuid.uuid4().hex[:8]}"
        try:
            table = self._new_table(temp, snapshot.spec, sync=False)
            try:
                table.load(snapshot)
                table.sync()  # sync=False above: one flush instead of one per chunk
            finally:
                table.close()
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return temp

    def _install(self, temp: Path, name: str) -> None:
        """Rename a loaded temp dir to `tables/<name>/` (atomic: the table appears whole or not
        at all) and open it. Caller holds the admin lock."""
        tables_dir = self.data_dir / TABLES_DIR
        try:
            os.rename(temp, tables_dir / name)
            fsync_dir(tables_dir)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        self._reopen(tables_dir / name)

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
                txn.put(SPEC_KEY, msgpack.packb(spec.to_dict()))  # commit = the table exists
            return LmdbTable(spec, path, env, self.max_map_size)
        except BaseException:
            env.close()
            shutil.rmtree(path, ignore_errors=True)
            raise

    def drop_table(self, name: str) -> None:
        self.get(name)  # NotFound before anything is deleted
        self._checkpoints().forget(name)  # not under the admin lock: a restore takes the two the other way round
        with self._admin:
            table = self.get(name)
            self._tombstones.mark(name)  # from here a crash finishes the drop at the next start
            table.retire()  # same-host readers stop trusting it
            del self._tables[name]
            table.close()  # waits for the writer and open transactions
            with self._snapshot_locks.setdefault(name, threading.Lock()):  # after a snapshot in flight
                shutil.rmtree(self.data_dir / SNAPSHOTS_DIR / name, ignore_errors=True)
            shutil.rmtree(table.path, ignore_errors=True)
            self._tombstones.clear(name)

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
