"""Training jobs as clients, one process: checkpoint and resume across daemon crashes, steps
re-sent after a partial failure, lr schedules, failures that always surface, bounded client
memory and a row cache that never goes stale. (Several ranks: tests/test_ddp.py.)
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from engram_client import (
    HostTables,
    Prefetcher,
    ShardedClient,
    StepFailed,
    TableLR,
    checkpoint_tables,
    restore_tables,
)
from engram_client.cache import RowCache
from engram_client.remote import MemStoreTables
from engram_client.steps import RECENT
from memstore.errors import FailedPrecondition, MemStoreError
from tests.servers import ServeProcess, in_process
from tests.test_remote_training import (
    INIT,
    LR,
    TinyLM,
    batches,
    local_tables,
    memstore_cluster,
    remote_model,
    sparse_optimizer,
)


def dense_params(model):
    return [p for n, p in model.named_parameters() if not n.startswith("engram.tables")]


def run_steps(model, data, dense: torch.optim.Optimizer, schedulers=()) -> None:
    for ids in data:
        model(ids).backward()
        dense.step()
        dense.zero_grad()
        for scheduler in schedulers:
            scheduler.step()


# ---- checkpoint and resume ------------------------------------------------------------------

@pytest.mark.subprocess
@pytest.mark.parametrize("backend", ["ram", "lmdb"])
def test_resume_after_every_daemon_was_killed_is_bit_identical(tmp_path, backend):
    data = batches() + batches()[:2]  # 8 steps
    shards = [ServeProcess(tmp_path / f"shard{i}", backend, "--shard-index", str(i), "--shard-count", "2").start()
              for i in range(2)]
    try:
        targets = [s.target for s in shards]
        with ShardedClient(targets) as client:
            model = remote_model(client, "adam")
            dense = torch.optim.SGD(dense_params(model), lr=0.1)
            run_steps(model, data[:4], dense)
            record, weights = checkpoint_tables(model), copy.deepcopy(model.state_dict())
            assert record["tables"]["engram_l1"]["step"] == 4
            run_steps(model, data[4:], dense)
            model.engram.tables.flush()
            uninterrupted = client.lookup("engram_l1", np.arange(model.engram.tables.num_rows))
        for shard in shards:
            shard.kill()
            shard.restart()
        with ShardedClient(targets, retry_timeout_s=30) as client:
            resumed = remote_model(client, "adam")
            resumed.load_state_dict(weights)
            restore_tables(resumed, record)
            assert resumed.engram.tables.step == 4
            run_steps(resumed, data[4:], torch.optim.SGD(dense_params(resumed), lr=0.1))
            resumed.engram.tables.flush()
            rows = client.lookup("engram_l1", np.arange(resumed.engram.tables.num_rows))
    finally:
        for shard in shards:
            shard.stop()
    np.testing.assert_array_equal(rows, uninterrupted)


def test_restore_needs_the_checkpoint_on_every_shard(tmp_path):
    from memstore.errors import NotFound
    with memstore_cluster(tmp_path, 2) as client:
        model = remote_model(client, "sgd")
        record = checkpoint_tables(model)
        run_steps(model, batches()[:2], torch.optim.SGD(dense_params(model), lr=0.1))
        model.engram.tables.flush()
        client.shards[1].drop_table("engram_l1")  # shard 1's copy (and its checkpoints) is gone
        client.shards[1].create_table("engram_l1", model.engram.tables.num_rows, model.engram.tables.dim)
        shard0_rows = np.arange(0, model.engram.tables.num_rows, 2)
        trained = client.lookup("engram_l1", shard0_rows)
        with pytest.raises(NotFound, match=rf"no checkpoint .* on shard 1 \({client.targets[1]}\).*nothing was restored"):
            restore_tables(model, record)
        np.testing.assert_array_equal(client.lookup("engram_l1", shard0_rows), trained)  # shard 0 kept its steps
        assert model.engram.tables.step == 2


def test_host_tables_checkpoint_and_restore():
    model = TinyLM(lambda rows, dim: HostTables(rows, dim, optimizer="adagrad", lr=LR["adagrad"]))
    source = model.engram.tables
    record = checkpoint_tables(model)
    before = source.store.lookup("engram", np.arange(source.num_rows))
    run_steps(model, batches()[:2], torch.optim.SGD(dense_params(model), lr=0.1))
    restore_tables(model, record)
    assert source.step == 0
    np.testing.assert_array_equal(source.store.lookup("engram", np.arange(source.num_rows)), before)


# ---- exactly once per shard -----------------------------------------------------------------

@pytest.mark.subprocess
def test_a_step_resent_after_a_partial_failure_is_applied_once_per_shard(tmp_path):
    """Issue 11's reproduction: shard 1 is down past the retry window, shard 0 applies the step."""
    shards = [ServeProcess(tmp_path / f"s{i}", "lmdb", "--shard-index", str(i), "--shard-count", "2").start()
              for i in range(2)]
    try:
        with ShardedClient([s.target for s in shards], retry_timeout_s=0.5) as client:
            client.create_table("t", 10, 2, init="zeros", optimizer="sgd", lr=1.0)
            shards[1].kill()
            with pytest.raises(MemStoreError, match="UNAVAILABLE"):
                client.update("t", [0, 1], np.ones((2, 2)), step=0)
            with pytest.raises(FailedPrecondition, match="step 0 failed"):  # shard 1 refuses it unsent
                client.update("t", [0, 1], np.ones((2, 2)), step=1)
            shards[1].restart()
            client.shards[1].retry_timeout_s = 30  # the channel reconnects with backoff
            for step in (0, 1):  # each whole step again: shard 0 acknowledges, shard 1 applies
                client.update("t", [0, 1], np.ones((2, 2)), step=step)
            np.testing.assert_array_equal(client.lookup("t", [0, 1]), -2 * np.ones((2, 2)))
    finally:
        for shard in shards:
            shard.stop()


