"""The plain Python client for one memstore server: numpy in, numpy out (no torch needed).

- Lookups larger than `max_ids_per_call` are split and sent `parallel_calls` at a time (two
  calls in flight is where loopback gRPC peaks, see LIMITS.md); rows stream back in ~1 MiB chunks.
- Updates sum duplicate ids first, stream gradients in ~1 MiB chunks and carry
  (client_id, seq): a retried update is acknowledged by the server, never applied twice. Updates
  of one client leave in the order they were made (one sender thread), so seqs only increase.
- UNAVAILABLE (server restarting) and gRPC's own RESOURCE_EXHAUSTED (concurrency back-pressure)
  are retried with exponential backoff until `retry_timeout_s`, with warnings (`memstore.connection`);
  a TLS mismatch fails at once; every other error raises a `memstore.errors.MemStoreError`
  subclass carrying the status code.
- The target and token default to `MEMSTORE_TARGET` and `MEMSTORE_TOKEN`, as in the CLI.
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
from functools import partial
from pathlib import Path
from typing import Self, TypeVar

import grpc
import numpy as np

from memstore import shm
from memstore.cluster import single_target, token_or_env
from memstore.connection import Retrying, TlsConfig
from memstore.connection import as_error as _as_error
from memstore.dtypes import storage_dtype
from memstore.errors import FailedPrecondition, MemStoreError
from memstore.protocol import (
    CHUNK_BYTES,
    PB_TO_DTYPE,
    TableInfo,
    as_row_grads,
    as_row_ids,
    spec_to_pb,
    sum_duplicates,
    table_info,
)
from memstore.same_host import LmdbView, SharedView, open_view
from memstore.spec import table_spec
from memstore.training import Job, StepOrder
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pb_grpc
from memstore.wire import decode_lookup_chunk, encode_update_chunk

T = TypeVar("T")
# Below this many ids per call, splitting a lookup costs more than it overlaps: measured with
# client and server on the same 2 cores, one 64k call (11 ms) beat two 32k calls (12.6 ms).
MIN_IDS_PER_CALL = 1 << 16
# A same-host gather of this many rows takes microseconds: `lookup_async` does it in the caller's
# thread, since a hand-off to a pool thread costs more and the two threads then contend for the
# GIL (decoding with entry prefetch measured 1.7x slower with the hand-off, bench decode --quick).
INLINE_GATHER_ROWS = 1 << 14


class MemStoreClient:
    """A connection to one memstore server.

    Args:
        target: "host:port" (or any gRPC target); None: `MEMSTORE_TARGET`, else 127.0.0.1:50051.
        token: bearer token, when the server runs with --token; None: `MEMSTORE_TOKEN` if set
            ("" sends none whatever the environment says).
        tls: a TlsConfig (CA, client cert/key for mutual TLS), True for the system roots, or None.
        timeout_s: deadline of each call; retry_timeout_s: how long UNAVAILABLE and back-pressure
            are retried before the error surfaces (0: never retry); retries are logged as warnings.
        client_id: identifies this client's updates for exactly-once delivery; leave it to the
            default (a fresh random id) unless you know you need to pin it.
        max_ids_per_call, parallel_calls: lookups larger than max_ids_per_call are split, and large
            ones go as up to parallel_calls calls in flight.
        shared_memory: "auto" (default): on the server's host, map its RAM tables read-only and
            gather rows here (`memstore.shm`), otherwise gRPC, silently; "on": the same-host
            path or a clear error; "off": always gRPC. Rows are identical either way.
    """

    def __init__(self, target: str | None = None, *, token: str | None = None, tls: TlsConfig | bool | None = None,
                 timeout_s: float = 60.0, retry_timeout_s: float = 60.0, client_id: str | None = None,
                 max_ids_per_call: int = 1 << 17, parallel_calls: int = 2, shared_memory: str = "auto"):
        if shared_memory not in ("auto", "on", "off"):
            raise ValueError(f"shared_memory must be 'auto', 'on' or 'off', got {shared_memory!r}")
        self.shared_memory = shared_memory
        self._views: dict[str, SharedView | LmdbView | None] = {}  # table → its mapping; None: gRPC for it
        self._views_lock = threading.RLock()  # lookups (several threads) and the update sender map tables
        self._views_swept = 0.0
        self._staging_name = f"{uuid.uuid4().hex}.buf"  # this client's file for staged Update payloads
        self._staged: set[Path] = set()
        self.target = target = single_target(target)
        self.timeout_s = timeout_s
        self.retry_timeout_s = retry_timeout_s
        self._retrying = Retrying(target, tls=bool(tls))
        token = token_or_env(token)
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
        self._step_order = StepOrder()  # step-numbered updates: touched only on the sender thread
        self._step_tables: set[str] = set()  # tables this client's own id updates by step

    # ---- tables -------------------------------------------------------------------------------

    def create_table(self, name: str, num_rows: int, dim: int, *, dtype: str = "float32", init: str = "normal",
                     init_scale: float = 0.02, seed: int = 0, optimizer: str = "sgd", lr: float = 0.01,
                     if_not_exists: bool = False, **optimizer_args: float) -> TableInfo:
        spec = table_spec(name, num_rows, dim, dtype=dtype, init=init, init_scale=init_scale, seed=seed,
                          optimizer=optimizer, lr=lr, **optimizer_args)
        request = pb.CreateTableRequest(spec=spec_to_pb(spec), if_not_exists=if_not_exists)
        return table_info(self._call(self._stub.CreateTable, request))

    def describe_table(self, name: str) -> TableInfo:
        return table_info(self._call(self._stub.DescribeTable, pb.DescribeTableRequest(name=name)))

    def list_tables(self) -> list[TableInfo]:
        return [table_info(t) for t in self._call(self._stub.ListTables, pb.ListTablesRequest()).tables]

    def drop_table(self, name: str) -> None:
        self._call(self._stub.DropTable, pb.DropTableRequest(name=name))
        self._drop_view(name)
        self._update_sender.submit(self._step_order.forget, name).result()  # a new table's steps start over

    def snapshot(self, name: str = "", *, tag: str = "") -> list[str]:
        """Snapshot one table or all; with `tag`, a named checkpoint of table `name` (the same tag
        again while the table is unchanged returns the existing one)."""
        return list(self._call(self._stub.Snapshot, pb.SnapshotRequest(table=name, tag=tag)).paths)

    def restore(self, name: str, tag: str, *, job: Job | None = None) -> str:
        """Roll table `name` back to its checkpoint `tag` (rows, optimizer state, exactly-once memory).
        `job`: this rank restarts its data-parallel job from there (what it sent before is withdrawn)."""
        request = pb.RestoreRequest(table=name, tag=tag, job=job.client_id if job else "", rank=job.rank if job else 0)
        path = self._call(self._stub.Restore, request).path
        self._update_sender.submit(self._step_order.forget, name).result()  # steps start over
        return path

    def stats(self) -> pb.StatsResponse:
        return self._call(self._stub.Stats, pb.StatsRequest())

    # ---- lookups ------------------------------------------------------------------------------

    def lookup(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows in the table's storage dtype, in the order of `ids`, shaped ids.shape + (dim,):
        [len(ids), dim] for a 1-D batch, [B, T, dim] for [B, T] ids. Ids of any integer dtype;
        floats raise TypeError (never truncated)."""
        ids = as_row_ids(ids)
        rows = self._lookup_flat(name, ids.reshape(-1))
        return rows.reshape(*ids.shape, rows.shape[-1])

    def _lookup_flat(self, name: str, ids: np.ndarray) -> np.ndarray:
        rows = self._shared_lookup(name, ids)
        if rows is not None:
            return rows
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

    def _shared_lookup(self, name: str, ids: np.ndarray) -> np.ndarray | None:
        """Rows gathered from the mapped table; None: take the gRPC path (not same-host, or ids
        the server must judge: out of range, another shard's)."""
        if self.shared_memory == "off":
            return None
        self._forget_dead_views()
        for _ in range(2):  # a stale mapping (dropped, re-created, restarted) is mapped once more
            view = self._view(name)
            if view is None:
                return None
            try:
                return view.lookup(ids)
            except shm.StaleMapping:
                self._drop_view(name, view)
        return None if self.shared_memory == "auto" else self._fail_shared(name, "its mapping keeps going stale")

    def _view(self, name: str) -> SharedView | LmdbView | None:
        """The table's mapping, made on first use; None: gRPC for now (cached when the server or
        the host says the table cannot be mapped, not after a transient error)."""
        with self._views_lock:
            return self._map(name)

    def _map(self, name: str) -> SharedView | LmdbView | None:
        if name in self._views:
            return self._views[name]
        try:
            view = open_view(self._call(self._stub.MapTable, pb.MapTableRequest(table=name)))
        except (shm.NotHere, shm.UnsafeDirectory) as exc:  # another host or process, not this user's files
            reason = str(exc)
        except shm.StaleMapping as exc:  # replaced while being mapped: gRPC now, map again next time
            if self.shared_memory == "on":
                self._fail_shared(name, str(exc))
            return None
        except MemStoreError as exc:
            if exc.code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                if self.shared_memory == "on" or exc.code == grpc.StatusCode.UNAUTHENTICATED:
                    raise  # the gRPC path would say the same (NOT_FOUND, UNAVAILABLE, ...)
                return None  # transient or the table's own error: gRPC answers, mapping is tried again later
            reason = exc.message  # not in shared memory (LMDB, shm off), or an older server
        else:
            self._views[name] = view
            return view
        if self.shared_memory == "on":
            self._fail_shared(name, reason)
        self._views[name] = None
        return None

    def _drop_view(self, name: str, stale: SharedView | LmdbView | None = None) -> None:
        """Forget the table's mapping (only `stale`, when given: another thread may have mapped
        it again meanwhile); closed under the lock, so no new mapping of it overlaps."""
        with self._views_lock:
            view = self._views.get(name)
            if view is None or (stale is not None and view is not stale):
                return
            del self._views[name]
            view.close()

    def _forget_dead_views(self) -> None:
        """Unmap tables that were dropped or whose daemon is gone, looked up or not: a mapping
        keeps the tmpfs pages of a dropped table alive. At most once a second."""
        now = time.monotonic()
        if now - self._views_swept < 1.0:
            return
        self._views_swept = now
        for name, view in list(self._views.items()):
            if view is not None and not view.alive():
                self._drop_view(name, view)

    def shared_tables(self) -> list[str]:
        """Tables this client reads through shared memory (the same-host path), so far."""
        return sorted(name for name, view in self._views.items() if view is not None)

    def _fail_shared(self, name: str, why: str):
        raise FailedPrecondition(f"shared_memory='on' but table {name!r} on {self.target} cannot be read "
                                 f"through shared memory: {why}")

    def lookup_async(self, name: str, ids: np.ndarray) -> Future:
        """`lookup` on a background thread; `.result()` gives the rows. Small batches of a table
        already mapped same-host are gathered at once instead (see INLINE_GATHER_ROWS); anything
        that may wait (mapping again, gRPC) still goes to the background thread."""
        ids = np.array(as_row_ids(ids))  # copy: the caller may reuse its buffer
        rows = self._inline_gather(name, ids) if ids.size <= INLINE_GATHER_ROWS else None
        if rows is not None:
            done: Future = Future()
            done.set_result(rows.reshape(*ids.shape, rows.shape[-1]))
            return done
        return self._async_pool.submit(self.lookup, name, ids)

    def _inline_gather(self, name: str, ids: np.ndarray) -> np.ndarray | None:
        """The rows from the table's current mapping, or None (not mapped, stale, or ids the
        server must judge): the caller then takes the full path."""
        view = self._views.get(name)  # a dict read; a mapping replaced meanwhile raises StaleMapping
        if view is None:
            return None
        try:
            return view.lookup(ids.reshape(-1))
        except Exception:  # noqa: BLE001 - stale or failing: the full path maps again or raises it properly
            return None

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

    def update(self, name: str, ids: np.ndarray, grads: np.ndarray, *, step: int | None = None,
               job: Job | None = None, lr: float | None = None) -> bool:
        """One optimizer step on the server: duplicate ids are summed, then applied exactly once.
        Returns False when the server had already applied it (a retried delivery). `ids` as for
        `lookup` (integers, any shape); `grads` float32 ids.shape + (dim,) or [ids.size, dim].

        step: the training step (>= 0). The update is then identified by (client_id, step), or
            (job, step), and applied at most once, so a step that raised may be sent again as a
            whole. Steps of one client go in increasing order.
        job: a data-parallel `Job` (needs `step`): the shard applies the mean of the ranks'
            gradients once all have sent theirs; the call returns when the step is applied.
        lr: this step's learning rate (an lr schedule); None: the table's.
        """
        return self.update_async(name, ids, grads, step=step, job=job, lr=lr).result()

    def update_async(self, name: str, ids: np.ndarray, grads: np.ndarray, *, step: int | None = None,
                     job: Job | None = None, lr: float | None = None) -> Future:
        """Queue an update; updates of this client reach the server in call order."""
        ids = as_row_ids(ids)
        grads = as_row_grads(grads, ids)  # [ids.size, dim]
        ids = ids.reshape(-1)
        if job is not None and step is None:
            raise ValueError("a data-parallel update (job=...) needs step=")
        if step is not None and step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        summed_ids, summed = sum_duplicates(ids, grads)
        if summed_ids is ids:  # already sorted and unique: nothing was copied, but the caller may
            summed_ids, summed = ids.copy(), summed.copy()  # reuse its buffers before this is sent
        ids, grads = np.ascontiguousarray(summed_ids), np.ascontiguousarray(summed)  # sent as raw bytes
        if step is None:
            return self._update_sender.submit(self._send_update, name, ids, grads, lr)
        return self._update_sender.submit(self._send_step, name, ids, grads, step, job, lr)

    def _send_update(self, name: str, ids: np.ndarray, grads: np.ndarray, lr: float | None) -> bool:
        if name in self._step_tables:
            raise ValueError(f"this client sends step-numbered updates to table {name!r}; "
                             "an update without step= would break their exactly-once order")
        applied = True
        for start in range(0, len(ids), self.max_ids_per_call):  # disjoint ids: one step per row still
            part = slice(start, start + self.max_ids_per_call)
            seq = self._next_seq(name)  # retries resend this seq: the server applies it once
            header = {"client_id": self.client_id, "seq": seq, "lr": lr}
            applied &= self._retry(partial(self._stream_update, name, header, ids[part], grads[part])).applied
        return applied

    def _send_step(self, name: str, ids: np.ndarray, grads: np.ndarray, step: int, job: Job | None,
                   lr: float | None) -> bool:
        """One training step as ONE Update (so it is applied whole or not at all)."""
        client_id = job.client_id if job else self.client_id
        if job is None:
            if name in self._seqs:
                raise ValueError(f"this client sent updates without step= to table {name!r}; step-numbered "
                                 "ones would break their exactly-once order (use another client)")
            self._step_tables.add(name)
        key = (name, client_id)
        first_send = self._step_order.check(key, step, self.target)
        header = {"client_id": client_id, "seq": step + 1, "lr": lr}
        timeout = self.timeout_s
        if job is not None and job.world_size > 1:
            header.update(rank=job.rank, world_size=job.world_size, step_timeout_ms=int(job.step_timeout_s * 1e3))
            timeout += job.step_timeout_s  # the server answers when every rank has sent (or the step is dropped)
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            return self._stream_update(name, header, ids, grads, timeout)
        try:
            response = self._retry(attempt)
            self._check_continuity(key, step, response, first_send and attempts == 1, job)
        except BaseException:
            self._step_order.record(key, step, ok=False)
            raise
        self._step_order.record(key, step, ok=True)
        return response.applied

    def _check_continuity(self, key: tuple[str, str], step: int, response: pb.UpdateResponse, first_try: bool,
                          job: Job | None) -> None:
        """Refuse to train on when the server's memory of this client's steps disagrees with ours."""
        name, who = key[0], f"job name {job.name!r}" if job else "client_id"
        if not response.applied and first_try:
            raise FailedPrecondition(
                f"step {step} of table {name!r} was already applied on {self.target} before this client sent it: "
                f"an earlier run used the same {who}, or another process uses it now (ranks without rank= and "
                "world_size=?). Resume that run with restore_tables(), or start a new one under a new name")
        acked = self._step_order.acked.get(key)
        if response.applied and acked is not None and response.previous_seq < acked + 1:
            raise FailedPrecondition(
                f"{self.target} lost steps of table {name!r} that it had acknowledged: it remembers "
                f"{f'step {response.previous_seq - 1}' if response.previous_seq else 'no step'}, this client had "
                f"step {acked} applied there (a RAM server restarted from an older snapshot?). Restore the job "
                "from its last checkpoint (restore_tables)")

    def _stream_update(self, name: str, header: dict, ids: np.ndarray, grads: np.ndarray,
                       timeout: float | None = None) -> pb.UpdateResponse:
        header = {"table": name, "total_rows": len(ids), **header}
        staged = self._stage(name, ids, grads)
        if staged is not None:  # same host: only the header travels; the payload is in the file
            messages = iter([encode_update_chunk(b"", b"", staging=staged, **header)])
        else:
            messages = self._update_chunks(header, ids, grads)
        try:
            return self._update_raw(messages, timeout=timeout or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _as_error(exc) from None

    @staticmethod
    def _update_chunks(header: dict, ids: np.ndarray, grads: np.ndarray) -> Iterator[bytes]:
        """~1 MiB UpdateChunks of whole rows; the header goes in the first."""
        rows_per_chunk = max(1, CHUNK_BYTES // (grads.shape[1] * 4 + 8))
        # flat views: a (0, dim) array cannot be cast (an empty step still sends its header)
        id_bytes, grad_bytes = memoryview(ids.reshape(-1)).cast("B"), memoryview(grads.reshape(-1)).cast("B")
        grad_row = grads.shape[1] * grads.itemsize
        for start in range(0, max(len(ids), 1), rows_per_chunk):
            stop = min(len(ids), start + rows_per_chunk)
            yield encode_update_chunk(id_bytes[start * 8:stop * 8], grad_bytes[start * grad_row:stop * grad_row],
                                      **(header if start == 0 else {}))

    def _stage(self, name: str, ids: np.ndarray, grads: np.ndarray) -> str | None:
        """Write the payload into this client's staging file on the daemon's host; its name, or
        None to send it over gRPC (another host, LMDB, shared memory off, or any trouble)."""
        if self.shared_memory == "off" or len(ids) == 0:
            return None
        try:
            view = self._view(name)
        except MemStoreError:
            return None
        if view is None or view.staging_dir is None:
            return None
        path = view.staging_dir / self._staging_name
        try:
            shm.stage(path, ids, grads)
        except OSError:
            return None
        self._staged.add(path)
        return self._staging_name

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
        return self._retrying(attempt, self.retry_timeout_s)  # read now: callers may change it

    def close(self) -> None:
        self._update_sender.shutdown(wait=True)
        self._async_pool.shutdown(wait=True)  # before the lookup pool: its jobs submit into it
        self._lookup_pool.shutdown(wait=True)
        for name in list(self._views):  # after every pending lookup has finished with them
            self._drop_view(name)
        for path in self._staged:
            path.unlink(missing_ok=True)
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _RowFormatChanged(Exception):
    """A table's rows no longer have the (dim, dtype) this client learnt for it."""


def completed(fn: Callable[..., T], *args) -> Future:
    """Run `fn(*args)` now; a done Future holds its result or its exception, as a pool's would."""
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except Exception as exc:  # noqa: BLE001 - handed to whoever calls .result(), like a pool does
        done.set_exception(exc)
    return done
