"""Prefetch Engram rows for upcoming batches while the current step computes.

Engram's row ids depend only on the input tokens, so they are known before the forward pass.
`Prefetcher` wraps any iterable of batches (a DataLoader): a background thread hashes the next
`depth` batches for every remote Engram layer of the model, and the lookup of batch k+1 is sent
while step k computes; the training loop gets the same batches back, in order, with the rows
already on their way. Lookups run one step ahead, not more: that is as far as the consistency
modes allow (sync: batch k+1 must see step k's update, so its overlapping rows are refetched;
async: batch k+1 may miss only step k's update).

    for batch in (loader := Prefetcher(loader, model, depth=2)):
        loss = model(batch["input_ids"]) ...
    print(loader.summary())   # did the model ever wait for memory?
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from engram_client.block import EngramBlock
from engram_client.remote import RemoteTables

_DONE = object()


def default_input_ids(batch: Any) -> torch.Tensor:
    """input_ids [B, T] from a tensor, a (input_ids, ...) tuple, or a dict with "input_ids"."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["input_ids"]
    return batch[0]


@dataclass
class PrefetchStats:
    wait_ms: list[float] = field(default_factory=list)   # per step: time the step waited for rows

    def summary(self) -> dict[str, float]:
        waits = np.asarray(self.wait_ms or [0.0])
        return {"steps": len(self.wait_ms), "wait_ms_mean": float(waits.mean()),
                "wait_ms_p50": float(np.percentile(waits, 50)), "wait_ms_p99": float(np.percentile(waits, 99)),
                "wait_ms_total": float(waits.sum())}


class Prefetcher:
    def __init__(self, batches: Iterable, model: nn.Module, depth: int = 2,
                 input_ids: Callable[[Any], torch.Tensor] = default_input_ids):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.batches, self.depth, self.input_ids = batches, depth, input_ids
        self.layers = [(block, block.tables) for block in model.modules()
                       if isinstance(block, EngramBlock) and isinstance(block.tables, RemoteTables)]
        self.stats = PrefetchStats()

    def __iter__(self) -> Iterator[Any]:
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(ready, stop), name="engram-prefetch", daemon=True)
        worker.start()
        try:
            started = time.perf_counter()
            current = self._next(ready)
            if current is not None:
                self._send(current, ahead=False)
            while current is not None:
                upcoming = self._next(ready)   # hashed by the worker while earlier steps ran
                if upcoming is not None:
                    self._send(upcoming, ahead=True)  # its lookup overlaps the step about to run
                batch, pending = current
                for (_, source), lookup in zip(self.layers, pending):
                    source.enqueue(lookup)
                    source.stats.last_wait_s = 0.0
                batch_wait = time.perf_counter() - started
                yield batch
                started = time.perf_counter()
                self.stats.wait_ms.append(1e3 * (batch_wait + self._rows_wait()))
                current = upcoming
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(0.01)

    @staticmethod
    def _next(ready: queue.Queue):
        item = ready.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is _DONE else item

    def _send(self, item, ahead: bool) -> None:
        _, pending = item
        for (_, source), lookup in zip(self.layers, pending):
            source.send_ahead(lookup) if ahead else source.send(lookup)

    def _rows_wait(self) -> float:
        return sum(source.stats.last_wait_s for _, source in self.layers)

    def _produce(self, ready: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self.batches:
                if stop.is_set():
                    return
                tokens = self.input_ids(batch).detach().cpu()                    # (B, T)
                pending = [source.prepare(block.row_ids(tokens)) for block, source in self.layers]
                ready.put((batch, pending))
            ready.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training loop
            ready.put(exc)

    def summary(self) -> dict[str, float]:
        return self.stats.summary()
