"""What both sides of the wire share: message constants, spec conversion, row ids, duplicate summing.

The server (`memstore.servicer`) and the plain client (`memstore.client`) both import this
module and nothing of each other, so the client never pulls in server internals.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from memstore.errors import InvalidArgument
from memstore.spec import InitSpec, OptimizerSpec, TableSpec
from memstore.v1 import memstore_pb2 as pb

ERROR_TRAILER = "memstore-error"  # set by the server on errors it raised itself (never retryable)
CHUNK_BYTES = 1 << 20  # ~1 MiB per streamed message: well inside gRPC's default 4 MiB limit

DTYPE_TO_PB = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}
PB_TO_DTYPE = {v: k for k, v in DTYPE_TO_PB.items()}


def spec_from_pb(msg: pb.TableSpec) -> TableSpec:
    if msg.dtype not in PB_TO_DTYPE:
        raise InvalidArgument(f"dtype must be FLOAT32, FLOAT16 or BFLOAT16, got enum value {msg.dtype}")
    init = InitSpec(kind=msg.init.kind or "normal", scale=msg.init.scale, seed=msg.init.seed)
    optimizer = OptimizerSpec(kind=msg.optimizer.kind or "sgd", lr=msg.optimizer.lr, args=dict(msg.optimizer.args))
    return TableSpec(name=msg.name, num_rows=msg.num_rows, dim=msg.dim, dtype=PB_TO_DTYPE[msg.dtype],
                     init=init, optimizer=optimizer)


def spec_to_pb(spec: TableSpec) -> pb.TableSpec:
    return pb.TableSpec(
        name=spec.name, num_rows=spec.num_rows, dim=spec.dim, dtype=DTYPE_TO_PB[spec.dtype],
        init=pb.InitSpec(kind=spec.init.kind, scale=spec.init.scale, seed=spec.init.seed),
        optimizer=pb.OptimizerSpec(kind=spec.optimizer.kind, lr=spec.optimizer.lr, args=spec.optimizer.args))


def as_row_ids(ids) -> np.ndarray:
    """`ids` as a C-contiguous little-endian int64 array of the same shape (a view when it is one).

    Any integer dtype is fine. Floats are refused, integer-valued ones too: a float id may
    already have been rounded (float32 holds integers exactly only up to 2**24, float64 up to
    2**53), and truncating 1.7 to row 1 would train the wrong row silently. So are bools.
    """
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros(array.shape, dtype="<i8")  # np.asarray([]) is float64: an empty batch is fine
    if array.dtype.kind not in "iu":
        raise TypeError(f"row ids must be integers (any numpy int dtype), got dtype {array.dtype}: float ids are "
                        "refused rather than truncated (1.7 would read row 1); convert exactly, e.g. "
                        "ids.astype(np.int64) after checking they are whole")
    if array.dtype == np.uint64 and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"row id {int(array.max())} does not fit int64 (row ids are int64 on the wire)")
    return np.asarray(array, dtype="<i8", order="C")  # (ascontiguousarray would make a scalar 1-D)


def as_row_grads(grads, ids: np.ndarray) -> np.ndarray:
    """Gradients as float32 [ids.size, dim], given shaped like the rows of a lookup of `ids`
    (ids.shape + (dim,)) or already flat ([ids.size, dim])."""
    grads = np.asarray(grads, dtype="<f4")
    if grads.ndim == ids.ndim + 1 and grads.shape[:-1] == ids.shape:
        return grads.reshape(ids.size, grads.shape[-1])
    if grads.ndim == 2 and grads.shape[0] == ids.size:
        return grads
    raise ValueError(f"grads must be ids.shape + (dim,) = {(*ids.shape, 'dim')} or [{ids.size}, dim], "
                     f"got {grads.shape}")


def sum_duplicates(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and the summed gradient of each.

    Training clients already send sorted unique ids (the per-row gradient of a unique lookup),
    so that case costs one comparison pass and no copy.
    """
    if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return ids, grads
    order = np.argsort(ids, kind="stable")
    sorted_ids, sorted_grads = ids[order], grads[order]
    is_first = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]               # (n,) first of its id
    if is_first.all():
        return sorted_ids, sorted_grads
    # Few rows repeat: start from each id's first row and add the repeats in place
    # (np.add.reduceat over axis 0 is several times slower than this).
    segment = np.cumsum(is_first) - 1                                       # (n,) unique index of each row
    summed = sorted_grads[is_first]                                         # (U, dim)
    np.add.at(summed, segment[~is_first], sorted_grads[~is_first])
    return sorted_ids[is_first], summed


@dataclass(frozen=True)
class TableInfo:
    spec: TableSpec            # num_rows is the global table size; shard fields say which shard answered
    rows_materialized: int
    bytes_used: int
    lookups: int
    updates: int
    bytes_reserved: int = 0    # claimed: RAM dense arrays, LMDB map (see memstore.memory)
    bytes_resident: int = 0    # in memory now
    checkpoints: tuple[str, ...] = ()  # tags of its checkpoints (merged over shards: those every shard has)


def table_info(msg: pb.TableInfo) -> TableInfo:
    spec = spec_from_pb(msg.spec)
    if msg.shard_count > 1:
        spec = replace(spec, shard_index=msg.shard_index, shard_count=msg.shard_count)
    return TableInfo(spec, msg.rows_materialized, msg.bytes_used, msg.lookups, msg.updates, msg.bytes_reserved,
                     msg.bytes_resident, tuple(msg.checkpoints))
