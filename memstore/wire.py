"""Hand-encoded protobuf for the two bulk messages: `LookupChunk` (out) and `UpdateChunk` (in).

These carry megabytes of rows and gradients. Through protobuf objects the payload is copied into
the message, copied again when serialised and once more when parsed. The wire format of a
message made of `bytes`/`string` fields and varints is simple, so the server and the client
write it directly (one copy, `b"".join`) and read payloads as views of the received buffer.
The bytes on the wire are ordinary `memstore.v1` messages: any protobuf client can still talk to
the server (tests/test_wire.py checks both directions against the generated code).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # wire types
_DOUBLE = struct.Struct("<d")
_UINT64_MAX = (1 << 64) - 1


class WireError(ValueError):
    """Bytes that are not a well-formed message."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(fields: list[tuple[int, int | float | str | bytes | memoryview | None]]) -> bytes:
    """Serialise (field number, value) pairs: ints as varints, floats as doubles, the rest
    length-delimited. Zero ints and empty payloads are left out, as proto3 does; None is an
    unset field, and a float is always written (our only double is `optional`: 0.0 is a value)."""
    parts: list[bytes | memoryview] = []
    for number, value in fields:
        if value is None:
            continue
        if isinstance(value, float):
            parts += [_varint(number << 3 | _I64), _DOUBLE.pack(value)]
        elif isinstance(value, int):
            if value:
                parts += [_varint(number << 3 | _VARINT), _varint(value)]
        else:
            payload = value.encode() if isinstance(value, str) else value
            if len(payload):
                parts += [_varint(number << 3 | _LEN), _varint(len(payload)), payload]
    return b"".join(parts)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """A varint of at most 10 bytes holding at most 64 bits, as protobuf accepts."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value > _UINT64_MAX:
                raise WireError(f"varint {value} does not fit in 64 bits")
            return value, pos
        shift += 7


def decode(data: bytes | memoryview) -> dict[int, int | float | memoryview]:
    """Field number → varint value, double, or payload view (the last occurrence wins, as in
    protobuf). 32-bit fixed fields are skipped: none of ours has one."""
    buf = memoryview(data)
    fields: dict[int, int | memoryview] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            fields[number], pos = _read_varint(buf, pos)
        elif kind == _LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise WireError(f"field {number} claims {length} bytes, {len(buf) - pos} remain")
            fields[number], pos = buf[pos:pos + length], pos + length
        elif kind == _I64:
            if pos + 8 > len(buf):
                raise WireError(f"field {number} is truncated")
            fields[number], pos = _DOUBLE.unpack_from(buf, pos)[0], pos + 8
        elif kind == _I32:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {kind} for field {number}")
    if pos != len(buf):
        raise WireError("message ends inside a field")
    return fields


# ---- LookupChunk: rows = 1, row_offset = 2, dtype = 3, dim = 4 -------------------------------

def encode_lookup_chunk(rows: memoryview | bytes, row_offset: int, dtype: int, dim: int) -> bytes:
    return encode([(1, rows), (2, row_offset), (3, dtype), (4, dim)])


def decode_lookup_chunk(data: bytes) -> tuple[memoryview, int, int, int]:
    """(rows view, row_offset, dtype, dim)."""
    f = decode(data)
    return _bytes(f, 1), _int(f, 2), _int(f, 3), _int(f, 4)


# ---- UpdateChunk: table = 1, client_id = 2, seq = 3, total_rows = 4, ids = 5, grads = 6,
#      rank = 7, world_size = 8, step_timeout_ms = 9, lr = 10 (double), staging = 11 -------------

_UINT32_MAX = (1 << 32) - 1


@dataclass(frozen=True)
class UpdateChunk:
    table: str
    client_id: str
    seq: int
    total_rows: int
    ids: memoryview
    grads: memoryview
    rank: int = 0
    world_size: int = 0
    step_timeout_ms: int = 0
    lr: float | None = None  # None: unset, the table's lr
    staging: str = ""        # same-host payload: a file in the daemon's staging dir, not the chunks


def encode_update_chunk(ids: memoryview | bytes, grads: memoryview | bytes, *, table: str = "",
                        client_id: str = "", seq: int = 0, total_rows: int = 0, rank: int = 0,
                        world_size: int = 0, step_timeout_ms: int = 0, lr: float | None = None,
                        staging: str = "") -> bytes:
    return encode([(1, table), (2, client_id), (3, seq), (4, total_rows), (5, ids), (6, grads),
                   (7, rank), (8, world_size), (9, step_timeout_ms), (10, None if lr is None else float(lr)),
                   (11, staging)])


def decode_update_chunk(data: bytes) -> UpdateChunk:
    f = decode(data)
    try:
        table, client_id, staging = (bytes(_bytes(f, n)).decode() for n in (1, 2, 11))
    except UnicodeDecodeError as exc:
        raise WireError(f"UpdateChunk: table, client_id or staging is not UTF-8 ({exc})") from None
    lr = f.get(10)
    if lr is not None and not isinstance(lr, float):
        raise WireError("field 10 (lr) should be a double")
    return UpdateChunk(table, client_id, _int(f, 3), _int(f, 4), _bytes(f, 5), _bytes(f, 6),
                       _int(f, 7, _UINT32_MAX), _int(f, 8, _UINT32_MAX), _int(f, 9, _UINT32_MAX), lr, staging)


def _int(fields: dict, number: int, limit: int = _UINT64_MAX) -> int:
    value = fields.get(number, 0)
    if not isinstance(value, int):
        raise WireError(f"field {number} should be a varint")
    if value > limit:  # protobuf truncates a too-wide uint32; we refuse it
        raise WireError(f"field {number} holds {value}, more than its type's maximum {limit}")
    return value


def _bytes(fields: dict, number: int) -> memoryview:
    value = fields.get(number, memoryview(b""))
    if not isinstance(value, memoryview):
        raise WireError(f"field {number} should be length-delimited")
    return value
