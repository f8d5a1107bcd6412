"""The memstore storage engine inside the training process: host-RAM tables, no server.

This is the paper's offload on one machine: the tables sit in host DRAM (numpy), rows are
gathered on the CPU by background threads and copied to the model's device, and the same
row-wise optimizers as the server apply the sparse updates. `InProcessStore` has the row-store
API of `MemStoreClient` (`lookup_async`, `update_async`, ...), so `RemoteTables` runs on it as is.
"""
from __future__ import annotations

import tempfile
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engram_client.remote import RemoteTables
from memstore.backends import open_backend
from memstore.client import INLINE_GATHER_ROWS, Job, StepOrder, TableInfo, completed
from memstore.protocol import as_row_grads, as_row_ids
from memstore.spec import table_spec
from memstore.store import Store


class InProcessStore:
    def __init__(self, data_dir: str | Path | None = None, backend: str = "ram", workers: int = 2):
        self._tmp = tempfile.TemporaryDirectory(prefix="engram-host-") if data_dir is None else None
        self.data_dir = Path(self._tmp.name if self._tmp else data_dir)
        self.store = Store(open_backend(backend, self.data_dir))
        self._lookups = ThreadPoolExecutor(workers, thread_name_prefix="engram-host-lookup")
        self._updates = ThreadPoolExecutor(1, thread_name_prefix="engram-host-update")  # in order
        self.client_id = uuid.uuid4().hex
        self._steps = StepOrder()  # touched only on the update thread
        self._closed = False

    def create_table(self, name: str, num_rows: int, dim: int, *, dtype: str = "float32", init: str = "normal",
                     init_scale: float = 0.02, seed: int = 0, optimizer: str = "sgd", lr: float = 0.01,
                     if_not_exists: bool = False, **optimizer_args: float) -> TableInfo:
        spec = table_spec(name, num_rows, dim, dtype=dtype, init=init, init_scale=init_scale, seed=seed,
                          optimizer=optimizer, lr=lr, **optimizer_args)
        return self._info(self.store.create_table(spec, if_not_exists))

    def describe_table(self, name: str) -> TableInfo:
        return self._info(self.store.describe(name))

    def lookup(self, name: str, ids: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError("this InProcessStore is closed")
        ids = as_row_ids(ids)
        rows = self.store.lookup(name, ids.reshape(-1))
        return rows.reshape(*ids.shape, rows.shape[-1])

    def lookup_async(self, name: str, ids: np.ndarray) -> Future:
        if np.size(ids) <= INLINE_GATHER_ROWS or self._closed:  # a hand-off costs more than a small gather
            return completed(self.lookup, name, ids)
        return self._lookups.submit(self.lookup, name, ids)

    def update(self, name: str, ids: np.ndarray, grads: np.ndarray, **step_args) -> bool:
        return self.update_async(name, ids, grads, **step_args).result()

    def update_async(self, name: str, ids: np.ndarray, grads: np.ndarray, *, step: int | None = None,
                     job: Job | None = None, lr: float | None = None) -> Future:
        """As `MemStoreClient.update_async`; a data-parallel job needs a memstore server."""
        if job is not None and job.world_size > 1:
            raise ValueError("data-parallel jobs (world_size > 1) need memstore servers, not host tables")
        ids = as_row_ids(ids)
        grads = as_row_grads(grads, ids)
        ids = ids.reshape(-1)
        if step is None:
            return self._updates.submit(lambda: self.store.update(name, ids, grads, "", 0, lr)[0])
        key = (name, job.client_id if job else self.client_id)

        def apply() -> bool:  # on the update thread, in order, as MemStoreClient sends
            self._steps.check(key, step, "the in-process store")
            try:
                applied = self.store.update(name, ids, grads, key[1], step + 1, lr).applied
            except BaseException:
                self._steps.record(key, step, ok=False)
                raise
            self._steps.record(key, step, ok=True)
            return applied
        return self._updates.submit(apply)

    def snapshot(self, name: str = "", *, tag: str = "") -> list[str]:
        return self.store.snapshot(name, tag)

    def restore(self, name: str, tag: str, *, job: Job | None = None) -> str:
        self._updates.submit(self._steps.forget, name).result()
        return self.store.restore(name, tag)[0]

    @staticmethod
    def _info(view) -> TableInfo:
        return TableInfo(view.spec, view.rows_materialized, view.bytes_used, view.counters.lookups,
                         view.counters.updates, view.bytes_reserved, view.bytes_resident, view.checkpoints)

    def close(self) -> None:
        self._closed = True
        self._updates.shutdown(wait=True)
        self._lookups.shutdown(wait=True)
        self.store.backend.close()
        if self._tmp:
            self._tmp.cleanup()


class HostTables(RemoteTables):
    """An Engram layer's table in this process's RAM, trained by the memstore optimizers."""

    def __init__(self, num_rows: int, dim: int, *, store: InProcessStore | None = None,
                 name: str = "engram", **kwargs):
        super().__init__(store or InProcessStore(), name, num_rows, dim, **kwargs)
