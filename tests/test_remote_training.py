"""Remote Engram tables train exactly like local ones (torchrec's rule: prove the fast path equals
the simple path). Same seed, same data: local tables with torch's sparse optimizers vs tables on
memstore (1 and 2 shards, sync mode, with and without prefetch) with the matching server optimizer.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engram_client.block import EngramBlock
from engram_client.cache import RowCache
from engram_client.config import EngramConfig
from engram_client.hashing import NgramHasher
from engram_client.host import HostTables
from engram_client.optim import RowwiseAdam
from engram_client.prefetch import Prefetcher
from engram_client.remote import MemStoreTables, RemoteTables
from engram_client.sharded import ShardedClient
from engram_client.tables import LocalTables
from memstore.init import init_rows
from memstore.spec import InitSpec
from tests.servers import ServeProcess, in_process

VOCAB, HIDDEN, B, T, STEPS = 50, 16, 4, 12, 6
CONFIG = EngramConfig(engram_vocab_size=[61, 67], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2,
                      layer_ids=[1], pad_id=0, seed=3, kernel_size=2)
LR = {"sgd": 0.5, "adagrad": 0.1, "adam": 0.05}
INIT = InitSpec("normal", 0.5, seed=11)


class TinyLM(nn.Module):
    """Embedding → Engram (residual) → LM head: just enough model to train a table."""

    def __init__(self, tables_for: callable):
        super().__init__()
        hasher = NgramHasher(CONFIG, vocab_size=VOCAB)
        tables = tables_for(hasher.total_rows(1), CONFIG.head_dim)
        torch.manual_seed(0)  # after the tables: dense weights must not depend on where rows live
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.engram = EngramBlock(CONFIG, 1, HIDDEN, hasher=hasher, tables=tables)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)                                                   # (B, T, C)
        h = h + self.engram(h, ids)
        return F.cross_entropy(self.head(h)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (B, T), generator=gen) for _ in range(STEPS)]


def local_tables(num_rows: int, dim: int) -> LocalTables:
    tables = LocalTables(num_rows, dim, sparse=True)
    with torch.no_grad():
        tables.weight.copy_(torch.from_numpy(init_rows(INIT, np.arange(num_rows), dim)))  # the server's init
    return tables


def sparse_optimizer(kind: str, params) -> torch.optim.Optimizer:
    return {"sgd": lambda: torch.optim.SGD(params, lr=LR["sgd"]),
            "adagrad": lambda: torch.optim.Adagrad(params, lr=LR["adagrad"]),
            "adam": lambda: RowwiseAdam(params, lr=LR["adam"])}[kind]()


def train(model: TinyLM, table_optimizer: torch.optim.Optimizer | None, data, prefetch: bool) -> list[float]:
    dense = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("engram.tables")], lr=0.1)
    losses = []
    for ids in (Prefetcher(data, model, depth=2) if prefetch else data):
        loss = model(ids)
        loss.backward()
        dense.step()
        if table_optimizer:
            table_optimizer.step()
        dense.zero_grad()
        if table_optimizer:
            table_optimizer.zero_grad()
        losses.append(loss.item())
    if isinstance(model.engram.tables, RemoteTables):
        model.engram.tables.flush()
    return losses


def train_local(kind: str):
    model = TinyLM(local_tables)
    losses = train(model, sparse_optimizer(kind, model.engram.tables.parameters()), batches(), prefetch=False)
    return losses, model


@contextlib.contextmanager
def memstore_cluster(tmp_path, shards: int, backend: str = "ram"):
    servers = [in_process(tmp_path / f"shard{i}", backend, shard_index=str(i), shard_count=shards)
               for i in range(shards)]
    for server in servers:
        server.start()
    try:
        with ShardedClient([s.target for s in servers], retry_timeout_s=30) as client:
            yield client
    finally:
        for server in servers:
            server.stop()


def remote_model(client, kind: str, mode: str = "sync", cache_bytes: int = 0) -> TinyLM:
    return TinyLM(lambda rows, dim: MemStoreTables(
        client, "engram_l1", rows, dim, optimizer=kind, lr=LR[kind], init="normal",
        init_scale=INIT.scale, seed=INIT.seed, mode=mode,
        cache=RowCache(cache_bytes, dim) if cache_bytes else None))


def assert_same_training(local, remote_losses, remote_model_, table_rows: np.ndarray) -> None:
    local_losses, local_model = local
    np.testing.assert_allclose(remote_losses, local_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table_rows, local_model.engram.tables.weight.detach().numpy(), rtol=1e-4, atol=1e-6)
    remote_params = dict(remote_model_.named_parameters())
    dense = {n: p for n, p in local_model.named_parameters() if not n.startswith("engram.tables")}
    assert set(dense) == set(remote_params)
    for name, p_local in dense.items():
        np.testing.assert_allclose(remote_params[name].detach().numpy(), p_local.detach().numpy(),
                                   rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("prefetch", [False, True])
def test_memstore_training_equals_local_training(tmp_path, kind, shards, prefetch):
    local = train_local(kind)
    with memstore_cluster(tmp_path, shards) as client:
        model = remote_model(client, kind)
        losses = train(model, None, batches(), prefetch=prefetch)
        rows = client.lookup("engram_l1", np.arange(model.engram.tables.num_rows))
    assert_same_training(local, losses, model, rows)


def test_training_through_the_row_cache_equals_local_training(tmp_path):
    """Updates invalidate cached rows, so a cache never serves a row the server has changed.
    (In training every row read is also written, so the cache pays off at inference.)"""
    local = train_local("adagrad")
    with memstore_cluster(tmp_path, 2) as client:
        model = remote_model(client, "adagrad", cache_bytes=64 * 1024)
        losses = train(model, None, batches(), prefetch=True)
        rows = client.lookup("engram_l1", np.arange(model.engram.tables.num_rows))
        assert_same_training(local, losses, model, rows)
        model.eval()
        with torch.no_grad():
            first, again = model(batches()[0]), model(batches()[0])
    assert model.engram.tables.cache.hits > 0 and torch.equal(first, again)


def test_host_tables_equal_local_training():
    local = train_local("adagrad")
    model = TinyLM(lambda rows, dim: HostTables(rows, dim, optimizer="adagrad", lr=LR["adagrad"],
                                                init_scale=INIT.scale, seed=INIT.seed))
    losses = train(model, None, batches(), prefetch=True)
    store = model.engram.tables.store
    assert_same_training(local, losses, model, store.lookup("engram", np.arange(model.engram.tables.num_rows)))


def test_async_mode_trains_with_bounded_staleness(tmp_path):
    with memstore_cluster(tmp_path, 1) as client:
        model = remote_model(client, "sgd", mode="async")
        losses = train(model, None, batches() * 3, prefetch=True)
    assert losses[-1] < losses[0]


def test_attaching_to_a_mismatched_table_fails_loudly(tmp_path):
    from memstore.errors import MemStoreError
    with memstore_cluster(tmp_path, 1) as client:
        client.create_table("engram_l1", 10, 8)
        with pytest.raises(MemStoreError, match="does not match"):
            remote_model(client, "sgd")


def test_misordered_shard_list_fails_loudly(tmp_path):
    """...before anything is created: each server's layout is checked first (Stats)."""
    from memstore.client import MemStoreClient
    from memstore.errors import FailedPrecondition
    servers = [in_process(tmp_path / f"s{i}", shard_index=str(i), shard_count=2) for i in range(2)]
    for server in servers:
        server.start()
    try:
        with ShardedClient([servers[1].target, servers[0].target]) as client, \
                pytest.raises(FailedPrecondition, match="fix the target order"):
            client.create_table("t", 100, 4)
        assert all(MemStoreClient(s.target).list_tables() == [] for s in servers)
    finally:
        for server in servers:
            server.stop()


