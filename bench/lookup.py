"""Section 1: lookup throughput, memstore beside the in-process limit, Redis and raw LMDB.

Systems, all reading the same rows (checked before timing):
- numpy gather   `np.take(table, ids, out=buf, mode="clip")` in this process: the memory limit.
- memstore ram   `MemStoreClient.lookup` over loopback gRPC to a `memstore serve --backend ram`.
- memstore ram same-host  the same server's table mapped read-only by this process
                 (`shared_memory="on"`, memstore/shm.py): the gather runs here, no RPC.
- memstore lmdb same-host  the LMDB server's environment opened read-only by this process.
- memstore lmdb  the same against `--backend lmdb` (page cache warm: the file was just written).
- redis MGET     one MGET of all ids from a local redis-server (hiredis parser), decoded to an array.
- lmdb get loop  py-lmdb in this process: one read txn, `txn.get` per id in request order.
Ids are uniform at every size, and Zipfian (s = zipf_s) at `zipf_size`.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench.config import BenchConfig
from bench.procs import MemstoreServer, RedisServer, find_redis
from bench.profile import py_spy
from bench.report import Section, rate, spread
from bench.tables import (
    lmdb_lookup,
    load_redis,
    preload,
    random_rows,
    redis_lookup,
    stored,
    value_spec,
    write_raw_lmdb,
)
from bench.timing import Measurement, id_batches, side_by_side
from memstore.client import MemStoreClient
from memstore.dtypes import storage_dtype

NUMPY, RAM, LMDB = "numpy gather", "memstore ram", "memstore lmdb"
RAM_SAME_HOST = "memstore ram same-host"
SAME_HOST = {"ram": RAM_SAME_HOST, "lmdb": "memstore lmdb same-host"}
REDIS, RAW_LMDB = "redis MGET", "lmdb get loop"
PROFILE_SIZE, PROFILE_SECONDS = 65536, 8.0  # --profile: ids per lookup, seconds per system
IDS_PER_SETTING = 1 << 21  # ids generated per setting: small batches rotate through many (cold caches)


def table_name(dtype: str) -> str:
    return f"lookup_{dtype}"


def run(cfg: BenchConfig, work: Path) -> Section:
    section = Section("lookup", f"Lookup: rows/s, {cfg.rows:,} rows x dim {cfg.dim}, loopback")
    values = random_rows(cfg.rows, cfg.dim, cfg.seed)                             # (N, dim) float32
    tables = {dtype: stored(values, dtype) for dtype in cfg.dtypes}
    specs = [(value_spec(table_name(d), cfg.rows, cfg.dim, d), values) for d in cfg.dtypes]
    for backend in ("ram", "lmdb"):
        preload(work / f"lookup-{backend}", backend, specs)
    del values, specs
    with contextlib.ExitStack() as stack:
        systems, pids = start_systems(stack, cfg, tables, work, section.notes)
        for d in cfg.dtypes:
            check_same_rows(systems[d], tables[d], cfg.seed)
            settings = [("uniform", n) for n in cfg.lookup_sizes] + [("zipf", cfg.zipf_size)]
            for dist, size in settings:
                measure(section, cfg, systems[d], d, dist, size)
        if cfg.profile_prefix:
            profile(section, cfg, systems[cfg.dtypes[0]], pids)
    section.notes.append("Tables materialised before timing (every row written once): steady state, "
                         "no lazy init.")
    return section


def start_systems(stack: contextlib.ExitStack, cfg: BenchConfig, tables: dict[str, np.ndarray], work: Path,
                  notes: list[str]) -> tuple[dict[str, dict], dict[str, int]]:
    """{dtype: {system: lookup(ids) -> rows}} over the same rows, and the memstore servers' pids."""
    systems = {d: {NUMPY: partial(numpy_gather, tables[d])} for d in cfg.dtypes}
    pids = {}
    for backend, label in (("ram", RAM), ("lmdb", LMDB)):
        server = stack.enter_context(MemstoreServer(work / f"lookup-{backend}", backend))
        pids[label] = server.pid
        client = stack.enter_context(MemStoreClient(server.target, shared_memory="off"))
        for d in cfg.dtypes:
            systems[d][label] = partial(client.lookup, table_name(d))
        mapped = stack.enter_context(MemStoreClient(server.target, shared_memory="on"))
        for d in cfg.dtypes:
            systems[d][SAME_HOST[backend]] = partial(mapped.lookup, table_name(d))
    redis_path, redis_missing = find_redis()
    if redis_path:
        redis = stack.enter_context(RedisServer(redis_path, work / "redis"))
        for db, d in enumerate(cfg.dtypes):  # one Redis db per dtype, same keys
            load_redis(redis.client(db), tables[d])
            systems[d][REDIS] = partial(redis_lookup, redis.client(db), dtype=tables[d].dtype, dim=cfg.dim)
        notes.append(f"Redis {redis.version()} (hiredis parser: {_hiredis()}), one MGET per lookup, "
                     "8-byte binary keys, no persistence.")
    else:
        notes.append(f"Redis baseline SKIPPED: {redis_missing}.")
    for d in cfg.dtypes:
        env = write_raw_lmdb(work / f"raw-lmdb-{d}", tables[d])
        stack.callback(env.close)
        systems[d][RAW_LMDB] = partial(lmdb_lookup, env, dtype=tables[d].dtype, dim=cfg.dim)
    return systems, pids


