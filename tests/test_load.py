"""Load: 32 concurrent clients mixing lookups and updates against one `memstore serve`.

The promise (docs/guarantees.md, "Load"): under sustained overload (32 clients, at most 8 RPCs
admitted at once) the only error is the designed RESOURCE_EXHAUSTED back-pressure, which
MemStoreClient retries, so its callers see no error at all; health checks still answer; every
acknowledged update is applied exactly once; the server's memory stays flat. p50/p99 latencies
are printed.

28 clients are MemStoreClients; 4 use raw stubs and record every status they get (only OK and
RESOURCE_EXHAUSTED are allowed, and a refused update must not be applied). All updates are
all-ones gradients with sgd, lr=1, zero init: a row ends at -(updates acknowledged for it).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram_client.memstore_client import MemStoreClient
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pb_grpc
from tests.servers import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

DURATION_S, CLIENTS, RAW_CLIENTS, MAX_CONCURRENT = 30.0, 32, 4, 8
ROWS, DIM, SEED = 200_000, 64, 0
LOOKUP_SHARE = 0.7


@dataclass
class Worker:
    """One client: a loop of lookups and updates until the deadline, with its own channel."""
    index: int
    target: str
    deadline: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(ROWS, np.int64))  # acknowledged updates per row
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"lookup": [], "update": []})
    codes: Counter = field(default_factory=Counter)
    error: BaseException | None = None

    @property
    def raw(self) -> bool:
        return self.index < RAW_CLIENTS

    def run(self) -> None:
        rng = np.random.default_rng([SEED, self.index])
        try:
            if self.raw:
                with grpc.insecure_channel(self.target) as channel:
                    self._loop(rng, raw=pb_grpc.MemStoreStub(channel))
            else:
                with MemStoreClient(self.target, retry_timeout_s=60, client_id=f"load-{self.index}") as client:
                    self._loop(rng, client=client)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _loop(self, rng: np.random.Generator, client: MemStoreClient | None = None, raw=None) -> None:
        seq = 0
        while time.monotonic() < self.deadline:
            started = time.perf_counter()
            if rng.random() < LOOKUP_SHARE:
                kind, ids = "lookup", rng.integers(0, ROWS, size=int(rng.integers(256, 4096)))
                rows = client.lookup("load", ids) if client else self._raw_lookup(raw, ids)
                assert rows is None or rows.shape == (len(ids), DIM)
            else:
                kind, ids, seq = "update", np.sort(rng.choice(ROWS, 512, replace=False)), seq + 1
                if client:  # returns once acknowledged: applied now, or before if a retry got there first
                    client.update("load", ids, np.ones((len(ids), DIM), np.float32))
                    self.counts[ids] += 1
                elif self._raw_update(raw, ids, seq):
                    self.counts[ids] += 1
            self.latencies[kind].append(time.perf_counter() - started)

    def _raw_lookup(self, stub, ids: np.ndarray) -> np.ndarray | None:
        try:
            chunks = list(stub.Lookup(pb.LookupRequest(table="load", ids=ids.astype("<i8").tobytes()), timeout=60))
        except grpc.RpcError as exc:
            self.codes[exc.code().name] += 1
            return None
        self.codes["OK"] += 1
        return np.frombuffer(b"".join(c.rows for c in chunks), "<f4").reshape(-1, DIM)

    def _raw_update(self, stub, ids: np.ndarray, seq: int) -> bool:
        """One delivery, not retried: a refused seq is simply skipped (seqs need only increase)."""
        chunk = pb.UpdateChunk(table="load", client_id=f"raw-{self.index}", seq=seq, total_rows=len(ids),
                               ids=ids.astype("<i8").tobytes(), grads=np.ones((len(ids), DIM), "<f4").tobytes())
        try:
            stub.Update(iter([chunk]), timeout=60)
        except grpc.RpcError as exc:
            self.codes[exc.code().name] += 1
            return False
        self.codes["OK"] += 1
        return True


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_32_clients_under_back_pressure(tmp_path, capsys):
    with ServeProcess(tmp_path / "data", "ram", "--max-concurrent-requests", str(MAX_CONCURRENT)) as srv:
        with MemStoreClient(srv.target) as client:
            client.create_table("load", ROWS, DIM, init="zeros", optimizer="sgd", lr=1.0)
            client.update("load", np.arange(ROWS), np.zeros((ROWS, DIM), np.float32))  # materialize every row
        deadline = time.monotonic() + DURATION_S
        workers = [Worker(i, srv.target, deadline) for i in range(CLIENTS)]
        threads = [threading.Thread(target=w.run) for w in workers]
        probes, rss = [], []
        for t in threads:
            t.start()
        with grpc.insecure_channel(srv.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:  # health probes and memory samples while the load runs
                started = time.perf_counter()
                reply = health.Check(health_pb2.HealthCheckRequest(service="memstore.v1.MemStore"), timeout=5)
                probes.append((reply.status, time.perf_counter() - started))
                rss.append(rss_bytes(srv.proc.pid))
                time.sleep(0.5)
        for t in threads:
            t.join(120)
        with MemStoreClient(srv.target) as client:
            final = client.lookup("load", np.arange(ROWS))
        srv.stop()

    errors = [w.error for w in workers if w.error]
    assert not errors, errors[:3]
    codes = sum((w.codes for w in workers), Counter())
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["RESOURCE_EXHAUSTED"] > 0, f"no back-pressure was exercised: {codes}"
    assert all(status == health_pb2.HealthCheckResponse.SERVING for status, _ in probes)
    expected = sum(w.counts for w in workers)
    np.testing.assert_array_equal(final[:, 0], -expected)  # each acknowledged update once, refused ones never
    np.testing.assert_array_equal(final, np.repeat(final[:, :1], DIM, 1))
    third = len(rss) // 3  # the first third warms up (arenas, caches); later thirds must not grow
    assert max(rss[2 * third:]) <= max(rss[third:2 * third]) * 1.10 + (16 << 20), [r >> 20 for r in rss]

    with capsys.disabled():
        print(f"\nload: {CLIENTS} clients for {DURATION_S:.0f}s, at most {MAX_CONCURRENT} RPCs admitted; "
              f"raw-stub statuses {dict(codes)}; server RSS {min(rss) >> 20}-{max(rss) >> 20} MiB; "
              f"health probe max {max(p for _, p in probes) * 1e3:.0f} ms")
        for kind in ("lookup", "update"):
            ms = np.array([x for w in workers if not w.raw for x in w.latencies[kind]]) * 1e3
            print(f"  {kind:6} (MemStoreClient, retries included): {len(ms)} calls, "
                  f"p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms")
