"""Multi-head n-gram hashing, bit-identical to DeepSeek's reference `NgramHashMapping`.

For a layer with multipliers m[0..N-1] (odd, drawn once per layer) and the token x[t-k] k steps
back (left-padded with `pad_id`), the n-gram ending at t is mixed as

    mix_n[t] = (x[t] * m[0]) ^ (x[t-1] * m[1]) ^ ... ^ (x[t-n+1] * m[n-1])      (int64)

and head j of order n reads row `mix_n[t] % p_{n,j}` of its own table, p_{n,j} a distinct prime.
Heads are laid out order-major: H = (N-1) * K heads, the 2-gram heads first. All heads of a layer
share one table of `total_rows(layer_id)` rows; head j starts at `head_offsets(layer_id)[j]`.

numpy in -> numpy out; torch in -> torch out on the input's device (a GPU job hashes on the GPU).
The int64 products cannot overflow: multipliers are < int64_max // vocab_size and ids are checked
to lie in [0, vocab_size), which is why out-of-range ids raise instead of wrapping around.
"""

from __future__ import annotations

import numpy as np
import torch

from engram_client.config import EngramConfig

Array = np.ndarray | torch.Tensor

_LAYER_SEED_STRIDE = 10007  # the reference's PRIME_1: per-layer seed = seed + 10007 * layer_id
# Miller-Rabin with these bases is deterministic for every n < 3.3e24 (covers all int64 sizes).
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Deterministic primality test for n < 3.3e24 (no sympy needed)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def search_head_sizes(config: EngramConfig) -> dict[int, list[list[int]]]:
    """The reference's global prime search: layer -> order -> K distinct primes.

    Within an order the search starts at engram_vocab_size (primes >= it) and each head takes the
    next prime above the previous head's; a prime already taken by any earlier layer/order/head is
    skipped, so no two heads anywhere share a modulus.
    """
    taken: set[int] = set()
    sizes: dict[int, list[list[int]]] = {}
    for layer_id in config.layer_ids:
        per_order = []
        for target in config.engram_vocab_size:
            heads, candidate = [], target - 1
            for _ in range(config.n_head_per_ngram):
                candidate += 1
                while candidate in taken or not is_prime(candidate):
                    candidate += 1
                taken.add(candidate)
                heads.append(candidate)
            per_order.append(heads)
        sizes[layer_id] = per_order
    return sizes


