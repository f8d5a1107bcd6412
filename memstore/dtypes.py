"""Storage dtypes. numpy has no bfloat16, so bf16 rows are stored as uint16 bit patterns.

Every backend stores rows as `storage_dtype(name)` arrays and converts with `to_float32` /
`from_float32`; the wire carries those raw little-endian bytes unchanged.
"""
from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")

_STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


def check_dtype(name: str) -> str:
    if name not in _STORAGE:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return name


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype that holds rows of `name` (bf16 → uint16 bit patterns)."""
    return _STORAGE[check_dtype(name)]


def itemsize(name: str) -> int:
    return storage_dtype(name).itemsize


def to_float32(rows: np.ndarray, name: str) -> np.ndarray:
    """Stored rows → float32 (a new array)."""
    if name == "bfloat16":
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.astype(np.float32)


def from_float32(values: np.ndarray, name: str) -> np.ndarray:
    """float32 → stored rows; bf16 rounds to nearest even like torch's `.to(torch.bfloat16)`."""
    if name == "bfloat16":
        values = np.ascontiguousarray(values, dtype=np.float32)
        bits = values.view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        out = ((bits + rounding) >> 16).astype(np.uint16)
        nan = np.isnan(values)
        if nan.any():  # rounding would carry a NaN's mantissa into the exponent (Inf, or 0 on overflow)
            out[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)  # quiet NaN, sign kept
        return out
    return values.astype(storage_dtype(name))
