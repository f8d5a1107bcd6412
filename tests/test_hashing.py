"""NgramHasher against a slow, obviously-correct transcription of DeepSeek's NgramHashMapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engram_client.config import EngramConfig
from engram_client.hashing import NgramHasher, is_prime, search_head_sizes

INT64_MAX = np.iinfo(np.int64).max


# ---- the slow reference (structure of engram_demo_v1.py, python ints and loops) -----------------
def slow_is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def slow_find_next_prime(start: int, seen: set[int]) -> int:
    candidate = start + 1
    while not (slow_is_prime(candidate) and candidate not in seen):
        candidate += 1
    return candidate


def slow_head_sizes(cfg: EngramConfig) -> dict[int, list[list[int]]]:
    seen: set[int] = set()
    out = {}
    for layer_id in cfg.layer_ids:
        per_order = []
        for n in range(2, cfg.max_ngram_size + 1):
            start, heads = cfg.engram_vocab_size[n - 2] - 1, []
            for _ in range(cfg.n_head_per_ngram):
                p = slow_find_next_prime(start, seen)
                seen.add(p)
                heads.append(p)
                start = p
            per_order.append(heads)
        out[layer_id] = per_order
    return out


def slow_hash(cfg: EngramConfig, ids: np.ndarray, vocab_size: int, pad_id: int) -> dict[int, np.ndarray]:
    """Per layer [B, T, H] with one python-int loop per token and head."""
    half_bound = max(1, (INT64_MAX // vocab_size) // 2)
    sizes = slow_head_sizes(cfg)
    B, T = ids.shape
    out = {}
    for layer_id in cfg.layer_ids:
        rng = np.random.default_rng(cfg.seed + 10007 * layer_id)
        mult = [int(r) * 2 + 1 for r in rng.integers(0, half_bound, size=cfg.max_ngram_size, dtype=np.int64)]
        res = np.zeros((B, T, cfg.num_heads), dtype=np.int64)
        for b in range(B):
            for t in range(T):
                tok = [int(ids[b, t - k]) if t - k >= 0 else pad_id for k in range(cfg.max_ngram_size)]
                head = 0
                for n in range(2, cfg.max_ngram_size + 1):
                    mix = 0
                    for k in range(n):
                        product = tok[k] * mult[k]
                        assert product <= INT64_MAX  # so python ints equal int64 arithmetic
                        mix ^= product
                    for p in sizes[layer_id][n - 2]:
                        res[b, t, head] = mix % p
                        head += 1
        out[layer_id] = res
    return out


def random_config(rng: np.random.Generator) -> tuple[EngramConfig, int]:
    n = int(rng.integers(2, 5))
    vocab_size = int(rng.choice([10, 11, 97, 1000, 50_257, 129_280, 1_000_000]))
    layer_sets = [[0], [1, 15], [3, 2, 7], [5, 6, 7, 8]]
    # Small, overlapping table targets force the global "skip primes already used" rule to matter.
    heads = int(rng.integers(1, 9))
    targets = [int(rng.choice([1, 2, 10, 12, 1000, 1003, 646_400, 2_000_003])) for _ in range(n - 1)]
    cfg = EngramConfig(
        engram_vocab_size=targets,
        max_ngram_size=n,
        n_embed_per_ngram=heads * 4,
        n_head_per_ngram=heads,
        layer_ids=layer_sets[int(rng.integers(len(layer_sets)))],
        pad_id=int(rng.integers(0, vocab_size)),
        seed=int(rng.integers(0, 2**31)),
    )
    return cfg, vocab_size


def random_ids(rng: np.random.Generator, vocab_size: int, shape=(3, 13)) -> np.ndarray:
    ids = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
    ids[0, :2] = [0, vocab_size - 1]  # the edges of the range
    return ids


# ---- bit-identity ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", range(40))
def test_matches_slow_reference_numpy_and_torch(case):
    rng = np.random.default_rng(case)
    cfg, vocab_size = random_config(rng)
    ids = random_ids(rng, vocab_size)
    hasher = NgramHasher(cfg, vocab_size=vocab_size)
    expected = slow_hash(cfg, ids, vocab_size, cfg.pad_id)

    got_np = hasher.hash(ids)
    got_torch = hasher.hash(torch.from_numpy(ids))
    assert list(got_np) == cfg.layer_ids
    for layer_id in cfg.layer_ids:
        assert isinstance(got_np[layer_id], np.ndarray) and got_np[layer_id].dtype == np.int64
        assert isinstance(got_torch[layer_id], torch.Tensor) and got_torch[layer_id].dtype == torch.int64
        np.testing.assert_array_equal(got_np[layer_id], expected[layer_id])
        np.testing.assert_array_equal(got_torch[layer_id].numpy(), expected[layer_id])
        np.testing.assert_array_equal(hasher.hash_layer(ids, layer_id), expected[layer_id])


@pytest.mark.parametrize("case", range(6))
def test_prime_search_matches_slow_search(case):
    cfg, vocab_size = random_config(np.random.default_rng(100 + case))
    assert search_head_sizes(cfg) == slow_head_sizes(cfg)
    hasher = NgramHasher(cfg, vocab_size=vocab_size)
    all_primes = [p for layer_id in cfg.layer_ids for p in hasher.head_sizes(layer_id)]
    assert len(set(all_primes)) == len(all_primes)  # one global search: no modulus reused


def test_default_config_geometry():
    cfg = EngramConfig()
    hasher = NgramHasher(cfg, vocab_size=129_280)
    assert search_head_sizes(cfg) == slow_head_sizes(cfg)
    sizes = hasher.head_sizes(1)
    assert len(sizes) == 16 and sizes[0] >= 129_280 * 5 and sizes == sorted(sizes)
    assert hasher.total_rows(1) == sum(sizes)
    np.testing.assert_array_equal(hasher.head_offsets(1), np.cumsum([0] + sizes[:-1]))


def test_is_prime_against_sieve_and_hard_cases():
    limit = 20_000
    sieve = np.ones(limit, dtype=bool)
    sieve[:2] = False
    for i in range(2, math.isqrt(limit) + 1):
        if sieve[i]:
            sieve[i * i :: i] = False
    assert [n for n in range(limit) if is_prime(n)] == list(np.flatnonzero(sieve))
    assert is_prime(2**61 - 1) and is_prime(2**31 - 1) and is_prime(1_000_003)
    # Carmichael numbers and strong pseudoprimes to several small bases.
    for composite in (561, 41041, 3_215_031_751, 3_825_123_056_546_413_051, 2**61 + 1):
        assert not is_prime(composite)


# ---- row ids -----------------------------------------------------------------------------------
def test_row_ids_add_head_offsets_and_stay_in_table():
    rng = np.random.default_rng(7)
    cfg, vocab_size = random_config(rng)
    hasher = NgramHasher(cfg, vocab_size=vocab_size)
    ids = random_ids(rng, vocab_size, (4, 50))
    for layer_id in cfg.layer_ids:
        per_head = hasher.hash_layer(ids, layer_id)
        rows = hasher.row_ids(ids, layer_id)
        np.testing.assert_array_equal(rows, per_head + hasher.head_offsets(layer_id))
        np.testing.assert_array_equal(hasher.row_ids(torch.from_numpy(ids), layer_id).numpy(), rows)
        starts = hasher.head_offsets(layer_id)
        ends = starts + np.array(hasher.head_sizes(layer_id))
        assert (rows >= starts).all() and (rows < ends).all()
        assert ends[-1] == hasher.total_rows(layer_id)


# ---- token map ---------------------------------------------------------------------------------
def test_token_map_maps_ids_and_pad_first():
    rng = np.random.default_rng(3)
    raw_vocab, cfg = 500, EngramConfig(engram_vocab_size=[1000, 2000], n_head_per_ngram=4, pad_id=17)
    token_map = rng.integers(0, 120, size=raw_vocab)
    token_map[:120] = np.arange(120)  # every compressed id is used
    hasher = NgramHasher(cfg, token_map=token_map)
    assert hasher.vocab_size == 120 and hasher.pad_id == token_map[17]
    ids = random_ids(rng, raw_vocab, (2, 9))
    expected = slow_hash(cfg, token_map[ids], 120, int(token_map[17]))
    for layer_id, got in hasher.hash(ids).items():
        np.testing.assert_array_equal(got, expected[layer_id])
    for layer_id, got in hasher.hash(torch.from_numpy(ids)).items():
        np.testing.assert_array_equal(got.numpy(), expected[layer_id])


# ---- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("bad", [-1, 100, 12345])
def test_out_of_range_ids_raise_with_value(as_torch, bad):
    hasher = NgramHasher(EngramConfig(engram_vocab_size=[50, 60]), vocab_size=100)
    ids = np.array([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=str(bad)):
        hasher.hash(torch.from_numpy(ids) if as_torch else ids)


def test_out_of_range_raw_id_with_token_map():
    hasher = NgramHasher(EngramConfig(engram_vocab_size=[50, 60]), token_map=np.arange(10) % 4)
    assert hasher.vocab_size == 4
    hasher.hash(np.array([[9, 0]]))
    with pytest.raises(ValueError, match="10"):
        hasher.hash(np.array([[10, 0]]))


def test_bad_arguments():
    cfg = EngramConfig(engram_vocab_size=[50, 60], pad_id=7)
    with pytest.raises(ValueError, match="pad_id: id 7 is outside"):
        NgramHasher(cfg, vocab_size=5)
    with pytest.raises(ValueError, match="vocab_size or token_map"):
        NgramHasher(cfg)
    hasher = NgramHasher(cfg, vocab_size=100)
    with pytest.raises(TypeError):
        hasher.hash(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        hasher.hash(np.array([1, 2]))
    with pytest.raises(KeyError):
        hasher.row_ids(np.array([[1, 2]]), layer_id=99)


def test_integer_dtypes_and_lists_are_accepted():
    hasher = NgramHasher(EngramConfig(engram_vocab_size=[50, 60]), vocab_size=100)
    ids = np.array([[5, 6, 7, 99]])
    ref = hasher.hash_layer(ids, 1)
    np.testing.assert_array_equal(hasher.hash_layer(ids.astype(np.int32), 1), ref)
    np.testing.assert_array_equal(hasher.hash_layer(ids.tolist(), 1), ref)
    np.testing.assert_array_equal(hasher.hash_layer(torch.tensor(ids, dtype=torch.int32), 1).numpy(), ref)
    assert hasher.hash_layer(np.zeros((2, 0), dtype=np.int64), 1).shape == (2, 0, 16)


# ---- history (incremental decoding) and document resets ----------------------------------------
@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_history_continues_the_sequence(as_torch, n):
    cfg = EngramConfig(engram_vocab_size=[300] * (n - 1), max_ngram_size=n, n_head_per_ngram=2, pad_id=3)
    hasher = NgramHasher(cfg, vocab_size=40)
    ids = np.random.default_rng(n).integers(0, 40, size=(2, 12))
    full = hasher.row_ids(ids, 1)
    padded = np.concatenate([np.full((2, n - 1), cfg.pad_id), ids], axis=1)
    for start in range(ids.shape[1]):
        history, chunk = padded[:, start : start + n - 1], ids[:, start : start + 3]
        if as_torch:
            history, chunk = torch.from_numpy(history), torch.from_numpy(chunk)
        got = hasher.row_ids(chunk, 1, history=history)
        got = got.numpy() if as_torch else got
        np.testing.assert_array_equal(got, full[:, start : start + 3])


@pytest.mark.parametrize("as_torch", [False, True])
def test_doc_separator_restarts_the_window(as_torch):
    sep = 9
    cfg = EngramConfig(engram_vocab_size=[300, 400, 500], max_ngram_size=4, n_head_per_ngram=2, doc_sep_id=sep)
    plain = NgramHasher(EngramConfig(**{**cfg.__dict__, "doc_sep_id": None}), vocab_size=20)
    hasher = NgramHasher(cfg, vocab_size=20)
    ids = np.array([[1, 2, 3, sep, 4, 5, sep, sep, 6, 7, 8, 1, 2], [sep, 1, 2, 3, 4, 5, 6, 7, sep, 8, 1, 2, 3]])
    got = hasher.row_ids(torch.from_numpy(ids) if as_torch else ids, 1)
    got = got.numpy() if as_torch else got
    for b in range(2):  # each document (starting at a separator) hashes as if it were alone
        starts = [0] + [t for t in range(ids.shape[1]) if ids[b, t] == sep]
        for s, e in zip(starts, starts[1:] + [ids.shape[1]]):
            alone = plain.row_ids(ids[b : b + 1, s:e], 1)
            np.testing.assert_array_equal(got[b : b + 1, s:e], alone)
    # ... and token-by-token with history gives the same rows
    padded = np.concatenate([np.full((2, 3), cfg.pad_id), ids], axis=1)
    for t in range(ids.shape[1]):
        step = hasher.row_ids(ids[:, t : t + 1], 1, history=padded[:, t : t + 3])
        np.testing.assert_array_equal(step, got[:, t : t + 1])


def test_without_separator_setting_nothing_resets():
    cfg = EngramConfig(engram_vocab_size=[300, 400], n_head_per_ngram=2)
    hasher = NgramHasher(cfg, vocab_size=20)
    ids = np.array([[1, 2, 9, 4, 5]])
    np.testing.assert_array_equal(hasher.hash_layer(ids, 1), slow_hash(cfg, ids, 20, cfg.pad_id)[1])
