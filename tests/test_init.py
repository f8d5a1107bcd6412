"""Deterministic row initialisation (memstore.init)."""
from __future__ import annotations

import numpy as np
import pytest

from memstore.init import init_rows
from memstore.spec import InitSpec


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_a_row_does_not_depend_on_its_batch(kind: str) -> None:
    spec = InitSpec(kind, scale=0.5, seed=3)
    ids = np.array([5, 10**11 - 1, 0, 5, 2**40 + 7], dtype=np.int64)
    batch = init_rows(spec, ids, 37)                                   # (5, 37), odd dim
    one_by_one = np.concatenate([init_rows(spec, ids[i:i + 1], 37) for i in range(len(ids))])
    reversed_batch = init_rows(spec, ids[::-1], 37)[::-1]
    np.testing.assert_array_equal(batch, one_by_one)
    np.testing.assert_array_equal(batch, reversed_batch)
    np.testing.assert_array_equal(batch[0], batch[3])                  # duplicates agree


def test_columns_do_not_depend_on_dim() -> None:
    spec = InitSpec("normal", 1.0, seed=11)
    ids = np.arange(100, dtype=np.int64)
    np.testing.assert_array_equal(init_rows(spec, ids, 64)[:, :9], init_rows(spec, ids, 9))


def test_large_batches_match_small_ones() -> None:
    """Chunking inside init_rows must not change any value."""
    spec = InitSpec("normal", 0.02, seed=1)
    ids = np.random.default_rng(0).integers(0, 10**11, 70_000)
    rows = init_rows(spec, ids, 8)
    pick = np.array([0, 1, 40_000, 69_999])
    np.testing.assert_array_equal(rows[pick], init_rows(spec, ids[pick], 8))


def test_seed_and_row_change_the_values() -> None:
    ids = np.arange(4, dtype=np.int64)
    a = init_rows(InitSpec("normal", 1.0, seed=0), ids, 16)
    b = init_rows(InitSpec("normal", 1.0, seed=1), ids, 16)
    assert not np.any(a == b)
    assert len({row.tobytes() for row in a}) == 4


def test_normal_statistics() -> None:
    ids = np.arange(20_000, dtype=np.int64) * 7919
    rows = init_rows(InitSpec("normal", 0.02, seed=5), ids, 64).ravel()  # 1.28M samples
    assert abs(rows.mean()) < 1e-4
    assert rows.std() == pytest.approx(0.02, rel=5e-3)
    assert np.mean(np.abs(rows) < 0.02) == pytest.approx(0.6827, abs=3e-3)  # within 1 sigma
    # Neighbouring columns (the two halves of one Box-Muller pair) are uncorrelated.
    pairs = rows.reshape(-1, 2)
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 5e-3


def test_uniform_statistics() -> None:
    ids = np.arange(20_000, dtype=np.int64)
    rows = init_rows(InitSpec("uniform", 0.1, seed=5), ids, 64).ravel()
    assert rows.min() >= -0.1 and rows.max() < 0.1
    assert rows.std() == pytest.approx(0.1 / np.sqrt(3), rel=5e-3)
    counts, _ = np.histogram(rows, bins=10, range=(-0.1, 0.1))
    assert counts.min() > 0.97 * counts.mean()


def test_zeros_and_empty() -> None:
    ids = np.array([1, 2], dtype=np.int64)
    np.testing.assert_array_equal(init_rows(InitSpec("zeros"), ids, 3), np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(init_rows(InitSpec("normal", 0.0), ids, 3), np.zeros((2, 3)))
    out = init_rows(InitSpec("normal"), np.zeros(0, np.int64), 5)
    assert out.shape == (0, 5) and out.dtype == np.float32


def test_output_is_contiguous_float32() -> None:
    out = init_rows(InitSpec("normal"), np.arange(3), 5)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (3, 5)
    assert np.all(np.isfinite(out))