# ---- learning-rate schedules ----------------------------------------------------------------

def warmup_cosine(step: int, warmup: int = 2, total: int = 6) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def run_scheduled(model, table_optimizer: torch.optim.Optimizer) -> None:
    """Train on `batches()` with the table optimizer following `warmup_cosine`."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(table_optimizer, warmup_cosine)
    dense = torch.optim.SGD(dense_params(model), lr=0.1)
    for ids in batches():
        model(ids).backward()
        for optimizer in (dense, table_optimizer):
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_scheduled_table_trains_like_a_scheduled_local_table(tmp_path, kind):
    local = TinyLM(local_tables)
    run_scheduled(local, sparse_optimizer(kind, local.engram.tables.parameters()))
    with memstore_cluster(tmp_path, 1) as client:
        model = remote_model(client, kind)
        run_scheduled(model, TableLR(model))  # the tables' lrs as a torch optimizer
        model.engram.tables.flush()
        rows = client.lookup("engram_l1", np.arange(model.engram.tables.num_rows))
    # float32 vs float64 learning rates: Adam's division amplifies the last bits a little
    np.testing.assert_allclose(rows, local.engram.tables.weight.detach().numpy(), rtol=1e-4, atol=2e-5)


def test_gradient_accumulation_makes_one_table_step(tmp_path):
    with memstore_cluster(tmp_path, 1) as client:
        model = TinyLM(lambda rows, dim: MemStoreTables(client, "acc", rows, dim, optimizer="sgd", lr=0.5,
                                                        init_scale=INIT.scale, seed=INIT.seed, grad_accumulation=2))
        for ids in batches()[:4]:
            model(ids).backward()
        model.engram.tables.flush()
        assert model.engram.tables.step == 2
        assert client.describe_table("acc").updates == 2


# ---- failures always surface ----------------------------------------------------------------

def _nan_step(model, ids) -> None:
    (model(ids) * float("nan")).backward()


def _train_async_then_flush(model, data) -> None:
    for ids in data:
        model(ids).backward()
    model.engram.tables.flush()


def test_async_training_never_drops_a_refused_step():
    """Issue 11's reproduction: one refused step, then 3 good steps and flush() used to pass."""
    data = batches()
    model = TinyLM(lambda rows, dim: HostTables(rows, dim, optimizer="sgd", mode="async"))
    with pytest.raises(StepFailed, match="NaN"):
        _nan_step(model, data[0])
        _train_async_then_flush(model, data[1:4])


def test_async_training_on_a_read_only_replica_raises(tmp_path):
    with in_process(tmp_path / "data") as server, ShardedClient([server.target]) as client:
        remote_model(client, "sgd")  # creates the table; the RAM snapshot keeps it
    with in_process(tmp_path / "data", read_only=True) as replica, ShardedClient([replica.target]) as client:
        model = TinyLM(lambda rows, dim: MemStoreTables(client, "engram_l1", rows, dim, mode="async", create=False))
        with pytest.raises(StepFailed, match="PERMISSION_DENIED"):
            _train_async_then_flush(model, batches()[:4])


def test_async_training_on_a_dropped_table_raises(tmp_path):
    with memstore_cluster(tmp_path, 1) as client:
        model = remote_model(client, "sgd", mode="async")
        client.drop_table("engram_l1")
        with pytest.raises(MemStoreError, match="NOT_FOUND"):
            _train_async_then_flush(model, batches()[:4])


def test_sync_training_raises_at_the_next_step():
    model = TinyLM(lambda rows, dim: HostTables(rows, dim, optimizer="sgd"))
    _nan_step(model, batches()[0])
    with pytest.raises(StepFailed, match="training step 0"):
        model(batches()[1])


# ---- bounded memory, fresh cache ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sync", "async"])
def test_client_memory_stays_bounded_under_the_prefetcher(mode):
    """Issue 11's reproduction: the update log grew by one entry per step for the whole run."""
    model = TinyLM(lambda rows, dim: HostTables(rows, dim, optimizer="sgd", mode=mode))
    source, most_in_flight = model.engram.tables, 0
    for ids in Prefetcher(batches() * 40, model, depth=2):
        model(ids).backward()
        most_in_flight = max(most_in_flight, source.steps.in_flight())
    assert source.step == 240
    assert most_in_flight <= 3 and len(source.steps._recent) <= RECENT


