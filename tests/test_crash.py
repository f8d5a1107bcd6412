"""Crash: SIGKILL an LMDB-backed `memstore serve` at random (seeded) moments under load.

The promise (docs/guarantees.md, "Crash"): every acknowledged update is applied exactly once,
and an update that was never acknowledged is either applied whole (rows, optimizer state and
its dedup record) or not at all.

How it is checked. Trainers send adagrad updates with all-ones gradients to distinct rows, so a
row's value and state depend only on how many updates touched it (not on their order): after
k updates, state == k in every element and the row equals k adagrad steps computed by the
server's own optimizer code, bit for bit. The trainers retry a failed delivery with the same
(client_id, seq), as MemStoreClient does, until it is acknowledged. The last kill is not
followed by a restart: the trainers give up on their in-flight update, which is then
unacknowledged. After the restart a snapshot (the portable format, with optimizer state and
the dedup memory) must show, per trainer, either its last acknowledged seq or the one after,
and every row must hold exactly the updates that this accounts for.

tests/test_serve_process.py::test_lmdb_survives_sigkill_with_every_acknowledged_update_applied_once
(sgd, one MemStoreClient) and tests/test_remote_training.py (a sharded training run) cover the
client's own retry loop; this test adds optimizer state, concurrent clients and in-flight losses.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from engram_client.memstore_client import MemStoreClient
from memstore.snapshot import read_snapshot
from memstore.spec import OptimizerSpec
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pb_grpc
from tests.integrity import adagrad_after_ones, server_checksum
from tests.servers import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

ROWS, DIM, ROWS_PER_UPDATE = 512, 8, 32
TRAINERS, KILLS, SEED = 4, 5, 8
ADAGRAD = OptimizerSpec("adagrad", lr=0.1)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class Trainer:
    """Sends updates seq = 1, 2, ... and retries each until acknowledged or told to give up."""
    index: int
    target: str
    give_up: threading.Event
    acked_counts: np.ndarray = field(default_factory=lambda: np.zeros(ROWS, np.int64))
    last_acked: int = 0
    in_flight: tuple[int, np.ndarray] | None = None  # (seq, ids) never acknowledged
    error: BaseException | None = None

    @property
    def client_id(self) -> str:
        return f"trainer-{self.index}"

    def run(self) -> None:
        rng = np.random.default_rng([SEED, self.index])
        options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]
        try:
            with grpc.insecure_channel(self.target, options=options) as channel:
                stub = pb_grpc.MemStoreStub(channel)
                while not self.give_up.is_set():
                    seq, ids = self.last_acked + 1, np.sort(rng.choice(ROWS, ROWS_PER_UPDATE, replace=False))
                    if not self._deliver(stub, seq, ids):
                        self.in_flight = (seq, ids)
                        return
                    self.acked_counts[ids] += 1
                    self.last_acked = seq
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _deliver(self, stub: pb_grpc.MemStoreStub, seq: int, ids: np.ndarray) -> bool:
        chunk = pb.UpdateChunk(table="t", client_id=self.client_id, seq=seq, total_rows=len(ids),
                               ids=ids.astype("<i8").tobytes(), grads=np.ones((len(ids), DIM), "<f4").tobytes())
        while True:
            try:
                stub.Update(iter([chunk]), timeout=2, wait_for_ready=True)
                return True  # applied now or before (a retry): acknowledged either way
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
            if self.give_up.is_set():
                return False
            time.sleep(0.02)


def test_sigkill_under_load_loses_nothing_acknowledged_and_half_applies_nothing(tmp_path):
    srv = ServeProcess(tmp_path / "data", "lmdb").start()  # lmdb_sync on: an ack means fsynced
    with MemStoreClient(srv.target) as client:
        client.create_table("t", ROWS, DIM, init="zeros", optimizer="adagrad", lr=ADAGRAD.lr)
    give_up = threading.Event()
    trainers = [Trainer(i, srv.target, give_up) for i in range(TRAINERS)]
    threads = [threading.Thread(target=t.run) for t in trainers]
    for t in threads:
        t.start()
    rng = np.random.default_rng(SEED)
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.2, 1.0))
        srv.kill()
        srv.restart()
    time.sleep(rng.uniform(0.2, 0.6))
    srv.kill()              # the last kill: in-flight updates are never acknowledged
    give_up.set()
    for t in threads:
        t.join(60)
    assert not [t.error for t in trainers if t.error], [t.error for t in trainers]
    acked = sum(t.last_acked for t in trainers)
    assert acked > 20 * KILLS, f"only {acked} updates were acknowledged: the test exercised little"

    srv.restart()
    with MemStoreClient(srv.target) as client:
        snap = read_snapshot(Path(client.snapshot("t")[0]))
        counts = _counts_accounted_for(trainers, snap.dedup)
        _assert_rows_and_state(snap, counts)
        np.testing.assert_array_equal(client.lookup("t", np.arange(ROWS)), adagrad_after_ones(
            ADAGRAD, DIM, int(counts.max()))[counts])
        _assert_redeliveries_are_duplicates(srv.target, trainers, snap.dedup, client)
    srv.stop()
    in_flight_applied = sum(snap.dedup.get(t.client_id, 0) > t.last_acked for t in trainers)
    print(f"\ncrash: {KILLS + 1} SIGKILLs, {acked} acknowledged updates, "
          f"{in_flight_applied}/{sum(t.in_flight is not None for t in trainers)} unacknowledged ones applied whole")


def _counts_accounted_for(trainers: list[Trainer], dedup: dict[str, int]) -> np.ndarray:
    """Updates per row: every acknowledged one, plus the in-flight ones the dedup memory says
    were applied. Anything else on the server would be a lost, doubled or stray update."""
    counts = np.zeros(ROWS, np.int64)
    for t in trainers:
        last_applied = dedup.get(t.client_id, 0)
        assert last_applied in (t.last_acked, t.last_acked + 1), (t.client_id, last_applied, t.last_acked)
        counts += t.acked_counts
        if last_applied == t.last_acked + 1:
            seq, ids = t.in_flight
            assert seq == last_applied
            counts[ids] += 1
    return counts


def _assert_rows_and_state(snap, counts: np.ndarray) -> None:
    """Rows and adagrad state moved together: state == k and row == k steps, for the same k."""
    touched = np.flatnonzero(counts)
    np.testing.assert_array_equal(snap.ids, touched)   # untouched rows were never written
    k = counts[touched]
    np.testing.assert_array_equal(snap.state, np.repeat(k[:, None].astype(np.float32), DIM, 1))
    np.testing.assert_array_equal(snap.rows, adagrad_after_ones(ADAGRAD, DIM, int(k.max()))[k])


def _assert_redeliveries_are_duplicates(target: str, trainers: list[Trainer], dedup: dict[str, int],
                                        client: MemStoreClient) -> None:
    """The dedup memory survived the SIGKILLs: re-sending applied seqs changes nothing."""
    before = server_checksum(client)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MemStoreStub(channel)
        for t in trainers:
            for seq in {1, dedup[t.client_id]}:
                chunk = pb.UpdateChunk(table="t", client_id=t.client_id, seq=seq, total_rows=1,
                                       ids=np.zeros(1, "<i8").tobytes(), grads=np.ones(DIM, "<f4").tobytes())
                assert not stub.Update(iter([chunk]), timeout=10).applied
    assert server_checksum(client) == before
