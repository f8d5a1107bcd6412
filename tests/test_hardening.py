"""Regression tests for defects an outside review found (issue 12), each reproduced first."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from engram_client import MemStoreClient, ShardedClient
from engram_client.remote import MemStoreTables
from memstore.backends.ram import RamBackend
from memstore.dtypes import from_float32, to_float32
from memstore.errors import FailedPrecondition, InvalidArgument
from memstore.spec import TableSpec
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


def test_close_lets_pending_async_lookups_finish(tmp_path):
    with in_process(tmp_path / "d") as server:
        client = MemStoreClient(server.target, max_ids_per_call=1 << 12)
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
