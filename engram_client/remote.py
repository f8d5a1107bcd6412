"""Table sources whose rows live outside the model: on memstore servers, or in host RAM.

Both are one class, `RemoteTables`, over a *row store* (anything with `lookup_async(name, ids)`,
`update_async(name, ids, grads)`, `create_table(...)`, `describe_table(name)`):
- `MemStoreTables(client, ...)`: a `MemStoreClient` or `ShardedClient`; the optimizer runs on the servers.
- `HostTables(num_rows, dim, ...)`: an in-process RAM table (the paper's host-DRAM offload,
  no server): rows are gathered on the CPU in the background and copied to the model's device.

Forward: the unique row ids of the batch are looked up (or taken from a prefetch queued by
`engram_client.prefetch.Prefetcher`), turned into a leaf tensor of shape [U, D] on the model's
device, and expanded to [B, T, H, D]. Backward: autograd sums the gradient per unique row (the
index's backward), a hook ships it as one `Update`, and the row store's optimizer applies it.

Consistency (`mode`):
- "sync": every lookup sees every earlier update, exactly like local training. Prefetched rows
  that an update touched after the prefetch was sent are fetched again once that update is
  acknowledged (only the overlap moves twice).
- "async": rows may miss the immediately preceding step's update (staleness bounded by one step):
  the step's update travels while the next step computes.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from engram_client.cache import RowCache
from engram_client.tables import TableSource
from memstore.dtypes import storage_dtype

MODES = ("sync", "async")


@dataclass(eq=False)  # identity semantics: tracked in a WeakSet until consumed or dropped
class PendingLookup:
    """Rows requested ahead of a forward pass (by the prefetcher) or in it."""
    row_ids: torch.Tensor        # (B, T, H) on the CPU: what the forward must match
    unique: np.ndarray           # (U,) sorted unique row ids
    inverse: torch.Tensor        # (B*T*H,) position of each row id in `unique`
    rows: Future | None          # -> np.ndarray (M, D) storage dtype, the M rows not cached; None: not sent
    updates_seen: int            # updates that were acknowledged before the lookup was sent
    hit: np.ndarray | None = None        # (U,) bool: served by the row cache
    cached: torch.Tensor | None = None   # (U, D) on the device: the cache's rows where `hit`


class _UpdateLog:
    """Updates of this source in the order they were sent, numbered from 0, with their acks.

    Updates are acknowledged in order (one sender per client), so "the first n are acked" is a
    single number. Entries every queued lookup has already seen are dropped (`forget_before`).
    """

    def __init__(self) -> None:
        self._base = 0                                  # number of the oldest entry still kept
        self._entries: deque[tuple[np.ndarray, Future]] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return self._base + len(self._entries)

    def append(self, ids: np.ndarray, future: Future) -> None:
        with self._lock:
            self._entries.append((ids, future))

    def acknowledged(self) -> int:
        with self._lock:
            done = 0
            while done < len(self._entries) and self._entries[done][1].done():
                done += 1
            return self._base + done

    def wait(self, upto: int, since: int = 0) -> list[np.ndarray]:
        """Wait for updates [0, upto); return the ids of updates [since, upto)."""
        with self._lock:
            kept = list(self._entries)[:max(0, upto - self._base)]
            first = max(0, since - self._base)
        for _, future in kept:
            future.result()  # raises if an update failed: never train on silently lost updates
        return [ids for ids, _ in kept[first:]]

    def forget_before(self, number: int) -> None:
        with self._lock:
            while self._base < number and self._entries and self._entries[0][1].done():
                self._entries.popleft()
                self._base += 1


@dataclass
class SourceStats:
    lookups: int = 0
    rows_fetched: int = 0
    rows_refetched: int = 0
    wait_s: float = 0.0          # time forward passes spent blocked on rows or acknowledgements
    last_wait_s: float = 0.0


class RemoteTables(TableSource):
    def __init__(self, store, name: str, num_rows: int, dim: int, *, dtype: str = "float32",
                 optimizer: str = "adam", lr: float = 1e-3, init: str = "normal", init_scale: float = 0.02,
                 seed: int = 0, mode: str = "sync", create: bool = True, cache: RowCache | None = None,
                 **optimizer_args: float):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.store, self.name, self.num_rows, self.dim, self.mode = store, name, int(num_rows), int(dim), mode
        self.cache = cache
        self.table_kwargs = dict(dtype=dtype, optimizer=optimizer, lr=lr, init=init, init_scale=init_scale,
                                 seed=seed, **optimizer_args)
        if create:
            self._attach()
        self._queue: deque[PendingLookup] = deque()
        self._updates = _UpdateLog()
        self._outstanding: weakref.WeakSet[PendingLookup] = weakref.WeakSet()  # requested, not yet used
        self._outstanding_lock = threading.Lock()
        self.stats = SourceStats()
        self._sender = ThreadPoolExecutor(1, thread_name_prefix=f"engram-{name}-ahead")
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)  # follows .to(device)

    def _attach(self) -> None:
        """Create the table, or check that the existing one is exactly what this block needs."""
        from memstore.errors import FailedPrecondition
        try:
            info = self.store.create_table(self.name, self.num_rows, self.dim, if_not_exists=True, **self.table_kwargs)
        except Exception as exc:
            if getattr(exc, "code", None) is not None and exc.code.name == "ALREADY_EXISTS":
                raise FailedPrecondition(
                    f"memstore table {self.name!r} exists but does not match this Engram layer "
                    f"({self.num_rows} rows x {self.dim}, {self.table_kwargs}): {exc}") from None
            raise
        spec = info.spec
        if (spec.num_rows, spec.dim, spec.dtype) != (self.num_rows, self.dim, self.table_kwargs["dtype"]):
            raise FailedPrecondition(f"table {self.name!r} is {spec.num_rows} x {spec.dim} {spec.dtype}, "
                                     f"expected {self.num_rows} x {self.dim} {self.table_kwargs['dtype']}")

    # ---- lookups ------------------------------------------------------------------------------

    def prepare(self, row_ids: torch.Tensor) -> PendingLookup:
        """De-duplicate the rows of `row_ids` (B, T, H); nothing is sent yet. Thread-safe."""
        row_ids = row_ids.detach().to("cpu", torch.int64)
        unique, inverse = torch.unique(row_ids.reshape(-1), sorted=True, return_inverse=True)
        pending = PendingLookup(row_ids, unique.numpy(), inverse, rows=None, updates_seen=0)
        with self._outstanding_lock:
            self._outstanding.add(pending)
        return pending

    def send(self, pending: PendingLookup) -> PendingLookup:
        """Send the lookup now; what the rows will reflect is settled when they are used."""
        pending.updates_seen = self._updates.acknowledged()
        pending.rows = self._lookup(self._uncached(pending))
        return pending

    def _lookup(self, ids: np.ndarray) -> Future:
        if len(ids):
            return self.store.lookup_async(self.name, ids)
        done: Future = Future()  # everything came from the cache: no round trip
        done.set_result(np.empty((0, self.dim), storage_dtype(self.table_kwargs["dtype"])))
        return done

    def _uncached(self, pending: PendingLookup) -> np.ndarray:
        """The ids the row cache cannot serve (all of them without a cache)."""
        if self.cache is None:
            return pending.unique
        hit, pending.cached = self.cache.lookup(torch.from_numpy(pending.unique))
        pending.hit = hit.cpu().numpy()
        return pending.unique[~pending.hit]

    def send_ahead(self, pending: PendingLookup) -> PendingLookup:
        """Send the lookup of the batch after the one about to run (the prefetcher's call).

        async: that batch may miss only the update of the step about to run, so the lookup waits
        (in the background) for every update sent so far, then goes: no refetch needed.
        sync: it goes now; rows the next update touches are fetched again when they are used.
        """
        if self.mode == "sync":
            return self.send(pending)
        must_see = len(self._updates)
        pending.updates_seen = must_see
        pending.rows = self._sender.submit(self._lookup_after, must_see, self._uncached(pending))
        return pending

    def _lookup_after(self, updates: int, unique: np.ndarray) -> np.ndarray:
        self._updates.wait(updates)
        return self._lookup(unique).result()

    def request(self, row_ids: torch.Tensor) -> PendingLookup:
        """Prepare and send at once."""
        return self.send(self.prepare(row_ids))

    def enqueue(self, pending: PendingLookup) -> None:
        """Queue a prefetched lookup for the next forward pass (in batch order)."""
        self._queue.append(pending)

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        pending = self._take_pending(row_ids)
        started = time.perf_counter()
        weights = self._ready_rows(pending)                                   # (U, D) on the device
        wait = time.perf_counter() - started
        self.stats.wait_s += wait
        self.stats.last_wait_s = wait
        self.stats.lookups += 1
        self._forget_seen_updates(pending)

        if self.training and torch.is_grad_enabled():
            weights.requires_grad_(True)
            unique_ids = pending.unique
            weights.register_hook(lambda grad: self._push(unique_ids, grad))
        inverse = pending.inverse.to(weights.device, non_blocking=True)
        # F.embedding, not weights[inverse]: its backward sums repeated rows in a fixed order,
        # so two runs from the same seed give the same table updates (index backward does not).
        return F.embedding(inverse, weights).view(*row_ids.shape, self.dim)   # (B, T, H, D)

    def _forget_seen_updates(self, consumed: PendingLookup) -> None:
        """Drop the log entries that no outstanding lookup (queued or still being prefetched) needs."""
        with self._outstanding_lock:
            self._outstanding.discard(consumed)
            oldest_needed = min((p.updates_seen for p in self._outstanding), default=len(self._updates))
        self._updates.forget_before(oldest_needed)

    def _take_pending(self, row_ids: torch.Tensor) -> PendingLookup:
        if self._queue:
            pending = self._queue.popleft()
            if pending.row_ids.shape == row_ids.shape and torch.equal(pending.row_ids, row_ids.cpu()):
                return pending
            self._queue.clear()  # out of step with the prefetcher (e.g. an eval batch): fetch directly
        self._updates.wait(self._must_see())  # no prefetch: wait first rather than fetch twice
        return self.request(row_ids)

    def _must_see(self) -> int:
        """Updates a lookup made now has to reflect: all of them, or all but the last (async)."""
        return max(0, len(self._updates) - (1 if self.mode == "async" else 0))

    def _ready_rows(self, pending: PendingLookup) -> torch.Tensor:
        """The rows of `pending.unique` as a float32 (U, D) tensor on the model's device, made as
        fresh as the consistency mode promises, with the cache's hits filled in."""
        fetched = self._tensor(pending.rows.result())                           # (M, D)
        self.stats.rows_fetched += len(fetched)
        if pending.hit is None:
            weights, refreshed = fetched, np.zeros(len(pending.unique), bool)
        else:
            weights = pending.cached.to(torch.float32, copy=True)                # (U, D)
            weights[torch.from_numpy(~pending.hit).to(weights.device)] = fetched
            refreshed = ~pending.hit
        stale = self._stale_ids(pending)
        if len(stale):
            at = np.searchsorted(pending.unique, stale)
            weights[torch.from_numpy(at).to(weights.device)] = self._tensor(
                self.store.lookup_async(self.name, stale).result())
            refreshed[at] = True
            self.stats.rows_refetched += len(stale)
        if self.cache is not None and refreshed.any():
            mask = torch.from_numpy(refreshed).to(weights.device)
            self.cache.insert(torch.from_numpy(pending.unique[refreshed]), weights[mask])
        return weights

    def _stale_ids(self, pending: PendingLookup) -> np.ndarray:
        """Rows of `pending` changed by updates it must see but that were not acknowledged when it
        was sent (they are fetched again)."""
        must_see = self._must_see()
        if must_see <= pending.updates_seen:
            return pending.unique[:0]
        missed = self._updates.wait(must_see, since=pending.updates_seen)
        if not missed:
            return pending.unique[:0]
        return np.intersect1d(pending.unique, np.concatenate(missed))

    def _tensor(self, rows: np.ndarray) -> torch.Tensor:
        return _to_tensor(rows, self.table_kwargs["dtype"], self._device_probe.device)

    # ---- updates ------------------------------------------------------------------------------

    def _push(self, unique_ids: np.ndarray, grad: torch.Tensor) -> None:
        """Autograd hook: grad (U, D) is already summed per unique row; ship it."""
        grads = grad.detach().to("cpu", torch.float32).numpy()
        if self.cache is not None:
            self.cache.invalidate(torch.from_numpy(unique_ids))
        self._updates.append(unique_ids, self.store.update_async(self.name, unique_ids, grads))

    def flush(self) -> None:
        """Wait until every update sent so far is applied (end of training, before eval/checkpoint)."""
        self._updates.wait(len(self._updates))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_rows={self.num_rows}, dim={self.dim}, mode={self.mode}"


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}  # one side stream per GPU for row copies


def _to_tensor(rows: np.ndarray, dtype: str, device: torch.device) -> torch.Tensor:
    """Storage rows → float32 tensor on `device`. On a GPU the rows go through pinned host memory
    and are copied with non_blocking=True on a side stream; the compute stream waits for the copy
    only where it uses the rows, so kernels already queued keep running meanwhile."""
    tensor = torch.from_numpy(rows)
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    if device.type != "cuda":
        return tensor.to(dtype=torch.float32)
    copy_stream = _COPY_STREAMS.setdefault(device, torch.cuda.Stream(device))
    pinned = tensor.pin_memory()
    with torch.cuda.stream(copy_stream):
        on_device = pinned.to(device, non_blocking=True)
    compute_stream = torch.cuda.current_stream(device)
    compute_stream.wait_stream(copy_stream)
    on_device.record_stream(compute_stream)  # the allocator must not reuse it before compute is done
    return on_device.to(torch.float32)


class MemStoreTables(RemoteTables):
    """Rows on memstore (one server or a `ShardedClient`); the server's optimizer trains them."""

    def __init__(self, client, name: str, num_rows: int, dim: int, **kwargs):
        super().__init__(client, name, num_rows, dim, **kwargs)
