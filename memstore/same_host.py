"""The client side of the same-host data plane: read a co-located server's tables directly.

`open_view(MapTable answer)` gives a `SharedView` (a RAM table mapped read-only from shared
memory, `memstore.shm`) or an `LmdbView` (an LMDB table's environment opened read-only). Both
return rows equal to a gRPC lookup's, or None for ids only the server may judge, and raise
`shm.StaleMapping` when the table went away under them (the client maps it again).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import lmdb
import numpy as np

from memstore import shm
from memstore.backends.lmdb_table import GENERATION_KEY, RETIRED_KEY, Gate, gather_rows
from memstore.protocol import spec_from_pb
from memstore.spec import TableSpec
from memstore.v1 import memstore_pb2 as pb


def open_view(response: pb.MapTableResponse) -> SharedView | LmdbView:
    """The same-host reader of a MapTable answer; StaleMapping when it cannot be used here."""
    if response.boot_id != shm.boot_id():
        raise shm.NotHere("the server runs on another host")
    return LmdbView(response) if response.kind == "lmdb" else SharedView(response)


def _local_ids(spec: TableSpec, ids: np.ndarray) -> np.ndarray | None:
    """This shard's rows of global `ids`; None for ids only the server may refuse (out of range,
    another shard's): the gRPC path answers those with the right error."""
    if len(ids) and (ids.min() < 0 or ids.max() >= spec.num_rows
                     or (spec.shard_count > 1 and np.any(ids % spec.shard_count != spec.shard_index))):
        return None
    return spec.to_local(ids)


def _served_spec(response: pb.MapTableResponse) -> TableSpec:
    return replace(spec_from_pb(response.spec), shard_index=response.shard_index, shard_count=response.shard_count or 1)


class LmdbView:
    """An LMDB table of a co-located server, its environment opened read-only here (LMDB is built
    for readers in other processes). One read transaction per lookup: each update whole or not
    at all, as over gRPC. The server marks the environment retired before a drop or a restore."""

    staging_dir = None  # updates to LMDB tables travel over gRPC

    def __init__(self, response: pb.MapTableResponse):
        if response.pid == os.getpid():  # LMDB: never one environment twice in a process
            raise shm.NotHere("the server runs in this process")
        self._gate = Gate()  # lookups share the environment; adopting a grown map needs it alone
        self.spec, self.generation = _served_spec(response), response.generation
        try:
            self.env = lmdb.open(response.path, readonly=True, lock=True, max_dbs=8, subdir=True)
            self.rows_db = self.env.open_db(b"rows", create=False)
            self.meta_db = self.env.open_db(b"meta", create=False)
        except lmdb.Error as exc:
            raise shm.StaleMapping(f"cannot open {response.path} read-only: {exc}") from None
        self.alive_or_raise()

    @contextmanager
    def _txn(self) -> Iterator[lmdb.Transaction]:
        """A read transaction; when the server has grown the map, its size is adopted first, with
        no other transaction of this environment open (LMDB's rule)."""
        for _ in range(2):
            with self._gate.shared():
                try:
                    with self.env.begin(db=self.rows_db) as txn:
                        yield txn
                        return
                except lmdb.MapResizedError:
                    pass
            with self._gate.exclusive():
                self.env.set_mapsize(0)  # 0: take the size the writer set
        raise shm.StaleMapping(f"table {self.spec.name!r}: the map keeps growing under this reader")

    def _check(self, txn: lmdb.Transaction) -> None:
        generation = txn.get(GENERATION_KEY, db=self.meta_db)
        if txn.get(RETIRED_KEY, db=self.meta_db) is not None or generation is None \
                or int.from_bytes(generation, "big") != self.generation:
            raise shm.StaleMapping(f"table {self.spec.name!r} was dropped or restored")

    def alive_or_raise(self) -> None:
        with self._txn() as txn:
            self._check(txn)

    def alive(self) -> bool:
        try:
            self.alive_or_raise()
        except (shm.StaleMapping, lmdb.Error):
            return False
        return True

    def close(self) -> None:
        with self._gate.exclusive():  # after the lookups still running on it
            self.env.close()

    def lookup(self, ids: np.ndarray) -> np.ndarray | None:
        local = _local_ids(self.spec, ids)
        if local is None:
            return None
        try:
            with self._txn() as txn:
                self._check(txn)
                return gather_rows(txn, self.spec, local)
        except lmdb.Error as exc:
            raise shm.StaleMapping(f"reading {self.spec.name!r}: {exc}") from None


class SharedView:
    """A RAM table of a co-located server, mapped read-only (see `memstore.shm`)."""

    def __init__(self, response: pb.MapTableResponse):
        self.spec = _served_spec(response)
        self.generation = response.generation
        self.files = shm.open_readonly(Path(response.path), self.spec, self.generation)
        self.staging_dir = Path(response.staging_dir) if response.staging_dir else None

    def alive(self) -> bool:
        try:
            shm.check(self.files, self.generation)
        except shm.StaleMapping:
            return False
        return True

    def close(self) -> None:
        self.files.close()

    def lookup(self, ids: np.ndarray) -> np.ndarray | None:
        """Rows of global `ids`; None for ids only the server may refuse (`_local_ids`)."""
        local = _local_ids(self.spec, ids)
        if local is None:
            return None
        shm.check(self.files, self.generation)
        rows, _ = shm.gather(self.files.rows, self.files.materialized, self.spec, local)
        shm.check(self.files, self.generation)  # dropped or replaced meanwhile: these rows are not trusted
        return rows
