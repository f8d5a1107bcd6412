"""Section 5: lookup throughput over 1, 2, 4 shards (`memstore serve` processes) on loopback.

One table of `rows` x `dim` (first dtype) split by the routing rule (row r on shard r % S), read
through `ShardedClient`: with S > 1 it de-duplicates the batch, sends one request per shard in
parallel and puts the answers back in order. All clusters run at once and are timed interleaved.
On a 2-core machine, S server processes and the client share two cores: more shards add
parallel requests but no CPU, so throughput can only rise where one server leaves a core idle
(waiting on the network stack or on the client), and falls once processes contend.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np

from bench.config import BenchConfig
from bench.procs import MemstoreServer
from bench.report import Section, rate, spread
from bench.tables import preload, random_rows, value_spec
from bench.timing import Measurement, id_batches, side_by_side
from engram_client.sharded import ShardedClient
from memstore.dtypes import storage_dtype
from memstore.store import ShardLayout

TABLE = "scaling"


def run(cfg: BenchConfig, work: Path) -> Section:
    dtype = cfg.dtypes[0]
    section = Section("scaling", f"Scaling: lookup rows/s over shards, {cfg.rows:,} rows x dim {cfg.dim} "
                                 f"{dtype}, RAM backend, uniform ids")
    values = random_rows(cfg.rows, cfg.dim, cfg.seed)
    spec = value_spec(TABLE, cfg.rows, cfg.dim, dtype)
    with contextlib.ExitStack() as stack:
        clients = {}
        for shards in cfg.shard_counts:
            targets = []
            for index in range(shards):
                data_dir = work / f"s{shards}-{index}"
                preload(data_dir, "ram", [(spec, values)], ShardLayout(index, shards))
                server = stack.enter_context(MemstoreServer(data_dir, "ram", "--shard-index", str(index),
                                                            "--shard-count", str(shards)))
                targets.append(server.target)
            clients[shards] = stack.enter_context(ShardedClient(targets))
        expected = values.astype(storage_dtype(dtype))
        del values
        probe = np.random.default_rng(cfg.seed).integers(0, cfg.rows, 1000)
        for shards, client in clients.items():
            if not np.array_equal(client.lookup(TABLE, probe), expected[probe]):
                raise AssertionError(f"{shards} shards returned wrong rows: benchmark setup is broken")
        for size in cfg.scaling_sizes:
            batches = id_batches(cfg.rows, size, max(8, math.ceil((1 << 21) / size)), "uniform", cfg.seed)
            calls = {f"{s} shard{'s' * (s > 1)}": (lambda i, c=c, b=batches: c.lookup(TABLE, b[i % len(b)]))
                     for s, c in clients.items()}
            seconds = side_by_side(calls, cfg.rounds, cfg.min_sample_s)
            single = None
            for (shards, name), s in zip(zip(clients, calls), seconds.values()):
                m = Measurement(name, s, size, cfg.dim * storage_dtype(dtype).itemsize)
                single = single or m.rate
                section.records.append(m.record(shards=shards, size=size, dtype=dtype))
                section.table.append({"ids": f"{size:,}", "shards": str(shards), "rows/s": rate(m.rate),
                                      "spread": spread(section.records[-1]), "GB/s": f"{m.gbps:.2f}",
                                      "x 1 shard": f"{m.rate / single:.2f}"})
    section.notes.append(f"{len(clients)} clusters ({sum(cfg.shard_counts)} server processes) on "
                         f"{len(os.sched_getaffinity(0))} cores, timed interleaved: shards share the cores "
                         "with each other and the client.")
    return section
