"""RowwiseAdam: lazy Adam for embedding tables, with one step count per row.

Plain Adam bias-corrects with a global step, which is wrong for a table where a row may be read
once in a thousand steps: its moments are fresh but the correction assumes they are old. Here each
row r counts its own updates t_r, and only rows with a non-zero gradient move (a row read but
given an exactly zero gradient is left alone, by this optimizer and by the server alike):

    m_r = b1 m_r + (1 - b1) g_r          v_r = b2 v_r + (1 - b2) g_r^2          t_r += 1
    row_r -= lr * (m_r / (1 - b1^t_r)) / (sqrt(v_r / (1 - b2^t_r)) + eps)

This is the memstore server's `adam`, so a table trained locally and one trained on the server
follow the same trajectory. No weight decay (it would have to touch every row every step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class RowwiseAdam(torch.optim.Optimizer):
    """Lazy, per-row bias-corrected Adam over dim 0 of each parameter.

    Works with sparse gradients (`LocalTables(sparse=True)`) and dense ones; either way a row
    counts as present when any of its gradient entries is non-zero, as on the memstore server.
    Moments and steps are kept in float32 whatever the parameter dtype.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if lr < 0 or eps < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid RowwiseAdam settings lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        rows, grad = _present_rows(param.grad)  # (R,), (R, *row_shape): R distinct rows
        if rows.numel() == 0:
            return
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            state["step"] = torch.zeros(param.shape[0], dtype=torch.int64, device=param.device)
        beta1, beta2 = group["betas"]
        grad = grad.float()

        m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(grad, alpha=1 - beta1)  # (R, ...)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t = state["step"].index_select(0, rows) + 1  # (R,)
        # bias corrections per row, in float64 so that tiny 1 - beta^t keep their precision
        shape = (-1,) + (1,) * (param.dim() - 1)
        bc1 = (1 - beta1 ** t.double()).float().view(shape)
        bc2 = (1 - beta2 ** t.double()).float().view(shape)
        update = (m / bc1) / ((v / bc2).sqrt() + group["eps"])

        new_rows = param.index_select(0, rows).float() - group["lr"] * update
        param.index_copy_(0, rows, new_rows.to(param.dtype))
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        state["step"].index_copy_(0, rows, t)


def _present_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct row indices in a gradient and their (summed) gradient rows."""
    if grad.is_sparse:
        grad = grad.coalesce()  # sums duplicate rows, sorts indices
        if grad.sparse_dim() != 1:
            raise ValueError(f"RowwiseAdam needs row-sparse gradients (sparse_dim 1), got {grad.sparse_dim()}")
        values = grad.values()
        present = (values != 0).reshape(values.shape[0], -1).any(dim=1)  # (R,) read rows with a real gradient
        return grad.indices()[0][present], values[present]
    if grad.dim() == 0:
        raise ValueError("RowwiseAdam updates rows: parameters need at least one dimension")
    rows = (grad != 0).reshape(grad.shape[0], -1).any(dim=1).nonzero().squeeze(1)  # (R,)
    return rows, grad.index_select(0, rows)
