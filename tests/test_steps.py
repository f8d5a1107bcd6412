"""The invariants of the two places that hold training-step state, one test each:
`memstore.steps.StepBarrier` (server: data-parallel steps) and `engram_client.steps.StepLog`
(client: pushed and confirmed steps). See their module docstrings for the numbered invariants.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from engram_client.steps import RECENT, StepFailed, StepLog
from memstore.backends.ram import RamBackend
from memstore.errors import Aborted, InvalidArgument, ResourceExhausted
from memstore.spec import InitSpec, OptimizerSpec, TableSpec
from memstore.steps import StepBarrier
from memstore.store import Store

DIM = 2


# ---- server: StepBarrier --------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    backend = RamBackend(tmp_path)
    store = Store(backend)
    store.create_table(TableSpec("t", 8, DIM, init=InitSpec("zeros"), optimizer=OptimizerSpec("sgd", 1.0)))
    yield store
    backend.close()


def with_barrier(store: Store, body, **kwargs):
    """Run `body(barrier)` on an event loop, backend work on threads (as the servicer does)."""
    pool = ThreadPoolExecutor(2)

    async def main():
        loop = asyncio.get_running_loop()
        barrier = StepBarrier(store, lambda fn, *a: loop.run_in_executor(pool, fn, *a), **kwargs)
        return await body(barrier)
    try:
        return asyncio.run(main())
    finally:
        pool.shutdown()


def part(ids, value):
    ids = np.asarray(ids, np.int64)
    return ids, np.full((len(ids), DIM), value, np.float32)


def contribute(barrier, rank, seq=1, ids=(0,), value=1.0, world_size=2, timeout_s=5.0, lr=None):
    return barrier.contribute("t", "job", seq, rank, world_size, lr, timeout_s, *part(ids, value))


def test_a_complete_step_is_applied_once_with_the_mean(store):
    async def body(barrier):
        first = await asyncio.gather(contribute(barrier, 0, ids=[0, 1], value=1.0),
                                     contribute(barrier, 1, ids=[1, 2], value=3.0))
        again = await asyncio.gather(contribute(barrier, 0), contribute(barrier, 1))  # retried deliveries
        return first, again
    first, again = with_barrier(store, body)
    assert [result.applied for result in first] == [True, True]
    assert [result.applied for result in again] == [False, False]        # invariant 1 and 4
    np.testing.assert_array_equal(store.lookup("t", np.arange(3))[:, 0], [-0.5, -2.0, -1.5])


def test_a_dropped_step_is_never_applied_and_every_waiter_hears_it(store):
    async def body(barrier):
        started = time.monotonic()
        with pytest.raises(Aborted, match=r"rank\(s\) \[1\] of 2"):
            await contribute(barrier, 0, timeout_s=0.3)
        waited = time.monotonic() - started
        with pytest.raises(Aborted, match="was dropped"):                   # the late rank: refused
            await contribute(barrier, 1, timeout_s=0.3)
        return waited
    waited = with_barrier(store, body)
    assert 0.3 <= waited < 2.0                                              # invariant 3
    np.testing.assert_array_equal(store.lookup("t", np.arange(3)), np.zeros((3, DIM)))  # invariant 2


def test_a_retry_while_the_step_is_applied_gets_its_result(store):
    async def body(barrier):
        tasks = [asyncio.ensure_future(contribute(barrier, r)) for r in (0, 1)]
        await asyncio.sleep(0)  # both registered; the step is now being applied
        while not barrier._applying and not all(t.done() for t in tasks):
            await asyncio.sleep(0.001)
        retry = await contribute(barrier, 0)
        return await asyncio.gather(*tasks), retry
    results, retry = with_barrier(store, body)
    assert [r[:2] for r in results] == [(True, 1), (True, 1)] and retry[0] is False  # invariant 4
    assert store.lookup("t", np.array([0]))[0, 0] == -1.0


def test_open_steps_are_bounded(store):
    async def body(barrier):
        waiting = [asyncio.ensure_future(contribute(barrier, 0, seq=s, timeout_s=0.2)) for s in range(1, 3)]
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="waiting"):
            await contribute(barrier, 0, seq=3)
        await asyncio.gather(*waiting, return_exceptions=True)
    with_barrier(store, body, max_open_steps=2)                             # invariant 5


def test_held_shares_are_bounded_in_bytes(store):
    async def body(barrier):
        waiting = asyncio.ensure_future(contribute(barrier, 0, ids=range(4), timeout_s=0.3))
        await asyncio.sleep(0.05)
        assert barrier._held_bytes == 64                                    # 4 ids + 4 x 2 float32
        with pytest.raises(ResourceExhausted, match="limit"):
            await contribute(barrier, 0, seq=2, ids=range(4), timeout_s=0.3)
        with pytest.raises(Aborted):
            await waiting
        assert barrier._held_bytes == 0
    with_barrier(store, body, max_held_bytes=100)  # room for one share of 4 rows, not two   # invariant 5


def test_a_restarted_rank_withdraws_its_old_share(store):
    async def body(barrier):
        old = asyncio.ensure_future(contribute(barrier, 0, value=100.0))  # rank 0 before it crashed
        await asyncio.sleep(0.05)
        barrier.restarted("t", "job", 0)                                   # invariant 6
        with pytest.raises(Aborted, match="restarted"):
            await old
        return await asyncio.gather(contribute(barrier, 0, value=1.0), contribute(barrier, 1, value=3.0))
    with_barrier(store, body)
    assert store.lookup("t", np.array([0]))[0, 0] == -2.0  # the mean of the new shares only


def test_a_refused_first_share_drops_the_step_for_the_ranks_after_it(store):
    async def body(barrier):
        ids, grads = part([1], np.nan)
        with pytest.raises(InvalidArgument, match="NaN"):
            await barrier.contribute("t", "job", 1, 1, 2, None, 5.0, ids, grads)
        with pytest.raises(Aborted, match="rank 1's share was refused"):  # at once, not after 5 s
            await asyncio.wait_for(contribute(barrier, 0, timeout_s=5.0), 1.0)
        with pytest.raises(InvalidArgument, match="max_world_size"):
            await contribute(barrier, 0, seq=2, world_size=10**9)
    with_barrier(store, body)


def test_ranks_must_agree(store):
    async def body(barrier):
        first = asyncio.ensure_future(contribute(barrier, 0, timeout_s=0.3))
        await asyncio.sleep(0.05)
        with pytest.raises(InvalidArgument, match="every rank must agree"):
            await contribute(barrier, 1, lr=0.5, timeout_s=0.3)
        with pytest.raises(InvalidArgument, match="outside"):
            await contribute(barrier, 2, timeout_s=0.3)
        with pytest.raises(Aborted, match="rank 1's share was refused"):  # at once, not after the timeout
            await asyncio.wait_for(first, 0.1)
    with_barrier(store, body)


def test_a_bad_contribution_is_refused_and_the_step_is_dropped(store):
    async def body(barrier):
        first = asyncio.ensure_future(contribute(barrier, 0, timeout_s=0.3))
        await asyncio.sleep(0.05)
        ids, grads = part([1], np.nan)
        with pytest.raises(InvalidArgument, match="NaN"):
            await barrier.contribute("t", "job", 1, 1, 2, None, 0.3, ids, grads)
        with pytest.raises(Aborted, match="rank 1's share was refused"):
            await asyncio.wait_for(first, 0.1)
    with_barrier(store, body)
    np.testing.assert_array_equal(store.lookup("t", np.arange(2)), np.zeros((2, DIM)))


# ---- client: StepLog ------------------------------------------------------------------------

def done(value=True) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def test_steps_are_confirmed_in_order():
    log, futures = StepLog("t"), [Future() for _ in range(3)]
    for future in futures:
        log.push(np.array([1]), lambda step, f=future: f)
    futures[2].set_result(True)
    futures[1].set_result(True)
    log.wait(0)
    assert (log.confirmed, log.next_step, log.in_flight()) == (0, 3, 3)     # invariant 1
    futures[0].set_result(True)
    log.wait(3)
    assert (log.confirmed, log.in_flight()) == (3, 0)


def test_a_failed_step_is_never_counted_as_confirmed():
    log = StepLog("t")
    failed: Future = Future()
    failed.set_exception(RuntimeError("refused"))
    attempts = iter([failed, done()])  # the first send is refused, the re-send goes through
    log.push(np.array([1]), lambda step: next(attempts))
    with pytest.raises(StepFailed, match="step 0"):                         # invariant 2
        log.wait(1)
    with pytest.raises(StepFailed):
        log.push(np.array([2]), lambda step: done())
    assert log.resend_failed() == [0]
    log.wait(1)
    assert log.confirmed == 1


def test_the_log_stays_small_over_many_steps():
    log = StepLog("t")
    for step in range(1000):
        log.push(np.array([step]), lambda s: done())
        log.wait(log.next_step)
    assert log.in_flight() == 0 and len(log._recent) == RECENT             # invariant 3
    assert log.ids_between(1000 - RECENT, 1000) is not None                 # invariant 4
    assert log.ids_between(1000 - RECENT - 1, 1000) is None


def test_more_ranks_than_the_concurrency_limit_still_complete_a_step(tmp_path):
    """A share waiting for the other ranks gives its admission slot back: with at most 2 RPCs
    admitted, 4 ranks' shares of one step must all get in (else none could ever finish)."""
    from engram_client import Job, MemStoreClient
    from tests.servers import in_process
    with in_process(tmp_path / "data", max_concurrent_requests=2) as server:
        clients = [MemStoreClient(server.target) for _ in range(4)]
        clients[0].create_table("t", 8, DIM, init="zeros", optimizer="sgd", lr=1.0)
        futures = [c.update_async("t", [r], np.ones((1, DIM)), step=0, job=Job("big", r, 4, step_timeout_s=20))
                   for r, c in enumerate(clients)]
        assert [f.result(timeout=30) for f in futures] == [True] * 4
        np.testing.assert_array_equal(clients[0].lookup("t", np.arange(4))[:, 0], [-0.25] * 4)
        for client in clients:
            client.close()
