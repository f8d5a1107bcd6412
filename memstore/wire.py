"""Hand-encoded `LookupChunk` messages: the one hot message, kept off the protobuf object path.

A Lookup streams megabytes of rows. Building a protobuf message copies the payload into it and
serialising copies it again (and parsing on the client once more). The wire format of a message
with one `bytes` field and three varints is simple, so the server writes it directly (one copy,
`b"".join`) and the client reads the payload as a view of the received buffer. The bytes on the
wire are an ordinary `memstore.v1.LookupChunk`: any protobuf client can still parse them
(tests/test_wire.py checks both directions against the generated code).
"""
from __future__ import annotations

_ROWS, _ROW_OFFSET, _DTYPE, _DIM = 1, 2, 3, 4  # field numbers in memstore.proto
_LEN, _VARINT = 2, 0                           # wire types


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_lookup_chunk(rows: memoryview | bytes, row_offset: int, dtype: int, dim: int) -> bytes:
    """Serialised `LookupChunk(rows=rows, row_offset=..., dtype=..., dim=...)`."""
    head = bytes([_ROWS << 3 | _LEN]) + _varint(len(rows))
    tail = (bytes([_ROW_OFFSET << 3 | _VARINT]) + _varint(row_offset)
            + bytes([_DTYPE << 3 | _VARINT]) + _varint(dtype)
            + bytes([_DIM << 3 | _VARINT]) + _varint(dim))
    return b"".join((head, rows, tail))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def decode_lookup_chunk(data: bytes) -> tuple[memoryview, int, int, int]:
    """(rows view, row_offset, dtype, dim) from a serialised LookupChunk, fields in any order."""
    buf = memoryview(data)
    rows, fields = buf[:0], {_ROW_OFFSET: 0, _DTYPE: 0, _DIM: 0}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, kind = key >> 3, key & 7
        if kind == _LEN:
            length, pos = _read_varint(buf, pos)
            if number == _ROWS:
                rows = buf[pos:pos + length]
            pos += length
        elif kind == _VARINT:
            fields[number], pos = _read_varint(buf, pos)
        else:
            raise ValueError(f"unexpected wire type {kind} for field {number} in LookupChunk")
    return rows, fields[_ROW_OFFSET], fields[_DTYPE], fields[_DIM]
