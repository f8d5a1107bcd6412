"""What both sides of the wire share: message constants, spec conversion, duplicate summing.

The server (`memstore.servicer`) and the plain client (`memstore.client`) both import this
module and nothing of each other, so the client never pulls in server internals.
"""
from __future__ import annotations

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
