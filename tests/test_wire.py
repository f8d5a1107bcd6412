"""Hand-encoded messages are exactly what protobuf reads and writes."""
import numpy as np
import pytest

from memstore.v1 import memstore_pb2 as pb
from memstore.wire import (
    WireError,
    decode,
    decode_lookup_chunk,
    decode_update_chunk,
    encode_lookup_chunk,
    encode_update_chunk,
)

PAYLOAD = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("n_bytes, row_offset, dtype, dim", [(0, 0, 1, 64), (128, 5, 2, 64), (1 << 20, 300_000, 3, 8)])
def test_lookup_chunk_round_trips_with_protobuf(n_bytes, row_offset, dtype, dim):
    payload = PAYLOAD[:n_bytes]
    parsed = pb.LookupChunk.FromString(encode_lookup_chunk(memoryview(payload), row_offset, dtype, dim))
    assert (parsed.rows, parsed.row_offset, parsed.dtype, parsed.dim) == (payload, row_offset, dtype, dim)
    generated = pb.LookupChunk(rows=payload, row_offset=row_offset, dtype=dtype, dim=dim).SerializeToString()
    rows, *fields = decode_lookup_chunk(generated)
    assert (bytes(rows), *fields) == (payload, row_offset, dtype, dim)


@pytest.mark.parametrize("header", [{}, {"table": "ngram_l1", "client_id": "trainer-7 ✓", "seq": 2**40,
                                         "total_rows": 65536}])
def test_update_chunk_round_trips_with_protobuf(header):
    ids, grads = PAYLOAD[:800], PAYLOAD[800:800 + 4 * 64 * 100]
    parsed = pb.UpdateChunk.FromString(encode_update_chunk(memoryview(ids), memoryview(grads), **header))
    assert (parsed.ids, parsed.grads) == (ids, grads)
    assert {k: getattr(parsed, k) for k in header} == header
    chunk = decode_update_chunk(pb.UpdateChunk(ids=ids, grads=grads, **header).SerializeToString())
    assert (bytes(chunk.ids), bytes(chunk.grads)) == (ids, grads)
    assert {k: getattr(chunk, k) for k in header} == header


@pytest.mark.parametrize("garbage", [b"\x0a\xff", b"\x0a\x05ab", b"\x80", b"\x0b", b"\x08" + b"\xff" * 11])
def test_malformed_bytes_are_a_wire_error(garbage):
    with pytest.raises(WireError):
        decode(garbage)
