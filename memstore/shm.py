"""RAM tables in shared memory: the daemon's arrays are files on a tmpfs, mapped by co-located
clients read-only, so a trainer on the same host gathers rows at memory speed, in its own
process, with no server work per lookup.

Layout, one directory per table incarnation (mode 0700: only the daemon's user can enter it):

    <shm_dir>/<table>.<generation>/
        header.bin        int64 [4]: MAGIC, generation, alive (1/0), layout version
        rows.bin          storage dtype [local_rows, dim]
        state.bin         float32 [local_rows, width]     (the daemon's optimizer state)
        materialized.bin  bool [local_rows]

State and invariants (the daemon writes, clients read):
- `generation` is random per incarnation (create, or start from a snapshot): a client that was
  told generation g only trusts a header that still says g and alive = 1.
- The daemon sets alive = 0 before it removes the files (drop, shutdown, the next start), so a
  client still holding the mapping sees it and asks for a new one; a client checks the header
  before and after each gather and throws the rows away if either check fails.
- Rows are published as the RAM backend does (`memstore.backends.ram`): values first, then the
  `materialized` flag; readers read flags first, then rows. A row read while an update writes it
  may mix old and new elements, as a gRPC lookup racing that update may (documented per backend).
- Clients never write: they map every file read-only.
"""
from __future__ import annotations

import mmap
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memstore import dtypes, optimizers
from memstore.init import init_rows
from memstore.spec import TableSpec

MAGIC = 0x6D656D7374_6F7265  # "memstore"
LAYOUT_VERSION = 1
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class StaleMapping(Exception):
    """The mapped table was dropped, restored elsewhere or replaced: map it again."""


def boot_id() -> str:
    """Identifies this boot of this machine: equal ids mean the same host (and its /dev/shm)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def default_shm_root() -> Path | None:
    """/dev/shm/memstore-<uid> where /dev/shm is a writable tmpfs; None elsewhere."""
    base = Path("/dev/shm")
    return base / f"memstore-{os.getuid()}" if base.is_dir() and os.access(base, os.W_OK) else None


@dataclass
class TableFiles:
    """The arrays of one table incarnation, mapped from its directory."""
    path: Path
    header: np.ndarray        # int64 [4]
    rows: np.ndarray          # storage dtype [L, dim]
    state: np.ndarray         # float32 [L, width]
    materialized: np.ndarray  # bool [L]

    @property
    def generation(self) -> int:
        return int(self.header[1])


def _shapes(spec: TableSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    width = optimizers.state_width(spec.optimizer, spec.dim)
    return {"rows": ((spec.local_rows, spec.dim), dtypes.storage_dtype(spec.dtype)),
            "state": ((spec.local_rows, width), np.dtype(np.float32)),
            "materialized": ((spec.local_rows,), np.dtype(np.bool_))}


def room_for(root: Path, spec: TableSpec, shared: list[TableFiles]) -> bool:
    """Whether the tmpfs under `root` can hold this table's dense size beside the tables already
    there (their untouched pages included): pages of a tmpfs file are allocated when first
    written, and a write past the tmpfs size would kill the daemon (SIGBUS), so a table goes
    into shared memory only when all of it fits (a container's /dev/shm is often 64 MiB)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    stat = os.statvfs(root)
    free = stat.f_bavail * stat.f_frsize
    promised = sum(_dense_file_bytes(f) - _allocated_bytes(f.path) for f in shared)
    return dense_file_bytes(spec) + promised <= free


def dense_file_bytes(spec: TableSpec) -> int:
    return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in _shapes(spec).values())


def _dense_file_bytes(files: TableFiles) -> int:
    return files.rows.nbytes + files.state.nbytes + files.materialized.nbytes


def _allocated_bytes(path: Path) -> int:
    try:
        return sum(p.stat().st_blocks * 512 for p in path.iterdir())
    except OSError:
        return 0


def create(root: Path, spec: TableSpec) -> TableFiles:
    """New zeroed (sparse) files for a table; the daemon's read-write mapping."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    generation = uuid.uuid4().int >> 65  # 63 bits: positive in int64
    path = root / f"{spec.name}.{generation}"
    path.mkdir(mode=0o700)
    arrays = {name: _map(path / f"{name}.bin", dtype, shape, "w+") for name, (shape, dtype) in _shapes(spec).items()}
    header = np.memmap(path / "header.bin", np.int64, "w+", shape=(4,))
    header[:] = (MAGIC, generation, 1, LAYOUT_VERSION)
    header.flush()
    return TableFiles(path, header, **arrays)


def open_readonly(path: Path, spec: TableSpec, generation: int) -> TableFiles:
    """A client's read-only mapping; raises StaleMapping when it is not that incarnation."""
    try:
        header = np.memmap(path / "header.bin", np.int64, "r", shape=(4,))
        arrays = {name: _map(path / f"{name}.bin", dtype, shape, "r")
                  for name, (shape, dtype) in _shapes(spec).items() if name != "state"}
    except (OSError, ValueError) as exc:
        raise StaleMapping(f"cannot map {path}: {exc}") from exc
    files = TableFiles(path, header, state=np.empty((0, 0), np.float32), **arrays)
    check(files, generation)
    return files


def _map(path: Path, dtype: np.dtype, shape: tuple[int, ...], mode: str) -> np.ndarray:
    if 0 in shape:  # an empty file cannot be mapped
        return np.zeros(shape, dtype)
    array = np.memmap(path, dtype, mode, shape=shape)
    if mode != "r":
        try:  # huge pages where the host allows them for shmem (shmem_enabled=advise); else a no-op
            array._mmap.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError, ValueError):
            pass
    return array


def check(files: TableFiles, generation: int) -> None:
    header = files.header
    if int(header[0]) != MAGIC or int(header[1]) != generation or int(header[2]) != 1:
        raise StaleMapping(f"{files.path} is no longer generation {generation} of its table")


def retire(files: TableFiles) -> None:
    """Mark the incarnation dead for every client, then remove its files."""
    files.header[2] = 0
    files.header.flush()
    shutil.rmtree(files.path, ignore_errors=True)


def retire_all(root: Path) -> None:
    """At start: whatever a previous daemon left (it may have been killed) is marked dead first."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        try:
            header = np.memmap(path / "header.bin", np.int64, "r+", shape=(4,))
            header[2] = 0
            header.flush()
        except (OSError, ValueError):
            pass
        shutil.rmtree(path, ignore_errors=True)


def gather(rows: np.ndarray, materialized: np.ndarray, spec: TableSpec,
           local_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, dim] (storage dtype) of `local_ids`, never-written rows as their initial value;
    and the mask of those. Flags are read before rows (see the module doc)."""
    fresh = ~np.take(materialized, local_ids, mode="clip")                       # (n,)
    out = np.empty((len(local_ids), spec.dim), rows.dtype)                       # (n, dim)
    np.take(rows, local_ids, axis=0, out=out, mode="clip")  # mode=clip: no bounds buffer, fastest
    if fresh.any():
        out[fresh] = initial_stored(spec, local_ids[fresh])
    return out, fresh


def initial_stored(spec: TableSpec, local_ids: np.ndarray) -> np.ndarray:
    """Initial rows in the storage dtype: what a lookup returns and an update starts from."""
    return dtypes.from_float32(init_rows(spec.init, spec.to_global(local_ids), spec.dim), spec.dtype)