def layer_multipliers(config: EngramConfig, vocab_size: int, layer_id: int) -> np.ndarray:
    """Odd int64 multipliers m[0..N-1] of one layer, small enough that (vocab_size-1)*m fits int64."""
    half_bound = max(1, (np.iinfo(np.int64).max // vocab_size) // 2)
    rng = np.random.default_rng(config.seed + _LAYER_SEED_STRIDE * layer_id)
    r = rng.integers(0, half_bound, size=(config.max_ngram_size,), dtype=np.int64)
    return r * 2 + 1


class NgramHasher:
    """Maps token ids [B, T] to per-head table rows [B, T, H] for every Engram layer.

    Args:
        config: the Engram config (orders, heads, layers, pad id, seed).
        vocab_size: size of the hashed token space (ids must lie in [0, vocab_size)). With a
            `token_map` it defaults to `token_map.max() + 1`.
        token_map: optional int64 array raw id -> compressed id (see `compression.py`); raw ids
            (and `pad_id`) are mapped through it before hashing, like the reference does.
    """

    def __init__(
        self,
        config: EngramConfig,
        vocab_size: int | None = None,
        token_map: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        self.config = config
        self.token_map = None if token_map is None else _as_int64_numpy(token_map).reshape(-1)
        if vocab_size is None:
            if self.token_map is None:
                raise ValueError("NgramHasher needs vocab_size or token_map")
            vocab_size = int(self.token_map.max()) + 1
        self.vocab_size = int(vocab_size)
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        # Raw ids are checked against this bound; with a map, its length is the raw vocabulary.
        self.input_vocab_size = self.vocab_size if self.token_map is None else len(self.token_map)
        if self.token_map is not None:
            lo, hi = int(self.token_map.min()), int(self.token_map.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token_map values must lie in [0, {self.vocab_size}), got [{lo}, {hi}]")
        self.pad_id = int(self._map(self._checked(np.array([config.pad_id]), "pad_id"))[0])

        self.layer_ids = list(config.layer_ids)
        self.num_heads = config.num_heads
        self._multipliers = {i: layer_multipliers(config, self.vocab_size, i) for i in self.layer_ids}
        primes = search_head_sizes(config)
        self._primes = {i: np.array(p, dtype=np.int64) for i, p in primes.items()}  # (N-1, K)
        self._offsets = {}
        for i, p in self._primes.items():
            sizes = p.reshape(-1)
            self._offsets[i] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)  # (H,)
        self._device_cache: dict[tuple, torch.Tensor] = {}

    # ---- table geometry -------------------------------------------------------------------
    def multipliers(self, layer_id: int) -> np.ndarray:
        """The layer's int64 multipliers m[0..N-1]."""
        return self._multipliers[self._check_layer(layer_id)].copy()

    def head_sizes(self, layer_id: int) -> list[int]:
        """The H prime table sizes of a layer, in head order (order-major)."""
        return [int(p) for p in self._primes[self._check_layer(layer_id)].reshape(-1)]

    def head_offsets(self, layer_id: int) -> np.ndarray:
        """int64 [H]: first row of each head inside the layer's single table."""
        return self._offsets[self._check_layer(layer_id)].copy()

    def total_rows(self, layer_id: int) -> int:
        """Rows of the layer's table: the sum of its head sizes."""
        return int(self._primes[self._check_layer(layer_id)].sum())

    # ---- hashing --------------------------------------------------------------------------
    def hash(self, input_ids: Array, *, history: Array | None = None) -> dict[int, Array]:
        """Per-head indices for every layer: {layer_id: int64 [B, T, H]}, WITHOUT head offsets.

        `history` ([B, N-1] raw ids that precede `input_ids`) replaces the left padding; it is how
        incremental decoding hashes one new token with the same result as the full sequence.
        """
        shifts = self._shifted_tokens(input_ids, history)
        return {i: self._hash_layer(shifts, i, with_offsets=False) for i in self.layer_ids}

    def hash_layer(self, input_ids: Array, layer_id: int, *, history: Array | None = None) -> Array:
        """One layer's per-head indices, int64 [B, T, H] (no head offsets)."""
        shifts = self._shifted_tokens(input_ids, history)
        return self._hash_layer(shifts, self._check_layer(layer_id), with_offsets=False)

    def row_ids(self, input_ids: Array, layer_id: int, *, history: Array | None = None) -> Array:
        """Global rows in the layer's table, int64 [B, T, H]: per-head index + head offset."""
        shifts = self._shifted_tokens(input_ids, history)
        return self._hash_layer(shifts, self._check_layer(layer_id), with_offsets=True)

    def ngram_tokens(self, input_ids: Array, *, history: Array | None = None) -> list[Array]:
        """The hashed tokens: `[x_t, x_{t-1}, ..., x_{t-N+1}]`, each [B, T], compressed, padded
        before the start (and reset at separators): the n-gram of order n at t is the first n."""
        return self._shifted_tokens(input_ids, history)

    def compress(self, input_ids: Array) -> Array:
        """Validate raw ids and map them through `token_map` (identity without one)."""
        return self._map(self._checked(_as_int64(input_ids), "input_ids"))

    # ---- internals ------------------------------------------------------------------------
    def _check_layer(self, layer_id: int) -> int:
        if layer_id not in self._multipliers:
            raise KeyError(f"layer {layer_id} has no Engram block (layer_ids={self.layer_ids})")
        return layer_id

    def _checked(self, ids: Array, what: str) -> Array:
        """Raise ValueError naming the first out-of-range value (one device sync for tensors)."""
        if (ids.size if isinstance(ids, np.ndarray) else ids.numel()) == 0:
            return ids
        if isinstance(ids, torch.Tensor):
            lo, hi = torch.stack(torch.aminmax(ids)).tolist()
        else:
            lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.input_vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what}: id {bad} is outside the token space [0, {self.input_vocab_size})")
        return ids

    def _map(self, ids: Array) -> Array:
        if self.token_map is None:
            return ids
        if isinstance(ids, np.ndarray):
            return self.token_map[ids]
        return self._on_device("token_map", self.token_map, ids.device)[ids]

    def _on_device(self, name: str, value: np.ndarray, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._device_cache:
            self._device_cache[key] = torch.as_tensor(value, device=device)
        return self._device_cache[key]

    def _shifted_tokens(self, input_ids: Array, history: Array | None) -> list[Array]:
        """shifts[k][b, t] = compressed token at t-k (pad before the start), k = 0..N-1."""
        raw = _as_int64(input_ids)
        if raw.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(raw.shape)}")
        ops = _ops(raw)
        B, T = raw.shape
        ctx_len = self.config.max_ngram_size - 1
        if history is None:
            ctx_raw = None
            ctx = ops.full(raw, (B, ctx_len), self.pad_id)
        else:
            ctx_raw = _as_int64(history)
            if tuple(ctx_raw.shape) != (B, ctx_len) or type(ctx_raw) is not type(raw):
                raise ValueError(f"history must be a {type(raw).__name__} of shape {(B, ctx_len)}")
            ctx = self.compress(ctx_raw)
        full = ops.cat([ctx, self.compress(raw)])  # (B, N-1+T)
        shifts = [full[:, ctx_len - k : ctx_len - k + T] for k in range(ctx_len + 1)]  # each (B, T)
        if self.config.doc_sep_id is not None:
            shifts = self._reset_at_separators(shifts, raw, ctx_raw, ops)
        return shifts

    def _reset_at_separators(self, shifts: list[Array], raw: Array, ctx_raw: Array | None, ops) -> list[Array]:
        """Replace tokens before the latest separator at or before t by pad (window restart)."""
        B, T = raw.shape
        ctx_len = len(shifts) - 1
        sep = self.config.doc_sep_id
        ctx_is_sep = ops.full(raw, (B, ctx_len), 0) if ctx_raw is None else (ctx_raw == sep)
        is_sep = ops.cat([ops.astype_int(ctx_is_sep), ops.astype_int(raw == sep)])  # (B, N-1+T)
        pos = ops.arange(raw, ctx_len + T)
        none = -(ctx_len + T + 1)  # "no separator yet": distance larger than any window
        last_sep = ops.cummax(ops.where(is_sep > 0, pos, none))
        since_sep = (pos - last_sep)[:, ctx_len:]  # (B, T): steps since the latest separator
        return [shifts[0]] + [ops.where(since_sep < k, self.pad_id, s) for k, s in enumerate(shifts) if k > 0]

    def _hash_layer(self, shifts: list[Array], layer_id: int, *, with_offsets: bool) -> Array:
        m = [int(v) for v in self._multipliers[layer_id]]
        ops = _ops(shifts[0])
        mix = shifts[0] * m[0]  # (B, T)
        mixes = []
        for k in range(1, len(shifts)):
            mix = mix ^ (shifts[k] * m[k])
            mixes.append(mix)  # mix of order k+1
        primes = self._primes[layer_id]  # (N-1, K)
        if isinstance(mix, torch.Tensor):
            primes = self._on_device(f"primes{layer_id}", primes, mix.device)
        B, T = mix.shape
        idx = ops.stack_last(mixes)[..., None] % primes  # (B, T, N-1, K): mix >= 0, so % == mod
        idx = idx.reshape(B, T, self.num_heads)  # (B, T, H), order-major
        if with_offsets:
            offsets = self._offsets[layer_id]
            if isinstance(idx, torch.Tensor):
                offsets = self._on_device(f"offsets{layer_id}", offsets, idx.device)
            idx += offsets  # in place: avoids another (B, T, H) allocation
        return idx


def _as_int64_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(np.int64, copy=False)


def _as_int64(ids) -> Array:
    """numpy/torch stay what they are (as int64); anything else (lists) becomes numpy."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        return ids.long()
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"input_ids contains {int(arr.max())}, outside the int64 range")
    return arr.astype(np.int64, copy=False)


class _NumpyOps:
    full = staticmethod(lambda like, shape, v: np.full(shape, v, dtype=np.int64))
    cat = staticmethod(lambda arrays: np.concatenate(arrays, axis=1))
    stack_last = staticmethod(lambda arrays: np.stack(arrays, axis=-1))
    where = staticmethod(np.where)
    arange = staticmethod(lambda like, n: np.arange(n, dtype=np.int64))
    cummax = staticmethod(lambda a: np.maximum.accumulate(a, axis=1))
    astype_int = staticmethod(lambda a: np.asarray(a, dtype=np.int64))


class _TorchOps:
    full = staticmethod(lambda like, shape, v: torch.full(shape, v, dtype=torch.int64, device=like.device))
    cat = staticmethod(lambda tensors: torch.cat(tensors, dim=1))
    stack_last = staticmethod(lambda tensors: torch.stack(tensors, dim=-1))
    arange = staticmethod(lambda like, n: torch.arange(n, dtype=torch.int64, device=like.device))
    cummax = staticmethod(lambda a: torch.cummax(a, dim=1).values)
    astype_int = staticmethod(lambda a: a.long())
    where = staticmethod(torch.where)


def _ops(like: Array):
    return _TorchOps if isinstance(like, torch.Tensor) else _NumpyOps
