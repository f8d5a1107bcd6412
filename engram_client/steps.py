"""The training steps a remote table source has pushed, and which of them the servers confirmed.

A *step* is one optimizer step of a table: the gradients of one training step (summed over its
micro-batches) sent as one update, numbered from 0 (or from the step a checkpoint restored).
The server applies step s of a client at most once, so a step that failed can be sent again.

State (all under `_lock`):

    next_step   the number the next pushed step gets: steps < next_step have been pushed
    confirmed   every step < confirmed is applied on every shard (its update succeeded)
    _inflight   step → (ids, future, send) for each step in [confirmed, next_step): pushed, not
                confirmed; `send(step)` sends it again (it holds the step's gradients)
    _recent     step → ids for the last `RECENT` confirmed steps

Invariants (tests/test_steps_client.py has one test each):
1. confirmed <= next_step, and `_inflight` holds exactly the steps in [confirmed, next_step).
   Steps are confirmed in order: step s only once every step < s is.
2. "Done" is not "confirmed": a step whose update failed stays in `_inflight` and `confirmed`
   stops in front of it, so every wait that needs it raises `StepFailed`, and so does every
   later push, until `resend_failed()` succeeds or `reset()` starts over from a checkpoint.
3. Memory is bounded: `_recent` keeps `RECENT` entries, and `_inflight` stays small because a
   forward waits for every step it must see before it computes (sync: all; async: all but the
   last), so at most two steps (three with a prefetched async lookup) are ever in flight.
4. A lookup sent when `confirmed` was c reflects every step < c. For the steps in [c, s) it
   must also see, `ids_between` gives the rows they touched (to fetch again), or None when a
   step is no longer remembered (fetch everything again).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

import numpy as np

RECENT = 8


class StepFailed(RuntimeError):
    """A training step's table update was refused or lost; nothing later is sent until it is
    re-sent (`RemoteTables.resend_failed()`) or the job restores a checkpoint."""

    def __init__(self, table: str, step: int, cause: BaseException):
        super().__init__(f"table {table!r}: the update of training step {step} failed: {cause}")
        self.table, self.step, self.cause = table, step, cause


class StepLog:
    def __init__(self, table: str, start: int = 0):
        self.table = table
        self._lock = threading.Lock()
        self.next_step = self.confirmed = start
        self._inflight: dict[int, tuple[np.ndarray, Future, Callable[[int], Future]]] = {}
        self._recent: dict[int, np.ndarray] = {}

    def push(self, ids: np.ndarray, send: Callable[[int], Future]) -> int:
        """Number the next step and send it with `send(step) -> Future`; raises `StepFailed` instead
        when an earlier step failed (invariant 2). Called by one thread at a time (backward)."""
        with self._lock:
            self._advance()
            self._raise_failed()
            step = self.next_step
            future = send(step)
            self._inflight[step] = (ids, future, send)
            self.next_step += 1
        return step

    def wait(self, upto: int) -> None:
        """Block until every step < upto is confirmed; raise `StepFailed` for one that failed."""
        while True:
            with self._lock:
                self._advance()
                if self.confirmed >= min(upto, self.next_step):
                    return
                self._raise_failed()
                future = self._inflight[self.confirmed][1]
            wait_futures([future])

    def ids_between(self, since: int, upto: int) -> list[np.ndarray] | None:
        """Ids of the steps in [since, upto) (invariant 4); None if one is forgotten."""
        with self._lock:
            known = {**self._recent, **{s: entry[0] for s, entry in self._inflight.items()}}
        if since > upto or any(s not in known for s in range(since, upto)):
            return None  # since > upto: from before a reset; nothing is known about it
        return [known[s] for s in range(since, upto)]

    def resend_failed(self) -> list[int]:
        """Send every failed step again, in order, with its number; returns their numbers."""
        with self._lock:
            failed = [s for s, (_, f, _) in sorted(self._inflight.items()) if f.done() and f.exception()]
            for step in failed:
                ids, _, send = self._inflight[step]
                self._inflight[step] = (ids, send(step), send)
        return failed

    def drain(self) -> None:
        """Wait until no pushed step is still travelling, failed or not (before a restore: an
        update landing after it would change the restored table)."""
        with self._lock:
            futures = [future for _, future, _ in self._inflight.values()]
        wait_futures(futures)

    def reset(self, step: int) -> None:
        """Start over at `step` (a checkpoint was restored); call `drain()` first."""
        with self._lock:
            self.next_step = self.confirmed = step
            self._inflight.clear()
            self._recent.clear()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    # ---- under the lock -----------------------------------------------------------------------

    def _advance(self) -> None:
        """Confirm the steps at the front whose updates succeeded (in order: invariant 1)."""
        while self.confirmed in self._inflight:
            ids, future, _ = self._inflight[self.confirmed]
            if not future.done() or future.exception() is not None:
                return
            del self._inflight[self.confirmed]
            self._recent[self.confirmed] = ids
            self._recent.pop(self.confirmed - RECENT, None)
            self.confirmed += 1

    def _raise_failed(self) -> None:
        for step, (_, future, _) in sorted(self._inflight.items()):
            if future.done() and future.exception() is not None:
                raise StepFailed(self.table, step, future.exception())
