"""Deterministic row initialisation: the value of row `id` is a pure function of (seed, id, column).

Tables are created lazily, so the initial value of a row must not depend on when, where or in
which batch it is first read: every shard, every restart and every backend has to agree. A
counter-based generator gives exactly that without storing anything: each element hashes its
coordinates with splitmix64 (Steele et al., "Fast splittable pseudorandom number generators",
2014), in vectorised uint64 numpy arithmetic.

    row_key[i]     = mix(mix(seed) ^ id[i] * GOLDEN)                    # (n,)
    bits[i, j]     = mix(row_key[i] + (j + 1) * GOLDEN)                 # (n, ceil(dim/2))
    two uniforms   = the high and low 32-bit halves of bits[i, j]
    normal         = Box-Muller on the two uniforms → columns 2j and 2j+1
    uniform        = each half on its own → columns 2j and 2j+1

So column c of a row is the same whatever the table's dim. The integer part is exact everywhere;
the float32 transcendentals (log, sin, cos) come from numpy's SIMD kernels, so values are
bit-identical for one numpy build and CPU family and agree to within an ulp across others.
"""
from __future__ import annotations

import numpy as np

from memstore import dtypes
from memstore.spec import InitSpec, TableSpec

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / phi, splitmix64's stream increment
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_S40, _S8 = np.uint64(40), np.uint64(8)
_LOW24 = np.uint64(0xFFFFFF)
_TWO_POW_M24 = np.float32(2.0**-24)
_TWO_PI = np.float32(2.0 * np.pi)
_CHUNK_ELEMENTS = 1 << 15  # hash pairs per chunk: 256 KiB of uint64 temporaries stay in L2


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (wrapping arithmetic)."""
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def row_keys(seed: int, ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per row id: (seed, id) → uint64 (n,)."""
    seed_key = _mix(np.array([seed], dtype=np.uint64))
    keys = ids.astype(np.uint64) * GOLDEN  # (n,) wrapping multiply spreads consecutive ids
    keys ^= seed_key
    return _mix(keys)


def _uniform_halves(bits: np.ndarray, high_out: np.ndarray, low_out: np.ndarray) -> None:
    """Two uniforms in [0, 1) per 64-bit hash: the top 24 bits of each 32-bit half, as float32.

    24-bit integers are exact in float32, so the conversion itself is exact on every platform."""
    np.copyto(high_out, bits >> _S40, casting="unsafe")
    high_out *= _TWO_POW_M24
    np.copyto(low_out, (bits >> _S8) & _LOW24, casting="unsafe")
    low_out *= _TWO_POW_M24


def _fill_chunk(kind: str, keys: np.ndarray, pairs: int, out: np.ndarray) -> None:
    """Fill out (n, 2*pairs) float32 with unit-scale values for rows with these keys."""
    n = keys.shape[0]
    columns = np.arange(1, pairs + 1, dtype=np.uint64) * GOLDEN  # (P,)
    bits = _mix(keys[:, None] + columns[None, :])                # (n, P)
    halves = out.reshape(n, pairs, 2)                             # views of even / odd columns
    u_even = np.empty((n, pairs), np.float32)
    u_odd = np.empty((n, pairs), np.float32)
    _uniform_halves(bits, u_even, u_odd)
    if kind == "uniform":
        # [0, 1) → [-1, 1)
        np.multiply(u_even, 2, out=halves[..., 0])
        halves[..., 0] -= 1
        np.multiply(u_odd, 2, out=halves[..., 1])
        halves[..., 1] -= 1
        return
    # Box-Muller: radius from u_even (shifted into (0, 1] so log is finite), angle from u_odd.
    u_even += _TWO_POW_M24
    radius = np.log(u_even, out=u_even)
    radius *= -2
    np.sqrt(radius, out=radius)
    angle = np.multiply(u_odd, _TWO_PI, out=u_odd)
    np.cos(angle, out=halves[..., 0])
    halves[..., 0] *= radius
    np.sin(angle, out=halves[..., 1])
    halves[..., 1] *= radius


def init_rows(init: InitSpec, ids: np.ndarray, dim: int) -> np.ndarray:
    """Initial values of rows `ids` (int64 [n], any order, duplicates allowed) → float32 [n, dim].

    zeros → 0; normal → N(0, scale²); uniform → U(-scale, scale). Deterministic per (seed, id, column).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = ids.shape[0]
    if init.kind == "zeros" or init.scale == 0.0 or n == 0:
        return np.zeros((n, dim), np.float32)
    pairs = (dim + 1) // 2
    padded = np.empty((n, 2 * pairs), np.float32)  # (n, dim rounded up to even)
    keys = row_keys(init.seed, ids)
    step = max(1, _CHUNK_ELEMENTS // pairs)
    for start in range(0, n, step):  # chunks keep the uint64 temporaries cache-resident
        _fill_chunk(init.kind, keys[start:start + step], pairs, padded[start:start + step])
    padded *= np.float32(init.scale)
    if padded.shape[1] == dim:
        return padded
    return np.ascontiguousarray(padded[:, :dim])


def initial_stored(spec: TableSpec, local_ids: np.ndarray) -> np.ndarray:
    """Initial rows of this shard's `local_ids` in the table's storage dtype: what a lookup
    returns for a row never written, and what an update starts from."""
    return dtypes.from_float32(init_rows(spec.init, spec.to_global(local_ids), spec.dim), spec.dtype)
