"""Hand-encoded LookupChunk bytes are exactly what protobuf reads and writes."""
import numpy as np
import pytest

from memstore.v1 import memstore_pb2 as pb
from memstore.wire import decode_lookup_chunk, encode_lookup_chunk


@pytest.mark.parametrize("n_bytes, row_offset, dtype, dim", [(0, 0, 1, 64), (128, 5, 2, 64), (1 << 20, 300_000, 3, 8)])
def test_round_trips_with_protobuf(n_bytes, row_offset, dtype, dim):
    payload = np.random.default_rng(0).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    encoded = encode_lookup_chunk(memoryview(payload), row_offset, dtype, dim)
    parsed = pb.LookupChunk.FromString(encoded)
    assert (parsed.rows, parsed.row_offset, parsed.dtype, parsed.dim) == (payload, row_offset, dtype, dim)
    generated = pb.LookupChunk(rows=payload, row_offset=row_offset, dtype=dtype, dim=dim).SerializeToString()
    rows, *fields = decode_lookup_chunk(generated)
    assert (bytes(rows), *fields) == (payload, row_offset, dtype, dim)
