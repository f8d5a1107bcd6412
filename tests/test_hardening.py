"""Regression tests for defects an outside review found (issue 12), each reproduced first."""
from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch

from engram_client import MemStoreClient, ShardedClient
from engram_client.remote import MemStoreTables
from memstore.backends.ram import RamBackend
from memstore.dtypes import from_float32, to_float32
from memstore.errors import FailedPrecondition, InvalidArgument
from memstore.spec import InitSpec, TableSpec
from memstore.store import Store
from memstore.wire import WireError, decode, decode_update_chunk, encode_update_chunk
from tests.servers import in_process


def test_varints_wider_than_64_bits_are_refused():
    seventy_bits = bytes([0x18]) + bytes([0xFF] * 9) + bytes([0x3F])  # field 3 (seq), 70 bits set
    with pytest.raises(WireError, match="64 bits"):
        decode(seventy_bits)
    assert decode_update_chunk(encode_update_chunk(b"", b"", seq=2**64 - 1)).seq == 2**64 - 1


def test_a_seq_of_2_63_or_more_is_refused_and_snapshots_keep_working(tmp_path):
    backend = RamBackend(tmp_path)
    store = Store(backend)
    store.create_table(TableSpec("t", 4, 2))
    with pytest.raises(InvalidArgument, match="seq must be in"):
        store.update("t", np.array([0]), np.ones((1, 2), np.float32), "c", 2**64 - 1)
    store.update("t", np.array([0]), np.ones((1, 2), np.float32), "c", 2**63 - 1)
    backend.checkpoint()  # msgpack holds any uint64: the snapshot is written
    backend.close()


def test_a_failing_table_does_not_stop_the_checkpoint_of_the_others(tmp_path):
    backend = RamBackend(tmp_path)
    store = Store(backend)
    for name in ("a", "b"):
        store.create_table(TableSpec(name, 4, 2))
        store.update(name, np.array([1]), np.ones((1, 2), np.float32), "", 0)
    shutil.rmtree(tmp_path / "snapshots" / "a")
    (tmp_path / "snapshots" / "a").write_text("not a directory")  # a's snapshot cannot be written
    with pytest.raises(OSError):
        backend.checkpoint()
    assert not backend.get("b").dirty and backend.get("a").dirty
    backend.close()


def test_nan_becomes_bfloat16_nan_as_in_torch():
    values = np.array([np.nan, -np.nan, 1.0, -np.inf], np.float32)
    values = np.concatenate([values, np.frombuffer(np.uint32(0x7FFFFFFF).tobytes(), np.float32)])  # NaN, max mantissa
    back = to_float32(from_float32(values, "bfloat16"), "bfloat16")
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.isnan(back), np.isnan(expected))
    np.testing.assert_array_equal(back[~np.isnan(back)], expected[~np.isnan(expected)])


def test_attaching_to_a_bfloat16_table_reads_bfloat16_rows(tmp_path):
    with in_process(tmp_path / "d") as server, ShardedClient([server.target]) as client:
        client.create_table("bf", 16, 4, dtype="bfloat16", init="uniform", init_scale=0.5)
        tables = MemStoreTables(client, "bf", 16, 4, create=False)  # constructor's dtype: the default float32
        rows = tables(torch.arange(16).view(1, 16, 1))                 # (1, 16, 1, 4)
        stored = torch.from_numpy(client.lookup("bf", np.arange(16))).view(torch.bfloat16).float()
        torch.testing.assert_close(rows.view(16, 4), stored, rtol=0, atol=0)
        assert rows.abs().max() <= 0.5


@pytest.mark.parametrize("shared_memory", ["off", "on"])
def test_close_lets_pending_async_lookups_finish(tmp_path, shared_memory):
    with in_process(tmp_path / "d") as server:
        client = MemStoreClient(server.target, max_ids_per_call=1 << 12, shared_memory=shared_memory)
        client.create_table("t", 1 << 16, 8)
        futures = [client.lookup_async("t", np.arange(1 << 15)) for _ in range(4)]  # split: uses the lookup pool
        client.close()
        assert all(f.result().shape == (1 << 15, 8) for f in futures)


