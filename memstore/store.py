"""The request layer between the gRPC servicer and a storage backend.

Everything a client sends is checked here, once, before a backend sees it: byte lengths, row
ranges, shard ownership, request size limits, finite gradients, read-only mode. Duplicate ids in
an update are summed here too, so backends receive sorted unique ids only. Ids are translated
from global row ids (what clients use) to this shard's local rows (what backends store).
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from memstore.backends.base import Backend, Table
from memstore.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from memstore.protocol import sum_duplicates
from memstore.spec import TableSpec, spec_differences

ID_DTYPE = np.dtype("<i8")
GRAD_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class ShardLayout:
    index: int = 0
    count: int = 1


@dataclass
class TableCounters:
    lookups: int = 0
    lookup_rows: int = 0
    updates: int = 0
    update_rows: int = 0
    duplicate_updates: int = 0


class UpdateResult(NamedTuple):
    applied: bool       # False: a retried delivery, acknowledged and not applied again
    rows: int           # unique rows touched
    previous_seq: int   # when applied: the client's last seq before this one (0: none)


@dataclass(frozen=True)
class TableView:
    """What DescribeTable reports: the global spec plus this shard's usage and counters."""
    spec: TableSpec          # global view: num_rows of the whole table, shard fields of this daemon
    rows_materialized: int
    bytes_used: int
    counters: TableCounters
    bytes_reserved: int = 0
    bytes_resident: int = 0
    checkpoints: tuple[str, ...] = ()  # the tags of its checkpoints here, oldest first


def parse_ids(raw: bytes, what: str = "ids") -> np.ndarray:
    if len(raw) % ID_DTYPE.itemsize:
        raise InvalidArgument(f"{what}: {len(raw)} bytes is not a whole number of int64 ids (8 bytes each)")
    return np.frombuffer(raw, dtype=ID_DTYPE)


def parse_grads(raw: bytes, rows: int, dim: int) -> np.ndarray:
    expected = rows * dim * GRAD_DTYPE.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"grads: got {len(raw)} bytes, expected {expected} = {rows} rows x dim {dim} x 4 bytes "
            "(gradients are little-endian float32)")
    return np.frombuffer(raw, dtype=GRAD_DTYPE).reshape(rows, dim)