def numpy_gather(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    out = np.empty((len(ids), table.shape[1]), table.dtype)
    return np.take(table, ids, axis=0, out=out, mode="clip")  # clip: no bounds buffer (LIMITS.md)


def profile(section: Section, cfg: BenchConfig, systems: dict, pids: dict[str, int]) -> None:
    """--profile: each memstore system looks up PROFILE_SIZE uniform ids in a loop for
    PROFILE_SECONDS while py-spy records its server and this process (the client side)."""
    batches = id_batches(cfg.rows, PROFILE_SIZE, 8, "uniform", cfg.seed)
    for label, pid in pids.items():
        name = label.replace("memstore ", "")
        targets = {f"{name}-server": pid, f"{name}-client": os.getpid()}
        with py_spy(targets, cfg.profile_prefix, section.notes):
            started, i = time.perf_counter(), 0
            while time.perf_counter() - started < PROFILE_SECONDS:
                systems[label](batches[i % len(batches)])
                i += 1


def check_same_rows(systems: dict, table: np.ndarray, seed: int) -> None:
    """Every system must return exactly the table's rows, in request order."""
    ids = np.random.default_rng(seed + 1).integers(0, len(table), 1000)
    for name, lookup in systems.items():
        got = np.asarray(lookup(ids))
        if not np.array_equal(got.view(np.uint8), table[ids].view(np.uint8)):
            raise AssertionError(f"{name} returned other rows than the table holds: the setup is broken")


def measure(section: Section, cfg: BenchConfig, systems: dict, dtype: str, dist: str, size: int) -> None:
    count = max(8, math.ceil(IDS_PER_SETTING / size))
    batches = id_batches(cfg.rows, size, count, dist, cfg.seed, cfg.zipf_s)
    calls = {name: (lambda i, f=lookup: f(batches[i % len(batches)])) for name, lookup in systems.items()}
    seconds = side_by_side(calls, cfg.rounds, cfg.min_sample_s)
    row_bytes = cfg.dim * storage_dtype(dtype).itemsize
    unique = float(np.mean([len(np.unique(b)) / size for b in batches[:8]]))
    results = {name: Measurement(name, s, size, row_bytes) for name, s in seconds.items()}
    limit = results[NUMPY].rate
    for name, m in results.items():
        record = m.record(dtype=dtype, dim=cfg.dim, dist=dist, size=size, unique_fraction=unique)
        section.records.append(record)
        section.table.append({
            "dtype": dtype, "ids": f"{size:,}", "dist": dist, "system": name, "rows/s": rate(m.rate),
            "spread": spread(record), "GB/s": f"{m.gbps:.2f}", "ms/call": f"{1e3 * m.median_s:.2f}",
            "x numpy": f"{m.rate / limit:.3f}",
            "x redis": f"{m.rate / results[REDIS].rate:.2f}" if REDIS in results else "-"})


def _hiredis() -> bool:
    try:
        from redis.utils import HIREDIS_AVAILABLE
        return bool(HIREDIS_AVAILABLE)
    except ImportError:
        return False