def test_one_listed_shard_of_three_is_refused(tmp_path):
    servers = [in_process(tmp_path / f"s{i}", shard_index=str(i), shard_count=3) for i in range(3)]
    for server in servers:
        server.start()
    try:
        with ShardedClient([servers[0].target]) as client:
            MemStoreClient(servers[0].target).create_table("t", 30, 2)
            with pytest.raises(FailedPrecondition, match="shard 0 of 3"):
                client.describe_table("t")
    finally:
        for server in servers:
            server.stop()


def test_python_dash_m_memstore_runs_the_cli(tmp_path):
    import subprocess
    import sys
    with in_process(tmp_path / "d") as server:
        MemStoreClient(server.target).create_table("t", 4, 2)
        def run(*args):
            return subprocess.run([sys.executable, "-m", "memstore", *args, "--target", server.target],
                                  capture_output=True, text=True, check=False)
        tagged = run("snapshot", "t", "--tag", "ck1")
        assert tagged.returncode == 0 and "checkpoints/t/" in tagged.stdout, tagged.stderr
        restored = run("restore", "t", "--tag", "ck1")
        assert restored.returncode == 0 and "ck1" in restored.stdout, restored.stderr
        missing = run("restore", "t", "--tag", "nope")
        assert missing.returncode == 1 and "no checkpoint 'nope'" in missing.stderr


