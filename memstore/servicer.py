"""The MemStore gRPC servicer: thin. It converts messages, runs `Store` calls on a thread pool
(numpy and LMDB work must never block the event loop) and streams rows back in chunks.

Errors are raised as `memstore.errors` exceptions and mapped to status codes by
`memstore.interceptors.ErrorInterceptor`; nothing here calls `context.abort` for them.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import numpy as np

from memstore import __version__, memory, shm
from memstore.errors import InvalidArgument
from memstore.metrics import Metrics
from memstore.protocol import CHUNK_BYTES, DTYPE_TO_PB, spec_from_pb, spec_to_pb
from memstore.steps import StepBarrier
from memstore.store import GRAD_DTYPE, ID_DTYPE, Store, TableView, parse_grads, parse_ids
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pb_grpc
from memstore.wire import UpdateChunk, WireError, decode_update_chunk, encode_lookup_chunk

T = TypeVar("T")


def info_to_pb(view: TableView) -> pb.TableInfo:
    return pb.TableInfo(spec=spec_to_pb(view.spec), rows_materialized=view.rows_materialized,
                        bytes_used=view.bytes_used, lookups=view.counters.lookups,
                        updates=view.counters.updates, shard_index=view.spec.shard_index,
                        shard_count=view.spec.shard_count, bytes_reserved=view.bytes_reserved,
                        bytes_resident=view.bytes_resident, checkpoints=view.checkpoints)


def _update_chunk(raw: bytes) -> UpdateChunk:
    try:
        return decode_update_chunk(raw)
    except WireError as exc:
        raise InvalidArgument(f"Update: malformed UpdateChunk: {exc}") from None


# ---- registration -----------------------------------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["MemStore"]
PRE_ENCODED_RESPONSES = {"Lookup"}  # handlers that yield serialised bytes themselves (memstore.wire)
RAW_REQUESTS = {"Update"}            # handlers that decode their request bytes themselves

_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
}


def rpc_method_handlers(servicer: MemStoreServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The generated registration, except that the bulk messages skip protobuf objects."""
    handlers = {}
    for method in SERVICE.methods:
        response_type = getattr(pb, method.output_type.name)
        factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=None if method.name in RAW_REQUESTS else getattr(pb, method.input_type.name).FromString,
            response_serializer=None if method.name in PRE_ENCODED_RESPONSES else response_type.SerializeToString)
    return handlers


def add_to_server(servicer: MemStoreServicer, server: grpc.aio.Server) -> None:
    handlers = rpc_method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