class Store:
    def __init__(self, backend: Backend, layout: ShardLayout = ShardLayout(), *,
                 max_rows_per_request: int = 1 << 22, max_request_bytes: int = 1 << 30,
                 read_only: bool = False):
        self.backend = backend
        self.layout = layout
        self.max_rows_per_request = max_rows_per_request
        self.max_request_bytes = max_request_bytes
        self.read_only = read_only
        self._counters: dict[str, TableCounters] = {}
        self._admin_lock = threading.Lock()  # create/drop are rare; keep them simple and serial

    # ---- tables -------------------------------------------------------------------------------

    def create_table(self, spec: TableSpec, if_not_exists: bool = False) -> TableView:
        self._check_writable("CreateTable")
        local_spec = dataclasses.replace(spec, shard_index=self.layout.index, shard_count=self.layout.count)
        with self._admin_lock:
            if any(t.spec.name == spec.name for t in self.backend.tables()):
                existing = self.backend.get(spec.name).spec
                if if_not_exists and existing == local_spec:
                    return self.describe(spec.name)
                if existing == local_spec:
                    raise AlreadyExists(f"table {spec.name!r} exists (with this spec: {_describe_spec(existing)})")
                raise AlreadyExists(f"table {spec.name!r} exists with a different spec: "
                                    f"{'; '.join(spec_differences(existing, local_spec))}")
            self.backend.create_table(local_spec)
        return self.describe(spec.name)

    def drop_table(self, name: str) -> None:
        self._check_writable("DropTable")
        with self._admin_lock:
            self.backend.drop_table(name)
            self._counters.pop(name, None)

    def spec(self, name: str) -> TableSpec:
        return self.backend.get(name).spec

    def describe(self, name: str) -> TableView:
        table = self.backend.get(name)
        usage = table.usage()
        return TableView(table.spec, usage.rows_materialized, usage.bytes_used, self._counter(name),
                         usage.bytes_reserved, usage.bytes_resident, tuple(self.backend.checkpoint_tags(name)))

    def list_tables(self) -> list[TableView]:
        return [self.describe(t.spec.name) for t in sorted(self.backend.tables(), key=lambda t: t.spec.name)]

    def snapshot(self, name: str = "", tag: str = "") -> list[str]:
        if tag:
            if not name:
                raise InvalidArgument("a tagged checkpoint names its table (Snapshot.table is empty)")
            return [str(self.backend.checkpoint_table(name, tag))]
        names = [name] if name else [t.spec.name for t in self.backend.tables()]
        return [str(self.backend.snapshot(n)) for n in names]

    def restore(self, name: str, tag: str) -> tuple[str, bool]:
        """Roll table `name` back to its checkpoint `tag`; returns (path, whether it changed)."""
        self._check_writable("Restore")
        if not tag:
            raise InvalidArgument("Restore needs the tag of a checkpoint (SnapshotRequest.tag)")
        path, changed = self.backend.restore_checkpoint(name, tag)
        return str(path), changed

    def staging_dir(self) -> Path | None:
        """Where same-host clients may stage Update payloads (None: they send them over gRPC)."""
        shm_dir = getattr(self.backend, "shm_dir", None)
        return None if shm_dir is None else shm_dir / "staging"

    def map_table(self, name: str) -> tuple[TableSpec, str, Path, int]:
        """(spec, kind, directory, generation) of a table co-located clients may read themselves."""
        table = self.backend.get(name)
        location = table.shared_location()
        if location is None:
            raise FailedPrecondition(
                f"table {name!r} is not in shared memory on this server ({self.backend.name} backend, shm_dir "
                "off, ram_memmap on, or too big for the tmpfs): use gRPC lookups")
        return (table.spec, *location)

    def last_seq(self, name: str, client_id: str) -> int | None:
        """The last seq (training step + 1) applied for `client_id` on table `name`."""
        return self.backend.get(name).last_seq(client_id)

    # ---- data path ----------------------------------------------------------------------------

    def lookup(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows [n, dim] (storage dtype) for global row ids (int64 [n]), in request order."""
        table, local_ids = self._checked_lookup(name, ids)
        try:
            return table.lookup(local_ids)
        except NotFound:
            return self._replacement(name, table).lookup(local_ids)

    def lookup_blocks(self, name: str, ids: np.ndarray, block_bytes: int) -> tuple[TableSpec, Iterator[np.ndarray]]:
        """`lookup` as consecutive blocks of at most `block_bytes` (at least one row each), with
        the spec of the table they come from; the whole request is validated first."""
        table, local_ids = self._checked_lookup(name, ids)  # before returning: errors come at once
        rows_per_block = max(1, block_bytes // table.spec.row_bytes)
        return table.spec, self._blocks(name, table, local_ids, rows_per_block)

    def _blocks(self, name: str, table: Table, local_ids: np.ndarray, rows_per_block: int) -> Iterator[np.ndarray]:
        blocks = table.lookup_blocks(local_ids, rows_per_block)
        try:
            first = next(blocks, None)
        except NotFound:
            blocks = self._replacement(name, table).lookup_blocks(local_ids, rows_per_block)
            first = next(blocks, None)
        if first is not None:
            yield first
            yield from blocks

    def _replacement(self, name: str, closed: Table) -> Table:
        """The table now serving `name` when a checkpoint restore swapped out `closed` under a
        lookup; NotFound again when the name is really gone (dropped)."""
        table = self.backend.get(name)
        if table is closed or table.spec != closed.spec:  # dropped (and maybe created again)
            raise NotFound(f"table {name!r} was dropped")
        return table

    def _checked_lookup(self, name: str, ids: np.ndarray) -> tuple[Table, np.ndarray]:
        table = self.backend.get(name)
        self._check_count(len(ids), "Lookup", table.spec.row_bytes)
        local_ids = self._to_local(table, ids)
        counters = self._counter(name)
        counters.lookups += 1
        counters.lookup_rows += len(ids)
        return table, local_ids

    def update(self, name: str, ids: np.ndarray, grads: np.ndarray, client_id: str, seq: int,
               lr: float | None = None) -> UpdateResult:
        """Apply one optimizer step. `grads` float32 [n, dim]; `lr` this step's learning rate
        (None: the table's)."""
        table = self.check_update_header(name, client_id, seq, lr)
        local_ids = self._checked_update_rows(table, ids, grads)
        previous_seq = (table.last_seq(client_id) or 0) if client_id else 0  # one sender per client
        unique_ids, summed = sum_duplicates(local_ids, grads)
        moving = summed.any(axis=1)  # a row whose gradient is exactly zero is not stepped (lazy Adam)
        if not moving.all():
            unique_ids, summed = unique_ids[moving], summed[moving]
        applied = table.apply_update(unique_ids, np.ascontiguousarray(summed), client_id, seq, lr)
        counters = self._counter(name)
        counters.updates += int(applied)
        counters.update_rows += len(unique_ids) if applied else 0
        counters.duplicate_updates += int(not applied)
        return UpdateResult(applied, len(unique_ids), previous_seq)

    def validate_update(self, name: str, ids: np.ndarray, grads: np.ndarray) -> None:
        """The checks `update` makes of its rows, without applying anything."""
        self._checked_update_rows(self.backend.get(name), ids, grads)

    def _checked_update_rows(self, table: Table, ids: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """Local row ids of a valid update; refuses bad shapes, foreign rows, NaN and Inf."""
        if grads.shape != (len(ids), table.spec.dim):
            raise InvalidArgument(f"grads shape {grads.shape} does not match {len(ids)} ids x dim {table.spec.dim}")
        local_ids = self._to_local(table, ids)
        if not np.isfinite(grads).all():
            bad = int(np.flatnonzero(~np.isfinite(grads).all(axis=1))[0])
            raise InvalidArgument(f"grads hold NaN or Inf (first at row {bad}, id {int(ids[bad])}); nothing applied")
        return local_ids

    def check_update_header(self, name: str, client_id: str, seq: int, lr: float | None) -> Table:
        self._check_writable("Update")
        table = self.backend.get(name)
        if len(client_id.encode()) > 256:  # bytes, not characters: LMDB keys hold at most 511 bytes
            raise InvalidArgument(f"client_id is {len(client_id.encode())} bytes in UTF-8; at most 256")
        if client_id and not 0 < seq < 2**63:
            raise InvalidArgument(f"seq must be in [1, 2^63) when client_id is set (it orders a client's "
                                  f"updates), got {seq}")
        if lr is not None and not 0 <= lr < 1e6:
            raise InvalidArgument(f"lr must be in [0, 1e6), got {lr}")
        return table

    def check_update_size(self, name: str, total_rows: int, client_id: str = "") -> TableSpec:
        """Called on an Update's first chunk, before the rest is buffered. An update of no rows
        is refused unless it carries a client_id: a training step may touch no row of a shard
        and still has to count (its seq is recorded; a data-parallel rank's share is empty)."""
        self._check_writable("Update")
        spec = self.backend.get(name).spec
        if total_rows < 0 or (total_rows == 0 and not client_id):
            raise InvalidArgument("Update: total_rows must be > 0 in the first chunk")
        self._check_count(total_rows, "Update", spec.dim * GRAD_DTYPE.itemsize)
        return spec

    # ---- checks -------------------------------------------------------------------------------

    def _to_local(self, table: Table, ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return ids
        num_rows = table.spec.num_rows
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_rows:
            bad = lo if lo < 0 else hi
            raise InvalidArgument(f"row id {bad} is outside table {table.spec.name!r} of {num_rows} rows")
        count, index = self.layout.count, self.layout.index
        if count == 1:
            return ids
        wrong = ids % count != index
        if wrong.any():
            bad = int(ids[np.argmax(wrong)])
            raise InvalidArgument(
                f"row id {bad} belongs to shard {bad % count}, not this shard {index} of {count}: "
                "the client's shard list or routing does not match the cluster")
        return ids // count

    def _check_count(self, rows: int, method: str, row_bytes: int) -> None:
        """Refuse before any work: too many rows, or rows too wide for the memory a request may take."""
        if rows > self.max_rows_per_request:
            raise ResourceExhausted(
                f"{method} of {rows} rows exceeds max_rows_per_request={self.max_rows_per_request}; "
                "split the request")
        if rows * row_bytes > self.max_request_bytes:
            raise ResourceExhausted(
                f"{method} of {rows} rows x {row_bytes} bytes exceeds max_request_bytes="
                f"{self.max_request_bytes}; split the request")

    def _check_writable(self, method: str) -> None:
        if self.read_only:
            raise PermissionDenied(f"{method} refused: this server is read-only (--read-only)")

    def _counter(self, name: str) -> TableCounters:
        return self._counters.setdefault(name, TableCounters())


def _describe_spec(spec: TableSpec) -> str:
    return (f"num_rows={spec.num_rows} dim={spec.dim} dtype={spec.dtype} init={spec.init.kind}"
            f"({spec.init.scale}, seed={spec.init.seed}) optimizer={spec.optimizer.kind}(lr={spec.optimizer.lr})")
