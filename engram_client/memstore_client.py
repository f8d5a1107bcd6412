"""Python client for one memstore server: numpy in, numpy out.

- Lookups larger than `max_ids_per_call` are split and sent `parallel_calls` at a time (two
  calls in flight is where loopback gRPC peaks, see LIMITS.md); rows stream back in ~1 MiB chunks.
- Updates sum duplicate ids first, stream gradients in ~1 MiB chunks and carry
  (client_id, seq): a retried update is acknowledged by the server, never applied twice. Updates
  of one client leave in the order they were made (one sender thread), so seqs only increase.
- UNAVAILABLE (server restarting) and gRPC's own RESOURCE_EXHAUSTED (concurrency back-pressure)
  are retried with exponential backoff until `retry_timeout_s`; every other error raises a
  `memstore.errors.MemStoreError` subclass carrying the status code.
- bfloat16 tables come back as uint16 bit patterns (numpy has no bf16):
  `torch.from_numpy(rows).view(torch.bfloat16)`.
"""
from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Self, TypeVar

import grpc
import numpy as np

from memstore.dtypes import storage_dtype
from memstore.errors import MemStoreError, from_status
from memstore.interceptors import ERROR_TRAILER
from memstore.servicer import CHUNK_BYTES, PB_TO_DTYPE, spec_from_pb, spec_to_pb
from memstore.spec import InitSpec, OptimizerSpec, TableSpec
from memstore.store import sum_duplicates
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pb_grpc
from memstore.wire import decode_lookup_chunk, encode_update_chunk

T = TypeVar("T")
_MESSAGE_TOO_LARGE = ("Received message larger than max", "Sent message larger than max")  # gRPC's, final
# Below this many ids per call, splitting a lookup costs more than it overlaps: measured with
# client and server on the same 2 cores, one 64k call (11 ms) beat two 32k calls (12.6 ms).
MIN_IDS_PER_CALL = 1 << 16
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class TlsConfig:
    """PEM files: `ca_cert` verifies the server; `client_cert`/`client_key` for mutual TLS."""
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None  # override the name checked against the certificate

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: Path(p).read_bytes() if p else None
        return grpc.ssl_channel_credentials(read(self.ca_cert), read(self.client_key), read(self.client_cert))


@dataclass(frozen=True)
class TableInfo:
    spec: TableSpec            # num_rows is the global table size; shard fields say which shard answered
    rows_materialized: int
    bytes_used: int
    lookups: int
    updates: int


def _info(msg: pb.TableInfo) -> TableInfo:
    spec = spec_from_pb(msg.spec)
    if msg.shard_count > 1:
        spec = replace(spec, shard_index=msg.shard_index, shard_count=msg.shard_count)
    return TableInfo(spec, msg.rows_materialized, msg.bytes_used, msg.lookups, msg.updates)


