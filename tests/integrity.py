"""What the reliability tests (load, crash, fuzz, resources, security) share: a checksum of what
a server holds, the status of a raw gRPC call, and the adagrad trajectory the crash test checks."""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram_client.memstore_client import MemStoreClient
from memstore import optimizers
from memstore.spec import OptimizerSpec

OK = grpc.StatusCode.OK


def server_checksum(client: MemStoreClient, *, max_rows: int = 100_000) -> str:
    """blake2b of every table's spec, applied-update count and all its rows (this shard's).

    Reads every row, so it is for the small tables of tests. Not included: materialized-row
    counts (a RAM lookup may store the init rows it computed) and optimizer state, which is not
    visible over the wire (rows and state change together; the crash test reads state through
    snapshots)."""
    h = hashlib.blake2b(digest_size=16)
    for info in sorted(client.list_tables(), key=lambda t: t.spec.name):
        spec = info.spec
        assert spec.num_rows <= max_rows, f"table {spec.name} is too large to checksum"
        h.update(repr((spec, info.updates)).encode())
        ids = np.arange(spec.shard_index, spec.num_rows, spec.shard_count, dtype=np.int64)
        h.update(client.lookup(spec.name, ids).tobytes())
    return h.hexdigest()


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a raw stub call; streaming replies are drained."""
    try:
        reply = call()
        if hasattr(reply, "__next__"):
            for _ in reply:
                pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def is_serving(channel: grpc.Channel, timeout_s: float = 5.0, service: str = "") -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def adagrad_after_ones(opt: OptimizerSpec, dim: int, max_steps: int, start: float = 0.0) -> np.ndarray:
    """Row value after k = 0..max_steps adagrad steps with an all-ones gradient → float32
    [max_steps + 1, dim], computed by the server's own optimizer code step by step (so equal
    bit for bit). All-ones gradients make the result independent of which client sent them."""
    row = np.full((1, dim), start, np.float32)
    state = optimizers.initial_state(opt, 1, dim)
    out = [row[0].copy()]
    ones = np.ones((1, dim), np.float32)
    for _ in range(max_steps):
        optimizers.step(opt, row, state, ones)
        out.append(row[0].copy())
    return np.stack(out)
