"""Row-wise optimizers (memstore.optimizers) against torch and direct formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memstore import optimizers
from memstore.spec import OptimizerSpec

NUM_ROWS, DIM, STEPS = 50, 8, 6
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch noise


def _sparse_batches(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per step: lookup ids with duplicates (as a model would produce) and their grads."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(STEPS):
        ids = rng.integers(0, NUM_ROWS, 30)
        batches.append((ids, rng.normal(size=(30, DIM)).astype(np.float32)))
    return batches


def _sum_duplicates(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the store does before a backend sees an update: sorted unique ids, summed grads."""
    unique, inverse = np.unique(ids, return_inverse=True)
    summed = np.zeros((len(unique), grads.shape[1]), np.float32)
    np.add.at(summed, inverse, grads)
    return unique, summed


def _run_ours(opt: OptimizerSpec, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    table = table.copy()
    state = optimizers.initial_state(opt, NUM_ROWS, DIM)
    for ids, grads in _sparse_batches():
        ids, grads = _sum_duplicates(ids, grads)
        rows, row_state = table[ids], state[ids]
        optimizers.step(opt, rows, row_state, grads)
        table[ids], state[ids] = rows, row_state
    return table, state


def _run_torch(make_optimizer, table: np.ndarray) -> np.ndarray:
    embedding = torch.nn.Embedding(NUM_ROWS, DIM, sparse=True)
    with torch.no_grad():
        embedding.weight.copy_(torch.from_numpy(table))
    optimizer = make_optimizer(embedding.parameters())
    for ids, grads in _sparse_batches():
        optimizer.zero_grad()
        out = embedding(torch.from_numpy(ids))          # (30, DIM)
        (out * torch.from_numpy(grads)).sum().backward()  # d/d row = grads, duplicates summed
        optimizer.step()
    return embedding.weight.detach().numpy()


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(NUM_ROWS, DIM)).astype(np.float32)


def test_sgd_matches_torch(table: np.ndarray) -> None:
    ours, state = _run_ours(OptimizerSpec("sgd", lr=0.1), table)
    theirs = _run_torch(lambda p: torch.optim.SGD(p, lr=0.1), table)
    assert state.shape == (NUM_ROWS, 0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("initial", [0.0, 0.1])
def test_adagrad_matches_torch(table: np.ndarray, initial: float) -> None:
    opt = OptimizerSpec("adagrad", lr=0.5, args={"initial_accumulator_value": initial})
    ours, state = _run_ours(opt, table)
    theirs = _run_torch(
        lambda p: torch.optim.Adagrad(p, lr=0.5, eps=1e-10, initial_accumulator_value=initial), table)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    touched = np.unique(np.concatenate([ids for ids, _ in _sparse_batches()]))
    untouched = np.setdiff1d(np.arange(NUM_ROWS), touched)
    np.testing.assert_array_equal(ours[untouched], table[untouched])
    assert np.all(state[untouched] == np.float32(initial))


def test_rowwise_adagrad_formula() -> None:
    opt = OptimizerSpec("rowwise_adagrad", lr=0.3, args={"eps": 1e-6, "initial_accumulator_value": 0.5})
    rows = np.ones((2, 4), np.float32)
    state = optimizers.initial_state(opt, 2, 4)
    grads = np.array([[1, 2, 3, 4], [0, 0, 0, 2]], np.float32)
    optimizers.step(opt, rows, state, grads)
    expected_state = 0.5 + np.array([[30 / 4], [4 / 4]], np.float32)
    np.testing.assert_allclose(state, expected_state, rtol=1e-6)
    np.testing.assert_allclose(rows, 1 - 0.3 * grads / (np.sqrt(expected_state) + 1e-6), rtol=1e-6)


def test_adam_equals_torch_adam_when_every_row_steps(table: np.ndarray) -> None:
    """With every row touched every step, per-row step counts equal the global one."""
    opt = OptimizerSpec("adam", lr=0.01)
    rng = np.random.default_rng(2)
    rows, state = table.copy(), optimizers.initial_state(opt, NUM_ROWS, DIM)
    param = torch.nn.Parameter(torch.from_numpy(table.copy()))
    torch_adam = torch.optim.Adam([param], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(STEPS):
        grads = rng.normal(size=(NUM_ROWS, DIM)).astype(np.float32)
        optimizers.step(opt, rows, state, grads)
        param.grad = torch.from_numpy(grads)
        torch_adam.step()
    np.testing.assert_allclose(rows, param.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state[:, -1], STEPS)


def test_adam_counts_steps_per_row() -> None:
    opt = OptimizerSpec("adam", lr=0.1, args={"beta1": 0.5, "beta2": 0.75, "eps": 1e-3})
    dim = 3
    rows = np.zeros((2, dim), np.float32)
    state = optimizers.initial_state(opt, 2, dim)
    assert state.shape == (2, 2 * dim + 1)
    state[1, -1] = 4  # row 1 has stepped before (with m = v = 0)
    g = np.array([[1, -2, 0.5], [1, -2, 0.5]], np.float32)
    optimizers.step(opt, rows, state, g)
    for row, t in ((0, 1), (1, 5)):
        m, v = 0.5 * g[row], 0.25 * g[row] ** 2
        expected = -0.1 * (m / (1 - 0.5**t)) / (np.sqrt(v / (1 - 0.75**t)) + 1e-3)
        np.testing.assert_allclose(rows[row], expected, rtol=1e-5)
        np.testing.assert_allclose(state[row, :dim], m, rtol=1e-6)
        np.testing.assert_allclose(state[row, dim:2 * dim], v, rtol=1e-6)
        assert state[row, -1] == t


@pytest.mark.parametrize("kind,width", [("sgd", 0), ("adagrad", 7), ("rowwise_adagrad", 1), ("adam", 15)])
def test_state_width(kind: str, width: int) -> None:
    opt = OptimizerSpec(kind)
    assert optimizers.state_width(opt, 7) == width
    assert optimizers.initial_state(opt, 3, 7).shape == (3, width)
    assert optimizers.initial_state(opt, 3, 7).dtype == np.float32
