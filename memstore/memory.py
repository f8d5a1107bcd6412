"""Memory a table really holds, beside the bytes of its materialised rows.

A RAM table reserves its dense size at create (calloc'd arrays, or files allocated in full on
/dev/shm), and hashed lookups make every page of it resident within the first batches, while
only the rows an update wrote count as materialised. So each table reports three numbers:
`bytes_used` (materialised rows and their optimizer state), `bytes_reserved` (what it has
claimed: a RAM table's dense arrays, an LMDB table's map) and `bytes_resident` (what is in
memory now: the arrays' pages the kernel holds, or an LMDB file's pages in the page cache).
"""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_bytes(array: np.ndarray) -> int:
    """Bytes of `array`'s pages in memory now (mincore(2)): anonymous pages that were touched,
    or file pages in the page cache. Whole pages: a small array counts its page."""
    if array.nbytes == 0:
        return 0
    return _resident(array.ctypes.data, array.nbytes)


def file_resident_bytes(path: Path) -> int:
    """Bytes of the file's pages in the page cache (mapped read-only for the question only;
    mapping touches no page)."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                return 0
            with mmap.mmap(file.fileno(), size, prot=mmap.PROT_READ) as mapped:
                view = np.frombuffer(mapped, np.uint8)
                try:
                    return _resident(view.ctypes.data, size)
                finally:
                    del view  # the mapping cannot close while an array points into it
    except FileNotFoundError:
        return 0


def allocated_bytes(directory: Path) -> int:
    """Blocks allocated to the files of a directory: on tmpfs (/dev/shm) that is memory, in
    use whether or not any process has touched the pages."""
    try:
        return sum(entry.stat().st_blocks * 512 for entry in os.scandir(directory) if entry.is_file())
    except FileNotFoundError:  # the table was dropped meanwhile
        return 0


def process_memory() -> tuple[int, int]:
    """(resident, virtual) bytes of this process; (0, 0) where /proc is missing."""
    try:
        virtual, resident = Path("/proc/self/statm").read_text().split()[:2]
    except (OSError, ValueError):
        return 0, 0
    return int(resident) * PAGE, int(virtual) * PAGE


def _resident(address: int, length: int) -> int:
    start = address - address % PAGE  # mincore wants a page-aligned start
    length += address - start
    pages = np.zeros(-(-length // PAGE), np.uint8)
    if _libc.mincore(start, length, pages.ctypes.data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mincore: {os.strerror(error)}")
    return int(np.count_nonzero(pages & 1)) * PAGE
