"""Table sources whose rows live outside the model: on memstore servers, or in host RAM.

Both are one class, `RemoteTables`, over a *row store* (anything with `lookup_async(name, ids)`,
`update_async(name, ids, grads, *, step, job, lr)`, `create_table(...)`, `describe_table(name)`,
`snapshot(name, tag=)`, `restore(name, tag)`):
- `MemStoreTables(client, ...)`: a `MemStoreClient` or `ShardedClient`; the optimizer runs on the servers.
- `HostTables(num_rows, dim, ...)`: an in-process RAM table (the paper's host-DRAM offload,
  no server): rows are gathered on the CPU in the background and copied to the model's device.

Forward: the unique row ids of the batch are looked up (or taken from a prefetch queued by
`engram_client.prefetch.Prefetcher`), turned into a leaf tensor of shape [U, D] on the model's
device, and expanded to [B, T, H, D]. Backward: autograd sums the gradient per unique row (the
index's backward); every `grad_accumulation` backward passes make one *training step*, sent as
one update numbered `.step` (exactly once per shard: `engram_client.steps`).

Consistency (`mode`):
- "sync": every lookup sees every earlier step, exactly like local training. Prefetched rows
  that a step touched after the prefetch was sent are fetched again once that step is
  confirmed (only the overlap moves twice).
- "async": rows may miss the immediately preceding step (staleness bounded by one step): the
  step's update travels while the next step computes.

Data-parallel jobs (`job=`, `rank=`, `world_size=`): the ranks train one table; every shard
applies one step per training step with the mean of the ranks' gradients (DDP semantics). A
rank cannot know which rows the other ranks touched, so in sync mode a lookup waits until the
previous step is applied everywhere (rows are fetched when the step starts; use async mode to
overlap them with the step before), and the row cache is refused (other ranks' updates would
make it stale). Without `job`, ranks train independently (Hogwild): each rank's steps are
applied as they come, one optimizer step per rank per training step.

Failures surface: a refused or lost step raises `StepFailed` at the next forward that must see
it (sync: the next step; async: the one after), at the next push, and at `flush()`.
"""
from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from engram_client.cache import RowCache
from engram_client.steps import StepLog
from engram_client.tables import TableSource
from memstore.client import Job
from memstore.dtypes import storage_dtype
from memstore.errors import FailedPrecondition

MODES = ("sync", "async")


@dataclass(eq=False)
class PendingLookup:
    """Rows requested ahead of a forward pass (by the prefetcher) or in it."""
    row_ids: torch.Tensor        # (B, T, H) on the CPU: what the forward must match
    unique: np.ndarray           # (U,) sorted unique row ids
    inverse: torch.Tensor        # (B*T*H,) position of each row id in `unique`
    rows: Future | None = None   # -> np.ndarray (M, D) storage dtype, the M rows not cached; None: not sent
    reflects: int = 0            # the rows reflect every step < reflects (StepLog.confirmed at send)
    hit: np.ndarray | None = None        # (U,) bool: served by the row cache
    cached: torch.Tensor | None = None   # (U, D) on the device: the cache's rows where `hit`
    source: RemoteTables | None = None   # the table that prepared it: only its forward uses it
    epoch: int = 0                       # the source's restore count then: older ones are never used
    requested: torch.Tensor | None = None  # the row_ids tensor as given (a same-object match needs no copy)


@dataclass
class SourceStats:
    lookups: int = 0
    requested_ahead: int = 0     # lookups whose rows were requested before their forward (prefetched)
    rows_fetched: int = 0
    rows_refetched: int = 0
    wait_s: float = 0.0          # time forward passes spent blocked on rows or confirmations
    last_wait_s: float = 0.0


