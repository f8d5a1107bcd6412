"""Section 2: update throughput per optimizer and backend, through the real client.

One `client.update(table, ids, grads)` per call: `update_size` sorted unique ids (what a training
client sends: the per-row sum of a batch's gradient) with float32 gradients, waited for. The
server gathers the rows and their optimizer state, steps, and writes both back. LMDB runs twice:
with the default `lmdb_sync=true` (every acknowledged update is fsynced) and with `--lmdb-sync
false` (survives kill -9, not power loss), so the cost of durability is visible. "ram same-host"
is the RAM server again with a co-located client: the gradients go through a staging file in
shared memory and only the Update's header over gRPC.
"""
from __future__ import annotations

import contextlib
import shutil
from functools import partial
from pathlib import Path

import numpy as np

from bench.config import BenchConfig
from bench.procs import MemstoreServer
from bench.report import Section, rate, spread
from bench.tables import NORMAL, optimizer_spec, preload
from bench.timing import Measurement, side_by_side
from memstore.client import MemStoreClient

SERVERS = {"ram": ("ram", ()), "ram same-host": ("ram", ()), "lmdb (sync)": ("lmdb", ()),
           "lmdb (no sync)": ("lmdb", ("--lmdb-sync", "false"))}
SAME_HOST = "ram same-host"  # gradients staged in shared memory (memstore/shm.py), only the header over gRPC


def run(cfg: BenchConfig, work: Path) -> Section:
    dtype = cfg.dtypes[0]
    section = Section("update", f"Update: rows/s, {cfg.update_size:,} unique ids per update, "
                                f"{cfg.update_rows:,} rows x dim {cfg.dim} {dtype}")
    # Rows of realistic size (N(0, 0.02)): tiny values (a zero-initialised table after a few sgd
    # steps) are fp16 subnormals, whose numpy conversions are 10-20x slower than normal ones.
    specs = [(optimizer_spec(f"update_{opt}", cfg.update_rows, cfg.dim, dtype, opt, init=NORMAL), None)
             for opt in cfg.optimizers]
    for backend in {backend for backend, _ in SERVERS.values()}:
        preload(work / f"{backend}-template", backend, specs)
    rng = np.random.default_rng(cfg.seed)
    batches = [np.sort(rng.choice(cfg.update_rows, cfg.update_size, replace=False)) for _ in range(8)]
    grads = rng.standard_normal((cfg.update_size, cfg.dim), dtype=np.float32) * np.float32(0.01)
    calls = {}
    with contextlib.ExitStack() as stack:
        for label, (backend, args) in SERVERS.items():
            data_dir = work / label.replace(" ", "").replace("(", "-").replace(")", "")
            shutil.copytree(work / f"{backend}-template", data_dir)  # each server its own copy
            server = stack.enter_context(MemstoreServer(data_dir, backend, *args))
            client = stack.enter_context(MemStoreClient(server.target, shared_memory="on" if label == SAME_HOST else "off"))
            for opt in cfg.optimizers:
                update = partial(client.update, f"update_{opt}")
                calls[(label, opt)] = lambda i, f=update: f(batches[i % len(batches)], grads)
        seconds = side_by_side({f"{b} {o}": c for (b, o), c in calls.items()}, cfg.rounds, cfg.min_sample_s)
    for (backend, opt), s in zip(calls, seconds.values()):
        m = Measurement(f"{backend} {opt}", s, cfg.update_size, cfg.dim * 4)
        section.records.append(m.record(backend=backend, optimizer=opt, size=cfg.update_size, dtype=dtype))
        section.table.append({"backend": backend, "optimizer": opt, "rows/s": rate(m.rate),
                              "spread": spread(section.records[-1]), "ms/update": f"{1e3 * m.median_s:.1f}",
                              "grad GB/s": f"{m.gbps:.2f}"})
    section.notes.append("Tables materialised first (one zero-gradient step on every row): no lazy init "
                         "in the timing.")
    section.notes.append("GB/s counts the float32 gradients sent; rows and optimizer state are also read and "
                         "written on the server (adagrad: +1x, adam: +2x the row width of float32 state).")
    return section