class MemStoreClient:
    """A connection to one memstore server.

    Args:
        target: "host:port" (or any gRPC target).
        token: bearer token, when the server runs with --token.
        tls: a TlsConfig (CA, client cert/key for mutual TLS), True for the system roots, or None.
        timeout_s: deadline of each call; retry_timeout_s: how long UNAVAILABLE and back-pressure
            are retried before the error surfaces (0: never retry).
        client_id: identifies this client's updates for exactly-once delivery; leave it to the
            default (a fresh random id) unless you know you need to pin it.
        max_ids_per_call, parallel_calls: lookups larger than max_ids_per_call are split, and large
            ones go as up to parallel_calls calls in flight.
    """

    def __init__(self, target: str, *, token: str | None = None, tls: TlsConfig | bool | None = None,
                 timeout_s: float = 60.0, retry_timeout_s: float = 60.0, client_id: str | None = None,
                 max_ids_per_call: int = 1 << 17, parallel_calls: int = 2):
        self.target = target
        self.timeout_s = timeout_s
        self.retry_timeout_s = retry_timeout_s
        self.client_id = client_id or uuid.uuid4().hex
        self.max_ids_per_call = max_ids_per_call
        self.parallel_calls = parallel_calls
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", 8 << 20)]
        if isinstance(tls, TlsConfig) and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        if tls:
            creds = tls.credentials() if isinstance(tls, TlsConfig) else grpc.ssl_channel_credentials()
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.MemStoreStub(self._channel)
        # Lookup answers are read without building protobuf objects (see memstore.wire).
        self._lookup_raw = self._channel.unary_stream(
            "/memstore.v1.MemStore/Lookup", request_serializer=pb.LookupRequest.SerializeToString,
            response_deserializer=None)
        self._update_raw = self._channel.stream_unary(
            "/memstore.v1.MemStore/Update", request_serializer=None,
            response_deserializer=pb.UpdateResponse.FromString)
        self._lookup_pool = ThreadPoolExecutor(parallel_calls, thread_name_prefix="memstore-lookup")
        self._async_pool = ThreadPoolExecutor(4, thread_name_prefix="memstore-async")
        self._update_sender = ThreadPoolExecutor(1, thread_name_prefix="memstore-update")  # keeps order
        self._seqs: dict[str, Iterator[int]] = {}
        self._row_format: dict[str, tuple[int, np.dtype]] = {}  # table → (dim, storage dtype), learnt
        self._seq_lock = threading.Lock()

    # ---- tables -------------------------------------------------------------------------------

    def create_table(self, name: str, num_rows: int, dim: int, *, dtype: str = "float32", init: str = "normal",
                     init_scale: float = 0.02, seed: int = 0, optimizer: str = "sgd", lr: float = 0.01,
                     if_not_exists: bool = False, **optimizer_args: float) -> TableInfo:
        spec = TableSpec(name, num_rows, dim, dtype, InitSpec(init, init_scale, seed),
                         OptimizerSpec(optimizer, lr, optimizer_args))
        request = pb.CreateTableRequest(spec=spec_to_pb(spec), if_not_exists=if_not_exists)
        return _info(self._call(self._stub.CreateTable, request))

    def describe_table(self, name: str) -> TableInfo:
        return _info(self._call(self._stub.DescribeTable, pb.DescribeTableRequest(name=name)))

    def list_tables(self) -> list[TableInfo]:
        return [_info(t) for t in self._call(self._stub.ListTables, pb.ListTablesRequest()).tables]

    def drop_table(self, name: str) -> None:
        self._call(self._stub.DropTable, pb.DropTableRequest(name=name))

    def snapshot(self, name: str = "") -> list[str]:
        return list(self._call(self._stub.Snapshot, pb.SnapshotRequest(table=name)).paths)

    def stats(self) -> pb.StatsResponse:
        return self._call(self._stub.Stats, pb.StatsRequest())

    # ---- lookups ------------------------------------------------------------------------------

    def lookup(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows [len(ids), dim] in the table's storage dtype, in the order of `ids`."""
        ids = np.ascontiguousarray(ids, dtype="<i8").reshape(-1)
        # Large batches go as `parallel_calls` calls at once: the server gathers one while it
        # streams the other (LIMITS.md: two calls in flight is where loopback gRPC peaks).
        parts = max(-(-len(ids) // self.max_ids_per_call), min(self.parallel_calls, len(ids) // MIN_IDS_PER_CALL))
        if parts <= 1:
            return self._lookup_part(name, ids)
        if name not in self._row_format:
            self._lookup_part(name, ids[:0])  # an empty lookup tells the row format, moving no rows
        dim, dtype = self._row_format[name]
        out = np.empty((len(ids), dim), dtype)
        bounds = np.linspace(0, len(ids), parts + 1).astype(int)
        try:
            list(self._lookup_pool.map(lambda b: self._lookup_part(name, ids[b[0]:b[1]], out[b[0]:b[1]]),
                                       itertools.pairwise(bounds)))  # each part streams into its slice
        except _RowFormatChanged:  # the table was dropped and re-created with other rows
            return self._lookup_part(name, ids)
        return out

    def lookup_async(self, name: str, ids: np.ndarray) -> Future:
        """`lookup` on a background thread; `.result()` gives the rows."""
        ids = np.array(ids, dtype="<i8").reshape(-1)  # copy: the caller may reuse its buffer
        return self._async_pool.submit(self.lookup, name, ids)

    def _lookup_part(self, name: str, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        request = pb.LookupRequest(table=name, ids=ids.tobytes())
        return self._retry(lambda: self._receive_rows(request, len(ids), out))

    def _receive_rows(self, request: pb.LookupRequest, n: int, out: np.ndarray | None) -> np.ndarray:
        try:
            for message in self._lookup_raw(request, timeout=self.timeout_s, metadata=self._metadata):
                payload, row_offset, dtype, dim = decode_lookup_chunk(message)
                row_format = (dim, storage_dtype(PB_TO_DTYPE[dtype]))
                self._row_format[request.table] = row_format
                if out is None:
                    out = np.empty((n, dim), dtype=row_format[1])
                elif (out.shape[1], out.dtype) != row_format:
                    raise _RowFormatChanged
                rows = np.frombuffer(payload, dtype=out.dtype).reshape(-1, dim)
                out[row_offset:row_offset + len(rows)] = rows
        except grpc.RpcError as exc:
            raise _as_error(exc) from None
        return out

    # ---- updates ------------------------------------------------------------------------------

    def update(self, name: str, ids: np.ndarray, grads: np.ndarray) -> bool:
        """One optimizer step on the server: duplicate ids are summed, then applied exactly once.
        Returns False when the server had already applied it (a retried delivery)."""
        return self.update_async(name, ids, grads).result()

    def update_async(self, name: str, ids: np.ndarray, grads: np.ndarray) -> Future:
        """Queue an update; updates of this client reach the server in call order."""
        ids = np.asarray(ids, dtype="<i8").reshape(-1)
        grads = np.asarray(grads, dtype="<f4")
        if grads.ndim != 2 or grads.shape[0] != len(ids):
            raise ValueError(f"grads must be [len(ids)={len(ids)}, dim], got {grads.shape}")
        summed_ids, summed = sum_duplicates(ids, grads)
        if summed_ids is ids:  # already sorted and unique: nothing was copied, but the caller may
            summed_ids, summed = ids.copy(), summed.copy()  # reuse its buffers before this is sent
        ids, grads = np.ascontiguousarray(summed_ids), np.ascontiguousarray(summed)  # sent as raw bytes
        return self._update_sender.submit(self._send_update, name, ids, grads)

    def _send_update(self, name: str, ids: np.ndarray, grads: np.ndarray) -> bool:
        applied = True
        for start in range(0, len(ids), self.max_ids_per_call):  # disjoint ids: one step per row still
            part = slice(start, start + self.max_ids_per_call)
            seq = self._next_seq(name)  # retries resend this seq: the server applies it once
            applied &= self._retry(partial(self._stream_update, name, seq, ids[part], grads[part]))
        return applied

    def _stream_update(self, name: str, seq: int, ids: np.ndarray, grads: np.ndarray) -> bool:
        rows_per_chunk = max(1, CHUNK_BYTES // (grads.shape[1] * 4 + 8))

        id_bytes, grad_bytes = memoryview(ids).cast("B"), memoryview(grads).cast("B")
        grad_row = grads.shape[1] * grads.itemsize

        def chunks() -> Iterator[bytes]:
            for start in range(0, max(len(ids), 1), rows_per_chunk):
                stop = min(len(ids), start + rows_per_chunk)
                header = ({"table": name, "client_id": self.client_id, "seq": seq, "total_rows": len(ids)}
                          if start == 0 else {})
                yield encode_update_chunk(id_bytes[start * 8:stop * 8],
                                          grad_bytes[start * grad_row:stop * grad_row], **header)
        try:
            return self._update_raw(chunks(), timeout=self.timeout_s, metadata=self._metadata).applied
        except grpc.RpcError as exc:
            raise _as_error(exc) from None

    def _next_seq(self, name: str) -> int:
        with self._seq_lock:
            return next(self._seqs.setdefault(name, itertools.count(1)))

    # ---- plumbing -----------------------------------------------------------------------------

    def _call(self, method: Callable, request):
        def once():
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise _as_error(exc) from None
        return self._retry(once)

    def _retry(self, attempt: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_timeout_s
        delay = 0.05
        while True:
            try:
                return attempt()
            except MemStoreError as exc:
                if not getattr(exc, "retryable", False) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def close(self) -> None:
        self._update_sender.shutdown(wait=True)
        self._lookup_pool.shutdown(wait=True)
        self._async_pool.shutdown(wait=True)
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _RowFormatChanged(Exception):
    """A table's rows no longer have the (dim, dtype) this client learnt for it."""


def _as_error(exc: grpc.RpcError) -> MemStoreError:
    """The project error for a failed call; `.retryable` marks transient failures."""
    code, details = exc.code(), exc.details() or ""
    trailers = dict(exc.trailing_metadata() or ())
    error = from_status(code, details)
    # UNAVAILABLE: server down or restarting. RESOURCE_EXHAUSTED without our trailer: gRPC's own
    # concurrency limit (back-pressure). Ours (e.g. request too large, map full) is final.
    error.retryable = (code in RETRYABLE and ERROR_TRAILER not in trailers
                       and not details.startswith(_MESSAGE_TOO_LARGE))
    return error

