"""Storage backends behind one interface (`memstore.backends.base`), chosen by name."""
from __future__ import annotations

import inspect
from pathlib import Path

from memstore.backends.base import Backend, Table, TableUsage
from memstore.backends.lmdbstore import LmdbBackend
from memstore.backends.ram import RamBackend

BACKENDS: dict[str, type[Backend]] = {"ram": RamBackend, "lmdb": LmdbBackend}

__all__ = ["BACKENDS", "Backend", "LmdbBackend", "RamBackend", "Table", "TableUsage", "open_backend"]


def open_backend(kind: str, data_dir: Path, **options) -> Backend:
    """Open (or create) the `kind` backend ("ram" | "lmdb") at `data_dir`, restoring its tables."""
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown backend {kind!r}; expected one of {', '.join(BACKENDS)}") from None
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "data_dir"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"backend {kind!r} does not take {sorted(unknown)}; it takes {sorted(accepted)}")
    return cls(Path(data_dir), **options)
