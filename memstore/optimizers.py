"""Row-wise optimizers: one vectorised numpy step over a batch of rows and their state.

A backend gathers the touched rows (as float32) and their optimizer state, calls `step`, and
writes both back together. State is float32, `state_width(opt, dim)` columns per row, laid out:

    sgd              width 0
    adagrad          width dim        [sum of g² per element]
    rowwise_adagrad  width 1          [sum of mean(g²) per row]
    adam             width 2*dim + 1  [m (dim) | v (dim) | t (1)]

Adagrad matches torch.optim.Adagrad (lr_decay=0, weight_decay=0): state += g²;
row -= lr * g / (sqrt(state) + eps). Adam is the lazy, row-wise variant: each row counts its own
steps `t` for the bias correction, so a row that is touched rarely is not over-corrected (the
per-row count is float32: exact up to 2^24 steps, after which the correction is 1 anyway).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from memstore.spec import OptimizerSpec


def state_width(opt: OptimizerSpec, dim: int) -> int:
    """float32 columns of optimizer state per row."""
    return {"sgd": 0, "adagrad": dim, "rowwise_adagrad": 1, "adam": 2 * dim + 1}[opt.kind]


def initial_state(opt: OptimizerSpec, n: int, dim: int) -> np.ndarray:
    """State of `n` rows never updated → float32 [n, state_width]."""
    width = state_width(opt, dim)
    if opt.kind in ("adagrad", "rowwise_adagrad"):
        return np.full((n, width), opt.arg("initial_accumulator_value"), np.float32)
    return np.zeros((n, width), np.float32)


def step(opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray, grads: np.ndarray,
         lr: float | None = None) -> None:
    """One optimizer step, in place on rows (float32 [n, dim]) and state (float32 [n, width]).

    `grads` is float32 [n, dim], one (already summed) gradient per row; rows are distinct.
    `lr` overrides the table's learning rate for this step (a trainer's lr schedule).
    """
    if lr is not None and lr != opt.lr:
        opt = replace(opt, lr=lr)
    _STEPS[opt.kind](opt, rows, state, grads)


# Each step reuses one scratch buffer (out=): a 64k x 64 batch is 16 MiB per temporary, and
# fresh temporaries cost page faults that rival the arithmetic.

def _sgd(opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray, grads: np.ndarray) -> None:
    scaled = np.multiply(grads, np.float32(opt.lr))
    rows -= scaled


def _scaled_step(opt: OptimizerSpec, rows: np.ndarray, numer: np.ndarray, denom: np.ndarray,
                 eps: float) -> None:
    """rows -= lr * numer / (denom + eps), in place; `denom` is scratch (overwritten)."""
    denom += np.float32(eps)
    np.divide(numer, denom, out=denom)
    denom *= np.float32(opt.lr)
    rows -= denom


def _adagrad(opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray, grads: np.ndarray) -> None:
    scratch = np.multiply(grads, grads)                     # (n, dim) g²
    state += scratch
    np.sqrt(state, out=scratch)
    _scaled_step(opt, rows, grads, scratch, opt.arg("eps"))


def _rowwise_adagrad(opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray,
                     grads: np.ndarray) -> None:
    state += np.einsum("ij,ij->i", grads, grads)[:, None] / np.float32(grads.shape[1])  # (n, 1) mean g²
    denom = np.sqrt(state)                                  # (n, 1), broadcast over dim
    denom += np.float32(opt.arg("eps"))
    scratch = np.divide(grads, denom)                       # (n, dim)
    scratch *= np.float32(opt.lr)
    rows -= scratch


def _adam(opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray, grads: np.ndarray) -> None:
    dim = rows.shape[1]
    b1, b2 = np.float32(opt.arg("beta1")), np.float32(opt.arg("beta2"))
    m, v, t = state[:, :dim], state[:, dim:2 * dim], state[:, 2 * dim:]  # views: (n,dim) (n,dim) (n,1)
    scratch = np.multiply(grads, 1 - b1)                    # (n, dim)
    m *= b1
    m += scratch
    np.multiply(grads, grads, out=scratch)
    scratch *= 1 - b2
    v *= b2
    v += scratch
    t += 1
    bias1 = 1 - np.power(b1, t)                             # (n, 1)
    bias2 = 1 - np.power(b2, t)
    np.divide(v, bias2, out=scratch)
    np.sqrt(scratch, out=scratch)
    numer = np.divide(m, bias1)                             # (n, dim) bias-corrected m
    _scaled_step(opt, rows, numer, scratch, opt.arg("eps"))


_STEPS = {"sgd": _sgd, "adagrad": _adagrad, "rowwise_adagrad": _rowwise_adagrad, "adam": _adam}
