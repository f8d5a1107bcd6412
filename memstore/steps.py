"""Data-parallel training steps: W ranks contribute to one step, the shard applies their mean once.

A rank's Update with `world_size` W > 1 carries the job (`client_id`), the step (`seq`, which is
the training step + 1) and its `rank`. The shard keeps the contributions of a step until all W
ranks have sent theirs (an empty one when the rank touched no row of this shard), then applies
ONE optimizer step with the mean gradient (the sum over ranks / W: what DDP's all-reduce gives
the dense parameters) under (client_id=job, seq), and answers every rank. A step that still
misses a rank `timeout` seconds after its first contribution is dropped: nothing of it is
applied, and every waiting rank gets ABORTED naming the missing ranks.

All state below lives on the server's event loop thread (no locks); the apply runs on the
executor.

    _open[(table, job, seq)]      a step collecting contributions (not applied, not dropped)
    _applying[(table, job, seq)]  the result future of a complete step while it is applied
    _applied[(table, job)]        the highest seq this barrier applied (until the table is restored)
    _dropped[(table, job)]        seq → reason, for the last `_DROPPED_KEPT` dropped steps
    _held_bytes                   bytes of the contributions held in `_open` steps

Invariants (each has a test in tests/test_steps.py):
1. A step is applied at most once: `_complete` moves it out of `_open` before applying, and the
   table's dedup memory refuses a second apply of (job, seq), across restarts too.
2. Nothing of a dropped step is applied: `_drop` moves it out of `_open`, and a contribution
   for a dropped seq is refused (ABORTED) rather than opening the step again.
3. Every contributor's wait ends once, within the step's timeout plus the apply: its future is
   resolved by `_apply` (result or error) or by `_drop`.
4. A contribution for a step already applied or being applied is acknowledged with the step's
   result (`applied=False`): a retried delivery, as for any update. It is checked against
   `_applied` after the last await, so a retry racing the apply cannot open the step again.
5. Held memory is bounded: at most `max_open_steps` steps are open per table, and the shares
   held by all open steps take at most `max_held_bytes` (beyond: RESOURCE_EXHAUSTED).
6. A rank that restarts from a checkpoint (`restarted`) withdraws the shares it sent in its
   previous life from the steps still waiting, and its job's dropped steps may be sent again;
   the shares of ranks that already restarted stay.
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from memstore.errors import Aborted, InvalidArgument, ResourceExhausted
from memstore.store import Store, UpdateResult

_DROPPED_KEPT = 64  # dropped seqs remembered per (table, job)
StepKey = tuple[str, str, int]  # (table, job, seq)


@dataclass
class _OpenStep:
    world_size: int
    lr: float | None
    timeout_s: float
    done: asyncio.Future                       # -> UpdateResult; shared by every contributor
    timer: asyncio.TimerHandle | None = None
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # rank → (ids, grads)


def describe(job: str, seq: int, table: str) -> str:
    return f"step {seq - 1} of job {job.removeprefix('job:')!r} on table {table!r}"


class StepBarrier:
    def __init__(self, store: Store, run: Callable[..., Awaitable], *, max_timeout_s: float = 3600.0,
                 max_open_steps: int = 64, max_held_bytes: int = 4 << 30, max_world_size: int = 65536):
        self.store, self._run = store, run
        self.max_timeout_s, self.max_open_steps, self.max_held_bytes = max_timeout_s, max_open_steps, max_held_bytes
        self.max_world_size = max_world_size
        self._open: dict[StepKey, _OpenStep] = {}
        self._applying: dict[StepKey, asyncio.Future] = {}
        self._applied: dict[tuple[str, str], int] = {}
        self._dropped: dict[tuple[str, str], dict[int, str]] = {}
        self._held_bytes = 0

    async def contribute(self, table: str, job: str, seq: int, rank: int, world_size: int, lr: float | None,
                         timeout_s: float, ids: np.ndarray, grads: np.ndarray) -> UpdateResult:
        """Add rank `rank`'s gradients to the step and wait until the step is applied or dropped.
        A share refused for any reason drops the step at once: the other ranks need not wait."""
        if not job:
            raise InvalidArgument("a data-parallel Update (world_size > 1) names its job in client_id")
        key = (table, job, seq)
        try:
            result = await self._admit(key, rank, world_size, lr, timeout_s, ids, grads)
        except (InvalidArgument, ResourceExhausted) as exc:
            self._fail(key, f"rank {rank}'s share was refused: {exc.message}")
            raise
        if result is not None:
            return result
        return await asyncio.shield(self._open[key].done if key in self._open else self._applying[key])

    async def _admit(self, key: StepKey, rank: int, world_size: int, lr: float | None, timeout_s: float,
                     ids: np.ndarray, grads: np.ndarray) -> UpdateResult | None:
        """Register the share; a result when the step needs no waiting (a retried delivery)."""
        table, job, seq = key
        self._check_header(rank, world_size, timeout_s)
        if key not in self._open and key not in self._applying:
            last = await self._run(self.store.last_seq, table, job)
            if last is not None and seq <= last and key not in self._applying:
                return UpdateResult(False, 0, last)  # applied before (invariant 4)
        await self._run(self.store.validate_update, table, ids, grads)  # a bad share never joins a step
        # No await from here until the contribution is registered: the state cannot move under us.
        if key in self._applying:
            return await self._retried(key)
        if seq <= self._applied.get((table, job), 0):
            return UpdateResult(False, 0, seq)  # applied while this share was being checked (invariant 4)
        reason = self._dropped.get((table, job), {}).get(seq)
        if reason is not None:
            raise Aborted(reason)  # invariant 2
        size = ids.nbytes + grads.nbytes
        if self._held_bytes + size > self.max_held_bytes:  # invariant 5
            raise ResourceExhausted(
                f"data-parallel steps waiting for ranks hold {self._held_bytes:,} bytes; this share of {size:,} "
                f"would pass the server's limit of {self.max_held_bytes:,} (4 x max_request_bytes): raise "
                "max_request_bytes, or make steps smaller (more shards)")
        step = self._open.get(key) or self._open_step(key, world_size, lr, timeout_s)
        if (world_size, lr) != (step.world_size, step.lr):
            raise InvalidArgument(
                f"{describe(job, seq, table)}: rank {rank} sends world_size={world_size} lr={lr}, but the step "
                f"was opened with world_size={step.world_size} lr={step.lr}; every rank must agree")
        self._hold(step, rank, (ids, grads))
        if len(step.parts) == step.world_size:
            self._complete(key)
        return None

    def _hold(self, step: _OpenStep, rank: int, share: tuple[np.ndarray, np.ndarray]) -> None:
        """Keep `rank`'s share; a retry replaces it (the same data, or a restarted rank's new one)."""
        old = step.parts.get(rank)
        step.parts[rank] = share
        self._held_bytes += share[0].nbytes + share[1].nbytes - (0 if old is None else old[0].nbytes + old[1].nbytes)

    def _release(self, step: _OpenStep) -> None:
        self._held_bytes -= sum(i.nbytes + g.nbytes for i, g in step.parts.values())

    def _check_header(self, rank: int, world_size: int, timeout_s: float) -> None:
        if world_size > self.max_world_size:
            raise InvalidArgument(f"world_size {world_size} is above the server's max_world_size={self.max_world_size}")
        if not 0 <= rank < world_size:
            raise InvalidArgument(f"rank {rank} is outside [0, world_size={world_size})")
        if not 0 < timeout_s <= self.max_timeout_s:
            raise InvalidArgument(f"step_timeout_ms must be in (0, {self.max_timeout_s * 1e3:.0f}] "
                                  f"(the server's max_step_timeout_s), got {timeout_s * 1e3:.0f}")

    def _open_step(self, key: StepKey, world_size: int, lr: float | None, timeout_s: float) -> _OpenStep:
        table = key[0]
        if sum(k[0] == table for k in self._open) >= self.max_open_steps:
            raise ResourceExhausted(f"table {table!r} has {self.max_open_steps} data-parallel steps waiting "
                                    "for ranks already; finish or drop those first")
        loop = asyncio.get_running_loop()
        step = _OpenStep(world_size, lr, timeout_s, loop.create_future())
        step.done.add_done_callback(_mark_retrieved)
        step.timer = loop.call_later(timeout_s, self._drop, key)
        self._open[key] = step
        return step

    async def _retried(self, key: StepKey) -> UpdateResult:
        result = await asyncio.shield(self._applying[key])
        return result._replace(applied=False)

    def _complete(self, key: StepKey) -> None:
        step = self._open.pop(key)  # invariant 1: out of `_open` before anything is applied
        step.timer.cancel()
        self._release(step)
        self._applying[key] = step.done
        asyncio.ensure_future(self._apply(key, step))

    async def _apply(self, key: StepKey, step: _OpenStep) -> None:
        table, job, seq = key
        try:
            ranks = sorted(step.parts)  # rank order: the same sum on every run
            ids = np.concatenate([step.parts[r][0] for r in ranks])                     # (n,)
            grads = np.concatenate([step.parts[r][1] for r in ranks])                   # (n, dim)
            grads *= np.float32(1.0 / step.world_size)  # the mean over ranks, as DDP averages
            result = await self._run(self.store.update, table, ids, grads, job, seq, step.lr)
            applied = self._applied.get((table, job), 0)
            self._applied[(table, job)] = max(applied, seq)
            step.done.set_result(result)
        except Exception as exc:  # noqa: BLE001 - every rank gets the apply's error
            step.done.set_exception(exc)
        finally:
            self._applying.pop(key, None)

    def _drop(self, key: StepKey) -> None:
        """The step's timer: it still misses ranks."""
        step = self._open.get(key)
        if step is None:
            return
        missing = (r for r in range(step.world_size) if r not in step.parts)  # lazily: world_size may be large
        first = list(itertools.islice(missing, 20))
        count = step.world_size - len(step.parts)
        shown = f"{first}" + (f" and {count - len(first)} more" if count > len(first) else "")
        self._fail(key, f"rank(s) {shown} of {step.world_size} sent nothing within {step.timeout_s:g} s")

    def _fail(self, key: StepKey, why: str) -> None:
        """Drop a step, open or not yet opened: nothing of it is applied, every waiting rank hears
        why (invariant 3), and later shares of it are refused (invariant 2)."""
        if key in self._applying or key[2] <= self._applied.get(key[:2], 0):
            return  # complete already: its fate is the apply's
        table, job, seq = key
        step = self._open.pop(key, None)
        if step is not None:
            step.timer.cancel()
            self._release(step)
        reason = (f"{describe(job, seq, table)} was dropped: {why}; nothing of this step was applied on this "
                  "shard. If a rank died, restart the job from its last checkpoint (engram_client.restore_tables); "
                  "if none did, check that every rank uses the same job name, world_size and lr")
        dropped = self._dropped.setdefault((table, job), {})
        dropped[seq] = reason
        while len(dropped) > _DROPPED_KEPT:
            del dropped[next(iter(dropped))]
        if step is not None:
            step.done.set_exception(Aborted(reason))

    def forget_table(self, table: str, why: str) -> None:
        """The table was dropped or rolled back: its open steps end (ABORTED), its memory goes."""
        for key in [k for k in self._open if k[0] == table]:
            self._abandon(key, why)
        for memory in (self._dropped, self._applied):
            for job_key in [k for k in memory if k[0] == table]:
                del memory[job_key]

    def restarted(self, table: str, job: str, rank: int) -> None:
        """`rank` of `job` restarts from a checkpoint of `table` (invariant 6)."""
        self._dropped.pop((table, job), None)
        self._applied.pop((table, job), None)  # the restore rolled the job's seq back
        for key in [k for k in self._open if k[:2] == (table, job)]:
            step = self._open[key]
            if rank in step.parts:
                share = step.parts.pop(rank)
                self._held_bytes -= share[0].nbytes + share[1].nbytes
            if not step.parts:
                self._abandon(key, f"rank {rank} restarted from a checkpoint")

    def _abandon(self, key: StepKey, why: str) -> None:
        step = self._open.pop(key)
        step.timer.cancel()
        self._release(step)
        step.done.set_exception(Aborted(f"{describe(key[1], key[2], key[0])} was abandoned: {why}"))


def _mark_retrieved(future: asyncio.Future) -> None:
    """A dropped step whose ranks all gave up must not log "exception was never retrieved"."""
    if not future.cancelled():
        future.exception()
