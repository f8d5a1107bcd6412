"""Retries: a duplicate Update delivery (same client_id, seq) is acknowledged and never applied
again, however deliveries race; the dedup memory is bounded and survives a restart.

Already proven elsewhere (docs/guarantees.md, "Retries"): one retried delivery in sequence
(tests/test_server.py::test_retried_update_is_acknowledged_not_reapplied), the LMDB bound with
LRU eviction (tests/test_backends.py::test_lmdb_dedup_memory_is_bounded), dedup surviving a
backend reopen (tests/test_backends.py::test_restart_restores_rows_state_and_dedup) and SIGKILL
(tests/test_crash.py).
"""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from engram_client.memstore_client import MemStoreClient
from memstore.backends.common import DedupMemory
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pb_grpc
from tests.servers import ServeProcess, in_process

ROWS, DIM = 256, 4


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.MemStoreStub(channel)


def deliver(stub: pb_grpc.MemStoreStub, client_id: str, seq: int, ids: np.ndarray, table: str = "t") -> bool:
    """One delivery of update (client_id, seq): all-ones gradients for `ids`; True if applied."""
    chunk = pb.UpdateChunk(table=table, client_id=client_id, seq=seq, total_rows=len(ids),
                           ids=ids.astype("<i8").tobytes(), grads=np.ones((len(ids), DIM), "<f4").tobytes())
    return stub.Update(iter([chunk]), timeout=30).applied


def payload(client: int, seq: int) -> np.ndarray:
    """The rows of update (client, seq): the same in every delivery of it."""
    return np.random.default_rng([client, seq]).choice(ROWS, 8, replace=False)


def test_racing_duplicate_deliveries_apply_each_update_once(server, client):
    """Per client, two senders race through the same seqs (an original and its retry), and each
    also re-delivers stale seqs at random. Every seq is applied by exactly one delivery; with
    sgd, lr=1 and zero init a row ends at -(number of updates touching it)."""
    clients, seqs = 4, 40
    client.create_table("t", ROWS, DIM, init="zeros", optimizer="sgd", lr=1.0)
    applied: dict[tuple[int, int], list[bool]] = {(c, s): [] for c in range(clients) for s in range(1, seqs + 1)}
    lock = threading.Lock()

    def sender(c: int, sender_id: int) -> None:
        rng = np.random.default_rng([c, sender_id])
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.MemStoreStub(channel)
            for seq in range(1, seqs + 1):
                stale = [int(s) for s in rng.integers(1, seq, size=rng.integers(0, 2))] if seq > 1 else []
                for s in [seq, *stale]:
                    result = deliver(stub, f"client-{c}", s, payload(c, s))
                    with lock:
                        applied[(c, s)].append(result)

    threads = [threading.Thread(target=sender, args=(c, i)) for c in range(clients) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results.count(True) == 1 for results in applied.values()), \
        {k: v for k, v in applied.items() if v.count(True) != 1}
    expected = np.zeros(ROWS)
    for c, s in applied:
        expected[payload(c, s)] += 1
    np.testing.assert_array_equal(client.lookup("t", np.arange(ROWS)), -np.repeat(expected[:, None], DIM, 1))
    deliveries = sum(len(v) for v in applied.values())
    assert client.stats().counters["duplicate_updates"] == deliveries - len(applied)


def test_a_late_older_seq_is_not_applied(client, stub):
    """seq orders a client's updates: once seq 5 is applied, a late seq 3 counts as a retry.
    (MemStoreClient sends each client's updates from one thread, in seq order.)"""
    client.create_table("t", ROWS, DIM, init="zeros", lr=1.0)
    assert deliver(stub, "c", 5, np.array([1]))
    assert not deliver(stub, "c", 3, np.array([2]))
    np.testing.assert_array_equal(client.lookup("t", [1, 2])[:, 0], [-1, 0])


def test_dedup_is_per_table_and_per_client(client, stub):
    for table in ("t", "u"):
        client.create_table(table, ROWS, DIM, init="zeros", lr=1.0)
    assert deliver(stub, "c", 1, np.array([1]), table="t")
    assert deliver(stub, "c", 1, np.array([1]), table="u")  # same (client, seq), other table
    assert deliver(stub, "d", 1, np.array([1]), table="t")  # same seq, other client
    assert not deliver(stub, "c", 1, np.array([1]), table="u")
    np.testing.assert_array_equal(client.lookup("t", [1])[0, 0], -2)


def test_updates_without_client_id_are_never_deduplicated(client, stub):
    client.create_table("t", ROWS, DIM, init="zeros", lr=1.0)
    assert deliver(stub, "", 0, np.array([1])) and deliver(stub, "", 0, np.array([1]))
    np.testing.assert_array_equal(client.lookup("t", [1])[0, 0], -2)


def test_dedup_memory_is_bounded_least_recently_seen_first():
    """The RAM backend's memory (the LMDB one: tests/test_backends.py::test_lmdb_dedup_memory_is_bounded)."""
    memory = DedupMemory(max_clients=3)
    for seq, client_id in enumerate(["a", "b", "c", "a", "d"], 1):  # "b" is the least recently seen
        memory.record(client_id, seq)
    assert list(memory.to_dict()) == ["c", "a", "d"]
    assert memory.is_duplicate("a", 4) and not memory.is_duplicate("b", 1)  # "b" forgotten


@pytest.mark.parametrize("backend", ["ram", "lmdb"])
def test_dedup_survives_a_graceful_restart(tmp_path, backend):
    for restart in range(2):
        with in_process(tmp_path / "data", backend) as srv, MemStoreClient(srv.target) as client, \
                grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.MemStoreStub(channel)
            if restart == 0:
                client.create_table("t", ROWS, DIM, init="zeros", lr=1.0)
                assert deliver(stub, "c", 1, np.array([1])) and deliver(stub, "c", 2, np.array([1]))
            else:
                assert not deliver(stub, "c", 2, np.array([1])) and not deliver(stub, "c", 1, np.array([1]))
                assert deliver(stub, "c", 3, np.array([1]))
                np.testing.assert_array_equal(client.lookup("t", [1])[0, 0], -3)


@pytest.mark.subprocess
def test_ram_crash_forgets_rows_and_dedup_together(tmp_path):
    """RAM keeps what its last snapshot holds: after SIGKILL, updates since then are lost with
    their dedup records, so a retry of a lost update is applied (once), never skipped."""
    srv = ServeProcess(tmp_path / "data", "ram").start()
    with grpc.insecure_channel(srv.target) as channel, MemStoreClient(srv.target) as client:
        client.create_table("t", ROWS, DIM, init="zeros", lr=1.0)
        stub = pb_grpc.MemStoreStub(channel)
        assert deliver(stub, "c", 1, np.array([1]))
        client.snapshot("t")
        assert deliver(stub, "c", 2, np.array([1]))  # acknowledged, not in a snapshot
    srv.kill()
    srv.restart()
    with grpc.insecure_channel(srv.target) as channel, MemStoreClient(srv.target) as client:
        stub = pb_grpc.MemStoreStub(channel)
        np.testing.assert_array_equal(client.lookup("t", [1])[0, 0], -1)
        assert not deliver(stub, "c", 1, np.array([1]))  # in the snapshot: a duplicate
        assert deliver(stub, "c", 2, np.array([1]))      # lost with the crash: applied again, once
        assert not deliver(stub, "c", 2, np.array([1]))
        np.testing.assert_array_equal(client.lookup("t", [1])[0, 0], -2)
    srv.stop()