def test_prefetch_overlaps_lookups_with_compute(tmp_path):
    """With a server that takes 150 ms per lookup and a step that computes for 150 ms, prefetching
    makes a step cost ~max(compute, lookup) instead of the sum."""
    delay_s = compute_s = 0.15

    def seconds_per_step(prefetch: bool) -> float:
        with in_process(tmp_path / f"slow{prefetch}", fault_lookup_delay_ms=delay_s * 1e3) as server, \
                ShardedClient([server.target], shared_memory="off") as client:  # a slow server: over gRPC
            model = remote_model(client, "sgd", mode="async")
            data = batches() * 2
            loader = Prefetcher(data, model, depth=2) if prefetch else data
            started = None
            for step, ids in enumerate(loader):
                if step == 1:
                    started = time.perf_counter()  # step 0 pays for starting the pipeline
                model(ids).backward()
                time.sleep(compute_s)
            return (time.perf_counter() - started) / (len(data) - 1)

    serial, overlapped = seconds_per_step(False), seconds_per_step(True)
    assert serial > delay_s + compute_s
    assert overlapped < 0.8 * serial, (serial, overlapped)


@pytest.mark.subprocess
def test_killing_a_shard_mid_training_loses_and_doubles_nothing(tmp_path):
    """Shard 1 (an LMDB `memstore serve`) is SIGKILLed and restarted during training; the client
    retries and, thanks to idempotent updates, ends exactly where an undisturbed run ends."""
    local = train_local("adagrad")
    shards = [ServeProcess(tmp_path / f"shard{i}", "lmdb", "--shard-index", str(i), "--shard-count", "2").start()
              for i in range(2)]
    try:
        with ShardedClient([s.target for s in shards], retry_timeout_s=60) as client:
            model = remote_model(client, "adagrad")
            data = batches()
            dense = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("engram.tables")],
                                    lr=0.1)
            losses = []
            for step, ids in enumerate(data):
                if step in (2, 4):
                    shards[1].kill()
                    shards[1].restart()
                loss = model(ids)
                loss.backward()
                dense.step()
                dense.zero_grad()
                losses.append(loss.item())
            model.engram.tables.flush()
            rows = client.lookup("engram_l1", np.arange(model.engram.tables.num_rows))
        assert_same_training(local, losses, model, rows)
    finally:
        for shard in shards:
            shard.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memstore_training_on_a_gpu_matches_local_cpu_training(tmp_path):
    """Rows are fetched to pinned host memory and copied to the GPU without blocking; training on
    the GPU against memstore ends where local CPU training ends (float tolerance: GPU kernels)."""
    local_losses, local_model = train_local("adagrad")
    with memstore_cluster(tmp_path, 1) as client:
        model = remote_model(client, "adagrad").cuda()
        losses = train(model, None, [ids.cuda() for ids in batches()], prefetch=True)
        rows = client.lookup("engram_l1", np.arange(model.engram.tables.num_rows))
    np.testing.assert_allclose(losses, local_losses, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rows, local_model.engram.tables.weight.detach().numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("store", ["host", "grpc", "same-host"])
def test_rows_with_an_exactly_zero_gradient_are_not_sent_and_a_step_of_none_still_counts(store, tmp_path):
    """Row dropout can drop every read of a row: its gradient is exactly zero, the store would skip
    it, so it is not sent (nor invalidated in the cache); a step with no row left is sent empty."""
    from memstore.client import MemStoreClient
    with contextlib.ExitStack() as stack:
        if store == "host":
            tables = HostTables(100, 4, optimizer="sgd", lr=1.0)
        else:
            server = stack.enter_context(in_process(tmp_path / "data"))
            client = stack.enter_context(MemStoreClient(server.target, shared_memory="off" if store == "grpc" else "on"))
            tables = MemStoreTables(client, "t", 100, 4, optimizer="sgd", lr=1.0)
        ids = torch.arange(6).view(1, 2, 3)
        before = tables.store.lookup(tables.name, np.arange(6))
        (tables(ids).sum() * 0).backward()          # every row's gradient is exactly zero
        tables.flush()
        assert tables.step == 1 and tables.steps.ids_between(0, 1)[0].size == 0
        np.testing.assert_array_equal(tables.store.lookup(tables.name, np.arange(6)), before)
        weights = torch.tensor([1.0, 0.0, 1.0]).view(1, 1, 3, 1)
        (tables(ids) * weights).sum().backward()    # rows 1 and 4 get no gradient
        tables.flush()
        assert tables.steps.ids_between(1, 2)[0].tolist() == [0, 2, 3, 5]
