"""What the clients accept as row ids and gradients (issue 15, item 11), on every row store
(`MemStoreClient`, `ShardedClient` over two real shards, the in-process `InProcessStore`), and
the table defaults that the CLI, the client and `MemStoreTables` share."""
from __future__ import annotations

import inspect
from contextlib import ExitStack

import numpy as np
import pytest

from engram_client import MemStoreTables, ShardedClient
from engram_client.host import InProcessStore
from engram_client.memstore_client import MemStoreClient
from engram_client.remote import RemoteTables
from memstore.cli import build_parser
from memstore.errors import FailedPrecondition
from tests.servers import in_process

ROWS, DIM = 64, 4


@pytest.fixture(params=["client", "sharded", "in_process"])
def row_store(request, tmp_path):
    """A row store holding table "t" (zeros, sgd lr 1: an update of g moves the row by -g)."""
    with ExitStack() as stack:
        if request.param == "in_process":
            store = InProcessStore(tmp_path / "host")
            stack.callback(store.close)
        else:
            count = 2 if request.param == "sharded" else 1
            servers = [stack.enter_context(in_process(tmp_path / f"s{i}", shard_index=str(i), shard_count=count))
                       for i in range(count)]
            targets = [s.target for s in servers]
            store = stack.enter_context(ShardedClient(targets) if count > 1 else MemStoreClient(targets[0]))
        store.create_table("t", ROWS, DIM, init="normal", lr=1.0)
        yield store


def test_float_ids_are_refused_not_truncated(row_store):
    before = row_store.lookup("t", [1])
    for ids in ([1.7], np.array([1.0, 2.0]), np.array([3], np.float32), [True]):
        with pytest.raises(TypeError, match="row ids must be integers"):
            row_store.lookup("t", ids)
        with pytest.raises(TypeError, match="row ids must be integers"):
            row_store.update("t", ids, np.ones((len(ids), DIM)))
    np.testing.assert_array_equal(row_store.lookup("t", [1]), before)  # no update landed on row 1


def test_every_integer_dtype_reads_the_same_rows(row_store):
    expected = row_store.lookup("t", np.array([5, 0, 63]))
    for dtype in (np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32, np.uint64, ">i8"):
        np.testing.assert_array_equal(row_store.lookup("t", np.array([5, 0, 63], dtype)), expected)
    assert row_store.lookup("t", []).shape == (0, DIM)  # an empty list is float64 to numpy: still fine
    with pytest.raises(ValueError, match="does not fit int64"):
        row_store.lookup("t", np.array([2**63], np.uint64))


def test_n_d_ids_keep_their_shape(row_store):
    ids = np.array([[3, 1, 3], [60, 0, 7]])                      # [B, T]
    rows = row_store.lookup("t", ids)
    assert rows.shape == (2, 3, DIM)
    np.testing.assert_array_equal(rows.reshape(-1, DIM), row_store.lookup("t", ids.reshape(-1)))
    assert row_store.lookup_async("t", ids).result().shape == (2, 3, DIM)
    assert row_store.lookup("t", np.int64(3)).shape == (DIM,)    # a scalar id: one row, like table[3]

    grads = np.arange(ids.size * DIM, dtype=np.float32).reshape(2, 3, DIM)  # shaped like the rows
    row_store.update("t", ids, grads)
    summed = {i: grads.reshape(-1, DIM)[ids.reshape(-1) == i].sum(axis=0) for i in np.unique(ids)}
    after = row_store.lookup("t", ids)
    for (b, t), i in np.ndenumerate(ids):
        np.testing.assert_allclose(after[b, t], rows[b, t] - summed[i], rtol=1e-6)
    with pytest.raises(ValueError, match=r"grads must be ids.shape \+ \(dim,\)"):
        row_store.update("t", ids, grads[:, :2])


def test_cli_client_and_memstore_tables_default_to_the_same_optimizer():
    create = build_parser().parse_args(["create-table", "t", "--rows", "1", "--dim", "1"])
    client = inspect.signature(MemStoreClient.create_table).parameters
    tables = inspect.signature(RemoteTables.__init__).parameters
    for name in ("optimizer", "lr", "init", "init_scale", "seed", "dtype"):
        assert getattr(create, name) == client[name].default == tables[name].default, name


def test_a_table_made_with_defaults_attaches_and_a_mismatch_names_the_fields(tmp_path):
    with in_process(tmp_path / "data") as server, MemStoreClient(server.target) as client:
        client.create_table("defaults", ROWS, DIM)
        MemStoreTables(client, "defaults", ROWS, DIM)  # attaches: the same defaults on both sides
        with pytest.raises(FailedPrecondition) as refused:
            MemStoreTables(client, "defaults", ROWS, DIM, optimizer="adam", lr=1e-3, seed=7)
    message = str(refused.value)
    assert "optimizer.kind: existing 'sgd', requested 'adam'" in message
    assert "optimizer.lr: existing 0.01, requested 0.001" in message
    assert "init.seed: existing 0, requested 7" in message and "num_rows" not in message