@pytest.mark.parametrize("sparse", [True, False])
def test_rowwise_adam_and_the_servers_adam_agree_on_zero_gradient_rows(tmp_path, sparse):
    """Rows 1 and 3 are read but get an exactly zero gradient: neither side steps them."""
    from engram_client.optim import RowwiseAdam
    ids = torch.tensor([0, 1, 2, 3])
    grads = torch.tensor([[1.0, -2.0], [0.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    weight = torch.nn.Parameter(torch.zeros(4, 2))
    optimizer = RowwiseAdam([weight], lr=0.1)
    with in_process(tmp_path / "d") as server:
        client = MemStoreClient(server.target)
        client.create_table("t", 4, 2, init="zeros", optimizer="adam", lr=0.1)
        for step in range(3):
            weight.grad = (torch.sparse_coo_tensor(ids[None], grads, (4, 2)) if sparse
                           else torch.zeros(4, 2).index_add_(0, ids, grads))
            optimizer.step()
            client.update("t", ids.numpy(), grads.numpy())
            # a later step moves the zero rows too, and their step counts must still agree
            grads = torch.tensor([[1.0, -2.0], [0.3, 0.0], [0.5, 0.5], [0.0, 0.0]])
        np.testing.assert_allclose(client.lookup("t", np.arange(4)), weight.detach().numpy(), rtol=1e-5, atol=1e-7)
        client.close()


@pytest.mark.parametrize("backend", ["ram", "lmdb"])
def test_a_lookup_racing_drop_and_create_never_mislabels_rows(tmp_path, backend):
    from memstore.backends import open_backend
    from memstore.errors import NotFound
    store = Store(open_backend(backend, tmp_path))
    store.create_table(TableSpec("t", 8, 2))
    spec, blocks = store.lookup_blocks("t", np.arange(4), 1 << 20)  # validated, not yet gathered
    store.drop_table("t")
    store.create_table(TableSpec("t", 8, 16))
    try:
        rows = np.concatenate(list(blocks))
    except NotFound:
        pass  # the table it was asked about is gone: an error, never rows of the new one
    else:
        assert rows.shape == (4, spec.dim) == (4, 2)
    store.backend.close()


@pytest.mark.parametrize("backend", ["ram", "lmdb"])
def test_a_drop_cut_short_by_a_crash_stays_dropped(tmp_path, backend):
    """The crash comes right after the drop started (its tombstone is written, nothing deleted):
    the next start must finish it, not restore the table from what is left."""
    from memstore.backends import open_backend
    from memstore.backends.common import Tombstones
    store = Store(open_backend(backend, tmp_path))
    store.create_table(TableSpec("t", 8, 2))
    store.update("t", np.array([1]), np.ones((1, 2), np.float32), "", 0)
    store.snapshot("t")
    store.snapshot("t", tag="ck")
    Tombstones(tmp_path).mark("t")
    store.backend.close()
    again = open_backend(backend, tmp_path)
    assert again.tables() == [] and not (tmp_path / "dropping" / "t").exists()
    again.close()


def test_ram_tables_are_admitted_only_while_their_dense_size_fits_in_memory(tmp_path):
    """Issue 12's reproduction: two tables of 60 % of RAM each were both accepted; the first
    lookups of the second would have got the daemon OOM-killed."""
    from memstore.errors import ResourceExhausted
    from memstore.server import usable_memory_bytes
    rows = int(0.6 * usable_memory_bytes() / (64 * 4 + 1))  # fp32 dim 64, sgd: 257 dense bytes per row
    with in_process(tmp_path / "d") as server:  # default config: ram_max_bytes = auto
        client = MemStoreClient(server.target)
        client.create_table("first", rows, 64)
        with pytest.raises(ResourceExhausted, match=r"GiB of RAM .* are left"):
            client.create_table("second", rows, 64)
        assert [t.spec.name for t in client.list_tables()] == ["first"]
        client.close()


def test_a_data_dir_refuses_another_backend_or_layout(tmp_path):
    """Issue 12's reproduction: restarted without --backend lmdb, the server served a stale RAM
    view of an LMDB data dir, and a trainer would have created a fresh table there."""
    from memstore.config import ConfigError
    with in_process(tmp_path / "d", "lmdb") as server:
        MemStoreClient(server.target).create_table("t", 4, 2)
    for backend, layout in (("ram", {}), ("lmdb", {"shard_index": "1", "shard_count": 2})):
        with pytest.raises(ConfigError, match="holds a lmdb memstore, shard 0 of 1"):
            in_process(tmp_path / "d", backend, **layout).start()
    with in_process(tmp_path / "d", "lmdb") as server:  # the right settings still work
        assert [t.spec.name for t in MemStoreClient(server.target).list_tables()] == ["t"]


def test_a_ram_update_failing_in_one_part_changes_nothing(tmp_path, monkeypatch):
    """Issue 12's reproduction: a 40k-row update is stepped in parts on several threads; one part
    running out of memory left the other parts written, and the retry applied them twice."""
    from memstore.backends import ram
    backend = RamBackend(tmp_path)
    store = Store(backend)
    store.create_table(TableSpec("t", 50_000, 4, optimizer=ram.optimizers.OptimizerSpec("sgd", 1.0)))
    ids, grads = np.arange(40_000), np.ones((40_000, 4), np.float32)
    before = store.lookup("t", ids).copy()
    real_step, calls = ram.optimizers.step, itertools.count()

    def failing_step(opt, rows, state, part_grads, lr=None):
        if next(calls) == 1:  # the second part stepped, whichever it is
            raise MemoryError("simulated: one part runs out of memory")
        return real_step(opt, rows, state, part_grads, lr)

    monkeypatch.setattr(ram.optimizers, "step", failing_step)
    if ram._parts(len(ids)) < 2:
        pytest.skip("one apply thread on this machine: the update is not split")
    with pytest.raises(MemoryError):
        store.update("t", ids, grads, "c", 1)
    np.testing.assert_array_equal(store.lookup("t", ids), before)          # nothing of it written
    monkeypatch.setattr(ram.optimizers, "step", real_step)
    assert store.update("t", ids, grads, "c", 1).applied                    # the retry applies it once
    np.testing.assert_array_equal(store.lookup("t", ids), before - 1)
    backend.close()


def test_snapshots_order_by_creation_not_by_the_clock(tmp_path):
    """Issue 12's reproduction: with the clock stepped back, "sorts last" was no longer "newest"."""
    from memstore.snapshot import list_snapshots, prune_snapshots
    backend = RamBackend(tmp_path, keep_snapshots=2)
    store = Store(backend)
    store.create_table(TableSpec("t", 4, 2, init=InitSpec("zeros")))
    table_dir = tmp_path / "snapshots" / "t"
    for value in (1.0, 2.0):
        store.update("t", np.array([0]), np.full((1, 2), value, np.float32), "", 0)
        store.snapshot("t")
    newest = list_snapshots(table_dir)[-1]
    newest.rename(table_dir / f"{newest.name.split('-')[0]}-19700101T000000.000000Z")  # its clock was behind
    prune_snapshots(table_dir, 1)
    backend.close()
    restored = RamBackend(tmp_path)
    assert restored.get("t").lookup(np.array([0]))[0, 0] == pytest.approx(-3.0 * 0.01)  # sgd lr 0.01: both updates
    restored.close()


def test_an_update_whose_deadline_expired_is_applied_once_when_resent(tmp_path):
    """The server may still apply an Update after the client's deadline expired; the re-sent
    step is then acknowledged, not applied again (and if it was not applied, the re-send is)."""
    import time

    from memstore.errors import MemStoreError
    with in_process(tmp_path / "d") as server:
        client = MemStoreClient(server.target, timeout_s=0.005, retry_timeout_s=0)
        MemStoreClient(server.target).create_table("t", 300_000, 16, init="zeros", optimizer="sgd", lr=1.0)
        ids, grads = np.arange(300_000), np.ones((300_000, 16), np.float32)
        with pytest.raises(MemStoreError, match="(?i)deadline.exceeded"):
            client.update("t", ids, grads, step=0)
        time.sleep(1.0)  # whatever the server was still doing with it has finished
        client.timeout_s = 60
        client.update("t", ids, grads, step=0)
        rows = MemStoreClient(server.target).lookup("t", np.array([0, 299_999]))
        np.testing.assert_array_equal(rows, -np.ones((2, 16)))
        client.close()



@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_server_reflection_answers_v1_and_v1alpha(tmp_path, version):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2
    with in_process(tmp_path / "d") as server, grpc.insecure_channel(server.target) as channel:
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        answer = next(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in answer.list_services_response.service}
    assert {"memstore.v1.MemStore", "grpc.reflection.v1.ServerReflection"} <= names


def test_a_data_dir_from_an_older_version_is_judged_by_its_contents(tmp_path):
    """No identity record yet: LMDB tables are not opened as RAM, and a refused start does not
    stamp the dir with its wrong settings (the right start still works)."""
    from memstore.config import ConfigError
    from memstore.server import DATA_DIR_IDENTITY
    with in_process(tmp_path / "d", "lmdb") as server:
        MemStoreClient(server.target).create_table("t", 4, 2)
    (tmp_path / "d" / DATA_DIR_IDENTITY).unlink()  # as an older version left it
    with pytest.raises(ConfigError, match="holds LMDB tables"):
        in_process(tmp_path / "d", "ram").start()
    with pytest.raises(ConfigError, match="created as shard 0 of 1"):
        in_process(tmp_path / "d", "lmdb", shard_index="1", shard_count=2).start()
    assert not (tmp_path / "d" / DATA_DIR_IDENTITY).exists()
    with in_process(tmp_path / "d", "lmdb") as server:
        assert [t.spec.name for t in MemStoreClient(server.target).list_tables()] == ["t"]
    assert (tmp_path / "d" / DATA_DIR_IDENTITY).exists()