class MemStoreServicer(pb_grpc.MemStoreServicer):
    def __init__(self, store: Store, executor: ThreadPoolExecutor, backend_name: str, metrics: Metrics,
                 lookup_delay_s: float = 0.0, max_step_timeout_s: float = 3600.0, admission=None):
        self.store = store
        self.executor = executor
        self.backend_name = backend_name
        self.metrics = metrics
        self.lookup_delay_s = lookup_delay_s  # testing only (fault_lookup_delay_ms)
        self.steps = StepBarrier(store, self._run, max_timeout_s=max_step_timeout_s,
                                 max_held_bytes=4 * store.max_request_bytes)
        self.admission = admission  # the concurrency limit: a share waiting for other ranks leaves it

    async def _run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- admin --------------------------------------------------------------------------------

    async def CreateTable(self, request: pb.CreateTableRequest, context) -> pb.TableInfo:
        spec = spec_from_pb(request.spec)
        return info_to_pb(await self._run(self.store.create_table, spec, request.if_not_exists))

    async def DropTable(self, request: pb.DropTableRequest, context) -> pb.DropTableResponse:
        await self._run(self.store.drop_table, request.name)
        self.steps.forget_table(request.name, "the table was dropped")
        return pb.DropTableResponse()

    async def ListTables(self, request, context) -> pb.ListTablesResponse:
        views = await self._run(self.store.list_tables)
        return pb.ListTablesResponse(tables=[info_to_pb(v) for v in views])

    async def DescribeTable(self, request: pb.DescribeTableRequest, context) -> pb.TableInfo:
        return info_to_pb(await self._run(self.store.describe, request.name))

    async def Snapshot(self, request: pb.SnapshotRequest, context) -> pb.SnapshotResponse:
        return pb.SnapshotResponse(paths=await self._run(self.store.snapshot, request.table, request.tag))

    async def MapTable(self, request: pb.MapTableRequest, context) -> pb.MapTableResponse:
        spec, kind, path, generation = self.store.map_table(request.table)
        return pb.MapTableResponse(spec=spec_to_pb(spec), shard_index=spec.shard_index, shard_count=spec.shard_count,
                                   path=str(path), generation=generation, boot_id=shm.boot_id(),
                                   staging_dir=str(self.store.staging_dir() or "") if kind == "ram" else "",
                                   kind=kind, pid=os.getpid())

    async def Restore(self, request: pb.RestoreRequest, context) -> pb.RestoreResponse:
        path, changed = await self._run(self.store.restore, request.table, request.tag)
        if changed:  # another rank's restore of the same checkpoint must not abandon steps already sent
            self.steps.forget_table(request.table, f"the table was restored to checkpoint {request.tag!r}")
        if request.job:
            self.steps.restarted(request.table, request.job, request.rank)
        return pb.RestoreResponse(path=path)

    async def Stats(self, request, context) -> pb.StatsResponse:
        views = await self._run(self.store.list_tables)
        counters = {
            "lookup_rows": float(sum(v.counters.lookup_rows for v in views)),
            "update_rows": float(sum(v.counters.update_rows for v in views)),
            "duplicate_updates": float(sum(v.counters.duplicate_updates for v in views)),
        }
        resident, virtual = memory.process_memory()
        return pb.StatsResponse(tables=[info_to_pb(v) for v in views], counters=counters,
                                version=__version__, backend=self.backend_name,
                                read_only=self.store.read_only, shard_index=self.store.layout.index,
                                shard_count=self.store.layout.count, process_resident_bytes=resident,
                                process_virtual_bytes=virtual,
                                ram_max_bytes=getattr(self.store.backend, "max_bytes", None) or 0)

    # ---- data path ----------------------------------------------------------------------------

    async def Lookup(self, request: pb.LookupRequest, context) -> AsyncIterator[bytes]:
        """Streams serialised LookupChunk messages (encoded by hand: see memstore.wire)."""
        if self.lookup_delay_s:
            await asyncio.sleep(self.lookup_delay_s)
        ids = parse_ids(request.ids)
        # The spec comes with the rows, from the same table object: a table dropped and created
        # again with another shape meanwhile can never label these rows with its own.
        spec, blocks = await self._run(self.store.lookup_blocks, request.table, ids, CHUNK_BYTES)
        dtype = DTYPE_TO_PB[spec.dtype]
        self.metrics.rows.labels("Lookup", request.table).inc(len(ids))
        self.metrics.bytes.labels("Lookup", request.table).inc(len(ids) * spec.row_bytes)
        if len(ids) == 0:
            yield encode_lookup_chunk(b"", 0, dtype, spec.dim)
            return
        # Gather block k+1 on the thread pool while block k is being sent.
        upcoming = self._run(next, blocks, None)
        start = 0
        while (block := await upcoming) is not None:
            upcoming = self._run(next, blocks, None)
            yield encode_lookup_chunk(memoryview(block).cast("B"), start, dtype, spec.dim)
            start += len(block)

    async def Update(self, request_iterator, context) -> pb.UpdateResponse:
        """Reads serialised UpdateChunk messages (decoded by hand: see memstore.wire)."""
        raw = await anext(aiter(request_iterator), None)
        if raw is None:
            raise InvalidArgument("Update: empty stream (the first chunk must carry table, total_rows, ...)")
        first = _update_chunk(raw)
        lr = first.lr  # None (unset): the table's own lr
        self.store.check_update_header(first.table, first.client_id, first.seq, lr)
        spec = self.store.check_update_size(first.table, first.total_rows, first.client_id)
        ids, grads = await self._receive_update(first, request_iterator, spec.dim)
        if first.world_size > 1:  # a data-parallel step: wait for every rank (memstore.steps)
            with self.admission.waiting() if self.admission else contextlib.nullcontext():
                result = await self.steps.contribute(
                    first.table, first.client_id, first.seq, first.rank, first.world_size, lr,
                    first.step_timeout_ms / 1e3, ids, grads)
        else:
            result = await self._run(self.store.update, first.table, ids, grads, first.client_id, first.seq, lr)
        self.metrics.rows.labels("Update", first.table).inc(len(ids))
        self.metrics.bytes.labels("Update", first.table).inc(ids.nbytes + grads.nbytes)
        return pb.UpdateResponse(applied=result.applied, rows=result.rows, previous_seq=result.previous_seq)

    async def _receive_update(self, first: UpdateChunk, rest, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Copy the streamed chunks (or the staged file) into buffers sized by the header,
        refusing any overflow."""
        total = first.total_rows
        if first.staging:
            staging_dir = self.store.staging_dir()
            if staging_dir is None:
                raise InvalidArgument("Update: staging is for same-host clients of a RAM server in shared memory")
            if len(first.ids) or len(first.grads) or await anext(aiter(rest), None) is not None:
                raise InvalidArgument("Update: a staged update carries no payload in its chunks")
            return await self._run(shm.read_staged, staging_dir, first.staging, total, dim)
        ids = np.empty(total, dtype=ID_DTYPE)
        grads = np.empty((total, dim), dtype=GRAD_DTYPE)
        filled = 0

        def take(chunk: UpdateChunk) -> None:
            nonlocal filled
            chunk_ids = parse_ids(chunk.ids)
            if filled + len(chunk_ids) > total:
                raise InvalidArgument(f"Update: chunks carry more than total_rows={total} rows")
            ids[filled:filled + len(chunk_ids)] = chunk_ids
            grads[filled:filled + len(chunk_ids)] = parse_grads(chunk.grads, len(chunk_ids), dim)
            filled += len(chunk_ids)

        take(first)
        async for raw in rest:
            take(_update_chunk(raw))
        if filled != total:
            raise InvalidArgument(f"Update: total_rows={total} but the chunks carried {filled} rows")
        return ids, grads
