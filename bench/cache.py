"""Section 6: the client hot-row cache (`engram_client.cache.RowCache`) under Zipfian traffic.

The path a training lookup takes, per batch of `zipf_size` Zipfian ids (s = zipf_s):
de-duplicate (np.unique), ask the cache, fetch only the misses from a `memstore serve --backend
ram` subprocess, offer the fetched rows to the cache, assemble the unique rows and expand them to
request order. "no cache" is the same path with every unique id fetched. Capacities are
fractions of the table's bytes. Each variant first runs `WARMUP_BATCHES` untimed batches (the
cache fills), then every variant reads the same fresh batches, interleaved by round; the hit rate
counts unique ids served by the cache over the timed batches.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.config import BenchConfig
from bench.procs import MemstoreServer
from bench.report import Section, rate
from bench.tables import preload, random_rows, value_spec
from bench.timing import ZipfIds
from memstore.client import MemStoreClient
from memstore.dtypes import storage_dtype

TABLE = "cache"
WARMUP_BATCHES = 8


class CachedLookup:
    """De-duplicate, serve hits from the cache, fetch misses, insert them, expand: one batch."""

    def __init__(self, client: MemStoreClient, cache, dim: int):
        self.client, self.cache, self.dim = client, cache, dim
        self.unique_ids = 0
        self.hits = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(ids, return_inverse=True)                    # (U,), (n,)
        if self.cache is None:
            return self.client.lookup(TABLE, unique)[inverse]                    # (n, D)
        hit, cached = self.cache.lookup(torch.from_numpy(unique))                # (U,), (U, D)
        hit = hit.numpy()
        rows = cached.numpy().copy()                                              # (U, D) valid where hit
        missing = unique[~hit]
        if len(missing):
            fetched = self.client.lookup(TABLE, missing)                          # (M, D)
            rows[~hit] = fetched
            self.cache.insert(torch.from_numpy(missing), torch.from_numpy(fetched))
        self.unique_ids += len(unique)
        self.hits += int(hit.sum())
        return rows[inverse]                                                      # (n, D)


def run(cfg: BenchConfig, work: Path) -> Section:
    dtype = cfg.dtypes[0]
    section = Section("cache", f"Cache: client hot-row cache, Zipfian ids (s={cfg.zipf_s}), "
                               f"{cfg.zipf_size:,} ids per batch, {cfg.rows:,} rows x dim {cfg.dim} {dtype}")
    try:
        from engram_client.cache import RowCache
    except ImportError as exc:
        section.skipped = f"engram_client.cache.RowCache is not available ({exc})"
        return section
    values = random_rows(cfg.rows, cfg.dim, cfg.seed)
    preload(work / "ram", "ram", [(value_spec(TABLE, cfg.rows, cfg.dim, dtype), values)])
    expected = values.astype(storage_dtype(dtype))
    del values
    table_bytes = expected.nbytes
    torch_dtype = torch.from_numpy(expected[:1]).dtype
    zipf = ZipfIds(cfg.rows, cfg.zipf_s, cfg.seed)
    per_round = max(1, cfg.cache_batches // cfg.rounds)
    batches = [zipf.sample(cfg.zipf_size) for _ in range(WARMUP_BATCHES + cfg.rounds * per_round)]
    threads_before, threads = torch.get_num_threads(), max(1, len(os.sched_getaffinity(0)) - 1)
    torch.set_num_threads(threads)  # as in training beside a server (see e2e): OpenMP stalls otherwise
    stack = contextlib.ExitStack()
    stack.callback(torch.set_num_threads, threads_before)
    with stack:
        server = stack.enter_context(MemstoreServer(work / "ram", "ram"))
        client = stack.enter_context(MemStoreClient(server.target, shared_memory="off"))
        variants = {"no cache": CachedLookup(client, None, cfg.dim)}
        for fraction in cfg.cache_fractions:
            cache = RowCache(int(fraction * table_bytes), cfg.dim, torch_dtype)
            variants[f"{100 * fraction:g}% of table"] = CachedLookup(client, cache, cfg.dim)
        for name, lookup in variants.items():
            for ids in batches[:WARMUP_BATCHES]:
                got = lookup(ids)
            if not np.array_equal(got, expected[batches[WARMUP_BATCHES - 1]]):
                raise AssertionError(f"cache variant {name!r} returned wrong rows")
            lookup.unique_ids = lookup.hits = 0
        timed = batches[WARMUP_BATCHES:]
        calls = {name: (lambda i, f=lookup: f(timed[i % len(timed)])) for name, lookup in variants.items()}
        seconds = _timed_once(calls, cfg.rounds, per_round)
    report(section, cfg, variants, seconds, table_bytes, batches)
    section.notes.append(f"torch runs with {threads} thread(s) here, one core less than the machine, like "
                         "the e2e section (with every core, the cache's small tensor ops stall in OpenMP "
                         "whenever the server runs).")
    return section


def _timed_once(calls: dict, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per batch: in each round every variant reads that round's batches once (no
    repeats: a batch read twice would flatter the cache)."""
    seconds = {name: [] for name in calls}
    for r in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            for i in range(r * per_round, (r + 1) * per_round):
                call(i)
            seconds[name].append((time.perf_counter() - started) / per_round)
    return seconds


def report(section: Section, cfg: BenchConfig, variants: dict, seconds: dict, table_bytes: int,
           batches: list[np.ndarray]) -> None:
    unique = np.mean([len(np.unique(b)) for b in batches[:8]])
    base = None
    for (name, lookup), s in zip(variants.items(), seconds.values()):
        median = float(np.median(s))
        hit_rate = lookup.hits / lookup.unique_ids if lookup.unique_ids else 0.0
        fraction = 0.0 if lookup.cache is None else lookup.cache.capacity_bytes / table_bytes
        base = base or cfg.zipf_size / median
        section.records.append({"variant": name, "capacity_fraction": fraction, "hit_rate": hit_rate,
                                "median_ms": 1e3 * median, "rate": cfg.zipf_size / median,
                                "rows_fetched_per_batch": unique * (1 - hit_rate), "seconds": s})
        ids_per_s = cfg.zipf_size / median
        section.table.append({"cache": name, "hit rate (unique ids)": f"{100 * hit_rate:.1f}%",
                              "rows fetched/batch": f"{unique * (1 - hit_rate):,.0f}",
                              "ms/batch": f"{1e3 * median:.1f}", "ids/s": rate(ids_per_s),
                              "x no cache": f"{ids_per_s / base:.2f}"})
    section.notes.append(f"{unique:,.0f} unique ids per {cfg.zipf_size:,}-id batch on average; "
                         "rates count requested ids.")

