"""The tables every system reads: one set of random rows, loaded into each store before timing.

Memstore creates rows lazily: a row never written reads as its initial value, computed on the fly
(the slow path). Lookups are benchmarked in the steady state, where every row has been written,
so tables are *materialised* before the servers start: the benchmark opens the backend's data dir
in-process, writes every row through `Store.update`, checkpoints, closes, and then `memstore serve`
restores it (RAM: from the snapshot; LMDB: the environment itself). Writing exact values through
the update path needs no private API: with `init="zeros"` and `sgd(lr=1)`, `row -= 1 * (-value)`
stores `value`. Redis and the raw LMDB loop get the same bytes, so every system reads identical
rows (checked before timing).
"""
from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np

from memstore.backends import open_backend
from memstore.dtypes import storage_dtype
from memstore.spec import InitSpec, OptimizerSpec, TableSpec
from memstore.store import ShardLayout, Store

LOAD_CHUNK = 1 << 18  # rows per write while loading
ZEROS = InitSpec("zeros", 0.0, 0)
NORMAL = InitSpec("normal", 0.02, 0)
ONE_SHARD = ShardLayout()


def random_rows(num_rows: int, dim: int, seed: int) -> np.ndarray:
    """float32 [num_rows, dim] ~ N(0, 0.02^2): the values of the lookup tables."""
    rows = np.random.default_rng(seed).standard_normal((num_rows, dim), dtype=np.float32)
    rows *= np.float32(0.02)
    return rows


def value_spec(name: str, num_rows: int, dim: int, dtype: str) -> TableSpec:
    """A table whose rows are set to exact values by one sgd(lr=1) update from zeros."""
    return TableSpec(name, num_rows, dim, dtype, ZEROS, OptimizerSpec("sgd", 1.0, {}))


def optimizer_spec(name: str, num_rows: int, dim: int, dtype: str, optimizer: str, lr: float = 0.01,
                   init: InitSpec = ZEROS) -> TableSpec:
    return TableSpec(name, num_rows, dim, dtype, init, OptimizerSpec(optimizer, lr, {}))


def preload(data_dir: Path, backend: str, tables: list[tuple[TableSpec, np.ndarray | None]],
            shard: ShardLayout = ONE_SHARD) -> None:
    """Create `tables` in a fresh data dir and write every row this shard owns.

    Each entry is (spec, float32 values [num_rows, dim]) or (spec, None): then every row gets one
    zero-gradient step (materialised with its optimizer state, values unchanged).
    """
    options = {"sync": False} if backend == "lmdb" else {}  # setup only; the server opens with its own
    store = Store(open_backend(backend, Path(data_dir), **options), shard)
    try:
        for spec, values in tables:
            store.create_table(spec)
            owned = np.arange(shard.index, spec.num_rows, shard.count, dtype=np.int64)  # global ids
            for start in range(0, len(owned), LOAD_CHUNK):
                ids = owned[start:start + LOAD_CHUNK]
                if values is None:  # the backend's own step: the store skips zero-gradient rows
                    table = store.backend.get(spec.name)
                    table.apply_update(ids // shard.count, np.zeros((len(ids), spec.dim), np.float32), "", 0)
                else:
                    store.update(spec.name, ids, -values[ids], "", 0)
        store.backend.checkpoint()
    finally:
        store.backend.close()


def lmdb_keys(ids: np.ndarray) -> list[bytes]:
    """8-byte big-endian keys (numeric order = byte order), as memstore's LMDB backend uses."""
    return np.ascontiguousarray(ids, dtype=">i8").view("V8").tolist()


def row_values(rows: np.ndarray) -> list[bytes]:
    rows = np.ascontiguousarray(rows)
    return rows.view(f"V{rows.shape[1] * rows.itemsize}").ravel().tolist()


def write_raw_lmdb(path: Path, rows: np.ndarray) -> lmdb.Environment:
    """A plain LMDB environment (one unnamed db) holding `rows` under 8-byte big-endian keys,
    reopened read-only with readahead off (random reads), as a server would."""
    map_size = int(rows.nbytes * 2 + (64 << 20) + len(rows) * 64)
    env = lmdb.open(str(path), map_size=map_size, sync=False, metasync=False, writemap=True)
    with env.begin(write=True) as txn, txn.cursor() as cursor:
        for start in range(0, len(rows), LOAD_CHUNK):
            ids = np.arange(start, min(start + LOAD_CHUNK, len(rows)), dtype=np.int64)
            cursor.putmulti(zip(lmdb_keys(ids), row_values(rows[ids])), append=True)
    env.close()
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, map_size=map_size)


def lmdb_lookup(env: lmdb.Environment, ids: np.ndarray, dtype: np.dtype, dim: int) -> np.ndarray:
    """The raw py-lmdb baseline: one read txn, one `get` per id, in request order."""
    with env.begin(buffers=False) as txn:
        values = list(map(txn.get, lmdb_keys(ids)))
    return np.frombuffer(b"".join(values), dtype).reshape(len(ids), dim)


def load_redis(client, rows: np.ndarray, batch: int = 10_000) -> None:
    """MSET every row under its 8-byte big-endian id, `batch` keys per command, pipelined."""
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(rows), batch):
        ids = np.arange(start, min(start + batch, len(rows)), dtype=np.int64)
        pipe.mset(dict(zip(lmdb_keys(ids), row_values(rows[ids]))))
        if len(pipe) >= 20:
            pipe.execute()
    pipe.execute()


def redis_lookup(client, ids: np.ndarray, dtype: np.dtype, dim: int) -> np.ndarray:
    """The Redis baseline: one MGET of all ids, decoded into one array."""
    values = client.mget(lmdb_keys(ids))
    return np.frombuffer(b"".join(values), dtype).reshape(len(ids), dim)


def stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as a table of `dtype` stores them."""
    return values.astype(storage_dtype(dtype))