def test_async_row_cache_holds_only_current_rows(tmp_path):
    """Issue 11's reproduction: a forward between push and apply re-inserted the old row."""
    with memstore_cluster(tmp_path, 1) as client:
        model = remote_model(client, "sgd", mode="async", cache_bytes=1 << 20)
        for ids in Prefetcher(batches() * 3, model, depth=2):
            model(ids).backward()
        source = model.engram.tables
        model.eval()
        with torch.no_grad():  # while the last step is still in flight: its rows must not be cached
            model(batches()[0])
        source.flush()
        cache = source.cache
        valid = cache.tags >= 0
        assert valid.sum() > 0
        server_rows = client.lookup("engram_l1", cache.tags[valid].numpy())
        np.testing.assert_array_equal(cache.rows[valid].numpy(), server_rows)
        with torch.no_grad():  # eval: served partly from the cache, equal to the server's rows
            cached = model(batches()[0])
            source.cache.clear()
            fetched = model(batches()[0])
        torch.testing.assert_close(cached, fetched, rtol=0, atol=0)


def test_a_data_parallel_rank_refuses_a_row_cache(tmp_path):
    with memstore_cluster(tmp_path, 1) as client, pytest.raises(ValueError, match="cache"):
        MemStoreTables(client, "t", 10, 4, job="j", rank=0, world_size=2, cache=RowCache(1 << 16, 4))


def test_a_new_run_reusing_a_job_name_fails_loudly(tmp_path):
    """Without restore_tables, a second run of job 'j' would have its steps acknowledged as
    already applied (its first steps silently skipped): the client refuses instead."""
    from engram_client import Job
    with memstore_cluster(tmp_path, 2) as client:
        client.create_table("t", 10, 2, init="zeros", optimizer="sgd", lr=1.0)
        client.update("t", [0, 1], np.ones((2, 2)), step=0, job=Job("j"))
        with ShardedClient(client.targets) as again, \
                pytest.raises(FailedPrecondition, match="earlier run used the same job name 'j'"):
            again.update("t", [0, 1], np.ones((2, 2)), step=0, job=Job("j"))


# ---- review findings ------------------------------------------------------------------------

def test_lr_zero_means_zero_not_the_tables_lr(tmp_path):
    with memstore_cluster(tmp_path, 1) as client:
        client.create_table("t", 4, 2, init="zeros", optimizer="sgd", lr=1.0)
        client.update("t", [0], np.ones((1, 2)), step=0, lr=0.0)
        client.update("t", [1], np.ones((1, 2)), step=1)
        np.testing.assert_array_equal(client.lookup("t", [0, 1])[:, 0], [0.0, -1.0])


def test_table_lr_state_survives_load_state_dict():
    model = TinyLM(lambda rows, dim: HostTables(rows, dim, optimizer="sgd", lr=0.1))
    table_lr = TableLR(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(table_lr, lambda s: 0.5 ** s)
    for _ in range(3):
        table_lr.step()
        scheduler.step()
    saved = table_lr.state_dict()
    resumed = TableLR(TinyLM(lambda rows, dim: HostTables(rows, dim, optimizer="sgd", lr=0.1)))
    resumed.load_state_dict(saved)
    assert resumed.sources[0].lr == pytest.approx(0.0125)
    resumed.param_groups[0]["lr"] = 0.5  # what a scheduler does next reaches the table
    assert resumed.sources[0].lr == 0.5


def test_job_names_make_distinct_valid_tags():
    from engram_client.remote import _tag_safe
    from memstore.checkpoints import check_tag
    tags = {_tag_safe(name) for name in ("v1..final", "exp/1", "exp:1", "-x", "")}
    assert len(tags) == 5
    for tag in tags:
        check_tag(tag + ".step0")


@pytest.mark.subprocess
def test_steps_lost_by_a_ram_restart_raise(tmp_path):
    """A RAM daemon killed before it snapshotted comes back without the steps it acknowledged:
    the trainer must hear it at its next step, not train on a table that went back in time."""
    with ServeProcess(tmp_path / "d", "ram") as daemon, ShardedClient([daemon.target], retry_timeout_s=30) as client:
        model = remote_model(client, "sgd")
        run_steps(model, batches()[:3], torch.optim.SGD(dense_params(model), lr=0.1))
        model.engram.tables.flush()
        daemon.kill()
        daemon.restart()
        with pytest.raises(StepFailed, match="lost steps"):
            run_steps(model, batches()[3:6], torch.optim.SGD(dense_params(model), lr=0.1))
            model.engram.tables.flush()


def test_a_dropped_and_recreated_table_trains_from_step_0_again(tmp_path):
    with memstore_cluster(tmp_path, 2) as client:
        for _ in range(2):
            client.create_table("t", 10, 2, init="zeros", optimizer="sgd", lr=1.0)
            for step in range(3):
                client.update("t", [0, 1], np.ones((2, 2)), step=step)
            np.testing.assert_array_equal(client.lookup("t", [0, 1]), -3 * np.ones((2, 2)))
            client.drop_table("t")
