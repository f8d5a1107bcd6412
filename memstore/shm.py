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
- The daemon holds an exclusive flock on `header.bin` for as long as the incarnation lives; the
  kernel drops it when the daemon dies, however it dies. A client's check also tries a shared
  lock without waiting: getting it means nobody serves these files any more (a SIGKILLed daemon),
  so the rows are not trusted.
- Every directory on the way is a real directory (not a symlink) owned by the daemon's user with
  mode 0700, checked by the daemon before it uses or deletes anything there and by the client
  before it maps anything: /dev/shm is writable by every user.
- Files are allocated in full at create (`posix_fallocate`): a tmpfs page written past the
  tmpfs size would kill the daemon with SIGBUS, so a table that does not fit fails at create.
- Clients never write: they map every file read-only.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memstore import dtypes, optimizers
from memstore.errors import InvalidArgument
from memstore.init import initial_stored
from memstore.spec import TableSpec

MAGIC = 0x6D656D7374_6F7265  # "memstore"
LAYOUT_VERSION = 1
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class StaleMapping(Exception):
    """The mapped table was dropped, restored elsewhere or replaced: map it again."""


class NotHere(StaleMapping):
    """The table can never be read this way from here (another host, the server's own process)."""


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
    lock_fd: int = -1         # header.bin: the daemon's exclusive flock, or the fd a client tests

    @property
    def generation(self) -> int:
        return int(self.header[1])

    def close(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # the daemon's flock goes with it
            self.lock_fd = -1


class UnsafeDirectory(Exception):
    """A directory in the shared-memory path that this user does not own exclusively."""


def secure_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if missing, then make sure it is a real directory owned by this
    user that nobody else may enter; raises UnsafeDirectory otherwise."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise UnsafeDirectory(f"{path} is not a directory owned by uid {os.getuid()} (uid {info.st_uid}, "
                              f"mode {oct(info.st_mode)}): not used for shared memory")
    if info.st_mode & 0o077:  # ours, but others may look in (made by an older version): close it
        os.chmod(path, 0o700)
    return path


def _shapes(spec: TableSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    width = optimizers.state_width(spec.optimizer, spec.dim)
    return {"rows": ((spec.local_rows, spec.dim), dtypes.storage_dtype(spec.dtype)),
            "state": ((spec.local_rows, width), np.dtype(np.float32)),
            "materialized": ((spec.local_rows,), np.dtype(np.bool_))}


def dense_file_bytes(spec: TableSpec) -> int:
    return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in _shapes(spec).values())


def room_for(root: Path, spec: TableSpec) -> bool:
    """Whether the tmpfs under `root` has room for the whole table now (files are allocated in
    full at create, so this is all the room it will ever take)."""
    info = os.statvfs(root)
    return dense_file_bytes(spec) <= info.f_bavail * info.f_frsize


def create(root: Path, spec: TableSpec) -> TableFiles:
    """New zeroed files for a table, allocated in full; the daemon's read-write mapping, with the
    daemon's flock held on its header. Raises OSError (ENOSPC) when the tmpfs cannot hold it."""
    generation = uuid.uuid4().int >> 65  # 63 bits: positive in int64
    path = root / f"{spec.name}.{generation}"
    os.mkdir(path, 0o700)
    try:
        for name, (shape, dtype) in _shapes(spec).items():
            _allocate_file(path / f"{name}.bin", int(np.prod(shape)) * dtype.itemsize)
        arrays = {name: _map(path / f"{name}.bin", dtype, shape, "r+") for name, (shape, dtype) in _shapes(spec).items()}
        header = np.memmap(path / "header.bin", np.int64, "w+", shape=(4,))
        lock_fd = os.open(path / "header.bin", os.O_RDONLY)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # alive for as long as this process holds it
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    header[:] = (MAGIC, generation, 1, LAYOUT_VERSION)
    header.flush()
    return TableFiles(path, header, lock_fd=lock_fd, **arrays)


def _allocate_file(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)  # ENOSPC now rather than SIGBUS later
    finally:
        os.close(fd)


def open_readonly(path: Path, spec: TableSpec, generation: int) -> TableFiles:
    """A client's read-only mapping; raises StaleMapping when it is not that incarnation, and
    UnsafeDirectory when the directory is not this user's own."""
    info = os.lstat(path) if path.exists() or path.is_symlink() else None
    if info is None:
        raise StaleMapping(f"{path} is gone")
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UnsafeDirectory(f"{path} is not a 0700 directory of uid {os.getuid()}: not mapped")
    try:
        for name in ("header", "rows", "materialized"):
            if os.lstat(path / f"{name}.bin").st_uid != os.getuid():
                raise UnsafeDirectory(f"{path / name}.bin is not owned by uid {os.getuid()}: not mapped")
        header = np.memmap(path / "header.bin", np.int64, "r", shape=(4,))
        arrays = {name: _map(path / f"{name}.bin", dtype, shape, "r")
                  for name, (shape, dtype) in _shapes(spec).items() if name != "state"}
        lock_fd = os.open(path / "header.bin", os.O_RDONLY)
    except (OSError, ValueError) as exc:
        raise StaleMapping(f"cannot map {path}: {exc}") from exc
    files = TableFiles(path, header, state=np.empty((0, 0), np.float32), lock_fd=lock_fd, **arrays)
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
    """Raise StaleMapping unless these files are still `generation`, alive, and served."""
    header = files.header
    if (int(header[0]) != MAGIC or int(header[1]) != generation or int(header[2]) != 1
            or int(header[3]) != LAYOUT_VERSION or not _served(files.lock_fd)):
        raise StaleMapping(f"{files.path} is no longer generation {generation} of a live table")


def _served(lock_fd: int) -> bool:
    """Whether a daemon still holds its flock on the header (a client's test: it never waits)."""
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(lock_fd, fcntl.LOCK_UN)
    return False


def retire(files: TableFiles) -> None:
    """Mark the incarnation dead for every client, then remove its files."""
    files.header[2] = 0
    files.header.flush()
    shutil.rmtree(files.path, ignore_errors=True)
    files.close()


def retire_all(root: Path) -> None:
    """At start (after the data-dir lock is held): whatever a previous daemon on this data dir
    left is marked dead, then removed. `root` must have passed `secure_dir`."""
    for path in root.iterdir():
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
            continue
        try:
            header = np.memmap(path / "header.bin", np.int64, "r+", shape=(4,))
            header[2] = 0
            header.flush()
        except (OSError, ValueError):
            pass
        shutil.rmtree(path, ignore_errors=True)


# ---- staged Update payloads ---------------------------------------------------------------------
# A same-host client writes an Update's ids and gradients into its own file under the daemon's
# `<shm_dir>/staging/` and sends only the header; the daemon copies them out before it answers,
# so the client may reuse its file for its next update (its updates leave one at a time).

STAGING_DIR = "staging"
STAGING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")  # a plain file name: never a path


def stage(path: Path, ids: np.ndarray, grads: np.ndarray) -> None:
    """Client side: ids int64 [n] at offset 0, grads float32 [n, dim] right after."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        _write_all(fd, memoryview(np.ascontiguousarray(ids, "<i8")).cast("B"), 0)
        _write_all(fd, memoryview(np.ascontiguousarray(grads, "<f4")).cast("B"), 8 * len(ids))
    finally:
        os.close(fd)


def read_staged(staging_dir: Path, name: str, rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Daemon side: copies of ids [rows] and grads [rows, dim] from a client's staging file.
    Raises InvalidArgument for anything but a regular file of this user, big enough, right there."""
    if not STAGING_NAME.match(name):
        raise InvalidArgument(f"Update: staging {name!r} is not a plain file name")
    try:
        fd = os.open(staging_dir / name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise InvalidArgument(f"Update: staging file {name!r}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        need = rows * (8 + 4 * dim)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size < need:
            raise InvalidArgument(f"Update: staging file {name!r} is not a regular file of this user holding "
                                  f"{need:,} bytes ({rows} rows x dim {dim})")
        ids = np.empty(rows, "<i8")
        grads = np.empty((rows, dim), "<f4")
        _read_all(fd, memoryview(ids).cast("B"), 0)
        _read_all(fd, memoryview(grads).cast("B"), 8 * rows)
        return ids, grads
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_all(fd: int, buffer: memoryview, offset: int) -> None:
    while len(buffer):
        got = os.preadv(fd, [buffer], offset)
        if got == 0:
            raise InvalidArgument("Update: staging file shrank while it was read")
        buffer, offset = buffer[got:], offset + got


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