class RemoteTables(TableSource):
    """Args (beyond the table's own: dtype, optimizer, lr, init, init_scale, seed, optimizer args;
    their defaults are `MemStoreClient.create_table`'s and `memstore create-table`'s: sgd, lr 0.01):
        mode: "sync" or "async" (see the module doc).
        create: create the table if missing (or check the existing one); False: attach only.
        cache: a `RowCache` for hot rows on the model's device (not with world_size > 1).
        grad_accumulation: backward passes per training step (micro-batches; one table step).
        job, rank, world_size, step_timeout_s: a data-parallel job (see the module doc).
    """

    def __init__(self, store, name: str, num_rows: int, dim: int, *, dtype: str = "float32",
                 optimizer: str = "sgd", lr: float = 0.01, init: str = "normal", init_scale: float = 0.02,
                 seed: int = 0, mode: str = "sync", create: bool = True, cache: RowCache | None = None,
                 grad_accumulation: int = 1, job: str | None = None, rank: int = 0, world_size: int = 1,
                 step_timeout_s: float = 300.0, **optimizer_args: float):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if grad_accumulation < 1:
            raise ValueError(f"grad_accumulation must be >= 1, got {grad_accumulation}")
        if world_size > 1 and job is None:
            raise ValueError("world_size > 1 needs job= (the same name on every rank); without a job "
                             "ranks train independently: leave world_size at 1")
        if world_size > 1 and cache is not None:
            raise ValueError("a row cache cannot follow the other ranks' updates: no cache with world_size > 1")
        self.store, self.name, self.num_rows, self.dim, self.mode = store, name, int(num_rows), int(dim), mode
        self.cache, self.grad_accumulation = cache, grad_accumulation
        self.job = Job(job, rank, world_size, step_timeout_s) if job is not None else None
        self.run_id = _tag_safe(job) if job is not None else uuid.uuid4().hex[:12]  # names checkpoints
        self.table_kwargs = dict(dtype=dtype, optimizer=optimizer, lr=lr, init=init, init_scale=init_scale,
                                 seed=seed, **optimizer_args)
        self.param_group = {"lr": float(lr)}  # `TableLR` hands this dict to torch lr schedulers
        if not create:  # the rows' dtype is the table's, whatever the constructor's default says
            self.table_kwargs["dtype"] = self.store.describe_table(name).spec.dtype
        self._check_spec(self._attach() if create else self.store.describe_table(name))
        self._queue: deque[PendingLookup] = deque()
        self._restores = 0  # reset_step calls so far: the epoch a PendingLookup must carry to be used
        self.steps = StepLog(name)
        self._accumulated: list[tuple[np.ndarray, np.ndarray]] = []  # micro-batches of the open step
        self.stats = SourceStats()
        self._sender = ThreadPoolExecutor(1, thread_name_prefix=f"engram-{name}-ahead")
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)  # follows .to(device)

    @property
    def step(self) -> int:
        """The next training step of this table (= steps pushed so far, counting from a restore)."""
        return self.steps.next_step

    @property
    def micro_batches_pending(self) -> int:
        """Backward passes of the current step so far (< grad_accumulation): a step is open."""
        return len(self._accumulated)

    @property
    def lr(self) -> float:
        """The learning rate the next step is sent with (a schedule may change it every step)."""
        return self.param_group["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_group["lr"] = float(value)

    @property
    def _world_size(self) -> int:
        return self.job.world_size if self.job else 1

    def _attach(self):
        """Create the table, or find the existing one; returns its TableInfo."""
        try:
            return self.store.create_table(self.name, self.num_rows, self.dim, if_not_exists=True, **self.table_kwargs)
        except Exception as exc:
            code = getattr(getattr(exc, "code", None), "name", None)
            if code == "ALREADY_EXISTS":
                raise FailedPrecondition(
                    f"memstore table {self.name!r} exists but does not match this Engram layer's settings "
                    f"({getattr(exc, 'message', exc)}): pass the table's settings, or create=False to attach to "
                    "it as it is (only rows, dim and dtype are checked then)") from None
            if code != "PERMISSION_DENIED":
                raise
            return self.store.describe_table(self.name)  # a read-only replica: attach to what it has

    def _check_spec(self, info) -> None:
        """The table must be exactly what this block needs."""
        spec = info.spec
        if (spec.num_rows, spec.dim, spec.dtype) != (self.num_rows, self.dim, self.table_kwargs["dtype"]):
            raise FailedPrecondition(f"table {self.name!r} is {spec.num_rows} x {spec.dim} {spec.dtype}, "
                                     f"expected {self.num_rows} x {self.dim} {self.table_kwargs['dtype']}")

    # ---- lookups ------------------------------------------------------------------------------

    def prepare(self, row_ids: torch.Tensor) -> PendingLookup:
        """De-duplicate the rows of `row_ids` (B, T, H); nothing is sent yet. Thread-safe."""
        requested, row_ids = row_ids, row_ids.detach().to("cpu", torch.int64)
        unique, inverse = torch.unique(row_ids.reshape(-1), sorted=True, return_inverse=True)
        return PendingLookup(row_ids, unique.numpy(), inverse, source=self, epoch=self._restores,
                             requested=requested)

    def send(self, pending: PendingLookup) -> PendingLookup:
        """Send the lookup now; what the rows will reflect is settled when they are used."""
        pending.reflects = self.steps.confirmed
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

        async: that batch may miss only the step about to run, so the lookup waits (in the
        background) for every step pushed so far, then goes: no refetch needed.
        sync, one rank: it goes now; rows the next step touches are fetched again when used.
        sync, data-parallel: not sent; fetched when its step starts (other ranks' rows are unknown).
        """
        if self.mode == "sync":
            return self.send(pending) if self._world_size == 1 else pending
        must_see = self.steps.next_step
        pending.reflects = must_see
        pending.rows = self._sender.submit(self._lookup_after, must_see, self._uncached(pending))
        return pending

    def _lookup_after(self, steps: int, unique: np.ndarray) -> np.ndarray:
        self.steps.wait(steps)  # raises StepFailed: the forward that uses these rows raises it
        return self._lookup(unique).result()

    def request(self, row_ids: torch.Tensor) -> PendingLookup:
        """Prepare and send at once."""
        return self.send(self.prepare(row_ids))

    def enqueue(self, pending: PendingLookup) -> None:
        """Queue a prefetched lookup for the next forward pass (in batch order)."""
        self._queue.append(pending)

    def prefetch(self, row_ids: torch.Tensor) -> PendingLookup:
        """Send the lookup of `row_ids` now, for a `forward(row_ids, prefetched=...)` later (decoding's
        entry prefetch). Unlike the training prefetcher's queue, the handle travels with its caller."""
        return self.request(row_ids)

    def forward(self, row_ids: torch.Tensor, prefetched: PendingLookup | None = None) -> torch.Tensor:
        pending = self._take_pending(row_ids) if prefetched is None else self._checked(prefetched, row_ids)
        started = time.perf_counter()
        weights = self._ready_rows(pending)                                   # (U, D) on the device
        wait = time.perf_counter() - started
        self.stats.wait_s += wait
        self.stats.last_wait_s = wait
        self.stats.lookups += 1

        if self.training and torch.is_grad_enabled():
            weights.requires_grad_(True)
            unique_ids = pending.unique
            weights.register_hook(lambda grad: self._push(unique_ids, grad))
        inverse = pending.inverse.to(weights.device, non_blocking=True)
        # F.embedding, not weights[inverse]: its backward sums repeated rows in a fixed order,
        # so two runs from the same seed give the same table updates (index backward does not).
        return F.embedding(inverse, weights).view(*row_ids.shape, self.dim)   # (B, T, H, D)

    def _take_pending(self, row_ids: torch.Tensor) -> PendingLookup:
        if self._queue:
            pending = self._queue.popleft()
            if self._usable(pending, row_ids):
                self.stats.requested_ahead += 1
                return pending
            self._queue.clear()  # out of step with the prefetcher (e.g. an eval batch): fetch directly
        return self._request_now(row_ids)

    def _checked(self, prefetched: PendingLookup, row_ids: torch.Tensor) -> PendingLookup:
        """A prefetch handed in by the caller, if it is for these very rows."""
        if not self._usable(prefetched, row_ids):
            return self._request_now(row_ids)
        self.stats.requested_ahead += 1
        return prefetched

    def _usable(self, pending: PendingLookup, row_ids: torch.Tensor) -> bool:
        """Prepared by this table, since its last restore, for these very rows."""
        if pending.source is not self or pending.epoch != self._restores:
            return False
        if row_ids is pending.requested:
            return True
        return pending.row_ids.shape == row_ids.shape and torch.equal(pending.row_ids, row_ids.cpu())

    def _request_now(self, row_ids: torch.Tensor) -> PendingLookup:
        self.steps.wait(self._must_see())  # no prefetch: wait first rather than fetch twice
        return self.request(row_ids)

    def _must_see(self) -> int:
        """Steps a lookup made now has to reflect: all of them, or all but the last (async)."""
        return max(0, self.steps.next_step - (1 if self.mode == "async" else 0))

    def _ready_rows(self, pending: PendingLookup) -> torch.Tensor:
        """The rows of `pending.unique` as a float32 (U, D) tensor on the model's device, made as
        fresh as the consistency mode promises, with the cache's hits filled in."""
        must_see = self._must_see()
        if pending.rows is None:  # deferred by send_ahead (sync, data-parallel)
            self.steps.wait(must_see)
            self.send(pending)
        fetched = self._tensor(pending.rows.result())                           # (M, D)
        self.stats.rows_fetched += len(fetched)
        if pending.hit is None:
            weights, refreshed = fetched, np.ones(len(pending.unique), bool)
        else:
            weights = pending.cached.to(torch.float32, copy=True)                # (U, D)
            weights[torch.from_numpy(~pending.hit).to(weights.device)] = fetched
            refreshed = ~pending.hit
        stale = self._stale_ids(pending, must_see)
        if len(stale):
            at = np.searchsorted(pending.unique, stale)
            weights[torch.from_numpy(at).to(weights.device)] = self._tensor(
                self.store.lookup_async(self.name, stale).result())
            refreshed[at] = True
            self.stats.rows_refetched += len(stale)
        if self.cache is not None:
            self._offer_to_cache(pending.unique, refreshed, weights, max(pending.reflects, must_see))
        return weights

    def _stale_ids(self, pending: PendingLookup, must_see: int) -> np.ndarray:
        """Rows of `pending` changed by steps it must see but that were not confirmed when it was
        sent (they are fetched again): the overlap with this rank's steps, or every row when
        other ranks' steps are involved or a step is no longer remembered."""
        if must_see <= pending.reflects:
            return pending.unique[:0]
        self.steps.wait(must_see)  # raises StepFailed for a step these rows depend on
        missed = self.steps.ids_between(pending.reflects, must_see)
        if missed is None or self._world_size > 1:
            return pending.unique
        if not missed:
            return pending.unique[:0]
        return np.intersect1d(pending.unique, np.concatenate(missed))

    def _offer_to_cache(self, unique: np.ndarray, refreshed: np.ndarray, weights: torch.Tensor,
                        reflects: int) -> None:
        """Cache the fetched rows that are current: not those a pushed step may still change
        (steps >= reflects), which would otherwise stay stale in the cache after it lands."""
        pending_steps = self.steps.ids_between(reflects, self.steps.next_step)
        if pending_steps is None:
            return
        keep = refreshed.copy()
        if pending_steps:
            keep &= ~np.isin(unique, np.concatenate(pending_steps))
        if keep.any():
            mask = torch.from_numpy(keep).to(weights.device)
            self.cache.insert(torch.from_numpy(unique[keep]), weights[mask])

    def _tensor(self, rows: np.ndarray) -> torch.Tensor:
        return _to_tensor(rows, self.table_kwargs["dtype"], self._device_probe.device)

    # ---- steps --------------------------------------------------------------------------------

    def _push(self, unique_ids: np.ndarray, grad: torch.Tensor) -> None:
        """Autograd hook: grad (U, D) is already summed per unique row. Every
        `grad_accumulation`-th call closes the training step and sends it."""
        self._accumulated.append((unique_ids, grad.detach().to("cpu", torch.float32).numpy()))
        if len(self._accumulated) < self.grad_accumulation:
            return
        parts, self._accumulated = self._accumulated, []
        ids = np.concatenate([p[0] for p in parts])
        grads = np.concatenate([p[1] for p in parts])  # duplicates across micro-batches: summed by the store
        touched = grads.any(axis=1)  # an exactly-zero gradient changes nothing (the store skips it too), e.g.
        ids, grads = ids[touched], grads[touched]  # a row whose every read row dropout dropped: not sent
        if self.cache is not None:
            self.cache.invalidate(torch.from_numpy(ids))  # rows about to change
        lr = self.lr  # the step's own lr, for its first send and any re-send
        self.steps.push(np.unique(ids), lambda step: self.store.update_async(
            self.name, ids, grads, step=step, job=self.job, lr=lr))

    def flush(self) -> None:
        """Wait until every step pushed so far is applied; raises `StepFailed` for one that failed
        (end of training, before eval or a checkpoint)."""
        self.steps.wait(self.steps.next_step)

    def resend_failed(self) -> list[int]:
        """Send failed steps again, in order, with their step numbers (each shard applies a step
        at most once, so shards that had applied it only acknowledge); returns their numbers.
        `flush()` then tells whether they went through."""
        return self.steps.resend_failed()

    def reset_step(self, step: int) -> None:
        """After a restore: the next step is `step`; in-flight steps, queued prefetches, partial
        accumulation and cached rows are forgotten."""
        self.steps.reset(step)
        self._restores += 1  # lookups prepared before now (a prefetch a state still holds) go unused
        self._accumulated.clear()
        self._queue.clear()
        if self.cache is not None:
            self.cache.clear()

    def extra_repr(self) -> str:
        job = f", job={self.job.name!r}, rank={self.job.rank}/{self.job.world_size}" if self.job else ""
        return f"name={self.name!r}, num_rows={self.num_rows}, dim={self.dim}, mode={self.mode}{job}"


def _tag_safe(name: str) -> str:
    """A job name as a checkpoint tag: [A-Za-z0-9_.-], no "..", at most 100 characters, and a
    short hash of the name itself, so "exp/1" and "exp:1" never share checkpoints."""
    readable = re.sub(r"[^A-Za-z0-9_\-]", "-", name).lstrip("-_")[:80] or "job"
    return f"{readable}-{hashlib.blake2b(name.encode(), digest_size=4).hexdigest()}"


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
