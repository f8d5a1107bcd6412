"""The storage interface every backend implements (one module per backend).

Division of labour:
- `memstore.store.Store` (above the backends) validates requests: ids in range, byte sizes,
  finite gradients, read-only mode; it sorts and de-duplicates ids and sums duplicate
  gradients. A backend therefore receives clean input only.
- Ids a backend sees are this shard's LOCAL rows, in [0, spec.local_rows); the store maps global
  row g to local row g // shard_count. Initial values come from the GLOBAL id
  (`spec.to_global`), so a row starts the same whatever the shard layout; snapshots store
  global ids (portable across layouts).
- A backend stores rows in the table's storage dtype (`memstore.dtypes`), keeps optimizer state
  beside the rows (float32, `memstore.optimizers.state_width` columns per row), creates rows
  lazily from `memstore.init.init_rows` (deterministic per (seed, row id)), applies each
  (client_id, seq) at most once, and persists itself under its data dir.

Thread-safety: `lookup` may run concurrently with anything and does not wait for updates
(only, briefly, for an LMDB map resize); `apply_update`, `snapshot` and `drop` on one table are
serialised by the table itself. What a lookup racing an update of the same rows sees is
backend-specific (LMDB: the whole update or none of it; RAM: each row, even each element, before
or after it). A table dropped or closed raises `NotFound`.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memstore.checkpoints import Checkpoints
from memstore.errors import NotFound
from memstore.snapshot import Snapshot
from memstore.spec import TableSpec


@dataclass(frozen=True)
class TableUsage:
    rows_materialized: int  # rows that hold storage (touched rows; all rows for eager backends)
    bytes_used: int         # bytes of the materialised rows + their optimizer state
    bytes_reserved: int = 0  # what the table has claimed: RAM dense arrays, LMDB map (memstore.memory)
    bytes_resident: int = 0  # what of it is in memory now


class Table(ABC):
    """One embedding table with its optimizer state."""

    spec: TableSpec

    @abstractmethod
    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Rows for `ids` (int64 [n], local rows in [0, spec.local_rows), any order, duplicates
        allowed; the array may be read-only).

        Returns a C-contiguous array [n, dim] of the storage dtype, in the order of `ids`.
        A row never written reads as its deterministic initial value.
        """

    def lookup_blocks(self, ids: np.ndarray, rows_per_block: int) -> Iterator[np.ndarray]:
        """The rows of `lookup(ids)` as consecutive blocks of at most `rows_per_block` rows, so the
        server can send the first block while it gathers the next. By default one lookup
        (one consistent read: what LMDB promises), then sliced; RAM gathers block by block."""
        rows = self.lookup(ids)
        for start in range(0, len(rows), rows_per_block):
            yield rows[start:start + rows_per_block]

    @abstractmethod
    def apply_update(self, ids: np.ndarray, grads: np.ndarray, client_id: str, seq: int,
                     lr: float | None = None) -> bool:
        """One optimizer step for rows `ids` (int64 [n], local, sorted, unique) with `grads`
        (float32 [n, dim], finite), at learning rate `lr` (None: the spec's). Rows and
        optimizer state change together, atomically; `version` goes up by one.

        Returns False, changing nothing, when `seq` <= the last seq applied for `client_id`
        on this table (a retried delivery); True when applied. An empty `client_id` disables
        the check. The (client_id → last seq) memory is bounded and persisted with the table.
        """

    def shared_location(self) -> tuple[str, Path, int] | None:
        """(kind, directory, generation) for same-host readers, or None when they cannot map it."""
        return None

    @abstractmethod
    def last_seq(self, client_id: str) -> int | None:
        """The last seq applied for `client_id` (None: none remembered)."""

    @property
    @abstractmethod
    def version(self) -> int:
        """Updates applied since this table was opened or restored: equal versions, equal rows."""

    @abstractmethod
    def usage(self) -> TableUsage: ...

    @abstractmethod
    def snapshot(self, dest: Path) -> Path:
        """Write a consistent copy of the table into the new directory `dest` in the portable
        snapshot format (`memstore.snapshot`: spec + dedup memory as msgpack, materialized GLOBAL
        row ids, rows, optimizer state as .npy), atomically (temp dir + rename); returns `dest`."""

    def export(self, dest: Path) -> Path:
        """`snapshot`, for a copy kept elsewhere (a tagged checkpoint): it does not count as the
        backend's own restart point."""
        return self.snapshot(dest)


class Backend(ABC):
    """A collection of tables persisted under one data directory."""

    name: str

    @abstractmethod
    def __init__(self, data_dir: Path, **options) -> None:
        """Open `data_dir` (created if missing) and restore every table found there. A data dir
        is held by one backend at a time (a second open raises `FailedPrecondition`)."""

    @abstractmethod
    def create_table(self, spec: TableSpec) -> Table:
        """Raises `AlreadyExists` if a table of that name exists."""

    @abstractmethod
    def drop_table(self, name: str) -> None:
        """Remove the table and its files. Raises `NotFound`."""

    _tables: dict[str, Table]  # every backend keeps its open tables here, by name
    data_dir: Path
    keep_checkpoints: int = 3

    def get(self, name: str) -> Table:
        """Raises `NotFound`."""
        try:
            return self._tables[name]
        except KeyError:
            raise NotFound(f"table {name!r} does not exist") from None

    def tables(self) -> list[Table]:
        return list(self._tables.values())

    @abstractmethod
    def snapshot(self, name: str) -> Path:
        """Snapshot one table to `<data_dir>/snapshots/<name>/<number>-<UTC timestamp>/`, keeping the
        newest `keep_snapshots`; returns the new path. Raises `NotFound`."""

    # ---- tagged checkpoints (training jobs: `memstore.checkpoints`) ------------------------------

    def checkpoint_table(self, name: str, tag: str) -> Path:
        """A named checkpoint of one table; the same tag again while the table is unchanged
        returns the existing one (every rank of a data-parallel job asks for it)."""
        return self._checkpoints().take(self.get(name), tag)

    def restore_checkpoint(self, name: str, tag: str) -> tuple[Path, bool]:
        """Roll table `name` back to its checkpoint `tag`; returns (path, whether anything
        changed): a no-op when the table is exactly that checkpoint already."""
        return self._checkpoints().restore(self.get(name), tag, self._replace_from)

    def checkpoint_tags(self, name: str) -> list[str]:
        """The tags of table `name`'s checkpoints on this server, oldest first."""
        return self._checkpoints().tags(name)

    _checkpoint_book: Checkpoints | None = None
    _checkpoint_book_lock = threading.Lock()  # two ranks' first checkpoints must share one book

    def _checkpoints(self) -> Checkpoints:
        with self._checkpoint_book_lock:
            if self._checkpoint_book is None:
                self._checkpoint_book = Checkpoints(self.data_dir, self.keep_checkpoints)
            return self._checkpoint_book

    @abstractmethod
    def _replace_from(self, snapshot: Snapshot) -> Table:
        """Make the table of `snapshot.spec.name` hold exactly the snapshot (rows, optimizer state,
        dedup memory), durably; returns the table now serving that name."""

    @abstractmethod
    def checkpoint(self) -> None:
        """Make everything acknowledged so far survive a restart (RAM: snapshot every table into
        the data dir, the state restored at start; LMDB: nothing to do beyond a sync)."""

    @abstractmethod
    def close(self) -> None:
        """Release files and memory maps. Does not checkpoint (the server calls that first)."""
