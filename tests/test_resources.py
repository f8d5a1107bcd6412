"""Resources: a full LMDB map, a full disk, a request too large for memory or above the limits.

The promise (docs/guarantees.md, "Resources"): running out of map, disk or memory is a clear
RESOURCE_EXHAUSTED that the client does not retry; nothing is half-written, the server keeps
serving, and after a restart every acknowledged update is there. A request above the size
limits is refused from its first message, before the rest is read.

A full disk is simulated with RLIMIT_FSIZE on the running server (Linux `prlimit`): a file
write beyond the limit fails like one on a full disk (LMDB sees a short write, EIO; snapshots
see EFBIG), with no root or loop device needed.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from engram_client.memstore_client import MemStoreClient
from memstore.errors import ResourceExhausted
from memstore.snapshot import list_snapshots
from memstore.spec import OptimizerSpec
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pb_grpc
from tests.integrity import adagrad_after_ones, is_serving, status_of
from tests.servers import ServeProcess, in_process

needs_prlimit = pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit(2)")

ROWS, DIM, BATCH = 100_000, 64, 2000
ADAGRAD = OptimizerSpec("adagrad", lr=0.1)
AFTER = adagrad_after_ones(ADAGRAD, DIM, 4)  # (5, DIM): a row after 0..4 all-ones steps


def limit_file_size(srv: ServeProcess, max_bytes: int | None) -> None:
    """Cap (or uncap: None) the size any file of the running server may grow to."""
    soft = resource.RLIM_INFINITY if max_bytes is None else max_bytes
    resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))


def fill_until_refused(client: MemStoreClient, counts: np.ndarray, max_batches: int = 200) -> ResourceExhausted:
    """Update fresh batches of rows until the server refuses one; `counts` (rows → acknowledged
    updates) records the others. The refusal must be final: not retried for retry_timeout_s."""
    for batch in range(max_batches):
        ids = np.arange(batch * BATCH, (batch + 1) * BATCH)
        started = time.monotonic()
        try:
            client.update("t", ids, np.ones((BATCH, DIM), np.float32))
        except ResourceExhausted as exc:
            assert time.monotonic() - started < client.retry_timeout_s / 2, "a full map or disk was retried"
            return exc
        counts[ids] += 1
    raise AssertionError(f"{max_batches} batches of {BATCH} rows and never refused")


def assert_rows_match(client: MemStoreClient, counts: np.ndarray) -> None:
    """Every row holds exactly its acknowledged updates, none half-written."""
    np.testing.assert_array_equal(client.lookup("t", np.arange(ROWS)), AFTER[counts])


def start_lmdb(data_dir: Path, *flags: str) -> tuple[ServeProcess, MemStoreClient]:
    srv = ServeProcess(data_dir, "lmdb", *flags).start()
    client = MemStoreClient(srv.target, retry_timeout_s=20)
    return srv, client


def restart_and_check(srv: ServeProcess, counts: np.ndarray) -> None:
    """SIGKILL, start again: the data on disk holds every acknowledged update and works on."""
    srv.kill()
    srv.restart()
    with MemStoreClient(srv.target, retry_timeout_s=20) as client:
        assert_rows_match(client, counts)
        client.update("t", [ROWS - 1], np.ones((1, DIM), np.float32))
        counts[ROWS - 1] += 1
        assert_rows_match(client, counts)
    srv.stop()


@pytest.mark.subprocess
def test_lmdb_map_full_is_a_clear_error_and_corrupts_nothing(tmp_path):
    srv, client = start_lmdb(tmp_path / "data", "--lmdb-map-size", str(1 << 20), "--lmdb-max-map-size", str(4 << 20))
    counts = np.zeros(ROWS, np.int64)
    with client:
        client.create_table("t", ROWS, DIM, init="zeros", optimizer="adagrad", lr=0.1)
        refusal = fill_until_refused(client, counts)
        assert "map full at max_map_size" in str(refusal) and counts.sum() > 0
        assert_rows_match(client, counts)                          # the refused batch left no trace
        client.update("t", [0], np.ones((1, DIM), np.float32))     # small updates still fit
        counts[0] += 1
        assert_rows_match(client, counts)
    restart_and_check(srv, counts)


@needs_prlimit
@pytest.mark.subprocess
def test_lmdb_disk_full_is_a_clear_error_and_corrupts_nothing(tmp_path):
    srv, client = start_lmdb(tmp_path / "data", "--lmdb-map-size", str(64 << 20))
    counts = np.zeros(ROWS, np.int64)
    with client:
        client.create_table("t", ROWS, DIM, init="zeros", optimizer="adagrad", lr=0.1)
        limit_file_size(srv, 4 << 20)
        refusal = fill_until_refused(client, counts)
        assert "is the disk full?" in str(refusal) and counts.sum() > 0
        assert_rows_match(client, counts)
        assert is_serving(client._channel)
        limit_file_size(srv, None)                                 # space freed: writes work again
        ids = np.arange(ROWS - BATCH, ROWS)
        client.update("t", ids, np.ones((BATCH, DIM), np.float32))
        counts[ids] += 1
        assert_rows_match(client, counts)
    restart_and_check(srv, counts)


@needs_prlimit
@pytest.mark.subprocess
def test_ram_snapshot_on_a_full_disk_keeps_the_last_good_one(tmp_path):
    srv = ServeProcess(tmp_path / "data", "ram").start()
    counts = np.zeros(ROWS, np.int64)
    with MemStoreClient(srv.target, retry_timeout_s=20) as client:
        client.create_table("t", ROWS, DIM, init="zeros", optimizer="adagrad", lr=0.1)
        client.update("t", np.arange(100), np.ones((100, DIM), np.float32))
        counts[:100] += 1
        client.snapshot("t")                                       # the last good snapshot
        good = list_snapshots(tmp_path / "data" / "snapshots" / "t")
        client.update("t", np.arange(ROWS), np.ones((ROWS, DIM), np.float32))  # ~51 MB of rows + state
        limit_file_size(srv, 8 << 20)
        with pytest.raises(ResourceExhausted, match="out of disk space"):
            client.snapshot("t")
        table_dir = tmp_path / "data" / "snapshots" / "t"
        assert list_snapshots(table_dir) == good and not [p for p in table_dir.iterdir() if p.name.startswith(".")]
        assert_rows_match(client, counts + 1)                      # RAM still holds everything
    srv.kill()                                                     # a crash: RAM restarts from `good`
    srv.restart()
    with MemStoreClient(srv.target) as client:
        assert_rows_match(client, counts)
    srv.stop()


def test_requests_above_the_limits_are_refused_before_they_are_buffered(tmp_path):
    """An Update announcing too many rows is refused on its first chunk: the client's stream is
    not read further. A message above gRPC's 4 MiB receive limit is refused."""
    pulled = 0

    def chunks(total_rows: int, count: int):
        nonlocal pulled
        ids, grads = np.arange(1000, dtype="<i8").tobytes(), np.ones((1000, DIM), "<f4").tobytes()
        for i in range(count):
            pulled += 1
            header = {"table": "t", "client_id": "big", "seq": 1, "total_rows": total_rows} if i == 0 else {}
            yield pb.UpdateChunk(ids=ids, grads=grads, **header)

    with in_process(tmp_path / "data", max_rows_per_request=10_000) as srv, \
            MemStoreClient(srv.target) as client, grpc.insecure_channel(srv.target) as channel:
        client.create_table("t", ROWS, DIM)
        stub = pb_grpc.MemStoreStub(channel)
        code, details = status_of(lambda: stub.Update(chunks(1_000_000, 1000), timeout=30))  # 256 MB offered
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_rows_per_request=10000" in details
        # gRPC's flow-control window lets the client run a few chunks ahead; 1000 would be all of it
        assert pulled <= 20, f"the server read {pulled} chunks of a request it had refused"
        big_ids = np.zeros(600_000, "<i8").tobytes()                                       # one 4.8 MB message
        code, details = status_of(lambda: stub.Lookup(pb.LookupRequest(table="t", ids=big_ids), timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
        assert client.describe_table("t").updates == 0 and is_serving(channel)


@needs_prlimit
@pytest.mark.subprocess
def test_a_request_too_large_for_memory_is_refused(tmp_path):
    """100k ids of a 65536-wide table ask for 24 GiB of rows: RESOURCE_EXHAUSTED, and the server
    lives on. The address space is capped so that this holds on a machine of any size."""
    with ServeProcess(tmp_path / "data", "lmdb", "--lmdb-map-size", str(16 << 20),
                      "--max-request-bytes", str(1 << 40)) as srv, \
            MemStoreClient(srv.target, retry_timeout_s=5, parallel_calls=1, shared_memory="off") as client:  # one call
        client.create_table("wide", 10**9, 65536)
        vm_bytes = _vm_size(srv.proc.pid)
        resource.prlimit(srv.proc.pid, resource.RLIMIT_AS, (vm_bytes + (2 << 30), resource.RLIM_INFINITY))
        with pytest.raises(ResourceExhausted, match="not enough memory"):
            client.lookup("wide", np.arange(100_000))
        assert client.lookup("wide", np.arange(4)).shape == (4, 65536)


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/<pid>/status")
