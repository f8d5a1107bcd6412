"""Prefetch Engram rows for upcoming batches while the current step computes.

Engram's row ids depend only on the input tokens, so they are known before the forward pass.
`Prefetcher` wraps any iterable of batches (a DataLoader): a background thread takes the next
batches, hashes them for every remote Engram layer of the model and sends their lookups; the
training loop gets the same batches back, in order, with the rows already on their way.

    for batch in (loader := Prefetcher(loader, model, depth=2)):
        loss = model(batch["input_ids"]) ...
    print(loader.summary())   # did the model ever wait for memory?
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

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
        step_wait: float | None = None  # of the step in progress: waiting for its batch so far
        try:
            while True:
                started = time.perf_counter()
                item = ready.get()
                if step_wait is not None:  # the previous step is over: add what its forward waited
                    self.stats.wait_ms.append(1e3 * (step_wait + self._rows_wait()))
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                batch, pending = item
                for (_, source), lookup in zip(self.layers, pending):
                    source.enqueue(lookup)
                    source.stats.last_wait_s = 0.0
                step_wait = time.perf_counter() - started
                yield batch
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(0.01)

    def _rows_wait(self) -> float:
        return sum(source.stats.last_wait_s for _, source in self.layers)

    def _produce(self, ready: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self.batches:
                if stop.is_set():
                    return
                tokens = self.input_ids(batch).detach().cpu()                    # (B, T)
                pending = [source.request(block.row_ids(tokens)) for block, source in self.layers]
                ready.put((batch, pending))
            ready.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training loop
            ready.put(exc)

    def summary(self) -> dict[str, float]:
        return self.stats.summary()
